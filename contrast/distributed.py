"""Rank / world helpers and gathering across processes.

Everything here is a no-op at world size 1, so single-process code paths call the same functions. Models never
import this module: the training loop hands :func:`gather_with_grad` (and :func:`ring_shift`) to objectives and
models in a :class:`contrast.objectives.Comm`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    if not is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def init_from_env(device: torch.device | None = None) -> DistInfo:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1); otherwise do nothing."""
    if is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return info()
    backend = "nccl" if (device is not None and device.type == "cuda") else "gloo"
    dist.init_process_group(backend=backend)
    return info()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients across ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ws = dist.get_world_size()
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0 (rank order), gradients flowing back to each rank.

    Requires equal batch sizes on every rank. Identity at world size 1.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def ring_shift(x: torch.Tensor) -> torch.Tensor:
    """Send ``x`` to the next rank and return the previous rank's (ranks in a ring), a tensor of the same shape.

    Every rank calls it with the same shape. No autograd: the sigmoid loss, which passes text features around the
    ranks with it, writes its own backward. Identity at world size 1.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    ws, rank = dist.get_world_size(), dist.get_rank()
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, (rank + 1) % ws), dist.P2POp(dist.irecv, out, (rank - 1) % ws)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_initialized() or dist.get_world_size() == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor: ``flag`` set on any rank (an all-reduce, no host synchronisation). Itself in one process."""
    if not is_initialized() or dist.get_world_size() == 1:
        return flag
    y = flag.to(torch.int32)
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y.bool()
