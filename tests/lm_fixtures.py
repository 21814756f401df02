"""Tiny Hugging Face causal LMs and tokenizers made on the spot: no download, a few milliseconds each.

The tokenizer is a byte-level BPE trained on a few sentences, with ChatML's turn markers as special tokens and, when
asked, a ChatML chat template (the template SmolLM2 and Qwen ship, written here as a Jinja string).
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "a red circle", "two blue squares", "a green triangle and a yellow star", "describe this image.",
    "the capital of france is paris", "what is in the picture", "a small purple heart beside a big orange moon",
    "<image> user assistant system", "one two three four five six seven eight nine ten",
]

ARCHS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128),
}


def make_tokenizer(folder: Path, chat: bool = True, bos: bool = False) -> Path:
    """A byte-level BPE tokenizer saved to ``folder`` (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>" if chat else "<|endoftext|>",
                                   bos_token="<|endoftext|>" if bos else None, pad_token="<|endoftext|>")
    if chat:
        fast.chat_template = CHATML
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


def hf_config(arch: str, vocab_size: int = 320) -> dict:
    """``model.*.decoder.hf_config`` of a tiny random LM of architecture ``arch``."""
    return {**ARCHS[arch], "vocab_size": vocab_size}


def tiny_hf_folder(folder: Path, arch: str = "llama", chat: bool = True, seed: int = 0) -> Path:
    """A saved tiny random causal LM with its tokenizer: what a user's local model folder looks like."""
    import torch
    import transformers

    make_tokenizer(folder, chat=chat)
    kwargs = hf_config(arch)
    cfg = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(folder))
    return folder
