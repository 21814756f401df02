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

import os
import random
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
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
from contrast.errors import CheckpointError
from contrast.runs import (
    SHARDED,
    WEIGHTS,
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
) -> Path | None:
    """Checkpoint ``step``; every rank calls it. An FSDP model's ranks each write their shards
    (:func:`_save_sharded`); otherwise the main process alone writes weights and state. Returns the step directory on
    the main process, None elsewhere."""
    if is_sharded(model):
        return _save_sharded(step_dir(Path(run_dir), step), model, optimizer, training_state(step, scheduler, extra),
                             keep)
    if not D.info().is_main:
        return None
    final = step_dir(Path(run_dir), step)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model_weights(model, tmp / WEIGHTS)
    torch.save({**training_state(step, scheduler, extra), "optimizer": optimizer.state_dict()}, tmp / STATE)
    return _publish(tmp, final, keep)


def _publish(tmp: Path, final: Path, keep: int) -> Path:
    """Sync the files of ``tmp``, rename it to ``final``, point ``latest`` at it and prune older checkpoints."""
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    root = final.parent
    pointer = root / "latest"
    ptmp = pointer.with_name(f"latest.tmp-{os.getpid()}")
    ptmp.write_text(final.name + "\n")
    os.replace(ptmp, pointer)
    _prune(root, keep)
    return final


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
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / SHARDED)  # files synced
    if main:
        torch.save(state, tmp / STATE)
        _publish(tmp, final, keep)
    D.barrier()  # no rank goes on before the checkpoint is in place
    return final if main else None


def _prune(ckpt_root: Path, keep: int) -> None:
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and ".tmp" not in p.name)
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_state(ckpt: Path) -> dict:
    path = ckpt / STATE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has weights but no {STATE}; it cannot be resumed (it can still be loaded for eval)")
    return torch.load(path, map_location="cpu", weights_only=True)


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
