"""Step checkpoints: weights in safetensors, training state in a ``weights_only``-loadable file, atomic writes.

Layout: ``RUN_DIR/checkpoints/step_00000100/{model.safetensors,state.pt}`` and ``RUN_DIR/checkpoints/latest``
naming the newest complete step directory. A checkpoint is written into a temporary directory and renamed into
place; ``latest`` is replaced atomically after that, so a crash mid-save never leaves a broken latest checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from contrast.errors import UserError

WEIGHTS = "model.safetensors"
STATE = "state.pt"


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete, or made for a different model."""


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def save_model_weights(model: nn.Module, path: str | Path) -> None:
    save_model(unwrap(model), str(path))


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``model``; a file from a different model raises naming the tensors that differ."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e
    model = unwrap(model)
    own = model.state_dict()
    shape_diff = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    # tensors shared between modules are stored once; their other names may be absent from the file
    aliases = _shared_aliases(model)
    missing = [k for k in own if k not in tensors and not any(a in tensors for a in aliases.get(k, ()))]
    unexpected = [k for k in tensors if k not in own]
    if shape_diff or missing or unexpected:
        lines = []
        if shape_diff:
            lines.append(f"{len(shape_diff)} tensors differ in shape: " + "; ".join(shape_diff[:8]))
        if missing:
            lines.append(f"{len(missing)} model tensors are missing from the checkpoint: " + ", ".join(missing[:8]))
        if unexpected:
            lines.append(f"{len(unexpected)} checkpoint tensors are not in the model: " + ", ".join(unexpected[:8]))
        raise CheckpointError(
            f"checkpoint {path} was made for a different model config.\n  "
            + "\n  ".join(lines)
            + "\n  Load it with the config it was trained with (the run directory's config.yaml), or start fresh."
        )
    for k, v in own.items():
        src = tensors.get(k)
        if src is None:
            src = next(tensors[a] for a in aliases[k] if a in tensors)
        with torch.no_grad():
            v.copy_(src)


def _shared_aliases(model: nn.Module) -> dict[str, list[str]]:
    by_ptr: dict[tuple[int, int], list[str]] = {}
    for k, v in model.state_dict(keep_vars=False).items():
        by_ptr.setdefault((v.untyped_storage().data_ptr(), v.storage_offset()), []).append(k)
    out: dict[str, list[str]] = {}
    for names in by_ptr.values():
        for n in names:
            out[n] = [m for m in names if m != n]
    return out


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


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


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


def resolve(path: str | Path) -> Path:
    """A run directory, a ``checkpoints`` folder or a step directory -> the step directory to load."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path not found: {p}")
    if (p / WEIGHTS).is_file():
        return p
    for root in (p / "checkpoints", p):
        pointer = root / "latest"
        if pointer.is_file():
            target = root / pointer.read_text().strip()
            if not (target / WEIGHTS).is_file():
                raise CheckpointError(f"{pointer} names {target}, which has no {WEIGHTS}; the run may be damaged")
            return target
    raise CheckpointError(f"{p} holds no checkpoint (no {WEIGHTS}, no checkpoints/latest); train first or pass a step directory")


def load_state(ckpt: Path) -> dict:
    path = ckpt / STATE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has weights but no {STATE}; it cannot be resumed (it can still be loaded for eval)")
    return torch.load(path, map_location="cpu", weights_only=True)


def run_dir_of(ckpt: Path) -> Path:
    """The run directory that holds a step directory (where config.yaml lives)."""
    for cand in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (cand / "config.yaml").is_file():
            return cand
    raise CheckpointError(f"no config.yaml found beside {ckpt}; it is needed to rebuild the model")
