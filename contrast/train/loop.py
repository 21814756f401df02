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
from contrast.config import Config, ConfigError, save_config, to_dict
from contrast.data.batches import StreamLoader
from contrast.errors import CheckpointError, UserError
from contrast.models import Model, ModelOutput
from contrast.objectives import Comm, LossOutput, Objective, build_objective
from contrast.runs import (
    CHECKPOINTS,
    WEIGHTS,
    atomic_write_bytes,
    build,
    load_model_weights,
    read_weights,
    resolve,
    resolve_checkpoint,
    save_model_weights,
    step_dir,
    text_tokenizer,
)
from contrast.train import checkpoint as C
from contrast.train import fsdp as F
from contrast.train.data import build_loader, loader_state, to_device, total_skips
from contrast.train.ema import EMA_WEIGHTS, Ema
from contrast.train.evals import (
    Best,
    EvaluationError,
    Evaluator,
    Failure,
    check_best_metric,
    failure_elsewhere,
)
from contrast.train.faults import SigtermStops, exit_when_lost, explain
from contrast.train.heads import check_head_init, init_heads
from contrast.train.host import keep_freed_memory
from contrast.train.log import RunLog
from contrast.train.optim import build_optimizer, build_scheduler
from contrast.train.step import PRECISIONS, NonFiniteLossError, Stepper, autocast, build_stepper

EMA_RUN = "ema"  # train.ema: the averaged weights as a run of their own, inside the run directory

__all__ = ["NonFiniteLossError", "Run", "RunResult", "setup", "train", "train_step"]


@dataclass
class RunResult:
    run_dir: Path
    step: int
    last_loss: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) at logged steps
    checkpoint: Path | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # samples skipped (or repaired) by cause, all ranks
    metrics: dict[str, float] = field(default_factory=dict)  # the eval tasks' metrics at the end of the run
    best: dict | None = None  # with train.best_metric: {metric, value, step} of the best evaluation
    main: bool = True  # this process is the main one (rank 0), which reports the run


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
    resumes: int = 0  # how many times this run was resumed (kept in its checkpoints)
    evaluator: Evaluator | None = None  # eval.tasks / eval.retrieval_split, run every train.eval_every and at the end
    best: Best | None = None  # train.best_metric's best value so far
    owns_group: bool = False  # setup created the process group (and train leaves it at the end)
    ema: Ema | None = None  # train.ema: the average of the trainable weights, updated after every step
    resumed_from: Path | None = None  # the checkpoint a resumed run started from


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------- set-up


def _init_process(cfg: Config) -> tuple[D.DistInfo, torch.device]:
    device = select_device(cfg.train.device)
    dist_info = D.init_from_env(device, cfg.train.collective_timeout_s)
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


def _fresh_start(run_dir: Path, resume: str | None) -> bool:
    """True when the run starts from step 0: no --resume, or --resume latest before any checkpoint was written."""
    return not resume or (resume == "latest" and not (run_dir / CHECKPOINTS / "latest").is_file())


def _resume(run: Run, resume: str) -> tuple[int, dict | None]:
    """Load weights and training state; returns the step and the saved data cursors (None for older checkpoints)."""
    if _fresh_start(run.run_dir, resume):
        run.resumes = 1
        if run.dist.is_main:
            print(f"{run.run_dir} holds no checkpoint yet (stopped before its first one): starting from step 0")
        return 0, None
    ckpt = resolve_checkpoint(run.run_dir if resume == "latest" else resume)
    state = C.load_state(ckpt)
    run.resumes = int(state.get("resumes", 0)) + 1
    C.load_weights_and_optimizer(ckpt, state, run.model, run.optimizer)  # sharded (DCP) or safetensors + optimizer
    run.resumed_from = ckpt
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
    """Process group, run directory, model, objective, optimizer, resumed state, the data loader and the eval
    tasks."""
    owns_group = not D.is_initialized()
    dist_info, device = _init_process(cfg)
    owns_group = owns_group and D.is_initialized()
    run_dir = Path(out_dir)
    _prepare_run_dir(cfg, run_dir, resume, dist_info.is_main)
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build(cfg.model).to(device)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = text_tokenizer(cfg, model)  # a decoder model's: its LM's own tokenizer and template
    if _fresh_start(run_dir, resume):  # a resumed run has its weights and heads in its checkpoint
        start_from(cfg, model, dist_info.is_main)
        init_heads(cfg, model, tokenizer, device, dist_info)
    else:
        check_head_init(cfg, model)
    comm = Comm(D.gather_with_grad if dist_info.world_size > 1 else None, dist_info.rank, dist_info.world_size,
                D.ring_shift)
    model.set_comm(comm)  # a forward that needs the global batch (BLIP's hard negatives) gets it like the loss
    if F.use_fsdp(cfg.train, dist_info):
        F.shard_model(model, device)  # in place: model is the sharded module from here on
    opt = build_optimizer(model, cfg.train)  # after sharding: FSDP's optimizer holds the sharded parameters
    run = Run(cfg, run_dir, dist_info, device, model, model, build_objective(cfg.loss, comm), opt,
              build_scheduler(opt, cfg.train), None, autocast(device, cfg.train.precision), owns_group=owns_group)
    _eval_setup(run)
    data_state = None
    if resume:
        run.start, data_state = _resume(run, resume)
    run.ema = _ema_setup(run)
    run.train_model = _wrap(model, cfg, dist_info, device)
    run.loader = build_loader(cfg, tokenizer, cfg.data.train_split, dist_info, run.start, data_state)
    run.stepper = build_stepper(run)
    run.stepper.guard.step.fill_(run.start)
    run.stepper.load_state(run.resumed or {})
    saved_best = (run.resumed or {}).get("best")
    if run.best is not None and saved_best and saved_best["metric"] == run.best.metric:
        run.best = Best(**saved_best)  # a resumed run keeps its best (unless it now tracks another metric)
    return run


def start_from(cfg: Config, model: nn.Module, main: bool) -> None:
    """``train.init_from``: the named run's weights into the freshly built ``model`` (strictly: every tensor, same
    shapes); the optimizer, schedule and step start anew."""
    source = cfg.train.init_from
    if not source:
        return
    if cfg.train.head_init != "none":
        raise ConfigError(f"train.head_init: {cfg.train.head_init} would replace the projections that train.init_from "
                          f"({source}) brings; set head_init: none to fine-tune them, or drop init_from")
    try:
        ckpt = resolve(Path(source).expanduser())
        load_model_weights(model, ckpt / WEIGHTS)
    except CheckpointError as e:
        raise ConfigError(f"train.init_from {source}: {str(e).splitlines()[0]} {' '.join(str(e).splitlines()[1:2])}"
                          .strip() + "; the model section comes from that run's config.yaml: remove the model keys "
                          "that change its shapes") from e
    if main:
        print(f"weights from {ckpt} (train.init_from); optimizer and schedule start at step 0")


def _ema_setup(run: Run) -> Ema | None:
    """``train.ema``: the average starts from the weights as they are now (fresh, or resumed: then from the
    checkpoint's own average when it has one). Refused with FSDP, whose ranks hold shards of the weights."""
    decay = run.cfg.train.ema
    if not decay:
        return None
    if F.is_sharded(run.model):
        raise ConfigError("train.ema keeps whole copies of the weights, which an FSDP run shards across processes; "
                          "set train.fsdp: false (DDP) or train.ema: 0")
    ema = Ema(run.model, decay)
    saved = run.resumed_from / EMA_WEIGHTS if run.resumed_from is not None else None
    if saved is not None and saved.is_file():
        ema.load(read_weights(saved), int((run.resumed or {}).get("ema_updates", 0)))
    elif saved is not None and run.dist.is_main:
        print(f"{run.resumed_from} holds no {EMA_WEIGHTS} (train.ema was off): the average starts here")
    return ema


def _eval_setup(run: Run) -> None:
    """The eval tasks and the tracked metric, opened before the first step so a bad task file stops the run now."""
    cfg = run.cfg
    if cfg.eval.tasks or cfg.eval.retrieval_split or cfg.eval.caption_split:
        run.evaluator = Evaluator(cfg, run.model, run.device)
    if cfg.train.eval_every and run.evaluator is None:
        raise ConfigError("train.eval_every needs something to evaluate: set eval.tasks (task files), "
                          "eval.retrieval_split (e.g. val) or, for a decoder model, eval.caption_split")
    if cfg.train.best_metric:
        check_best_metric(cfg.train.best_metric, run.evaluator)  # now, not after the steps
        run.best = Best(cfg.train.best_metric)


# --------------------------------------------------------------------------------------------------- the step


def train_step(run: Run, batch: dict[str, torch.Tensor]) -> tuple[LossOutput, ModelOutput]:
    """Forward and backward (whole or in micro-batches), clip, optimizer and scheduler step on one batch; a step
    whose loss or gradients are not finite is not applied (see :class:`contrast.train.step.NonFiniteGuard`)."""
    return run.stepper(to_device(batch, run.device, run.cfg.model.image))


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
    their shards), the main process writes the rest. A failed write stops every rank with the main one's message."""
    data = loader_state(run.loader, run.dist)
    extra = {"world_size": run.dist.world_size, "data": data, "resumes": run.resumes, **run.stepper.state()}
    if run.best is not None:
        extra["best"] = run.best.state()
    tensors = None
    if run.ema is not None:
        extra["ema_updates"] = run.ema.updates
        tensors = {EMA_WEIGHTS: run.ema.tensors()}
    failed, path = None, None
    try:
        path = C.save_checkpoint(run.run_dir, step, run.model, run.optimizer, run.scheduler, extra,
                                 keep=run.cfg.train.keep_checkpoints if keep is None else keep, tensors=tensors)
    except C.CheckpointWriteError as e:
        failed = e
    if bool(D.any_rank(torch.tensor(failed is not None, device=run.device))):  # one all-reduce per checkpoint
        raise failed or C.CheckpointWriteError(f"the main process could not write the checkpoint of step {step} "
                                               "(its message says why); continue with --resume latest")
    return path


def _evaluate(run: Run, log: RunLog, step: int) -> tuple[dict[str, float], bool, list[Failure]]:
    """Every rank evaluates; the main process's metrics decide, the same way on every rank, whether ``step`` is the
    best so far. Returns the metrics, that decision (the caller then checkpoints ``step`` and calls
    :func:`_mark_best`), made before the checkpoint so that the checkpoint holds it, and the evaluations that failed
    (the same list on every rank; the caller checkpoints and stops, :func:`_evaluation_failed`)."""
    metrics, failures = run.evaluator.run(run.model)
    if run.ema is not None:  # the same evaluations of the averaged weights (ema/<metric>), on every rank alike
        with run.ema.swapped(run.model):
            averaged, more = run.evaluator.run(run.model)
        metrics.update({f"ema/{k}": v for k, v in averaged.items()})
        failures = failures or more
    anywhere = bool(D.any_rank(torch.tensor(bool(failures), device=run.device)))
    metrics, failures = D.broadcast_object((metrics, failures))
    if anywhere and not failures:
        failures = [failure_elsewhere()]
    improved = not failures and run.best is not None and run.best.update(metrics, step)
    log.evaluation(step, metrics, run.best.state() if run.best is not None else None)
    return metrics, improved, failures


def _mark_best(run: Run, path: Path | None) -> None:
    if run.dist.is_main and path is not None:
        C.point(run.run_dir / CHECKPOINTS / "best", path)


def _evaluation_failed(run: Run, step: int, failures: list[Failure], final: bool) -> EvaluationError:
    """The error that ends a run whose evaluation at ``step`` failed, once the checkpoint of ``step`` is written: it
    names each failed evaluation and the command that reruns it on that checkpoint (consolidated first when sharded,
    so that the command can load it)."""
    ckpt = step_dir(run.run_dir, step)
    if F.is_sharded(run.model) and run.dist.is_main and not (ckpt / WEIGHTS).is_file():
        C.consolidate(ckpt)
    D.barrier()
    then = ("training is complete" if final else
            "once it is fixed, continue training with --resume latest")
    return EvaluationError(f"evaluation at step {step} failed: {run.evaluator.describe(failures, ckpt)}. The "
                           f"checkpoint of step {step} is saved in {ckpt}; {then}")


# --------------------------------------------------------------------------------------------------- the loop


def train(cfg: Config, out_dir: str | Path, resume: str | None = None, progress: bool = True) -> RunResult:
    """Train ``cfg`` into ``out_dir``; ``resume`` is None, 'latest' or a checkpoint path. However the run ends, a
    summary goes to metrics.jsonl and the output; a lost rank, a SIGTERM or a failed checkpoint write ends it with a
    message naming the cause and the checkpoint to continue from."""
    started = time.perf_counter()
    run = setup(cfg, out_dir, resume)
    result = RunResult(run_dir=run.run_dir, step=run.start, last_loss=float("nan"), main=run.dist.is_main)
    log = RunLog(run.run_dir, cfg.train.steps, run.start, run.dist.is_main, progress, resumed=bool(resume),
                 tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb, config=to_dict(cfg))
    heartbeat = D.Heartbeat.for_process_group(
        cfg.train.lost_rank_s, exit_when_lost(run.run_dir, lambda why: _summarise(run, log, result, started, f"stopped: {why}")))
    with SigtermStops() as stops:
        try:
            _steps(run, log, result)
            _finish(run, log, result)
            _summarise(run, log, result, started, "completed", gather=True)
        except BaseException as e:
            stops.quiet()
            error = explain(e, heartbeat, run.run_dir)
            why = str(error).splitlines()[0] if str(error) else type(error).__name__
            if heartbeat is not None:
                heartbeat.fail(why[:300])
            _summarise(run, log, result, started, f"stopped: {why}")
            if error is e:
                raise
            raise error from e
        finally:
            log.close()
    if heartbeat is not None:
        heartbeat.stop()
    D.barrier()
    if run.owns_group:
        D.shutdown()  # every rank leaves together: no rank's exit looks like a lost peer
    return result


def _steps(run: Run, log: RunLog, result: RunResult) -> None:
    run.model.train()
    batches = iter(run.loader)
    while result.step < run.cfg.train.steps:
        result.step = _one_step(run, next(batches), result.step, log, result)


def _finish(run: Run, log: RunLog, result: RunResult) -> None:
    """The final checkpoint (FSDP: consolidated), then the end-of-run evaluation, which re-points ``best`` at the
    final checkpoint when it wins; a failing evaluation leaves the checkpoint and ends the run naming it."""
    step = result.step
    if not (run.resumed and step == run.start):  # a run resumed at its last step has its checkpoint
        result.checkpoint = _save(run, step)
    elif run.dist.is_main:
        result.checkpoint = step_dir(run.run_dir, step)
    if F.is_sharded(run.model) and result.checkpoint is not None and not (result.checkpoint / WEIGHTS).is_file():
        C.consolidate(result.checkpoint)  # the final checkpoint gets model.safetensors: main rank only, others wait
    if run.ema is not None and run.dist.is_main:
        _write_ema_run(run, step)
    D.barrier()
    if run.evaluator is None:
        return
    result.metrics, improved, failures = _evaluate(run, log, step)
    result.best = run.best.state() if run.best is not None else None
    if improved:
        _record_best(run, result.checkpoint)
    if failures:
        raise _evaluation_failed(run, step, failures, final=True)


def _write_ema_run(run: Run, step: int) -> Path:
    """RUN/ema: a run directory (this run's config, the averaged weights at ``step``) that every command loads."""
    target = run.run_dir / EMA_RUN
    ckpt = step_dir(target, step)
    ckpt.mkdir(parents=True, exist_ok=True)
    save_config(run.cfg, target / "config.yaml")
    with run.ema.swapped(run.model):
        save_model_weights(run.model, ckpt / WEIGHTS)
    C.point(target / CHECKPOINTS / "latest", ckpt)
    print(f"the weights' moving average (train.ema {run.cfg.train.ema}) at step {step}: {target}")
    return target


def _record_best(run: Run, path: Path | None) -> None:
    """``path`` (written before its evaluation) becomes the best checkpoint: its state's best, then the pointer."""
    if not run.dist.is_main or path is None:
        return
    import io

    state = C.load_state(path)
    state["best"] = run.best.state()
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path / C.STATE, buf.getvalue())
    _mark_best(run, path)


def _summarise(run: Run, log: RunLog, result: RunResult, started: float, status: str, gather: bool = False) -> None:
    """The end-of-run record: steps, resumes, skipped samples by cause (all ranks' when ``gather``, a collective;
    this rank's otherwise), non-finite steps, wall time, how it ended. Printed and written by the main process."""
    state = loader_state(run.loader, run.dist) if gather else {"streams": run.loader.state()}
    result.skipped = total_skips(state)
    record = {"steps": result.step, "started_at_step": run.start, "resumes": run.resumes,
              "skipped": result.skipped, **run.stepper.guard.report(),
              "wall_s": round(time.perf_counter() - started, 1), "status": status}
    if not gather and run.dist.world_size > 1:
        record["skipped_counts_of_rank"] = run.dist.rank
    if result.best:
        record["best"] = result.best
    log.summary(record)
    if run.dist.is_main:
        skipped = sum(result.skipped.values())
        print(f"run summary: {record['steps']} steps (from step {run.start}; resumed {run.resumes} times), "
              f"{skipped} samples skipped, {record['nonfinite_steps']} non-finite steps, {record['wall_s']} s: "
              f"{status}", flush=True)


def _one_step(run: Run, batch: dict, step: int, log: RunLog, result: RunResult) -> int:
    t = run.cfg.train
    losses, out = train_step(run, batch)
    step += 1
    result.step = step  # taken, whatever stops the run on this step (a failed evaluation or checkpoint write)
    log.count(batch["input_ids"].shape[0] * run.dist.world_size)
    logged = step % t.log_every == 0 or step == t.steps
    saving = t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps  # the last: in _finish
    if logged or saving:  # host synchronisation on these steps only
        _check_finite(run, step)
    if logged:
        value = float(D.all_reduce_mean(losses.total.detach()))
        result.losses.append((step, value))
        result.last_loss = value
        extra = {"grad_norm": float(run.stepper.grad_norm), **run.stepper.guard.report()}
        log.write(step, value, losses, out, run.optimizer.param_groups[0]["lr"], extra)
    log.advance()
    improved, failures = False, []
    if t.eval_every and step % t.eval_every == 0 and step < t.steps:  # the last step's evaluation ends the run
        _, improved, failures = _evaluate(run, log, step)
    if saving or improved or failures:  # the best evaluation's step is checkpointed even between checkpoint steps
        result.checkpoint = _save(run, step)
    if improved:
        _mark_best(run, result.checkpoint)
    if failures:
        raise _evaluation_failed(run, step, failures, final=False)
    return step
