"""Contrastive objectives as pure functions over tensors, and :class:`Objective`, a weighted sum of them.

References: InfoNCE / ITC -- Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP), 2021.

Cross-process gathering is injected (``gather``, ``rank``), never imported: with ``gather=None`` every function is the
single-process loss; with a gather that concatenates features from every rank, each rank computes its own rows of
the global logit matrix (the local-loss form), and averaging the per-rank losses gives the global loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]


def info_nce(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather: Gather | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised features (B, E); ``logit_scale`` is the multiplier (already exp'd).

    Row i of the images matches row i of the texts. Returns the mean of the image->text and text->image
    cross-entropies.
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")
    B = image_emb.shape[0]
    all_img = gather(image_emb) if gather is not None else image_emb  # (N, E)
    all_txt = gather(text_emb) if gather is not None else text_emb  # (N, E)
    labels = torch.arange(B, device=image_emb.device) + rank * B
    logits_i2t = logit_scale * image_emb @ all_txt.t()  # (B, N)
    logits_t2i = logit_scale * text_emb @ all_img.t()  # (B, N)
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


@dataclass
class LossOutput:
    """The weighted total that is back-propagated and each unweighted term, for logging."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


Term = Callable[..., torch.Tensor]


class Objective:
    """A weighted sum of loss terms. Each term is ``fn(model_output, gather=..., rank=...) -> scalar``.

    The training loop calls ``objective(model_output)`` and never knows which terms it holds.
    """

    def __init__(self, terms: dict[str, tuple[float, Term]], gather: Gather | None = None, rank: int = 0):
        if not terms:
            raise ValueError("the objective has no terms with a positive weight; set at least one loss weight > 0")
        self.terms = terms
        self.gather = gather
        self.rank = rank

    def __call__(self, out) -> LossOutput:
        parts: dict[str, torch.Tensor] = {}
        total = None
        for name, (weight, fn) in self.terms.items():
            value = fn(out, gather=self.gather, rank=self.rank)
            parts[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        return LossOutput(total=total, parts=parts)


def itc_term(out, *, gather: Gather | None = None, rank: int = 0) -> torch.Tensor:
    """InfoNCE on a model output carrying ``image_emb``, ``text_emb`` and ``logit_scale``."""
    return info_nce(out.image_emb, out.text_emb, out.logit_scale, gather=gather, rank=rank)


def hard_negative_indices(
    sim: torch.Tensor,
    positive: torch.Tensor,
    *,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one hard negative per row of a similarity matrix (B, N), as in ALBEF / BLIP.

    Each row's candidates are weighted by ``softmax(sim)``; the positive (column ``positive[i]``) and any column
    flagged in ``exclude`` get weight zero, so the draw is without replacement of the positive. Vectorised through
    ``torch.multinomial``; pass a seeded ``generator`` for a reproducible draw. Returns column indices (B,).
    """
    with torch.no_grad():
        weights = torch.softmax(sim.float(), dim=1)
        weights[torch.arange(sim.shape[0], device=sim.device), positive] = 0.0
        if exclude is not None:
            weights = weights.masked_fill(exclude, 0.0)
        empty = weights.sum(dim=1) <= 0
        if empty.any():  # nothing else to draw from: fall back to uniform over the non-positive columns
            uniform = torch.ones_like(weights)
            uniform[torch.arange(sim.shape[0], device=sim.device), positive] = 0.0
            weights = torch.where(empty[:, None], uniform, weights)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)
