"""Contrastive objectives as pure functions over tensors, and :class:`Objective`, a weighted sum of them.

References: InfoNCE / ITC -- Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP), 2021.

Cross-process gathering is injected (``gather``, ``rank``), never imported: with ``gather=None`` every function is the
single-process loss; with a gather that concatenates features from every rank, each rank computes its own rows of
the global logit matrix (the local-loss form), and averaging the per-rank losses gives the global loss.
"""

from __future__ import annotations

import functools
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
    cross-entropies. Images may also come as several embeddings each (B, Q, E), BLIP-2's query outputs: a pair then
    scores the best of its Q similarities (Li et al., BLIP-2, 2023).
    """
    if image_emb.shape[0] != text_emb.shape[0] or image_emb.shape[-1] != text_emb.shape[-1] or text_emb.ndim != 2:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")
    B = image_emb.shape[0]
    all_img = gather(image_emb) if gather is not None else image_emb  # (N, E) or (N, Q, E)
    all_txt = gather(text_emb) if gather is not None else text_emb  # (N, E)
    labels = torch.arange(B, device=image_emb.device) + rank * B
    if image_emb.ndim == 3:
        logits_i2t = logit_scale * torch.einsum("iqe,je->ijq", image_emb, all_txt).amax(dim=-1)  # (B, N)
        logits_t2i = logit_scale * torch.einsum("je,iqe->jiq", text_emb, all_img).amax(dim=-1)  # (B, N)
        return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
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


def build_objective(loss_cfg, gather: Gather | None = None, rank: int = 0) -> Objective:
    """Map each positive weight in ``LossConfig`` to its term. A new loss adds one entry to ``available``."""
    available: dict[str, Term] = {
        "itc": functools.partial(itc_or_distilled_term, alpha=float(getattr(loss_cfg, "distill_alpha", 0.4))),
        "sigmoid": sigmoid_term,
        "itm": itm_term,
        "lm": functools.partial(lm_term, label_smoothing=float(getattr(loss_cfg, "lm_label_smoothing", 0.1))),
    }
    terms: dict[str, tuple[float, Term]] = {}
    for name, fn in available.items():
        weight = float(getattr(loss_cfg, name, 0.0) or 0.0)
        if weight > 0:
            terms[name] = (weight, fn)
    return Objective(terms, gather=gather, rank=rank)


# --------------------------------------------------------------------------------------------------- SigLIP


def sigmoid_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    gather: Gather | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023).

    Every (image, text) pair is an independent binary problem: ``-log sigmoid(z * (scale * <x, y> + bias))`` with
    ``z = +1`` for matching pairs and ``-1`` otherwise, summed over all pairs and divided by the number of images.
    With a ``gather`` injected, only text features cross ranks: this rank's B images score against the N gathered
    texts and the sum is divided by B, so the mean of the per-rank losses (what DDP's gradient averaging optimises)
    equals the single-process loss on the concatenated batch -- the normalisation of open_clip's ``SigLipLoss``.
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")
    if logit_bias is None:
        raise ValueError("sigmoid_loss needs a logit bias; set model.init_logit_bias (SigLIP uses -10)")
    B = image_emb.shape[0]
    all_txt = gather(text_emb) if gather is not None else text_emb  # (N, E)
    logits = logit_scale * image_emb @ all_txt.t() + logit_bias  # (B, N)
    signs = -torch.ones_like(logits)
    rows = torch.arange(B, device=logits.device)
    signs[rows, rows + rank * B] = 1.0
    return -F.logsigmoid(signs * logits).sum() / B


def sigmoid_term(out, *, gather: Gather | None = None, rank: int = 0) -> torch.Tensor:
    """The sigmoid loss on a model output carrying ``image_emb``, ``text_emb``, ``logit_scale`` and ``logit_bias``."""
    return sigmoid_loss(out.image_emb, out.text_emb, out.logit_scale, out.logit_bias, gather=gather, rank=rank)


# --------------------------------------------------------------------------------------------------- BLIP


def distilled_info_nce(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    image_emb_m: torch.Tensor,
    text_emb_m: torch.Tensor,
    alpha: float,
    *,
    rank: int = 0,
) -> torch.Tensor:
    """ITC with momentum distillation (Li et al., ALBEF, 2021; BLIP, 2022).

    ``image_emb`` / ``text_emb`` (B, E) are this rank's student features; ``image_emb_m`` / ``text_emb_m`` (M, E)
    are the teacher's features of the global batch (rank order) followed by the feature queue. Targets mix the
    teacher's softmax with the one-hot positive (column ``rank * B + i``): ``alpha * p_m + (1 - alpha) * onehot``.
    """
    B = image_emb.shape[0]
    labels = torch.arange(B, device=image_emb.device) + rank * B
    with torch.no_grad():
        own_img_m = image_emb_m[labels]  # (B, E): the teacher's view of this rank's rows
        own_txt_m = text_emb_m[labels]
        onehot = F.one_hot(labels, image_emb_m.shape[0]).to(image_emb.dtype)  # (B, M)
        t_i2t = alpha * torch.softmax(logit_scale * own_img_m @ text_emb_m.t(), dim=1) + (1 - alpha) * onehot
        t_t2i = alpha * torch.softmax(logit_scale * own_txt_m @ image_emb_m.t(), dim=1) + (1 - alpha) * onehot
    logits_i2t = logit_scale * image_emb @ text_emb_m.t()  # (B, M)
    logits_t2i = logit_scale * text_emb @ image_emb_m.t()  # (B, M)
    loss_i2t = -(F.log_softmax(logits_i2t, dim=1) * t_i2t).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(logits_t2i, dim=1) * t_t2i).sum(dim=1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def itm_loss(itm_logits: torch.Tensor, itm_labels: torch.Tensor) -> torch.Tensor:
    """Image-text matching: 2-way cross-entropy over positive and hard-negative pairs (logits (P, 2), labels (P,))."""
    return F.cross_entropy(itm_logits, itm_labels)


def lm_loss(
    lm_logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, num_captions: int, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Captioning loss: label-smoothed next-token cross-entropy over packed positions.

    ``lm_logits`` (P, V) and ``targets`` (P,) are the positions that have a next token; ``rows`` (P,) names the
    caption each belongs to. Each caption's loss is the mean over its own tokens and the batch loss the mean over
    ``num_captions`` captions, so a batch split evenly across ranks averages back to the single-process value
    whatever the caption lengths.
    """
    per_token = F.cross_entropy(lm_logits, targets, label_smoothing=label_smoothing, reduction="none")  # (P,)
    sums = per_token.new_zeros(num_captions).index_add(0, rows, per_token)  # (num_captions,)
    counts = torch.bincount(rows, minlength=num_captions).clamp(min=1)
    return (sums / counts).mean()


def itc_or_distilled_term(out, *, gather: Gather | None = None, rank: int = 0, alpha: float = 0.4) -> torch.Tensor:
    """ITC: plain InfoNCE over the gathered batch, or the momentum-distilled form when the output carries teacher
    features (``image_emb_m`` / ``text_emb_m``, BLIP with ``model.blip.momentum_distill``)."""
    if getattr(out, "image_emb_m", None) is not None:
        return distilled_info_nce(
            out.image_emb, out.text_emb, out.logit_scale, out.image_emb_m, out.text_emb_m, alpha, rank=rank
        )
    return info_nce(out.image_emb, out.text_emb, out.logit_scale, gather=gather, rank=rank)


def itm_term(out, *, gather: Gather | None = None, rank: int = 0) -> torch.Tensor:
    """ITM on a model output carrying ``itm_logits`` and ``itm_labels`` (negatives were drawn by the model)."""
    return itm_loss(out.itm_logits, out.itm_labels)


def lm_term(out, *, gather: Gather | None = None, rank: int = 0, label_smoothing: float = 0.1) -> torch.Tensor:
    """Captioning LM loss on a model output carrying packed ``lm_logits``, ``lm_targets`` and ``lm_rows``."""
    num_captions = getattr(out, "num_captions", None) or out.image_emb.shape[0]  # decoder-only outputs carry it
    return lm_loss(out.lm_logits, out.lm_targets, out.lm_rows, num_captions, label_smoothing)
