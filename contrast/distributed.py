"""Rank / world helpers and gathering across processes.

Everything here is a no-op at world size 1, so single-process code paths call the same functions. Models never
import this module: the training loop hands :func:`gather_with_grad` (and :func:`ring_shift`) to objectives and
models in a :class:`contrast.objectives.Comm`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

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


def init_from_env(device: torch.device | None = None, timeout_s: float | None = None) -> DistInfo:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1); otherwise do nothing.
    ``timeout_s`` bounds how long one collective waits for the other ranks."""
    if is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return info()
    backend = "nccl" if (device is not None and device.type == "cuda") else "gloo"
    dist.init_process_group(backend=backend, **({"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}))
    return info()


def shutdown() -> None:
    """Leave the process group (after the last collective), so no rank's exit looks like a lost peer."""
    if is_initialized():
        dist.destroy_process_group()


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


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over every rank, in place (itself in one process)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool tensor: ``flag`` set on any rank (an all-reduce, no host synchronisation). Itself in one process."""
    if not is_initialized() or dist.get_world_size() == 1:
        return flag
    y = flag.to(torch.int32)
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y.bool()


# --------------------------------------------------------------------------------------------------- lost ranks

_BEAT, _LOST, _DONE = "contrast/heartbeat/", "contrast/lost", "done"


class Heartbeat:
    """Tells a dead rank from a slow one. Every rank ticks a counter in the process group's store from a daemon
    thread; rank 0 watches every counter, the others watch rank 0's, and a counter that stands still for
    ``lost_after`` seconds marks its rank lost in the store. Every thread reads that mark and calls
    ``on_lost(ranks, reason)``, which is expected to end the process: no rank waits out a collective's timeout.

    A rank that stops on an error says so first (:meth:`fail`), and one that finishes marks itself done
    (:meth:`stop`), so neither is taken for lost. The store calls cost O(1) per rank per tick (rank 0: O(world))."""

    def __init__(self, store: dist.Store, rank: int, world: int, lost_after: float,
                 on_lost: Callable[[list[int], str], None]):
        self.store, self.rank, self.world, self.lost_after, self.on_lost = store, rank, world, lost_after, on_lost
        self.interval = max(0.1, min(1.0, lost_after / 6))
        self.watched = list(range(world)) if rank == 0 else [0]
        self.seen: dict[int, tuple[bytes, float]] = {}
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="contrast-heartbeat", daemon=True)

    @classmethod
    def for_process_group(cls, lost_after: float, on_lost: Callable[[list[int], str], None]) -> Heartbeat | None:
        """A started heartbeat on the default process group's store; None in one process or when ``lost_after`` is
        0. A collective: every rank calls it."""
        if not is_initialized() or dist.get_world_size() == 1 or not lost_after:
            return None
        store = dist.distributed_c10d._get_default_store().clone()  # its own connection, for the thread
        beat = cls(store, dist.get_rank(), dist.get_world_size(), lost_after, on_lost)
        beat.register()
        dist.barrier()  # every counter exists before anyone reads one
        beat.start()
        return beat

    def register(self) -> None:
        """Create this rank's counter (before any rank starts: reading a missing key would block)."""
        self.store.set(self._key(self.rank), "0")

    def start(self) -> None:
        self._thread.start()

    def _key(self, rank: int) -> str:
        return f"{_BEAT}{rank}"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.ticks += 1
                self.store.set(self._key(self.rank), str(self.ticks))
                found = self.lost()
            except Exception as e:  # the store itself is gone: its host (rank 0's node) died
                found = ([0], f"the rendezvous store stopped answering ({type(e).__name__})")
            if found and not self._stop.is_set():
                self.on_lost(*found)
                return

    def lost(self) -> tuple[list[int], str] | None:
        """The ranks marked lost (or failed) in the store, or those whose counters this rank saw stand still for
        ``lost_after`` seconds (then marked for every rank to read)."""
        if self.store.check([_LOST]):
            ranks, _, reason = self.store.get(_LOST).decode().partition(":")
            return [int(r) for r in ranks.split(",")], reason
        now = time.monotonic()
        for r, value in zip(self.watched, self.store.multi_get([self._key(r) for r in self.watched])):
            if self.seen.get(r, (None,))[0] != value:
                self.seen[r] = (value, now)
        stale = [r for r, (value, since) in self.seen.items()
                 if r != self.rank and value != _DONE.encode() and now - since > self.lost_after]
        if not stale:
            return None
        reason = f"no sign of life for {self.lost_after:.0f} s"
        self.store.compare_set(_LOST, "", ",".join(map(str, stale)) + ":" + reason)  # the first finder's word
        return self.lost()

    def quiet_ranks(self) -> tuple[list[int], str]:
        """After a collective failed: the ranks marked lost, or else those whose counters stand still over three
        ticks (a live rank's thread ticks even while its main thread waits). For naming them, not for deciding."""
        if self.store.check([_LOST]):
            return self.lost() or ([], "")
        keys = [self._key(r) for r in range(self.world)]
        before = self.store.multi_get(keys)
        time.sleep(3 * self.interval)
        after = self.store.multi_get(keys)
        quiet = [r for r, (a, b) in enumerate(zip(before, after)) if a == b and b != _DONE.encode() and r != self.rank]
        return quiet, "its process stopped answering"

    def fail(self, reason: str) -> None:
        """This rank stops on an error: the others stop too, naming it and the reason."""
        self._stop.set()
        try:
            self.store.compare_set(_LOST, "", f"{self.rank}:stopped with an error: {reason}")
        except Exception:
            pass

    def stop(self) -> None:
        """This rank finished: its silence from now on is not a loss."""
        self._stop.set()
        try:
            self.store.set(self._key(self.rank), _DONE)
        except Exception:
            pass


def broadcast_object(obj: object) -> object:
    """The main process's ``obj`` on every rank (a collective); ``obj`` itself in one process."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
