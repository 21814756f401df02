"""Decoders: the language models that consume a vision tower, behind one interface
(:class:`~contrast.decoders.base.LanguageModel`), and the prompts they read (:mod:`contrast.decoders.prompts`).

- ``own``: the project's small causal LM over open_clip BPE ids (fast tests, the demo);
- ``hf``: any Hugging Face ``AutoModelForCausalLM`` read from a local folder (or built from a config), with its own
  tokenizer and chat template.
"""

from contrast.decoders.base import LanguageModel, LayerHook, positions_of
from contrast.decoders.hf import DecoderError, HFLanguageModel, decoder_layers
from contrast.decoders.own import CausalLM
from contrast.decoders.prompts import BPECodec, Codec, HFCodec, PromptError, PromptTokenizer

__all__ = [
    "BPECodec", "CausalLM", "Codec", "DecoderError", "HFCodec", "HFLanguageModel", "LanguageModel", "LayerHook",
    "PromptError", "PromptTokenizer", "decoder_layers", "positions_of",
]
