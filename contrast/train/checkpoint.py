"""Step checkpoints: weights in safetensors, training state in a ``weights_only``-loadable file, atomic writes.

The run-directory layout and weight I/O live in :mod:`contrast.runs`; this module adds the training state
(optimizer, scheduler, RNG, step). A checkpoint is written into a temporary directory and renamed into place;
``latest`` is replaced atomically after that, so a crash mid-save never leaves a broken latest checkpoint.

An FSDP run (:mod:`contrast.train.fsdp`) writes sharded checkpoints instead: every rank writes its shards of the
weights and the optimizer state with ``torch.distributed.checkpoint`` (DCP) into ``sharded/``, the main process
writes the rest of the training state into ``state.pt``, and all ranks finish before the rename. DCP reshards on
load, so a sharded checkpoint resumes with any number of processes, sharded or not; :func:`consolidate` turns one
into the usual ``model.safetensors`` in a single process.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from contrast import distributed as D
from contrast.config import load_config
from contrast.errors import CheckpointError, unpickling_problem
from contrast.runs import (
    SHARDED,
    WEIGHTS,
    atomic_write_text,
    build,
    load_model_weights,
    resolve_checkpoint,
    run_dir_of,
    save_model_weights,
    step_dir,
)
from contrast.train.fsdp import is_sharded

STATE = "state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def training_state(step: int, scheduler, extra: dict | None = None) -> dict:
    """What ``state.pt`` holds besides the optimizer: step, scheduler, RNG and ``extra`` (data cursors, ...)."""
    return {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), **(extra or {})}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    extra: dict | None = None,
    keep: int = 2,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path | None:
    """Checkpoint ``step``; every rank calls it. An FSDP model's ranks each write their shards
    (:func:`_save_sharded`); otherwise the main process alone writes weights and state, and each ``tensors`` entry
    ``{file name: state dict}`` as a safetensors file beside them (the weight average, ``ema.safetensors``). Returns
    the step directory on the main process, None elsewhere."""
    if is_sharded(model):
        return _save_sharded(step_dir(Path(run_dir), step), model, optimizer, training_state(step, scheduler, extra),
                             keep)
    if not D.info().is_main:
        return None
    final = step_dir(Path(run_dir), step)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    with _write_failures(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model_weights(model, tmp / WEIGHTS)
        for name, sd in (tensors or {}).items():
            save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(tmp / name))
        torch.save({**training_state(step, scheduler, extra), "optimizer": optimizer.state_dict()}, tmp / STATE)
        return _publish(tmp, final, keep)


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a file system refusing a rename); the previous one stands."""


@contextlib.contextmanager
def _write_failures(tmp: Path, final: Path) -> Iterator[None]:
    """A write that fails leaves no partial step directory behind and stops the run with a message naming the
    checkpoint that still stands (``latest`` moves only after a complete write; older ones are pruned after it)."""
    try:
        yield
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        pointer = final.parent / "latest"
        stands = (f"the previous checkpoint {final.parent / pointer.read_text().strip()} is intact"
                  if pointer.is_file() else "no earlier checkpoint exists")
        cause = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        raise CheckpointWriteError(f"writing the checkpoint {final} failed ({cause}); {stands}. Free disk space or "
                                   "fix the file system, then continue with --resume latest") from e


def _publish(tmp: Path, final: Path, keep: int) -> Path:
    """Sync the files of ``tmp``, rename it to ``final``, point ``latest`` at it and prune older checkpoints."""
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    root = final.parent
    old = final.with_name(final.name + f".old-{os.getpid()}")
    if final.exists():  # the same step written again: set the old one aside until the new one is in place
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old.exists():
            os.replace(old, final)
        raise
    point(root / "latest", final)
    shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep)
    return final


def point(pointer: Path, target: Path) -> None:
    """Make the file ``pointer`` (latest, best) name the step directory ``target``, atomically."""
    atomic_write_text(pointer, target.name + "\n")


def _save_sharded(final: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, keep: int
                  ) -> Path | None:
    """A sharded checkpoint of an FSDP ``model`` (DCP shards, every rank) plus ``state`` (main rank) at ``final``."""
    main = dist.get_rank() == 0
    name = [f"{final.name}.tmp-{os.getpid()}"]  # the main rank's name for the temporary directory
    if main:
        shutil.rmtree(final.with_name(name[0]), ignore_errors=True)
    dist.broadcast_object_list(name, src=0)  # after the main rank cleared it
    tmp = final.with_name(name[0])
    model_state, optim_state = get_state_dict(model, optimizer)
    failed = None
    try:
        with _write_failures(tmp, final):
            try:
                dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / SHARDED)  # synced
            except CheckpointException as e:  # every rank gets it when any rank's write failed
                raise OSError(_first_line(e)) from e
            if main:
                torch.save(state, tmp / STATE)
                _publish(tmp, final, keep)
    except CheckpointWriteError as e:
        failed = e
    D.barrier()  # no rank goes on before the checkpoint is in place (or every rank knows it is not)
    if failed is not None:
        raise failed
    return final if main else None


def _prune(ckpt_root: Path, keep: int) -> None:
    """Keep the newest ``keep`` step directories and the one ``best`` names; remove what killed writers left."""
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and "." not in p.name)
    best = ckpt_root / "best"
    protected = best.read_text().strip() if best.is_file() else None
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != protected:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_root.glob("step_*.*-*"):  # .tmp-PID / .old-PID of a process that died mid-write
        shutil.rmtree(stale, ignore_errors=True)


STATE_KEYS = ("step", "scheduler", "rng")


def load_state(ckpt: Path) -> dict:
    """The training state of a checkpoint. Only tensors and plain values are read (``weights_only``): a file holding
    anything else (code to run, objects of other programs) is refused with a message, and nothing in it runs."""
    path = ckpt / STATE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has weights but no {STATE}; it cannot be resumed (it can still be loaded for eval)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on the pickle protocol of foreign files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds more than tensors and plain values ({unpickling_problem(e)}), so it was "
                              "refused unread: it is not a training state written by contrast. Resume from a "
                              "checkpoint of this run's own, or start fresh") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({unpickling_problem(e)}); it may be truncated or damaged. "
                              "Resume from an earlier checkpoint (--resume RUN/checkpoints/step_N)") from e
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise CheckpointError(f"{path} is not a training state written by contrast (it lacks "
                              f"{', '.join(STATE_KEYS)}); resume from a checkpoint of this run's own")
    return state


def load_weights_and_optimizer(ckpt: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore ``model`` and ``optimizer`` from a checkpoint: a sharded one into any model (DCP reshards it to this
    run's processes and sharding), one with safetensors weights into an unsharded model."""
    if (ckpt / SHARDED).is_dir():
        _load_sharded(ckpt / SHARDED, model, optimizer)
    elif is_sharded(model):
        raise CheckpointError(f"{ckpt} was written without train.fsdp (it has no {SHARDED}/ folder) and an FSDP run "
                              "resumes only sharded checkpoints; resume it with --set train.fsdp=false")
    else:
        load_model_weights(model, ckpt / WEIGHTS)
        optimizer.load_state_dict(state["optimizer"])


def _load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        _dcp_load(state, folder, no_dist=not D.is_initialized())
    except (Exception, CheckpointException) as e:  # DCP's own exception derives from BaseException
        raise CheckpointError(f"the sharded checkpoint {folder} cannot be loaded into this model and optimizer "
                              f"({_first_line(e)}); resume it with the config it was trained with (its run "
                              "directory's config.yaml)") from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _dcp_load(state: dict, folder: Path, no_dist: bool) -> None:
    """``dcp.load`` in place into ``state``; ``no_dist``: every tensor whole, read by this process alone."""
    with warnings.catch_warnings():  # DCP warns when it loads in one process, which is the intent then
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder, no_dist=no_dist)


def _first_line(e: BaseException) -> str:
    """The cause in one line: for DCP's exception, that of the first failing rank (missing or mis-shaped tensors)."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def consolidate(path: str | Path) -> Path:
    """Write ``model.safetensors`` into a sharded checkpoint (a run directory, its checkpoints folder or a step
    directory), in this process alone: no torchrun, no process group. Returns the weights file."""
    ckpt = resolve_checkpoint(path)
    out = ckpt / WEIGHTS
    if not (ckpt / SHARDED).is_dir():
        return out  # written unsharded: the weights are already there
    model = build(load_config(run_dir_of(ckpt) / "config.yaml").model)
    state = get_model_state_dict(model)
    try:
        _dcp_load({"model": state}, ckpt / SHARDED, no_dist=True)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"the sharded checkpoint in {ckpt} cannot be loaded into the model of its "
                              f"config.yaml ({_first_line(e)}); it may be damaged or incomplete") from e
    set_model_state_dict(model, state)
    tmp = out.with_name(f"{WEIGHTS}.tmp-{os.getpid()}")
    save_model_weights(model, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out
