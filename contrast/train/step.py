"""One optimisation step without host synchronisation: forward and backward (whole, gradient-cached, or averaged over
micro-batches), per-tower gradient norms, the non-finite guard, clipping and the (scaled, gated) optimizer step.

Gradient caching (Gao et al., "Scaling Deep Metric Learning Beyond the GPU Memory Constraint", 2021): when the loss
couples a batch only through its embeddings (ITC, SigLIP), the step first embeds each micro-batch without keeping a
graph, computes the loss and its gradient with respect to the embeddings (and the logit scale and bias) on the whole
batch (across ranks, as usual), then runs each micro-batch again with its random state replayed and back-propagates
the cached embedding gradients. Parameter gradients equal the whole-batch step's; memory holds one micro-batch's
activations plus the batch's embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.modules.batchnorm import _NormBase

from contrast import distributed as D
from contrast.config import ConfigError
from contrast.errors import UserError
from contrast.models import ModelOutput
from contrast.objectives import LossOutput, Objective
from contrast.train.optim import logit_scale_clamp

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ACCUMULATE = ("auto", "cache", "mean")
NONFINITE = ("stop", "skip")
Backward = Callable[[torch.Tensor], None]


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the gradients became NaN or infinite."""


# --------------------------------------------------------------------------------------------------- splitting


def exact_split(couplings: dict[str, str]) -> str | None:
    """How micro-batches of loss terms with these couplings combine into the whole-batch step exactly: ``cache``
    (every term couples the batch through the embeddings only), ``mean`` (every term is a per-caption mean), or None
    (ITM needs the image-text pairs of the whole batch)."""
    kinds = set(couplings.values())
    return {frozenset({"embeddings"}): "cache", frozenset({"sample"}): "mean"}.get(frozenset(kinds))


def accumulation(train_cfg, objective: Objective, per_rank: int) -> str:
    """How a rank's batch of ``per_rank`` pairs is computed: ``whole``, ``cache`` or ``mean`` (checked, explained)."""
    micro, mode = train_cfg.micro_batch_size, train_cfg.accumulate
    if mode not in ACCUMULATE:
        raise ConfigError(f"train.accumulate must be one of {', '.join(ACCUMULATE)}, got '{mode}'")
    if micro is None or micro >= per_rank:
        return "whole"
    if micro < 1 or per_rank % micro:
        raise ConfigError(f"train.micro_batch_size {micro} must divide the batch of each process (train.batch_size "
                          f"{per_rank}); choose a divisor of {per_rank}")
    exact = exact_split(objective.couplings)
    if mode == "mean":
        return "mean"
    if exact == "cache" or (mode == "auto" and exact == "mean"):
        return exact
    terms = ", ".join(f"{n} ({k})" for n, k in objective.couplings.items())
    raise ConfigError(
        f"train.micro_batch_size {micro} with train.accumulate: {mode} cannot be exact for the loss terms {terms}: "
        "gradient caching is exact only when every term couples the batch through its embeddings (itc, sigmoid), "
        "and ITM draws its hard negatives from the image-text pairs of the whole batch. Set train.accumulate: mean "
        "to average the gradients of independent micro-batches (exact for per-caption LM losses; otherwise each "
        "micro-batch is its own contrastive batch, see README 'Large batches'), or remove train.micro_batch_size")


def split(batch: dict, size: int) -> list[dict]:
    """The batch in micro-batches of ``size`` rows; tensors without a batch dimension are shared."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i : i + size] if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v for k, v in batch.items()}
            for i in range(0, n, size)]


def _sync_owner(model: nn.Module) -> nn.Module | None:
    """The DDP or FSDP module that reduces gradients (inside a torch.compile wrapper too), if any."""
    for m in model.modules():
        if isinstance(m, nn.parallel.DistributedDataParallel | FSDPModule):
            return m
    return None


@contextmanager
def no_sync(owner: nn.Module | None, enabled: bool) -> Iterator[None]:
    """Accumulate gradients locally (no cross-rank reduction) while ``enabled``."""
    if not enabled or owner is None:
        yield
    elif isinstance(owner, FSDPModule):
        owner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            owner.set_requires_gradient_sync(True)
    else:
        with owner.no_sync():
            yield


# --------------------------------------------------------------------------------------------------- random state


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


# --------------------------------------------------------------------------------------------------- caching


def _cached_output(outs: list[ModelOutput]) -> tuple[ModelOutput, dict[str, torch.Tensor]]:
    """The whole batch's output from micro-batch outputs computed without a graph: per-sample tensors concatenated,
    scalars (logit scale, bias) taken once, each a leaf whose gradient the loss fills."""
    leaves: dict[str, torch.Tensor] = {}
    for f in dataclasses.fields(ModelOutput):
        values = [getattr(o, f.name) for o in outs]
        if values[0] is None:
            continue
        if not torch.is_tensor(values[0]):
            raise ConfigError(f"gradient caching needs a model whose output is embeddings only, but it also returned "
                              f"'{f.name}' (ITM, captioning or a momentum teacher); set train.accumulate: mean or "
                              "remove train.micro_batch_size")
        joined = values[0] if values[0].ndim == 0 else torch.cat(values)
        leaves[f.name] = joined.detach().requires_grad_(joined.is_floating_point())  # ids take no gradient
    return ModelOutput(**leaves), leaves


def _surrogate(out: ModelOutput, grads: dict[str, torch.Tensor], rows: slice, last: bool) -> torch.Tensor:
    """A scalar whose gradient is the cached gradient pushed through this micro-batch's outputs (scalars once)."""
    total = torch.zeros((), device=_grad_device(grads))
    for name, g in grads.items():
        value = getattr(out, name)
        if g is None or (value.ndim == 0 and not last):
            continue
        total = total + (value.float() * (g if value.ndim == 0 else g[rows]).float()).sum()
    return total


def _grad_device(grads: dict[str, torch.Tensor | None]) -> torch.device:
    return next(g.device for g in grads.values() if g is not None)


def _running_stats(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of every normalisation layer's running statistics, which a forward in training mode updates."""
    return [(b, b.clone()) for m in model.modules() if isinstance(m, _NormBase) and m.training for b in m.buffers()]


def cached_step(run, batch: dict, size: int, backward: Backward) -> tuple[LossOutput, ModelOutput]:
    """Gradient caching over micro-batches of ``size`` rows (see the module docstring)."""
    chunks, states = split(batch, size), []
    saved = _running_stats(run.model)  # they advance once per micro-batch, in the second pass
    with torch.no_grad():
        outs = []
        for c in chunks:
            states.append(_rng_state(run.device))
            with run.autocast:
                outs.append(run.train_model(c))
    full, leaves = _cached_output(outs)
    del outs
    with run.autocast:
        losses = run.objective(full)
    backward(losses.total)
    grads = {name: leaf.grad for name, leaf in leaves.items()}
    for b, v in saved:
        b.copy_(v)
    owner = _sync_owner(run.train_model)
    for i, (c, state) in enumerate(zip(chunks, states)):
        last = i == len(chunks) - 1
        _set_rng_state(state, run.device)
        with no_sync(owner, not last), run.autocast:
            out = run.train_model(c)
            surrogate = _surrogate(out, grads, slice(i * size, (i + 1) * size), last)
        surrogate.backward()  # the cached gradients already carry the loss scale
    return losses, full


def mean_step(run, batch: dict, size: int, backward: Backward) -> tuple[LossOutput, ModelOutput]:
    """Independent micro-batches, each its own loss; gradients (and logged losses) averaged over them."""
    chunks = split(batch, size)
    owner, n = _sync_owner(run.train_model), len(chunks)
    total, parts, out = None, {}, None
    for i, c in enumerate(chunks):
        with no_sync(owner, i < n - 1), run.autocast:
            out = run.train_model(c)
            losses = run.objective(out)
        backward(losses.total / n)
        total = losses.total.detach() / n + (0 if total is None else total)
        for k, v in losses.parts.items():
            parts[k] = v.detach() / n + parts.get(k, 0)
    return LossOutput(total=total, parts=parts), out


def whole_step(run, batch: dict, size: int, backward: Backward) -> tuple[LossOutput, ModelOutput]:
    with run.autocast:
        out = run.train_model(batch)
        losses = run.objective(out)
    backward(losses.total)
    return losses, out


STEPS = {"whole": whole_step, "cache": cached_step, "mean": mean_step}


# --------------------------------------------------------------------------------------------------- the guard


class NonFiniteGuard:
    """Watches every step for a non-finite loss or gradient without synchronising: counters live on the device and
    are read at logged steps. ``stop``: from the first bad step on, no update is applied, and the run stops at the
    next check. ``skip``: a bad step is not applied and is counted; ``max_run`` bad steps in a row stop the run."""

    def __init__(self, mode: str, max_run: int, towers: list[str], terms: list[str], device: torch.device):
        if mode not in NONFINITE:
            raise ConfigError(f"train.nonfinite must be one of {', '.join(NONFINITE)}, got '{mode}'")
        if max_run < 1:
            raise ConfigError(f"train.max_nonfinite must be at least 1, got {max_run}")
        self.mode, self.max_run, self.towers, self.terms = mode, max_run, towers, terms
        z = torch.zeros((), dtype=torch.long, device=device)
        self.step, self.count, self.run, self.halted, self.last = z.clone(), z.clone(), z.clone(), z.clone(), z - 1
        self.last_terms = torch.zeros(len(terms), device=device)
        self.last_towers = torch.zeros(len(towers), dtype=torch.bool, device=device)

    def observe(self, total: torch.Tensor, parts: dict, norms: torch.Tensor | None) -> torch.Tensor:
        """Record this step; returns a 0-dim bool tensor: True when its update must not be applied."""
        self.step += 1
        bad_towers = ~torch.isfinite(norms) if norms is not None else torch.zeros_like(self.last_towers)
        bad = D.any_rank(~torch.isfinite(total.detach()) | bad_towers.any())
        terms = torch.stack([parts[k].detach().float() for k in self.terms]) if self.terms else self.last_terms
        self.count += bad
        self.run = (self.run + 1) * bad
        self.last = torch.where(bad, self.step, self.last)
        self.last_terms = torch.where(bad, terms, self.last_terms)
        self.last_towers = torch.where(bad, bad_towers, self.last_towers)
        if self.mode == "stop":
            self.halted |= bad
            return self.halted.bool()
        return bad

    def report(self) -> dict:
        """Counters for the log (a host synchronisation: call it at logged steps)."""
        return {"nonfinite_steps": int(self.count)}

    def problem(self) -> str | None:
        """Why the run must stop now, or None (a host synchronisation)."""
        stop = bool(self.halted) if self.mode == "stop" else int(self.run) >= self.max_run
        if not stop:
            return None
        terms = {k: round(float(v), 4) for k, v in zip(self.terms, self.last_terms.tolist())}
        towers = [t for t, b in zip(self.towers, self.last_towers.tolist()) if b]
        where = f"non-finite gradients in: {', '.join(towers)}" if towers else "the gradients were finite"
        first = int(self.last) - (int(self.run) - 1 if self.mode == "skip" else 0)
        if self.mode == "stop":
            return (f"the loss or the gradients became non-finite at step {first} (terms: {terms}; {where}); from "
                    f"that step on no update was applied")
        return (f"{int(self.run)} steps in a row (steps {first}-{int(self.last)}) had a non-finite loss or gradients "
                f"(last: terms {terms}; {where}); {int(self.count)} steps were skipped in all")

    def state(self) -> dict:
        return {k: getattr(self, k).cpu() for k in ("step", "count", "run", "halted", "last", "last_terms",
                                                     "last_towers")}

    def load_state(self, state: dict) -> None:
        for k, v in state.items():
            if k in ("step", "count", "run", "halted", "last", "last_terms", "last_towers"):
                setattr(self, k, v.to(getattr(self, k).device, getattr(self, k).dtype))


# --------------------------------------------------------------------------------------------------- the stepper


def _tower_params(optimizer: torch.optim.Optimizer) -> dict[str, list[nn.Parameter]]:
    towers: dict[str, list[nn.Parameter]] = {}
    for g in optimizer.param_groups:
        towers.setdefault(g.get("name", "head").removesuffix("_no_decay"), []).extend(g["params"])
    return towers


def _norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    n = torch.nn.utils.get_total_norm(grads)
    return n.full_tensor() if isinstance(n, DTensor) else n


class Stepper:
    """Everything one step needs beyond the model: how to split the batch, the gradient scaler (fp16), the guard."""

    def __init__(self, run, mode: str, micro: int | None):
        cfg = run.cfg.train
        self.run, self.mode, self.micro = run, mode, micro
        self.towers = _tower_params(run.optimizer)
        self.params = [p for ps in self.towers.values() for p in ps]
        self.scaler = torch.amp.GradScaler(run.device.type) if cfg.precision == "fp16" else None
        self.fused = bool(run.optimizer.defaults.get("fused"))
        self.guard = NonFiniteGuard(cfg.nonfinite, cfg.max_nonfinite, list(self.towers), list(run.objective.terms),
                                    run.device)
        self.grad_norm: torch.Tensor | None = None
        self.clamp_scale = logit_scale_clamp(run.model, run.cfg.model.max_logit_scale)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def __call__(self, batch: dict) -> tuple[LossOutput, ModelOutput]:
        run = self.run
        run.optimizer.zero_grad(set_to_none=True)
        losses, out = STEPS[self.mode](run, batch, self.micro, self.backward)
        skip = self._unscale_and_observe(losses)
        if run.cfg.train.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.params, run.cfg.train.grad_clip, self.grad_norm)
        self._apply(skip)
        self.clamp_scale()
        if run.ema is not None:
            run.ema.update(skip)
        run.scheduler.step()
        return losses, out

    def _tower_norms(self) -> torch.Tensor:
        return torch.stack([_norm(ps, self.run.device) for ps in self.towers.values()])  # (towers,)

    def _unscale_and_observe(self, losses: LossOutput) -> torch.Tensor:
        if self.scaler is None:
            norms = self._tower_norms()
            skip = self.guard.observe(losses.total, losses.parts, norms)
        else:  # gradient overflow is the scaler's business; the guard watches the loss, and poisons a halted step
            skip = self.guard.observe(losses.total, losses.parts, None)
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:  # NaN gradients make the scaler skip the update
                torch._foreach_mul_(grads, torch.where(skip, float("nan"), 1.0).to(grads[0].dtype))
            self.scaler.unscale_(self.run.optimizer)
            norms = self._tower_norms()
        self.grad_norm = norms.square().sum().sqrt()
        return skip

    def _apply(self, skip: torch.Tensor) -> None:
        opt = self.run.optimizer
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        elif self.fused:  # the fused kernel skips the update (and its step count) where found_inf is set
            opt.found_inf = skip.float()
            opt.step()
            del opt.found_inf
        elif not bool(skip):  # other optimizers: a host synchronisation
            opt.step()

    def state(self) -> dict:
        return {"nonfinite": self.guard.state(), **({"scaler": self.scaler.state_dict()} if self.scaler else {})}

    def load_state(self, state: dict) -> None:
        if "nonfinite" in state:
            self.guard.load_state(state["nonfinite"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def build_stepper(run) -> Stepper:
    """The step for ``run`` (after its optimizer and wrapping exist): checks the micro-batch and precision settings."""
    cfg = run.cfg.train
    return Stepper(run, accumulation(cfg, run.objective, cfg.batch_size), cfg.micro_batch_size)


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
