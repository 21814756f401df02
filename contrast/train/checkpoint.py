"""Step checkpoints: weights in safetensors, training state in a ``weights_only``-loadable file, atomic writes.

The run-directory layout and weight I/O live in :mod:`contrast.runs`; this module adds the training state
(optimizer, scheduler, RNG, step). A checkpoint is written into a temporary directory and renamed into place;
``latest`` is replaced atomically after that, so a crash mid-save never leaves a broken latest checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch
from torch import nn

from contrast.errors import CheckpointError
from contrast.runs import WEIGHTS, save_model_weights, step_dir

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


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    extra: dict | None = None,
    keep: int = 2,
) -> Path:
    run_dir = Path(run_dir)
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model_weights(model, tmp / WEIGHTS)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        **(extra or {}),
    }
    torch.save(state, tmp / STATE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = run_dir / "checkpoints" / "latest"
    ptmp = pointer.with_name(f"latest.tmp-{os.getpid()}")
    ptmp.write_text(final.name + "\n")
    os.replace(ptmp, pointer)
    _prune(run_dir / "checkpoints", keep)
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and ".tmp" not in p.name)
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_state(ckpt: Path) -> dict:
    path = ckpt / STATE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has weights but no {STATE}; it cannot be resumed (it can still be loaded for eval)")
    return torch.load(path, map_location="cpu", weights_only=True)
