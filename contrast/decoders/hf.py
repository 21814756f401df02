"""Any Hugging Face ``AutoModelForCausalLM`` (Llama, Qwen2, GPT-2, SmolLM2, ...) behind the
:class:`~contrast.decoders.base.LanguageModel` interface.

The model runs through its own base model (``model.base_model``: final hidden states, normed) and its own output
embedding (the LM head), so a loss can run the head on the answer positions only. Position ids always come from the
attention mask, so left-padded prompts generate as right-padded ones would. The per-layer hook is a forward
pre-hook on each decoder layer: the module tree and the state-dict names stay the model's own (an export writes them
unchanged), and the hook runs outside a layer's activation checkpoint.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from contrast.decoders.base import LanguageModel, LayerHook, positions_of
from contrast.errors import UserError


class DecoderError(UserError, ValueError):
    """A language model that cannot serve as a decoder here (the message names why and the fix)."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a Hugging Face causal LM: the base model's ModuleList with one entry per
    hidden layer (``model.layers`` in Llama / Qwen2, ``h`` in GPT-2)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for child in model.base_model.children():
        if isinstance(child, nn.ModuleList) and (n is None or len(child) == n):
            return child
    raise DecoderError(f"cannot find the decoder layers of {type(model).__name__} (no layer list of "
                       f"{n} entries in its base model); the cross-attention bridge needs them")


class HFLanguageModel(LanguageModel):
    """A transformers causal LM; ``eos_token_ids`` from its generation config / config / tokenizer."""

    def __init__(self, model: nn.Module, eos_token_ids: tuple[int, ...] = ()):
        super().__init__()
        self.hf = model
        emb = model.get_input_embeddings()
        self.width = int(emb.embedding_dim)
        self.vocab_size = int(emb.num_embeddings)
        self.num_layers = int(model.config.num_hidden_layers)
        self.num_heads = int(getattr(model.config, "num_attention_heads", 1))
        self.eos_token_ids = tuple(eos_token_ids) or _eos_of(model)
        params = inspect.signature(model.base_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._hook: LayerHook | None = None
        for i, layer in enumerate(decoder_layers(model)):
            layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True)

    def _pre_hook(self, i: int):
        def run(module: nn.Module, args: tuple, kwargs: dict):
            if self._hook is None:
                return None
            if args:
                return (self._hook(i, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self._hook(i, kwargs["hidden_states"])}
        return run

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf.get_input_embeddings()(input_ids)

    def hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               layer_hook: LayerHook | None = None, cache: Any = None, use_cache: bool = False
               ) -> tuple[torch.Tensor, Any]:
        B, L = inputs_embeds.shape[:2]
        if attention_mask is None:
            past = 0 if cache is None else int(cache.get_seq_length())
            attention_mask = torch.ones(B, past + L, dtype=torch.long, device=inputs_embeds.device)
        self._hook = layer_hook  # set on every call (None included): a stale hook never runs
        out = self.hf.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask.long(),
                                 position_ids=positions_of(attention_mask, L), use_cache=use_cache or cache is not None,
                                 **{self._cache_kw: cache})
        new_cache = getattr(out, "cache", None) if self._cache_kw == "cache" else getattr(out, "past_key_values", None)
        return out.last_hidden_state, new_cache

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.hf.get_output_embeddings()(hidden)

    def reorder_cache(self, cache: Any, rows: torch.Tensor) -> Any:
        cache.reorder_cache(rows)
        return cache

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        newer = hasattr(self.hf, "activation_checkpointing_enable")  # transformers 5 renamed the methods
        if enable and newer:
            self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif enable:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            (self.hf.activation_checkpointing_disable if newer else self.hf.gradient_checkpointing_disable)()


def _eos_of(model: nn.Module) -> tuple[int, ...]:
    ids: list[int] = []
    for cfg in (getattr(model, "generation_config", None), model.config):
        e = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        ids += e if isinstance(e, list | tuple) else ([e] if e is not None else [])
    return tuple(dict.fromkeys(int(i) for i in ids))
