"""Next-token targets of captions: the packing of BPE captions (BLIP's captioning head, BLIP-2's ITG) and of
prompted answers (decoders). Logits are computed only at the positions that predict a target.

The causal language models themselves are parts (:mod:`contrast.decoders`): the project's :class:`CausalLM` and any
Hugging Face causal LM, behind one interface.
"""

from __future__ import annotations

import torch

from contrast.decoders.own import CausalLM
from contrast.models.outputs import LMOutput
from contrast.tokenizer import text_padding_mask

__all__ = ["CausalLM", "answer_output", "packed_lm_output", "packed_targets", "trim_padding"]


def trim_padding(input_ids: torch.Tensor) -> torch.Tensor:
    """Drop the columns after the batch's longest caption: they are padding everywhere and change no output."""
    keep = int(text_padding_mask(input_ids).sum(dim=1).max())
    return input_ids[:, :keep]


def packed_targets(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(where, targets, rows)``: a (B, T-1) mask of the positions whose next token is real, those tokens (P,)
    and their caption numbers (P,). Logits are computed at those positions only."""
    real = text_padding_mask(input_ids)[:, 1:]  # (B, T-1)
    where = real
    targets = input_ids[:, 1:][where]
    return where, targets, where.nonzero()[:, 0]


def packed_lm_output(hidden: torch.Tensor, input_ids: torch.Tensor, head) -> LMOutput:
    """:class:`LMOutput` from caption hidden states (B, T, W): ``head`` runs only where a next token exists."""
    where, targets, rows = packed_targets(input_ids)
    return LMOutput(head(hidden[:, :-1][where]), targets, rows, input_ids.shape[0])


def answer_output(hidden: torch.Tensor, labels: torch.Tensor, head) -> LMOutput:
    """:class:`LMOutput` of prompted samples: ``labels`` (B, T) holds the answer's token at each answer position and
    -100 elsewhere (not shifted); position t predicts ``labels[t + 1]``, and ``head`` runs on those positions only."""
    where = labels[:, 1:] != -100  # (B, T-1)
    return LMOutput(head(hidden[:, :-1][where]), labels[:, 1:][where], where.nonzero()[:, 0], labels.shape[0])
