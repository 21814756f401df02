"""Closed-form projection heads: the ridge-regularised CCA of two towers' pooled features (``train.head_init: cca``).

With pretrained towers (LiT), the two projections are linear maps whose best start is not random: canonical
correlation analysis finds the pairs of directions, one per tower, along which paired image and text features
correlate most (Hotelling, "Relations between two sets of variates", 1936). Before the first step the run reads its
first ``head_init_batches`` training batches, accumulates the second moments of the towers' pooled features (summed
across ranks), and sets

    image.proj = (Rx^-1/2 U S^1/2)^T,   text.proj = (Ry^-1/2 V S^1/2)^T,

where ``Rx = Cxx + ridge * mean eigenvalue(Cxx) * I`` (likewise ``Ry``), ``U S V^T`` is the SVD of
``Rx^-1/2 Cxy Ry^-1/2`` and only the first ``embed_dim`` pairs are kept, so an image-text score weighs each canonical
pair by its correlation. The moments are not centred: the projections stay bias-free (the shared mean direction
becomes one more pair). Each matrix is then rescaled to the norm of the random start it replaces, which changes no
normalised embedding and keeps the optimizer's steps relative to the weights as they were. With ``train.steps: 0``
the run is this closed form alone.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

import torch

from contrast import distributed as D
from contrast.config import Config, ConfigError
from contrast.models import DualEncoder
from contrast.train.data import build_loader, to_device

HEAD_INITS = ("none", "cca")


class CrossMoments:
    """Sums of ``x x^T``, ``y y^T`` and ``x y^T`` over paired rows, in float64."""

    def __init__(self, dx: int, dy: int, device: torch.device | str = "cpu"):
        kw = dict(dtype=torch.float64, device=device)
        self.xx, self.yy, self.xy = torch.zeros(dx, dx, **kw), torch.zeros(dy, dy, **kw), torch.zeros(dx, dy, **kw)
        self.n = torch.zeros((), **kw)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"paired features need as many rows: {x.shape[0]} images, {y.shape[0]} texts")
        x, y = x.detach().to(self.xx), y.detach().to(self.yy)
        self.xx += x.T @ x
        self.yy += y.T @ y
        self.xy += x.T @ y
        self.n += x.shape[0]

    def all_reduce(self) -> CrossMoments:
        """The sums over every rank (in place)."""
        for t in (self.xx, self.yy, self.xy, self.n):
            D.all_reduce_sum(t)
        return self


def _inv_sqrt(c: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(c + ridge * mean eigenvalue * I)^-1/2`` of a symmetric positive semi-definite ``c``."""
    c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    e, v = torch.linalg.eigh(c)
    return (v * e.clamp_min(e.max() * 1e-12) ** -0.5) @ v.T


def cca_weights(m: CrossMoments, k: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A (Dx, k), B (Dy, k), correlations (k,))``: the first ``k`` canonical pairs, each column scaled by the
    square root of its (regularised) correlation; scores ``(x A) . (y B)`` weigh each pair by its correlation."""
    n = float(m.n)
    wx, wy = _inv_sqrt(m.xx.cpu() / n, ridge), _inv_sqrt(m.yy.cpu() / n, ridge)
    u, s, vh = torch.linalg.svd(wx @ (m.xy.cpu() / n) @ wy)
    root = s[:k].sqrt()
    return (wx @ u[:, :k]) * root, (wy @ vh[:k].T) * root, s[:k]


def check_head_init(cfg: Config, model: torch.nn.Module) -> None:
    t = cfg.train
    if t.head_init not in HEAD_INITS:
        raise ConfigError(f"train.head_init must be one of {', '.join(HEAD_INITS)}, got {t.head_init!r}")
    if t.head_init == "none":
        return
    if not isinstance(model, DualEncoder):
        raise ConfigError(f"train.head_init: {t.head_init} sets the two projections of a dual encoder (model.kind "
                          f"clip); model.kind {cfg.model.kind} has other heads: use head_init: none")
    widths = model.image.width, model.text.width
    if cfg.model.embed_dim > min(widths):
        raise ConfigError(f"train.head_init: cca finds at most {min(widths)} canonical pairs (the narrower tower's "
                          f"width; image {widths[0]}, text {widths[1]}) but model.embed_dim is {cfg.model.embed_dim}; "
                          f"set model.embed_dim <= {min(widths)} or head_init: none")
    if t.head_init_batches < 1:
        raise ConfigError(f"train.head_init_batches must be at least 1, got {t.head_init_batches}")
    if not (t.head_init_ridge > 0 and t.head_init_ridge < float("inf")):
        raise ConfigError(f"train.head_init_ridge must be a positive number (e.g. 1.0), got {t.head_init_ridge}")


@torch.no_grad()
def feature_moments(model: DualEncoder, batches: Iterable[dict], device: torch.device) -> CrossMoments:
    """Second moments of the towers' pooled features over ``batches`` (already on ``device``), summed over ranks."""
    m = CrossMoments(model.image.width, model.text.width, device)
    for batch in batches:
        x, y = model.image.pooled(batch["pixels"]), model.text.pooled(batch["input_ids"])
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("train.head_init: a tower gave non-finite features on a training batch; check the "
                             "tower's weights (model.image.weights / model.text.hf_path) or use head_init: none")
        m.add(x, y)
    return m.all_reduce()


def init_heads(cfg: Config, model: DualEncoder, tokenizer, device: torch.device, dist_info: D.DistInfo
               ) -> dict | None:
    """Set the projections of ``model`` by ``train.head_init`` from the first training batches of this rank; the
    random generators are left as they were, so the run's batches and draws are those of a run without it."""
    check_head_init(cfg, model)
    if cfg.train.head_init == "none":
        return None
    started = time.perf_counter()
    states = random.getstate(), torch.random.get_rng_state()
    was_training = model.training
    model.eval()  # the features the towers give at evaluation (no dropout)
    try:
        loader = build_loader(cfg, tokenizer, cfg.data.train_split, dist_info)
        batches = (to_device(b, device, cfg.model.image) for _, b in zip(range(cfg.train.head_init_batches), loader))
        moments = feature_moments(model, batches, device)
    finally:
        random.setstate(states[0])
        torch.random.set_rng_state(states[1])
        model.train(was_training)
    a, b, corr = cca_weights(moments, cfg.model.embed_dim, cfg.train.head_init_ridge)
    with torch.no_grad():
        for proj, w in ((model.image.proj, a), (model.text.proj, b)):
            w = w.T.to(proj.weight)
            proj.weight.copy_(w * (proj.weight.norm() / w.norm()))
    info = {"pairs": int(moments.n), "corr_first": float(corr[0]), "corr_last": float(corr[-1]),
            "seconds": round(time.perf_counter() - started, 1)}
    if dist_info.is_main:
        print(f"train.head_init cca: projections from {info['pairs']} training pairs; canonical correlations "
              f"{info['corr_first']:.3f} (first) to {info['corr_last']:.3f} (pair {len(corr)}), "
              f"{info['seconds']} s")
    return info
