"""The language-model interface every decoder implements: the project's small causal LM and any Hugging Face
causal LM behind one small surface, so bridges and vision-language models never ask which one they hold.

A :class:`LanguageModel` embeds token ids, runs causally over input embeddings (with an optional per-layer hook, the
seat of gated cross-attention, and an optional KV cache for generation), turns final hidden states into logits, and
says which ids end a generation. Its tokenizer (with the chat template, when it has one) is a
:class:`~contrast.decoders.prompts.PromptTokenizer`, built beside it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]  # (layer index, hidden (B, L, W)) -> hidden (B, L, W)


def positions_of(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """(B, new) position ids of the last ``new`` columns of a (B, L) mask of real tokens (left padding allowed)."""
    pos = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, L)
    return pos[:, -new:]


class LanguageModel(nn.Module, abc.ABC):
    """A causal LM over input embeddings. Implementations set ``width``, ``vocab_size``, ``num_layers``,
    ``num_heads`` and ``eos_token_ids`` and implement the methods below."""

    width: int
    vocab_size: int
    num_layers: int
    num_heads: int
    eos_token_ids: tuple[int, ...] = ()

    @abc.abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, W) input embeddings."""

    @abc.abstractmethod
    def hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               layer_hook: LayerHook | None = None, cache: Any = None, use_cache: bool = False
               ) -> tuple[torch.Tensor, Any]:
        """Final hidden states (B, L, W) of ``inputs_embeds`` (B, L, W) and the KV cache after them.

        ``attention_mask`` (B, past + L) marks real positions (1) and padding (0), cached ones included;
        ``layer_hook(i, h)`` runs on the hidden states entering layer ``i``; ``cache`` is what an earlier call returned
        (``use_cache=True`` starts one)."""

    @abc.abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., W) final hidden states -> (..., V) next-token logits."""

    @abc.abstractmethod
    def reorder_cache(self, cache: Any, rows: torch.Tensor) -> Any:
        """The cache of the batch rows ``rows`` (beam search)."""

    @abc.abstractmethod
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the LM's layers (the answer's gradient still passes a frozen LM)."""
