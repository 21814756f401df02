"""Contrastive objectives as pure functions over tensors, and :class:`Objective`, a weighted sum of them.

References: InfoNCE / ITC -- Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision" (CLIP), 2021. Sigmoid loss and its ring across devices -- Zhai et al., "Sigmoid Loss for Language Image
Pre-Training" (SigLIP), 2023. Tiled losses -- Wang et al., "Breaking the Memory Barrier: Near Infinite Batch Size
Scaling for Contrastive Loss" (Inf-CL), 2024.

Cross-process gathering is injected (``gather``, ``rank``), never imported: with ``gather=None`` every function is the
single-process loss; with a gather that concatenates features from every rank, each rank computes its own rows of
the global logit matrix (the local-loss form), and averaging the per-rank losses gives the global loss.

ITC and the sigmoid loss run as hand-written autograd functions over blocks of one logit matrix per rank (this
rank's images against the texts). ITC reads its text->image terms from the columns of that same matrix, so a step
costs three matmuls (open_clip's ClipLoss: six). ``tile_size`` bounds its blocks: a matrix of at most
``tile_size ** 2`` entries is computed whole and its exponentials kept for the backward; a larger one in tiles whose
log-sum-exps are accumulated forward and which are recomputed backward (memory linear in the batch, one matmul
more). The sigmoid loss sums its gradients in the forward pass while each block is at hand, so it never holds more
than one block. Gradients follow :func:`contrast.distributed.gather_with_grad`'s convention: each rank receives its
share of the gradient of the sum of every rank's loss, so DDP's averaging yields the gradient of the global loss.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

Gather = Callable[[torch.Tensor], torch.Tensor]
Shift = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Comm:
    """Cross-process context handed to objectives and models: a gather (concatenate along dim 0 across ranks,
    gradients flowing back; None in one process), this rank, the number of ranks, and optionally a ring shift (send a
    tensor to the next rank and return the previous rank's, no autograd; :func:`contrast.distributed.ring_shift`)
    with which the sigmoid loss passes text features around the ranks instead of gathering them."""

    gather: Gather | None = None
    rank: int = 0
    world: int = 1
    shift: Shift | None = None

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
    tile_size: int = 0,
    pair_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised features (B, E); ``logit_scale`` is the multiplier (already exp'd).

    Row i of the images matches row i of the texts. Returns the mean of the image->text and text->image
    cross-entropies. Only texts are gathered: this rank's images score against every text in one logit matrix
    (B, N), whose columns give the text->image terms. ``tile_size`` > 0 computes a matrix of more than
    ``tile_size ** 2`` entries in tiles (memory linear in B; 0: always whole). Images may also come as several
    embeddings each (B, Q, E), BLIP-2's query outputs: a pair then scores the best of its Q similarities (Li et al.,
    BLIP-2, 2023; computed whole, by autograd).

    ``pair_ids`` (B, K) int64 makes the targets multi-positive: pairs whose ids agree in any of the K columns (the
    same caption, the same group) are positives of each other, and each row's (and column's) target is uniform over
    its positives -- the cross-entropy against ``mask / mask.sum()`` of SupCon (Khosla et al., 2020) applied to
    image-text pairs. Without duplicate ids it is the plain loss.
    """
    if image_emb.shape[0] != text_emb.shape[0] or image_emb.shape[-1] != text_emb.shape[-1] or text_emb.ndim != 2:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")
    if image_emb.ndim == 3:
        if pair_ids is not None:
            raise ValueError("loss.positives works with one embedding per image, not query embeddings (B, Q, E)")
        return _info_nce_queries(image_emb, text_emb, logit_scale, gather=gather, rank=rank)
    _check_tile_size(tile_size)
    all_txt = gather(text_emb) if gather is not None else text_emb  # (N, E)
    ids = _checked_ids(pair_ids, image_emb.shape[0], gather)
    scale = _as_tensor(logit_scale, image_emb)
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (image_emb, all_txt, scale))
    return _InfoNCE.apply(image_emb, all_txt, scale, rank, gather, tile_size, _compute_dtype(image_emb), grads, ids)


def _checked_ids(pair_ids: torch.Tensor | None, batch: int, gather: Gather | None):
    """(this rank's ids (B, K), every rank's ids (N, K)) or None: the gathered ids line up with gathered texts."""
    if pair_ids is None:
        return None
    if pair_ids.ndim == 1:
        pair_ids = pair_ids[:, None]
    if pair_ids.ndim != 2 or pair_ids.shape[0] != batch or pair_ids.is_floating_point():
        raise ValueError(f"pair_ids must be integer ids (B, K) for a batch of {batch}, got {tuple(pair_ids.shape)} "
                         f"{pair_ids.dtype}")
    return pair_ids, (gather(pair_ids) if gather is not None else pair_ids)


class _Positives:
    """Which pairs of a (B, N) logit matrix are positives -- those whose ids agree in some column, the matching pair
    always -- and, added block by block, each row's and column's number of positives and sum of positive logits."""

    def __init__(self, row_ids: torch.Tensor, col_ids: torch.Tensor, like: torch.Tensor):
        self.row_ids, self.col_ids = row_ids, col_ids
        opts = {"dtype": _wide(like[:0]).dtype, "device": like.device}
        B, N = row_ids.shape[0], col_ids.shape[0]
        self.row_n, self.row_sum = torch.zeros(B, **opts), torch.zeros(B, **opts)
        self.col_n, self.col_sum = torch.zeros(N, **opts), torch.zeros(N, **opts)

    def mask(self, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        """(r, c) bool: the positives among these rows and columns."""
        (r0, r1), (c0, c1) = rows, cols
        return (self.row_ids[r0:r1, None, :] == self.col_ids[None, c0:c1, :]).any(dim=-1)  # (r, c)

    def add(self, rows: tuple[int, int], cols: tuple[int, int], logits: torch.Tensor) -> None:
        (r0, r1), (c0, c1) = rows, cols
        m = self.mask(rows, cols)
        self.row_n[r0:r1] += m.sum(dim=1)
        self.col_n[c0:c1] += m.sum(dim=0)
        picked = torch.where(m, logits, 0.0)  # (r, c)
        self.row_sum[r0:r1] += picked.sum(dim=1)
        self.col_sum[c0:c1] += picked.sum(dim=0)


def _info_nce_queries(image_emb, text_emb, logit_scale, *, gather: Gather | None, rank: int) -> torch.Tensor:
    """InfoNCE where each image has Q query embeddings (B, Q, E) and a pair scores its best query."""
    B = image_emb.shape[0]
    all_img = gather(image_emb) if gather is not None else image_emb  # (N, Q, E)
    all_txt = gather(text_emb) if gather is not None else text_emb  # (N, E)
    labels = torch.arange(B, device=image_emb.device) + rank * B
    logits_i2t = logit_scale * torch.einsum("iqe,je->ijq", image_emb, all_txt).amax(dim=-1)  # (B, N)
    logits_t2i = logit_scale * torch.einsum("je,iqe->jiq", text_emb, all_img).amax(dim=-1)  # (B, N)
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


# --------------------------------------------------------------------------------------------------- blockwise logits

# a logit matrix computed whole is still processed in row strips of about this many entries (16 MiB in fp32), so the
# exponentials of a strip are taken while its logits are in cache
_STRIP_ENTRIES = 1 << 22


def _check_tile_size(tile_size: int) -> None:
    if tile_size < 0:
        raise ValueError(f"loss.tile_size must be 0 (never tile) or a positive tile side, got {tile_size}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmuls' precision: autocast's dtype where autocast is on for ``x``'s device, else ``x``'s own dtype.
    Log-sum-exps, sigmoids and gradient sums are float32 (float64 for float64 inputs): see ``_wide``."""
    kind = x.device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _no_autocast(x: torch.Tensor):
    """Casts inside the hand-written functions are explicit (``_compute_dtype``), forward and backward alike."""
    kind = x.device.type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext()


def _spans(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _blocks(rows: int, cols: int, tile_size: int) -> tuple[list[tuple[tuple[int, int], tuple[int, int]]], bool]:
    """The (row span, column span) blocks covering a (rows, cols) logit matrix, and whether they are kept for the
    backward: whole (kept, in row strips) when tile_size is 0 or the matrix has at most tile_size ** 2 entries, else
    tile_size x tile_size tiles (the last ones smaller), recomputed in the backward."""
    if tile_size == 0 or rows * cols <= tile_size * tile_size:
        return [(r, (0, cols)) for r in _spans(rows, max(1, _STRIP_ENTRIES // max(cols, 1)))], True
    return list(itertools.product(_spans(rows, tile_size), _spans(cols, tile_size))), False


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision of sums and exponentials: float32, or float64 for float64 ``x``."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    """A logit scale or bias as a tensor (a Python number becomes a constant)."""
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=_wide(like).dtype, device=like.device)


def _scratch(blocks, like: torch.Tensor, count: int = 2) -> list[torch.Tensor]:
    """Flat buffers the size of the largest block, reused block after block: fresh memory for every block would cost
    its page faults each time (a quarter of a tiled loss's time on a CPU)."""
    size = max((r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1) in blocks)
    return [torch.empty(size, dtype=_wide(like).dtype, device=like.device) for _ in range(count)]


def _views(buffers: list[torch.Tensor] | None, rows: int, cols: int) -> list[torch.Tensor | None]:
    """(rows, cols) tensors on the front of each scratch buffer (Nones without buffers)."""
    return [None, None] if buffers is None else [buf[: rows * cols].view(rows, cols) for buf in buffers]


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T`` in the operands' dtype, returned widened (``_wide``), into ``out`` if given."""
    if out is None:
        return _wide(torch.mm(a, b.t()))
    return torch.mm(a, b.t(), out=out) if a.dtype == out.dtype else out.copy_(torch.mm(a, b.t()))


def _add_mm(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """``out += x @ y`` in place (``out`` is widened; ``x``, ``y`` in the matmul dtype)."""
    if x.dtype == out.dtype:
        out.addmm_(x, y)
    else:
        out += _wide(torch.mm(x, y))


def _exp_block(a: torch.Tensor, b: torch.Tensor, scratch: list[torch.Tensor] | None = None,
               on_logits: Callable[[torch.Tensor], None] | None = None):
    """A logit block ``a @ b.T`` (r, c) exponentiated twice: shifted by its row maxima and by its column maxima.
    Returns (exp by rows, row maxima, exp by columns, column maxima), widened; in ``scratch`` buffers if given.
    ``on_logits`` sees the logits first."""
    g_out, col_out = _views(scratch, a.shape[0], b.shape[0])
    g = _mm(a, b, g_out)  # (r, c)
    if on_logits is not None:
        on_logits(g)
    row_max, col_max = g.amax(dim=1), g.amax(dim=0)
    by_col = torch.sub(g, col_max, out=col_out).exp_() if col_out is not None else torch.sub(g, col_max).exp_()
    by_row = g.sub_(row_max[:, None]).exp_()  # (r, c), in place
    return by_row, row_max, by_col, col_max


def _merge(run_max: torch.Tensor, run_sum: torch.Tensor, new_max: torch.Tensor, new_sum: torch.Tensor) -> None:
    """Fold one block's (max, sum of exp(x - max)) into running ones, in place (an online log-sum-exp)."""
    top = torch.maximum(run_max, new_max)
    run_sum.mul_(torch.exp(run_max - top)).add_(new_sum * torch.exp(new_max - top))
    run_max.copy_(top)


def _lse_pass(a: torch.Tensor, b: torch.Tensor, blocks, keep: bool, pos: _Positives | None = None):
    """Row (B,) and column (N,) log-sum-exps of ``a @ b.T``, block by block; with ``keep``, each block's
    exponentials as well (for the backward); with ``pos``, its positives' counts and logit sums."""
    opts = {"dtype": _wide(a[:0]).dtype, "device": a.device}
    row_max, row_sum = torch.full((a.shape[0],), -math.inf, **opts), torch.zeros(a.shape[0], **opts)
    col_max, col_sum = torch.full((b.shape[0],), -math.inf, **opts), torch.zeros(b.shape[0], **opts)
    kept, scratch = [], None if keep else _scratch(blocks, a)
    for (r0, r1), (c0, c1) in blocks:
        hook = None if pos is None else functools.partial(pos.add, (r0, r1), (c0, c1))
        by_row, rmax, by_col, cmax = _exp_block(a[r0:r1], b[c0:c1], scratch, hook)
        _merge(row_max[r0:r1], row_sum[r0:r1], rmax, by_row.sum(dim=1))
        _merge(col_max[c0:c1], col_sum[c0:c1], cmax, by_col.sum(dim=0))
        if keep:
            kept.append((by_row, rmax, by_col, cmax))
    return row_max + row_sum.log(), col_max + col_sum.log(), kept


class _InfoNCE(torch.autograd.Function):
    """InfoNCE from one logit matrix ``G = s * img @ txt.T`` (B, N): this rank's rows against every text.

    Image->text terms are G's row log-sum-exps; text->image terms its column log-sum-exps, completed across ranks
    through the gather (each rank holds other rows of the same columns). dLoss/dG is ``(P_row + P_col) / 2B`` less
    the positives, so the backward is two matmuls; the column part is weighted by the upstream gradient of the rank
    that owns the column, making each rank's gradients its share of the gradient of every rank's weighted loss.
    """

    @staticmethod
    def forward(ctx, img, txt, scale, rank, gather, tile_size, dtype, grads, ids):  # type: ignore[override]
        B, N = img.shape[0], txt.shape[0]
        if N % B or not 0 <= rank < N // B:
            raise ValueError(f"{N} gathered texts are not a whole number of batches of {B} with rank {rank} in it")
        blocks, keep = _blocks(B, N, tile_size)
        keep = keep and grads  # nothing to keep for a loss that will not be differentiated
        own = slice(rank * B, (rank + 1) * B)
        with _no_autocast(img):
            a32 = _wide(img) * _wide(scale)  # (B, E): the scale rides on the smaller operand
            pos = None if ids is None else _Positives(ids[0], ids[1], a32)
            row_lse, col_lse, kept = _lse_pass(a32.to(dtype), txt.to(dtype), blocks, keep, pos)
            if pos is None:
                if gather is not None:  # every rank's rows of each column
                    col_lse = torch.logsumexp(gather(col_lse[None]), dim=0)  # (W, N) -> (N,)
                target = 2 * (a32 * _wide(txt[own])).sum()  # the positive logits, rows and columns
            else:
                col_lse = _complete_columns(pos, col_lse, gather)
                target = (pos.row_sum / pos.row_n).sum() + (pos.col_sum[own] / pos.col_n[own]).sum()
            loss = (row_lse.sum() + col_lse[own].sum() - target) / (2 * B)
        ctx.save_for_backward(img, txt, scale, row_lse, col_lse)
        ctx.meta, ctx.kept, ctx.pos = (rank, gather, blocks, dtype), kept, pos
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        img, txt, scale, row_lse, col_lse = ctx.saved_tensors
        rank, gather, blocks, dtype = ctx.meta
        kept, ctx.kept = ctx.kept, None  # kept blocks are consumed in place; a second backward recomputes them
        pos, B = ctx.pos, img.shape[0]
        g = _wide(grad.detach()).reshape(1)
        g_col = (gather(g) if gather is not None else g).repeat_interleave(B) / (2 * B)  # (N,) owner's upstream
        with _no_autocast(img):
            a32 = _wide(img) * _wide(scale)  # (B, E)
            a, b = a32.to(dtype), txt.to(dtype)
            d_a = torch.zeros_like(a32)  # dLoss/d(scale * img), (B, E)
            d_b = torch.zeros(txt.shape, dtype=a32.dtype, device=txt.device)  # dLoss/dtxt, (N, E)
            scratch = None if kept else _scratch(blocks, a32)
            for k, (rows, cols) in enumerate(blocks):
                (r0, r1), (c0, c1) = rows, cols
                lse, given = (row_lse[r0:r1], col_lse[c0:c1]), kept[k] if kept else scratch
                d = _grad_block(a[r0:r1], b[c0:c1], lse, given, g / (2 * B), g_col[c0:c1])
                if pos is not None:  # the targets: each row's and column's positives share its weight
                    m = pos.mask(rows, cols)
                    d -= m * (g / (2 * B) / pos.row_n[r0:r1])[:, None] + m * (g_col[c0:c1] / pos.col_n[c0:c1])
                d = d.to(dtype)  # (r, c) dLoss/dG
                _add_mm(d_a[r0:r1], d, b[c0:c1])
                _add_mm(d_b[c0:c1], d.t(), a[r0:r1])
            if pos is None:  # the positives: -(g / B) * G[i, rank * B + i]
                d_a -= (g / B) * _wide(txt[rank * B : (rank + 1) * B])
                d_b[rank * B : (rank + 1) * B] -= (g / B) * a32
        return _scaled_grads(ctx, img, txt, scale, d_a, d_b) + (None, None, None, None, None, None)


def _complete_columns(pos: _Positives, col_lse: torch.Tensor, gather: Gather | None) -> torch.Tensor:
    """Every rank's rows of each column: the columns' log-sum-exps, positive counts and positive logit sums (the
    counts and sums completed in ``pos``, in place). Returns the columns' log-sum-exps (N,)."""
    if gather is None:
        return col_lse
    parts = gather(torch.stack([col_lse, pos.col_n, pos.col_sum]))  # (3W, N), rank by rank
    pos.col_n, pos.col_sum = parts[1::3].sum(dim=0), parts[2::3].sum(dim=0)
    return torch.logsumexp(parts[0::3], dim=0)


def _grad_block(a, b, lse, given: tuple | list, w_row: torch.Tensor, w_col: torch.Tensor) -> torch.Tensor:
    """dLoss/dG on one block: ``w_row * P_row + w_col * P_col`` (r, c), the softmaxes of its rows and columns in the
    whole matrix (final log-sum-exps ``lse``). ``given`` is the forward's kept exponentials (a tuple), rescaled in
    place, or scratch buffers (a list) for recomputed logits, shifted by the final log-sum-exps (which bound every
    entry: no maxima needed)."""
    row_lse, col_lse = lse
    if isinstance(given, tuple):
        by_row, rmax, by_col, cmax = given
        by_row.mul_((torch.exp(rmax - row_lse) * w_row)[:, None])
        return by_row.addcmul_(by_col, (torch.exp(cmax - col_lse) * w_col)[None, :])
    g_out, col_out = _views(given, a.shape[0], b.shape[0])
    g = _mm(a, b, g_out)  # (r, c)
    by_col = torch.sub(g, col_lse, out=col_out).exp_().mul_(w_col)  # (r, c) w_col * P_col
    return by_col.addcmul_(g.sub_(row_lse[:, None]).exp_(), w_row[:, None])


def _scaled_grads(ctx, img, txt, scale, d_a, d_b) -> tuple:
    """Gradients for (img, txt, scale) from those for ``a = scale * img`` (``d_a``, scaled in place) and ``txt``, in
    the inputs' dtypes. dLoss/dscale = sum_ij dLoss/dG_ij * <img_i, txt_j> = sum_i <d_a_i, img_i>."""
    need = ctx.needs_input_grad
    d_scale = torch.vdot(d_a.flatten(), _wide(img).flatten()).to(scale.dtype) if need[2] else None
    d_img = d_a.mul_(_wide(scale)).to(img.dtype) if need[0] else None
    return d_img, d_b.to(txt.dtype) if need[1] else None, d_scale


@dataclass
class LossOutput:
    """The weighted total that is back-propagated and each unweighted term, for logging."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


Term = Callable[..., torch.Tensor]

# How each term couples the samples of a batch, which decides how a batch may be split into micro-batches:
# "embeddings": only through the pooled embeddings (and the logit scale / bias), so gradient caching is exact;
# "sample": a mean of per-sample losses, so averaging equal micro-batches is exact;
# "pairs": through the image-text pairs themselves (ITM's hard negatives are drawn from the whole batch).
COUPLING = {"itc": "embeddings", "sigmoid": "embeddings", "itm": "pairs", "lm": "sample"}


class Objective:
    """A weighted sum of loss terms. Each term is ``fn(model_output, comm) -> scalar``.

    The training loop calls ``objective(model_output)`` and never knows which terms it holds; it may ask how they
    couple the batch (:attr:`couplings`) to split a batch into micro-batches.
    """

    def __init__(self, terms: dict[str, tuple[float, Term]], comm: Comm | None = None,
                 couplings: dict[str, str] | None = None):
        if not terms:
            raise ValueError("the objective has no terms with a positive weight; set at least one loss weight > 0")
        self.terms = terms
        self.comm = comm or Comm()
        self.couplings = {name: (couplings or COUPLING).get(name, "pairs") for name in terms}

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
        empty = weights.sum(dim=1) <= 0  # nothing else to draw from: uniform over the non-positive columns
        uniform = torch.ones_like(weights)  # (always built: branching on ``empty`` would wait for the device)
        uniform[torch.arange(sim.shape[0], device=sim.device), positive] = 0.0
        weights = torch.where(empty[:, None], uniform, weights)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def build_objective(loss_cfg, comm: Comm | None = None) -> Objective:
    """Map each positive weight of the loss config to its term. A new loss adds one entry to ``available``."""
    _check_tile_size(loss_cfg.tile_size)
    multi = bool(check_positives(loss_cfg.positives))
    available: dict[str, Term] = {
        "itc": functools.partial(itc_term, alpha=loss_cfg.distill_alpha, tile_size=loss_cfg.tile_size,
                                 positives=multi),
        "sigmoid": functools.partial(sigmoid_term, tile_size=loss_cfg.tile_size, positives=multi),
        "itm": itm_term,
        "lm": functools.partial(lm_term, label_smoothing=loss_cfg.lm_label_smoothing),
    }
    terms = {name: (float(getattr(loss_cfg, name)), fn) for name, fn in available.items() if getattr(loss_cfg, name) > 0}
    return Objective(terms, comm)


POSITIVES = ("caption", "group")  # what else makes two pairs of a batch positives of each other (loss.positives)


def check_positives(positives: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``loss.positives`` checked: a subset of :data:`POSITIVES`, in the order given."""
    bad = [p for p in positives if p not in POSITIVES]
    if bad:
        raise ValueError(f"loss.positives may hold {' and '.join(POSITIVES)} (pairs sharing a caption, or a "
                         f"data.group_column value, are positives), got {bad}")
    return tuple(dict.fromkeys(positives))


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
    tile_size: int = 0,
    shift: Shift | None = None,
    world: int = 1,
    pair_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023).

    Every (image, text) pair is an independent binary problem: ``-log sigmoid(z * (scale * <x, y> + bias))`` with
    ``z = +1`` for matching pairs and ``-1`` otherwise, summed over all pairs and divided by the number of images.
    Across ranks only text features move: this rank's B images score against the N texts of every rank and the sum is
    divided by B, so the mean of the per-rank losses (what DDP's gradient averaging optimises) equals the
    single-process loss on the concatenated batch -- the normalisation of open_clip's ``SigLipLoss``. With a ring
    ``shift`` (and ``world`` ranks) the texts travel around the ranks chunk by chunk, as in the paper, so a rank holds
    one (B, B) logit block and one chunk of texts at a time; else the ``gather``-ed texts are scored in blocks.
    ``tile_size`` > 0 splits any block of more than ``tile_size ** 2`` pairs into tiles. ``pair_ids`` (B, K) int64
    labels every pair whose ids agree in any column (the same caption, the same group) ``z = +1``.
    """
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image_emb.shape)} vs {tuple(text_emb.shape)}")
    if logit_bias is None:
        raise ValueError("sigmoid_loss needs a logit bias; set model.init_logit_bias (SigLIP uses -10)")
    _check_tile_size(tile_size)
    scale, bias = _as_tensor(logit_scale, image_emb), _as_tensor(logit_bias, image_emb)
    dtype = _compute_dtype(image_emb)
    if shift is not None and world > 1:
        own_ids = None if pair_ids is None else _checked_ids(pair_ids, image_emb.shape[0], None)[0]
        return _SigmoidRing.apply(image_emb, text_emb, scale, bias, shift, world, tile_size, dtype, own_ids)
    all_txt = gather(text_emb) if gather is not None else text_emb  # (N, E)
    ids = _checked_ids(pair_ids, image_emb.shape[0], gather)
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (image_emb, all_txt, scale, bias))
    return _Sigmoid.apply(image_emb, all_txt, scale, bias, rank, tile_size, dtype, grads, ids)


def sigmoid_term(out, comm: Comm, tile_size: int, positives: bool = False) -> torch.Tensor:
    """The sigmoid loss on a model output's embeddings, logit scale and logit bias (and pair ids, with
    ``positives``)."""
    img = _needs(out, "image_emb", "sigmoid")
    return sigmoid_loss(img, out.text_emb, out.logit_scale, out.logit_bias, gather=comm.gather, rank=comm.rank,
                        tile_size=tile_size, shift=comm.shift, world=comm.world,
                        pair_ids=_pair_ids(out, "sigmoid") if positives else None)


def _pair_ids(out, term: str) -> torch.Tensor:
    """The batch's pair ids, which ``loss.positives`` needs."""
    ids = out.pair_ids  # the dual encoder passes the batch's through
    if ids is None:
        raise ValueError(f"loss.positives is set but this {term} batch carries no pair ids; it needs model.kind clip "
                         "and batches from `contrast train` (or a 'pair_ids' entry), else set loss.positives: []")
    return ids


def _sigmoid_blocks(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, tile_size: int, grads: bool,
                    pos: _Positives | None = None):
    """Over every pair of ``z = a @ b.T + bias`` (B, N), block by block: the sum of softplus(z) and, with ``grads``,
    the sums sigmoid(z) @ b (B, E), sigmoid(z).T @ a (N, E) and of sigmoid(z) -- the loss as if every pair were a
    negative (softplus(z) = -log sigmoid(-z)) and its gradients with respect to ``a``, ``b`` and the bias. With
    ``pos`` the positives it marks are taken as such (softplus(z) - z, and sigmoid(z) - 1)."""
    opts = {"dtype": _wide(a[:0]).dtype, "device": a.device}
    total, d_bias = torch.zeros((), **opts), torch.zeros((), **opts)
    d_a = torch.zeros(a.shape, **opts) if grads else None
    d_b = torch.zeros(b.shape, **opts) if grads else None
    fused, bias = a.dtype == opts["dtype"], bias.to(opts["dtype"])
    blocks = _blocks(a.shape[0], b.shape[0], tile_size)[0]
    scratch = _scratch(blocks, a)
    for (r0, r1), (c0, c1) in blocks:
        z_out, softplus_out = _views(scratch, r1 - r0, c1 - c0)
        if fused:
            z = torch.addmm(bias, a[r0:r1], b[c0:c1].t(), out=z_out)  # (r, c)
        else:
            z = _mm(a[r0:r1], b[c0:c1], z_out).add_(bias)
        total += torch.ops.aten.softplus.out(z, 1, 20, out=softplus_out).sum()
        m = None if pos is None else pos.mask((r0, r1), (c0, c1))  # (r, c)
        if m is not None:
            total -= torch.where(m, z, 0.0).sum()
        if grads:
            p = z.sigmoid_() if m is None else z.sigmoid_().sub_(m.to(z.dtype))
            d_bias += p.sum()
            p = p.to(a.dtype)
            _add_mm(d_a[r0:r1], p, b[c0:c1])
            _add_mm(d_b[c0:c1], p.t(), a[r0:r1])
    return total, d_a, d_b, d_bias


def _positives(a32: torch.Tensor, txt: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The matching pairs' logits (B,): row i of ``a32 = scale * img`` with row i of ``txt``."""
    return (a32 * _wide(txt)).sum(dim=1) + bias


class _Sigmoid(torch.autograd.Function):
    """The sigmoid loss of this rank's images against all (gathered) texts. The loss is
    ``(sum_ij softplus(z_ij) - sum_i z_i,pos) / B`` since softplus(-z) = softplus(z) - z, and dLoss/dz is
    ``(sigmoid(z) - [positive]) / B``: with gradients wanted they are summed in the forward pass while each block's
    logits are at hand (three matmuls in all, none repeated), and the backward scales them."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, rank, tile_size, dtype, grads, ids):  # type: ignore[override]
        B = img.shape[0]
        own = slice(rank * B, (rank + 1) * B)
        with _no_autocast(img):
            a32 = _wide(img) * _wide(scale)  # (B, E)
            pos = None if ids is None else _Positives(ids[0], ids[1], a32)
            total, d_a, d_b, d_bias = _sigmoid_blocks(a32.to(dtype), txt.to(dtype), bias, tile_size, grads, pos)
            if pos is None:
                total = total - _positives(a32, txt[own], bias).sum()
            if grads and pos is None:  # the positives' -1 in dLoss/dz
                d_a -= _wide(txt[own])
                d_b[own] -= a32
                d_bias -= B
        ctx.save_for_backward(img, txt, scale)
        ctx.partial, ctx.bias_dtype = (d_a, d_b, d_bias, B) if grads else None, bias.dtype
        return total / B

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.partial is None:
            raise RuntimeError("sigmoid_loss was called without gradients wanted, then differentiated")
        img, txt, scale = ctx.saved_tensors
        d_a, d_b, d_bias, B = ctx.partial
        g = _wide(grad.detach()) / B
        d_img, d_txt, d_scale = _scaled_grads(ctx, img, txt, scale, d_a * g, d_b * g)
        d_bias = (d_bias * g).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
        return d_img, d_txt, d_scale, d_bias, None, None, None, None, None


class _SigmoidRing(torch.autograd.Function):
    """The sigmoid loss with texts passed around the ranks (SigLIP's chunked form; big_vision's ppermute loop).

    At step k a rank holds the texts of rank ``rank - k`` and scores its own images against them: one (B, B) logit
    block and one chunk of texts at a time. The backward runs the ring again, recomputing each block; the gradient of
    a chunk travels with it, gathering every rank's contribution, and a last hop takes it home.
    """

    @staticmethod
    def forward(ctx, img, txt, scale, bias, shift, world, tile_size, dtype, ids):  # type: ignore[override]
        with _no_autocast(img):
            a32 = _wide(img) * _wide(scale)  # (B, E)
            a, held, held_ids = a32.to(dtype), txt, ids
            total = -_positives(a32, txt, bias).sum() if ids is None else a32.new_zeros(())
            for k in range(world):
                pos = None if ids is None else _Positives(ids, held_ids, a32)
                total += _sigmoid_blocks(a, held.to(dtype), bias, tile_size, False, pos)[0]
                if k < world - 1:
                    held = shift(held)  # now the texts of rank (rank - k - 1)
                    held_ids = None if ids is None else shift(held_ids)
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.meta, ctx.ids = (shift, world, tile_size, dtype), ids
        return total / img.shape[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        img, txt, scale, bias = ctx.saved_tensors
        shift, world, tile_size, dtype = ctx.meta
        ids, B = ctx.ids, img.shape[0]
        g = _wide(grad.detach()) / B  # this rank's upstream gradient: it scales this rank's contributions only
        with _no_autocast(img):
            a32 = _wide(img) * _wide(scale)  # (B, E)
            a, held, held_ids = a32.to(dtype), _wide(txt), ids
            # the positives' -1 in dLoss/dz (with ids: inside each block), then each block's sigmoids
            k_pos = 1.0 if ids is None else 0.0
            d_a, travelling = -k_pos * held, -k_pos * g * a32
            d_bias = torch.full((), -k_pos * B, dtype=a32.dtype, device=img.device)
            for k in range(world):
                pos = None if ids is None else _Positives(ids, held_ids, a32)
                _, da, db, dbias = _sigmoid_blocks(a, held.to(dtype), bias, tile_size, True, pos)
                d_a, d_bias, travelling = d_a + da, d_bias + dbias, travelling + g * db
                if k < world - 1:  # the chunk and its gradient so far move on together
                    held, travelling = shift(torch.cat([held, travelling])).split(B)
                    held_ids = None if ids is None else shift(held_ids)
            d_b = shift(travelling)  # (B, E): every rank's weighted gradient for this rank's texts, home
        d_img, d_txt, d_scale = _scaled_grads(ctx, img, txt, scale, d_a * g, d_b)
        d_bias = (d_bias * g).to(bias.dtype) if ctx.needs_input_grad[3] else None
        return d_img, d_txt, d_scale, d_bias, None, None, None, None, None


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


def itc_term(out, comm: Comm, alpha: float, tile_size: int, positives: bool = False) -> torch.Tensor:
    """ITC: InfoNCE over the gathered batch (multi-positive over the pair ids with ``positives``), or its
    momentum-distilled form when the output carries teacher features (BLIP with ``model.blip.momentum_distill``)."""
    img = _needs(out, "image_emb", "itc")
    if out.teacher is not None:
        t = out.teacher
        return distilled_info_nce(img, out.text_emb, out.logit_scale, t.image_emb, t.text_emb, alpha, rank=comm.rank)
    return info_nce(img, out.text_emb, out.logit_scale, gather=comm.gather, rank=comm.rank, tile_size=tile_size,
                    pair_ids=_pair_ids(out, "itc") if positives else None)


def itm_term(out, comm: Comm) -> torch.Tensor:
    """ITM on the positives and hard negatives the model drew."""
    itm = _needs(out, "itm", "itm")
    return itm_loss(itm.logits, itm.labels)


def lm_term(out, comm: Comm, label_smoothing: float) -> torch.Tensor:
    """Captioning LM loss on packed logits (``out.lm``)."""
    lm = _needs(out, "lm", "lm")
    return lm_loss(lm.logits, lm.targets, lm.rows, lm.num_captions, label_smoothing)
