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


@dataclass(frozen=True)
class Comm:
    """Cross-process context handed to objectives and models: a gather (concatenate along dim 0 across ranks,
    gradients flowing back; None in one process) and this rank."""

    gather: Gather | None = None
    rank: int = 0

    def all(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, ...) from every rank, concatenated in rank order; ``x`` itself in one process."""
        return self.gather(x) if self.gather is not None else x


def similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """(I, T) image-text scores: the dot product, or for query embeddings (I, Q, E) the best query of each pair
    (Li et al., BLIP-2, 2023)."""
    if image_emb.ndim == 3:
        return torch.einsum("iqe,je->ijq", image_emb, text_emb).amax(dim=-1)  # (I, T)
    return image_emb @ text_emb.t()


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
    if image_emb.ndim == 3:  # the best query of each pair
        logits_i2t = logit_scale * torch.einsum("iqe,je->ijq", image_emb, all_txt).amax(dim=-1)  # (B, N)
        logits_t2i = logit_scale * torch.einsum("je,iqe->jiq", text_emb, all_img).amax(dim=-1)  # (B, N)
    else:
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
    """A weighted sum of loss terms. Each term is ``fn(model_output, comm) -> scalar``.

    The training loop calls ``objective(model_output)`` and never knows which terms it holds.
    """

    def __init__(self, terms: dict[str, tuple[float, Term]], comm: Comm | None = None):
        if not terms:
            raise ValueError("the objective has no terms with a positive weight; set at least one loss weight > 0")
        self.terms = terms
        self.comm = comm or Comm()

    def __call__(self, out) -> LossOutput:
        parts: dict[str, torch.Tensor] = {}
        total = None
        for name, (weight, fn) in self.terms.items():
            value = fn(out, self.comm)
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


def build_objective(loss_cfg, comm: Comm | None = None) -> Objective:
    """Map each positive weight of the loss config to its term. A new loss adds one entry to ``available``."""
    available: dict[str, Term] = {
        "itc": functools.partial(itc_term, alpha=loss_cfg.distill_alpha),
        "sigmoid": sigmoid_term,
        "itm": itm_term,
        "lm": functools.partial(lm_term, label_smoothing=loss_cfg.lm_label_smoothing),
    }
    terms = {name: (float(getattr(loss_cfg, name)), fn) for name, fn in available.items() if getattr(loss_cfg, name) > 0}
    return Objective(terms, comm)


def _needs(out, part: str, term: str):
    value = getattr(out, part)
    if value is None:
        raise ValueError(f"loss.{term} is on but this model produces no {part}; set loss.{term}: 0 for this model kind")
    return value


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


def sigmoid_term(out, comm: Comm) -> torch.Tensor:
    """The sigmoid loss on a model output's embeddings, logit scale and logit bias."""
    img = _needs(out, "image_emb", "sigmoid")
    return sigmoid_loss(img, out.text_emb, out.logit_scale, out.logit_bias, gather=comm.gather, rank=comm.rank)


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


def lm_nll(lm_logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed plain (unsmoothed) next-token negative log-likelihood over packed positions, and their count."""
    nll = F.cross_entropy(lm_logits.float(), targets, reduction="sum")
    return float(nll), int(targets.numel())


def itm_loss(itm_logits: torch.Tensor, itm_labels: torch.Tensor) -> torch.Tensor:
    """Image-text matching: 2-way cross-entropy over positive and hard-negative pairs (logits (P, 2), labels (P,))."""
    return F.cross_entropy(itm_logits, itm_labels)


def lm_loss(
    lm_logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, num_captions: int, label_smoothing: float
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


def itc_term(out, comm: Comm, alpha: float) -> torch.Tensor:
    """ITC: InfoNCE over the gathered batch, or its momentum-distilled form when the output carries teacher features
    (BLIP with ``model.blip.momentum_distill``)."""
    img = _needs(out, "image_emb", "itc")
    if out.teacher is not None:
        t = out.teacher
        return distilled_info_nce(img, out.text_emb, out.logit_scale, t.image_emb, t.text_emb, alpha, rank=comm.rank)
    return info_nce(img, out.text_emb, out.logit_scale, gather=comm.gather, rank=comm.rank)


def itm_term(out, comm: Comm) -> torch.Tensor:
    """ITM on the positives and hard negatives the model drew."""
    itm = _needs(out, "itm", "itm")
    return itm_loss(itm.logits, itm.labels)


def lm_term(out, comm: Comm, label_smoothing: float) -> torch.Tensor:
    """Captioning LM loss on packed logits (``out.lm``)."""
    lm = _needs(out, "lm", "lm")
    return lm_loss(lm.logits, lm.targets, lm.rows, lm.num_captions, label_smoothing)
