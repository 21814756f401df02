"""Tokenizers: open_clip's byte-pair encoder with its bundled vocabulary (the default), and the tokenizer of a
Hugging Face text tower."""

from __future__ import annotations

import torch


class ClipTokenizer:
    """open_clip's BPE tokenizer (49,408 tokens, start/end-of-text markers, zero padding) at a fixed context length.

    ``tokenizer(texts) -> LongTensor (B, context_length)``; the end-of-text token has the highest id, so the
    text tower finds it with an argmax.
    """

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self._tok.encoder)
        self.sot_token_id = self._tok.sot_token_id
        self.eot_token_id = self._tok.eot_token_id

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self._tok(list(texts), context_length=self.context_length)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        ids = [int(i) for i in ids if int(i) not in (0, self.sot_token_id, self.eot_token_id)]
        return self._tok.decode(ids).strip()


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder: ``tok(texts) -> LongTensor (B, T)``, T <= context_length.

    Batches are padded to their longest text with the tokenizer's pad id and truncated at ``context_length``.
    """

    def __init__(self, path: str, context_length: int = 64, pad_to_context: bool = False):
        from transformers import AutoTokenizer

        self.path = path
        self.context_length = context_length
        self.padding = "max_length" if pad_to_context else "longest"  # max_length: SigLIP pools the last position
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.pad_token_id = int(self._tok.pad_token_id if self._tok.pad_token_id is not None else 0)
        self.vocab_size = len(self._tok)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        enc = self._tok(
            list(texts), padding=self.padding, truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return enc["input_ids"]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()


def build_hf_tokenizer(text_cfg) -> HFTokenizer:
    """The tokenizer saved with a Hugging Face text tower's model (``model.text.hf_path``)."""
    from contrast.towers.adapters import hf_folder  # here: the towers package imports this module

    return HFTokenizer(hf_folder(text_cfg.hf_path), text_cfg.context_length)


def text_padding_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) True at real positions of BPE ids: up to and including the end-of-text token (the highest id).

    The BPE tokenizer pads with id 0, which is also a real token, so the end-of-text position decides.
    """
    T = input_ids.shape[1]
    eot = input_ids.argmax(dim=-1, keepdim=True)  # (B, 1)
    return torch.arange(T, device=input_ids.device)[None, :] <= eot  # (B, T)


class TrimmedTokenizer:
    """A BPE tokenizer whose batches end at their last end-of-text token: the trailing padding columns every caption
    of the batch has are dropped, so the text tower runs on the batch's longest caption instead of the full context.
    Exact for towers that never let padding reach a real position (causal, or masked); training batches use it."""

    def __init__(self, tokenizer: ClipTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts)  # (B, T)
        if not torch.is_tensor(ids):  # a prompt tokenizer's batch: already padded to its longest sample
            return ids
        return ids[:, : int(ids.argmax(dim=-1).max()) + 1]  # (B, T'), T' = last end-of-text position + 1


def build_tokenizer(text_cfg):
    """The tokenizer a text tower config asks for (``model.text.kind``: clip -> BPE, hf -> the model's own)."""
    if text_cfg.kind == "hf":
        return build_hf_tokenizer(text_cfg)
    if text_cfg.tokenizer:  # an imported tower's own tokenizer (HF CLIP, SigLIP's sentencepiece / Gemma)
        from contrast.towers.adapters import resolve_path

        path = str(resolve_path(text_cfg.tokenizer, want="hf"))
        return HFTokenizer(path, text_cfg.context_length, pad_to_context=text_cfg.pool == "last")
    return ClipTokenizer(text_cfg.context_length)
