"""The training loop: :func:`setup` builds everything once, :func:`train_step` is one optimisation step, and
:func:`train` drives them. The loop never knows which model family or objective it runs.

Data order is a pure function of (seed, epoch, position) (see :mod:`contrast.train.data`); a checkpoint stores
every data stream's cursor, so resuming at step k continues with exactly the batches the uninterrupted run would
have seen, mid-epoch and with DataLoader workers.
"""

from __future__ import annotations

import random
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from contrast import distributed as D
from contrast.config import Config, ConfigError, save_config
from contrast.data.batches import StreamLoader
from contrast.data.transforms import normalise_batch
from contrast.errors import UserError
from contrast.models import Model, ModelOutput
from contrast.objectives import Comm, LossOutput, Objective, build_objective
from contrast.runs import build, resolve_checkpoint, step_dir
from contrast.tokenizer import build_tokenizer
from contrast.train import checkpoint as C
from contrast.train import fsdp as F
from contrast.train.data import build_loader, loader_state, total_skips
from contrast.train.host import keep_freed_memory
from contrast.train.log import RunLog
from contrast.train.optim import build_optimizer, build_scheduler
from contrast.train.step import PRECISIONS, NonFiniteLossError, Stepper, autocast, build_stepper

__all__ = ["NonFiniteLossError", "Run", "RunResult", "setup", "train", "train_step"]


@dataclass
class RunResult:
    run_dir: Path
    step: int
    last_loss: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) at logged steps
    checkpoint: Path | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # samples skipped (or repaired) by cause, all ranks


@dataclass
class Run:
    """Everything :func:`setup` builds; :func:`train_step` and :func:`train` only read it."""

    cfg: Config
    run_dir: Path
    dist: D.DistInfo
    device: torch.device
    model: Model  # the bare model (checkpoints, logging)
    train_model: nn.Module  # what the step calls: the model, wrapped by DDP and/or torch.compile
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: StreamLoader
    autocast: AbstractContextManager
    start: int = 0
    stepper: Stepper | None = None  # built last in setup: the step, the gradient scaler and the non-finite guard
    resumed: dict | None = None  # the training state a resumed run started from


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------- set-up


def _init_process(cfg: Config) -> tuple[D.DistInfo, torch.device]:
    device = select_device(cfg.train.device)
    dist_info = D.init_from_env(device)
    if device.type == "cuda" and dist_info.world_size > 1:
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cpu" and cfg.train.keep_host_memory:
        keep_freed_memory()
    if cfg.train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{cfg.train.precision}'")
    return dist_info, device


def _prepare_run_dir(cfg: Config, run_dir: Path, resume: str | None, main: bool) -> None:
    if not main:
        return
    if not resume and (run_dir / "checkpoints" / "latest").is_file():
        raise UserError(f"{run_dir} already holds a trained run; continue it with --resume latest, or pass another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")


def _resume(run: Run, resume: str) -> tuple[int, dict | None]:
    """Load weights and training state; returns the step and the saved data cursors (None for older checkpoints)."""
    ckpt = resolve_checkpoint(run.run_dir if resume == "latest" else resume)
    state = C.load_state(ckpt)
    C.load_weights_and_optimizer(ckpt, state, run.model, run.optimizer)  # sharded (DCP) or safetensors + optimizer
    run.scheduler.load_state_dict(state["scheduler"])
    C.set_rng_state(state["rng"])
    run.resumed = state
    if run.dist.is_main:
        print(f"resumed from {ckpt} at step {int(state['step'])}")
        if "data" not in state:
            print("this checkpoint holds no data position (written by an earlier version): the data order restarts")
    return int(state["step"]), state.get("data")


def _wrap(model: nn.Module, cfg: Config, dist_info: D.DistInfo, device: torch.device) -> nn.Module:
    wrapped = model
    if dist_info.world_size > 1 and not F.is_sharded(model):  # an FSDP model reduces its own gradients
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(wrapped) if cfg.train.compile else wrapped


def setup(cfg: Config, out_dir: str | Path, resume: str | None = None) -> Run:
    """Process group, run directory, model, objective, optimizer, resumed state and the data loader."""
    dist_info, device = _init_process(cfg)
    run_dir = Path(out_dir)
    _prepare_run_dir(cfg, run_dir, resume, dist_info.is_main)
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build(cfg.model).to(device)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = build_tokenizer(cfg.model.text)
    comm = Comm(D.gather_with_grad if dist_info.world_size > 1 else None, dist_info.rank, dist_info.world_size,
                D.ring_shift)
    model.set_comm(comm)  # a forward that needs the global batch (BLIP's hard negatives) gets it like the loss
    if F.use_fsdp(cfg.train, dist_info):
        F.shard_model(model, device)  # in place: model is the sharded module from here on
    opt = build_optimizer(model, cfg.train)  # after sharding: FSDP's optimizer holds the sharded parameters
    run = Run(cfg, run_dir, dist_info, device, model, model, build_objective(cfg.loss, comm), opt,
              build_scheduler(opt, cfg.train), None, autocast(device, cfg.train.precision))
    data_state = None
    if resume:
        run.start, data_state = _resume(run, resume)
    run.train_model = _wrap(model, cfg, dist_info, device)
    run.loader = build_loader(cfg, tokenizer, cfg.data.train_split, dist_info, run.start, data_state)
    run.stepper = build_stepper(run)
    run.stepper.guard.step.fill_(run.start)
    run.stepper.load_state(run.resumed or {})
    return run


# --------------------------------------------------------------------------------------------------- the step


def train_step(run: Run, batch: dict[str, torch.Tensor]) -> tuple[LossOutput, ModelOutput]:
    """Forward and backward (whole or in micro-batches), clip, optimizer and scheduler step on one batch; a step
    whose loss or gradients are not finite is not applied (see :class:`contrast.train.step.NonFiniteGuard`)."""
    return run.stepper(to_device(batch, run.device, run.cfg.model.image))


def to_device(batch: dict, device: torch.device, image_cfg) -> dict:
    """The batch on ``device``; uint8 pixels (as the loader sends them) are normalised there."""
    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "pixels" in batch and batch["pixels"].dtype == torch.uint8:
        mean = torch.tensor(image_cfg.mean).view(-1, 1, 1)
        batch["pixels"] = normalise_batch(batch["pixels"], mean, torch.tensor(image_cfg.std).view(-1, 1, 1))
    return batch


def _check_finite(run: Run, step: int) -> None:
    """Stop the run when the non-finite guard says so (at logged and checkpoint steps: a host synchronisation)."""
    problem = run.stepper.guard.problem()
    if problem is None:
        return
    saved = _save(run, step, keep=run.cfg.train.keep_checkpoints + 1)
    raise NonFiniteLossError(
        f"{problem}. The weights from before it are saved in {saved or 'the main process checkpoint'} (at step {step}, "
        "so a resumed run goes on with the next batches). Lower train.lr, raise train.warmup_steps or set "
        "train.grad_clip, or set train.nonfinite: skip; then resume with --resume latest."
    )


def _save(run: Run, step: int, keep: int | None = None) -> Path | None:
    """Checkpoint ``step`` with every rank's data cursors; all ranks call it (gathering the cursors; FSDP ranks write
    their shards), the main process writes the rest."""
    data = loader_state(run.loader, run.dist)
    return C.save_checkpoint(run.run_dir, step, run.model, run.optimizer, run.scheduler,
                             {"world_size": run.dist.world_size, "data": data, **run.stepper.state()},
                             keep=run.cfg.train.keep_checkpoints if keep is None else keep)


# --------------------------------------------------------------------------------------------------- the loop


def train(cfg: Config, out_dir: str | Path, resume: str | None = None, progress: bool = True) -> RunResult:
    """Train ``cfg`` into ``out_dir``; ``resume`` is None, 'latest' or a checkpoint path."""
    started = time.perf_counter()
    run = setup(cfg, out_dir, resume)
    result = RunResult(run_dir=run.run_dir, step=run.start, last_loss=float("nan"))
    log = RunLog(run.run_dir, cfg.train.steps, run.start, run.dist.is_main, progress)
    run.model.train()
    step = run.start
    try:
        batches = iter(run.loader)
        while step < cfg.train.steps:
            step = _one_step(run, next(batches), step, log, result)
    finally:
        log.close()
    result.step = step
    t = cfg.train
    saved = step > run.start and t.checkpoint_every and step % t.checkpoint_every == 0  # the same on every rank
    if not saved and not (resume and step == run.start):
        result.checkpoint = _save(run, step)
    elif run.dist.is_main:
        result.checkpoint = step_dir(run.run_dir, step)
    result.skipped = total_skips(loader_state(run.loader, run.dist))
    log.summary({"steps": step, "started_at_step": run.start, "skipped": result.skipped,
                 "wall_s": round(time.perf_counter() - started, 1)})
    if F.is_sharded(run.model) and result.checkpoint is not None and result.checkpoint.is_dir():
        C.consolidate(result.checkpoint)  # the final checkpoint gets model.safetensors: main rank only, others wait
    D.barrier()
    return result


def _one_step(run: Run, batch: dict, step: int, log: RunLog, result: RunResult) -> int:
    t = run.cfg.train
    losses, out = train_step(run, batch)
    step += 1
    log.count(batch["input_ids"].shape[0] * run.dist.world_size)
    logged, saving = step % t.log_every == 0 or step == t.steps, t.checkpoint_every and step % t.checkpoint_every == 0
    if logged or saving:  # host synchronisation on these steps only
        _check_finite(run, step)
    if logged:
        value = float(D.all_reduce_mean(losses.total.detach()))
        result.losses.append((step, value))
        result.last_loss = value
        extra = {"grad_norm": float(run.stepper.grad_norm), **run.stepper.guard.report()}
        log.write(step, value, losses, out, run.optimizer.param_groups[0]["lr"], extra)
    log.advance()
    if saving:
        result.checkpoint = _save(run, step)
    return step
