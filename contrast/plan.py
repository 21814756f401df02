"""Plan a run before spending accelerator hours: memory per device, FLOPs, step time and the settings that make a
recipe fit (``contrast plan``).

Everything is measured on the machine the planner runs on (a CPU is fine) from a few small training micro-steps of
the recipe's own model (:func:`contrast.runs.build`) on a batch of the recipe's shapes, at two batch sizes
(:data:`PROBE_BATCHES`), and extrapolated linearly in the batch (per-sample slope, fixed intercept):

- parameters: counted per tower as the optimizer groups them (image / text / head);
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over the model's forward, the loss and the backward (matmuls,
  convolutions, attention; the backward of a checkpointed model includes its recomputation);
- activations: the bytes saved for the backward (``torch.autograd.graph.saved_tensors_hooks`` over the forward and
  the loss, storages counted once, parameters left out);
- the step's peak: every tensor allocated during forward, loss and backward, followed until it is freed (a
  dispatch mode over the step); its peak, gradients left out, less the saved activations is the backward's
  workspace (the gradients of activations, a checkpointed segment's recomputed activations);
- the logit blocks of ITC and the sigmoid loss (quadratic in the batch, negligible at the probe's batch sizes) are
  derived from :mod:`contrast.objectives`' documented blocks: a local block of ``B_local x B_global`` float32
  logits, its exponentials kept twice for ITC's backward, or tiles of at most ``loss.tile_size ** 2`` entries.

Each process computes ``train.batch_size`` pairs per step (the training loop's reading; the global batch is that
times the number of devices). The per-device memory of a setting (micro-batch, activation checkpointing, FSDP) is
then the sum of weights, gradients, AdamW's two moments, the step's peak at the micro-batch, the loss and, with
gradient caching, the cached embeddings; step time is the FLOPs a device executes over ``peak TFLOP/s x MFU``.
FLOPs are counted in a pass of their own (the counter's module tracking keeps tensors alive into the backward).
Communication and kernel choices of the target device are not modelled.
"""

from __future__ import annotations

import copy
import itertools
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from contrast.config import Blip2ModelConfig, BlipModelConfig, Config
from contrast.errors import UserError
from contrast.models import Model, ModelOutput
from contrast.objectives import Objective, build_objective
from contrast.runs import build
from contrast.tokenizer import build_tokenizer
from contrast.train.fsdp import plan_units
from contrast.train.optim import tower_of
from contrast.train.step import autocast as train_autocast
from contrast.train.step import exact_split

GiB = 1024**3
PROBE_BATCHES = (2, 4)  # micro-step batch sizes; every measured figure is linear in the batch between and beyond
TOWERS = ("image", "text", "lm", "head")  # the optimizer's groups (lm: a decoder model's language model)
CAPTION = "a photo of a small red circle next to a large blue square on a white background"


class PlanError(UserError, ValueError):
    """A planner argument that cannot be used (a memory size, a device count, an MFU)."""


# --------------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """The devices a plan is made for."""

    memory_gib: float = 80.0  # memory per device
    peak_tflops: float = 989.0  # peak dense TFLOP/s of one device in the recipe's precision (H100 SXM bf16)
    world: int = 1  # devices (ranks)
    mfu: float = 0.4  # the share of the peak the step achieves on the FLOPs it executes

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GiB


def parse_positive(value: str | float, name: str, example: str, integer: bool = False) -> float:
    """``value`` as a positive number; a PlanError naming the flag and an example otherwise."""
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        kind = "a whole number" if integer else "a number"
        raise PlanError(f"{name} must be {kind} greater than 0, got '{value}'; e.g. {name} {example}") from None
    if not number > 0 or math.isinf(number):
        raise PlanError(f"{name} must be greater than 0, got '{value}'; e.g. {name} {example}")
    return number


def make_target(memory: str | float, peak_tflops: str | float, world: str | int, mfu: str | float) -> Target:
    """A validated :class:`Target` from command-line strings or numbers."""
    target = Target(memory_gib=parse_positive(memory, "--memory", "80 (GiB per device)"),
                    peak_tflops=parse_positive(peak_tflops, "--peak-tflops", "989"),
                    world=int(parse_positive(world, "--world", "8", integer=True)),
                    mfu=parse_positive(mfu, "--mfu", "0.4"))
    if target.mfu > 1:
        raise PlanError(f"--mfu is a share of the peak between 0 and 1, got {target.mfu}; e.g. --mfu 0.4")
    return target


def per_rank_batch(cfg: Config) -> int:
    """The batch of each process: train.batch_size, as the training loop reads it (the global batch is
    ``train.batch_size x world``)."""
    return cfg.train.batch_size


# --------------------------------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Linear:
    """A quantity linear in the batch: ``per_sample * b + fixed``."""

    per_sample: float
    fixed: float

    def at(self, b: float) -> float:
        return self.per_sample * b + self.fixed

    @classmethod
    def fit(cls, points: dict[int, float]) -> Linear:
        """Through the first and last of ``{batch: value}``."""
        (b0, v0), (b1, v1) = min(points.items()), max(points.items())
        slope = (v1 - v0) / (b1 - b0)
        return cls(slope, v0 - slope * b0)


@dataclass
class Probe:
    """What one training micro-step measured."""

    saved: int  # bytes saved for the backward by the forward and the loss
    peak: int  # peak bytes of the tensors the step allocated, gradients left out
    flops_forward: int  # the model's forward
    flops_step: int  # forward, loss and backward


class LiveBytes(TorchDispatchMode):
    """Follows every storage an op creates until it is freed; :meth:`peak` replays the allocations afterwards,
    leaving out storages named at the end (the gradients, which the planner counts by themselves)."""

    def __init__(self) -> None:
        super().__init__()
        self.serial: dict[int, int] = {}  # live storage data_ptr -> its allocation's serial number
        self.events: list[tuple[int, int]] = []  # (serial, +bytes at allocation / -bytes at release)
        self.count = itertools.count()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr and ptr not in self.serial and ptr not in inputs:  # a view or an in-place op's result: not new
                    self.serial[ptr] = serial = next(self.count)
                    self.events.append((serial, storage.nbytes()))
                    weakref.finalize(storage, self._release, ptr, serial, storage.nbytes())
        return out

    def _release(self, ptr: int, serial: int, nbytes: int) -> None:
        if self.serial.get(ptr) == serial:
            del self.serial[ptr]
        self.events.append((serial, -nbytes))

    def peak(self, leave_out: list[torch.Tensor]) -> int:
        skip = {self.serial.get(t.untyped_storage().data_ptr()) for t in leave_out}
        live = top = 0
        for serial, nbytes in self.events:
            if serial not in skip:
                live += nbytes
                top = max(top, live)
        return top


def _cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting the CPU's fused attention as its GPU kernels are counted."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
    })


def saved_storages(exclude: set[int]) -> tuple[saved_tensors_hooks, dict[int, int]]:
    """Hooks recording each storage saved for the backward once (by data_ptr), skipping ``exclude``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in exclude:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    return saved_tensors_hooks(pack, lambda t: t), seen


def probe(model: Model, objective: Objective, make_batch: Callable[[], dict], precision: str = "fp32") -> Probe:
    """One training micro-step (forward, loss, backward) of ``model`` on ``make_batch()``, measured; twice, as FLOPs
    are counted apart (the counter's module tracking keeps tensors alive into the backward)."""
    autocast = train_autocast(torch.device("cpu"), precision)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    live = LiveBytes()
    hooks, seen = saved_storages(params)
    with live:
        batch = make_batch()
        with hooks, autocast:
            loss = objective(model(batch)).total
        saved = sum(seen.values())
        loss.backward()
    peak = live.peak([p.grad for p in model.parameters() if p.grad is not None])
    del batch, loss
    model.zero_grad(set_to_none=True)
    counter, batch = flop_counter(), make_batch()
    with counter:
        with autocast:
            out = model(batch)
            flops_forward = counter.get_total_flops()
            loss = objective(out).total
        loss.backward()
    model.zero_grad(set_to_none=True)
    return Probe(saved, peak, flops_forward, counter.get_total_flops())


def probe_config(cfg: Config) -> Config:
    """``cfg`` with activation checkpointing off in every tower (and the Q-Former) and feature caches off."""
    cfg = copy.deepcopy(cfg)
    m = cfg.model
    m.image.grad_checkpointing = m.text.grad_checkpointing = False
    m.image.feature_cache = m.text.feature_cache = 0
    if isinstance(m, Blip2ModelConfig):
        m.qformer.grad_checkpointing = False
    return cfg


def batch_maker(cfg: Config, model: Model, tokenizer: Callable, b: int) -> Callable[[], dict]:
    """A batch of ``b`` pairs in the recipe's shapes: pixels at the image size (or, for a features directory, the
    frozen tower's tokens) and the recipe's tokenizer on captions long enough to fill the context."""
    words = CAPTION.split()
    captions = [" ".join(itertools.islice(itertools.cycle(words[i % 3:] + words), 4 * cfg.model.text.context_length))
                for i in range(b)]
    size = cfg.model.image.image_size
    if model.supports("decoder"):  # a decoder model reads prompts from its own language model's tokenizer
        tokenizer = model.text_tokenizer()

    def make() -> dict:
        pixels = torch.randn(b, 3, size, size)
        text = tokenizer(captions)
        text = text if isinstance(text, dict) else {"input_ids": text}
        if cfg.model.features_dir:
            with torch.no_grad():
                return {"image_feats": model.image_tower.forward_tokens(pixels), **text}
        return {"pixels": pixels, **text}

    return make


def probe_model(cfg: Config, checkpointing: bool, tokenizer: Callable) -> tuple[Model, dict[int, Probe], ModelOutput]:
    """The recipe's model, with activation checkpointing on or off everywhere (as train.grad_checkpointing turns it
    on), probed at :data:`PROBE_BATCHES`."""
    cfg = probe_config(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build(cfg.model).train()
    if checkpointing:
        model.set_grad_checkpointing(True)
    objective = build_objective(cfg.loss)
    probes = {b: probe(model, objective, batch_maker(cfg, model, tokenizer, b), cfg.train.precision)
              for b in PROBE_BATCHES}
    with torch.no_grad():
        out = model(batch_maker(cfg, model, tokenizer, PROBE_BATCHES[0])())
    return model, probes, out


@dataclass
class Measured:
    """The recipe's model as measured on this machine: sizes in bytes, FLOPs, and linear fits in the batch."""

    params: dict[str, dict[str, int]]  # tower -> {"total": n, "trainable": n}
    weight_bytes: int  # parameters and buffers
    grad_bytes: int  # one gradient per trainable parameter
    adam_bytes: int  # AdamW's two moments per trainable parameter
    unit_bytes: int  # the largest FSDP unit: one block, or the parameters outside every block
    embed_dim: int  # E of the contrastive embeddings (0: none)
    queries: int  # image embeddings per image (BLIP-2's queries), 1 otherwise
    embedding_bytes: int  # per sample: image and text embeddings (what gradient caching keeps for the whole batch)
    flops_forward: Linear  # the model's forward (what gradient caching runs once more)
    flops_step: Linear  # forward, loss and backward, less the contrastive losses' logit matmuls (see loss_flops)
    flops_step_ckpt: Linear  # the same with checkpointing: the backward recomputes the checkpointed blocks
    saved: Linear  # bytes saved for the backward
    saved_ckpt: Linear
    peak: Linear  # peak bytes allocated by a step (forward, loss, backward), gradients left out
    peak_ckpt: Linear


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread: the probes are tiny, and on a busy machine more threads only wait for each
    other (a CPU shared with other jobs runs them tens of times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure(cfg: Config) -> Measured:
    """Build and probe the recipe's model without and with activation checkpointing."""
    tokenizer = build_tokenizer(cfg.model.text)
    with one_thread():
        model, plain, out = probe_model(cfg, False, tokenizer)
        _, ckpt, _ = probe_model(cfg, True, tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    emb = [t for t in (out.image_emb, out.text_emb) if t is not None]
    embed_dim = int(out.text_emb.shape[-1]) if out.text_emb is not None else 0
    queries = int(out.image_emb.shape[1]) if out.image_emb is not None and out.image_emb.ndim == 3 else 1

    def fit(probes: dict[int, Probe], key: str) -> Linear:
        """A linear fit of one figure; the step's FLOPs less the losses' quadratic matmuls, added back by the plan."""
        loss = (lambda b: loss_flops(cfg, embed_dim, queries, b, 1)) if key == "flops_step" else (lambda b: 0)
        return Linear.fit({b: getattr(p, key) - loss(b) for b, p in probes.items()})

    return Measured(
        params=param_counts(model),
        weight_bytes=sum(_nbytes(t) for t in itertools.chain(model.parameters(), model.buffers())),
        grad_bytes=sum(_nbytes(p) for p in trainable),
        adam_bytes=2 * sum(_nbytes(p) for p in trainable),
        unit_bytes=fsdp_unit_bytes(model),
        embed_dim=embed_dim,
        queries=queries,
        embedding_bytes=sum(t.numel() * 4 for t in emb) // PROBE_BATCHES[0],
        flops_forward=fit(plain, "flops_forward"),
        flops_step=fit(plain, "flops_step"),
        flops_step_ckpt=fit(ckpt, "flops_step"),
        saved=fit(plain, "saved"),
        saved_ckpt=fit(ckpt, "saved"),
        peak=fit(plain, "peak"),
        peak_ckpt=fit(ckpt, "peak"),
    )


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def param_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """Parameters per tower, grouped as the optimizer groups them (image / text / head), and in all."""
    counts = {t: {"total": 0, "trainable": 0} for t in (*TOWERS, "all")}
    for name, p in model.named_parameters():
        for key in (tower_of(name), "all"):
            counts[key]["total"] += p.numel()
            counts[key]["trainable"] += p.numel() if p.requires_grad else 0
    return counts


def fsdp_unit_bytes(model: nn.Module) -> int:
    """The most parameter bytes FSDP gathers at once: the largest of the units train.fsdp shards
    (:func:`contrast.train.fsdp.plan_units`, innermost first, each owning what inner units left)."""
    claimed: set[int] = set()
    largest = 0
    for unit in plan_units(model):
        own = [p for p in unit.parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in own)
        largest = max(largest, sum(_nbytes(p) for p in own))
    return largest


# --------------------------------------------------------------------------------------------------- the loss


def pairwise_terms(cfg: Config) -> list[str]:
    """The loss terms whose memory and FLOPs grow with B_local x B_global."""
    distill = isinstance(cfg.model, BlipModelConfig) and cfg.model.blip.momentum_distill
    terms = []
    if cfg.loss.itc > 0:
        terms.append("itc_distilled" if distill else "itc")
    if cfg.loss.sigmoid > 0:
        terms.append("sigmoid")
    return terms


def split_mode(cfg: Config) -> tuple[str, bool]:
    """How micro-batches of this objective combine, and whether that is exact (as the training step decides from
    the objective's couplings): gradient caching when every term couples the batch through its embeddings only
    (ITC, sigmoid; not with momentum distillation), a mean when every term is a per-caption mean (LM only), else a
    mean that is not the whole-batch loss (BLIP's ITM, mixed objectives)."""
    exact = exact_split(build_objective(cfg.loss).couplings)
    if exact == "cache" and "itc_distilled" not in pairwise_terms(cfg):
        return "cache", True
    return "mean", exact == "mean"


def cache_allowed(cfg: Config) -> bool:
    """Gradient caching is exact for ITC / sigmoid objectives only (no ITM, LM or momentum distillation)."""
    return split_mode(cfg) == ("cache", True)


def _itc_blocks(cfg: Config, rows: int, cols: int) -> tuple[int, bool]:
    """Entries of ITC's logit block and whether it is computed whole (exponentials kept for the backward)."""
    tile = cfg.loss.tile_size
    if tile == 0 or rows * cols <= tile * tile:
        return rows * cols, True
    return tile * tile, False


def loss_bytes(cfg: Config, meas: Measured, b_local: int, world: int) -> int:
    """Bytes the contrastive losses hold beyond the saved activations, at a local batch of ``b_local``."""
    b_global, total = b_local * world, 0
    for term in pairwise_terms(cfg):
        if term == "itc" and meas.queries > 1:  # (B, N, Q) similarities and (B, N) logits, kept by autograd
            total += b_local * b_global * (2 * meas.queries + 6) * 4
        elif term == "itc":  # a whole matrix keeps two exponentials; tiles: two scratch tiles, forward and backward
            entries, _ = _itc_blocks(cfg, b_local, b_global)
            total += 2 * entries * 4
        elif term == "itc_distilled":  # student logits, teacher targets, log-softmaxes, both directions
            total += 8 * b_local * b_global * 4
        else:  # sigmoid: two scratch blocks; with more ranks the texts come round one rank's block at a time
            cols = b_global if world == 1 else b_local
            tile = cfg.loss.tile_size
            total += 2 * (min(b_local * cols, tile * tile) if tile else b_local * cols) * 4
    return total


def loss_flops(cfg: Config, embed_dim: int, queries: int, b_local: int, world: int) -> int:
    """FLOPs of the contrastive losses' logit matmuls (forward and backward) on one device, for embeddings of
    ``embed_dim`` (and ``queries`` image embeddings per image)."""
    b_global, total = b_local * world, 0
    pair = 2 * b_local * b_global * embed_dim  # one (B_local, E) x (E, B_global) matmul
    for term in pairwise_terms(cfg):
        if term == "itc" and queries > 1:
            total += 6 * pair * queries  # two einsums, each with two gradients
        elif term == "itc":
            total += pair * (3 if _itc_blocks(cfg, b_local, b_global)[1] else 4)  # tiles are recomputed
        elif term == "itc_distilled":
            total += 8 * pair
        else:
            total += pair * (3 if world == 1 else 4)  # the ring recomputes each block in the backward
    return total


# --------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """How a rank computes its batch: in micro-batches of ``micro`` (caching or mean accumulation), with or without
    activation checkpointing and FSDP."""

    micro: int
    checkpointing: bool
    fsdp: bool
    accumulate: str = "cache"  # cache | mean, when micro is below the per-rank batch


def memory(cfg: Config, meas: Measured, target: Target, s: Setting) -> dict[str, float]:
    """Bytes per device of each part of a training step under setting ``s``."""
    b_local = per_rank_batch(cfg)
    split = s.micro < b_local
    shard = target.world if s.fsdp else 1
    saved = meas.saved_ckpt if s.checkpointing else meas.saved
    peak = meas.peak_ckpt if s.checkpointing else meas.peak
    loss_batch = s.micro if split and s.accumulate == "mean" else b_local
    parts = {
        "weights": meas.weight_bytes / shard + (meas.unit_bytes if s.fsdp and shard > 1 else 0),
        "gradients": meas.grad_bytes / shard,
        "optimizer": meas.adam_bytes / shard,
        "ema": meas.adam_bytes / 2 if cfg.train.ema else 0,  # train.ema: one fp32 copy of the trainable weights
        "activations": max(0.0, saved.at(s.micro)),
        "workspace": max(0.0, peak.at(s.micro) - saved.at(s.micro)),
        "loss": loss_bytes(cfg, meas, loss_batch, target.world),
        "embedding_cache": 2 * meas.embedding_bytes * b_local if split and s.accumulate == "cache" else 0,
    }
    parts["total"] = sum(parts.values())
    return parts


def step_flops(cfg: Config, meas: Measured, target: Target, s: Setting) -> float:
    """FLOPs one device executes per step: forward and backward (with recomputation when checkpointing), gradient
    caching's extra forward of the towers, and the loss."""
    b_local = per_rank_batch(cfg)
    step = meas.flops_step_ckpt if s.checkpointing else meas.flops_step
    micro_steps = math.ceil(b_local / s.micro)
    flops = step.at(s.micro) * micro_steps
    if s.micro < b_local and s.accumulate == "cache":
        flops += meas.flops_forward.at(s.micro) * micro_steps  # the no-grad forward that fills the cache
    loss_batch = s.micro if s.micro < b_local and s.accumulate == "mean" else b_local
    loss_times = micro_steps if loss_batch < b_local else 1
    return flops + loss_times * loss_flops(cfg, meas.embed_dim, meas.queries, loss_batch, target.world)


def current_setting(cfg: Config, target: Target) -> Setting:
    """The setting the recipe asks for."""
    b_local = per_rank_batch(cfg)
    t, m = cfg.train, cfg.model
    ckpt = t.grad_checkpointing or m.image.grad_checkpointing or m.text.grad_checkpointing
    accumulate = t.accumulate if t.accumulate in ("cache", "mean") else split_mode(cfg)[0]
    return Setting(min(t.micro_batch_size or b_local, b_local), bool(ckpt), t.fsdp, accumulate)


def fits(cfg: Config, meas: Measured, target: Target, s: Setting) -> bool:
    return memory(cfg, meas, target, s)["total"] <= target.memory_bytes


def largest_micro(cfg: Config, meas: Measured, target: Target, s: Setting, limit: int = 1 << 24) -> int:
    """The largest micro-batch that fits under setting ``s`` (0 if not even one sample does), searched by doubling
    then bisection; the loss stays that of the per-rank batch unless ``s`` accumulates means."""
    def ok(m: int) -> bool:
        return fits(cfg, meas, target, Setting(m, s.checkpointing, s.fsdp, s.accumulate))

    if not ok(1):
        return 0
    lo, hi = 1, 2
    while hi < limit and ok(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def divisors(n: int) -> list[int]:
    return sorted({d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}, reverse=True)


# --------------------------------------------------------------------------------------------------- advice


@dataclass
class Advice:
    setting: Setting
    overrides: list[str] = field(default_factory=list)  # `--set` overrides to add, in order
    notes: list[str] = field(default_factory=list)
    fits: bool = True


ACCUMULATION_NOTE = ("accumulation is not exact for this objective: its terms couple the batch beyond the embeddings "
                     "(ITM's hard negatives, momentum distillation, ITC mixed with LM), so gradient caching cannot "
                     "split it; micro-batches would need train.accumulate: mean, a mean of per-micro-batch losses whose "
                     "negatives come from each micro-batch only")


OVERRIDE_ORDER = ("train.micro_batch_size", "train.accumulate", "train.grad_checkpointing", "train.fsdp")


def advise(cfg: Config, meas: Measured, target: Target) -> Advice:
    """What to turn on so the recipe fits ``target``, overrides listed in the order of preference: nothing if it
    fits; else gradient caching (the largest micro-batch dividing the per-rank batch), then activation checkpointing;
    FSDP when weights, gradients and optimizer state alone do not fit."""
    advice = _advise(cfg, meas, target)
    advice.overrides.sort(key=lambda o: OVERRIDE_ORDER.index(o.split("=")[0]))
    return advice


def _advise(cfg: Config, meas: Measured, target: Target) -> Advice:
    advice = Advice(current_setting(cfg, target))
    if fits(cfg, meas, target, advice.setting):
        return advice
    if not advice.setting.fsdp and meas.weight_bytes + meas.grad_bytes + meas.adam_bytes >= target.memory_bytes:
        _advise_fsdp(meas, target, advice)
    if _fit_micro_and_checkpointing(cfg, meas, target, advice):
        return advice
    if target.world > 1 and not advice.setting.fsdp:  # the last resort: shard the state too
        s = advice.setting
        sharded = Advice(Setting(s.micro, s.checkpointing, True, s.accumulate), ["train.fsdp=true"])
        if _fit_micro_and_checkpointing(cfg, meas, target, sharded):
            return sharded
    advice.fits = False
    smallest = memory(cfg, meas, target, Setting(1, True, target.world > 1, split_mode(cfg)[0]))
    advice.notes.append(f"it does not fit even then (a micro-batch of 1 with checkpointing{' and FSDP' * (target.world > 1)}"
                        f" still needs {human_bytes(smallest['total'])} per device): lower train.batch_size or the "
                        "model's sizes, or use more devices with train.fsdp=true")
    return advice


def _fit_micro_and_checkpointing(cfg: Config, meas: Measured, target: Target, advice: Advice) -> bool:
    """Add micro-batches (where they are exact), then checkpointing, then micro-batches under checkpointing to
    ``advice`` until the step fits; False if nothing does."""
    if fits(cfg, meas, target, advice.setting):
        return True
    b_local = per_rank_batch(cfg)
    exact = split_mode(cfg)[1]
    if exact and _try_micro(cfg, meas, target, advice, checkpointing=advice.setting.checkpointing):
        return True
    if not exact and ACCUMULATION_NOTE not in advice.notes:
        advice.notes.append(ACCUMULATION_NOTE)
    if not advice.setting.checkpointing:
        advice.overrides.append("train.grad_checkpointing=true")
        advice.setting = Setting(b_local, True, advice.setting.fsdp, advice.setting.accumulate)
        if fits(cfg, meas, target, advice.setting):
            return True
    return _try_micro(cfg, meas, target, advice, checkpointing=True)


def _advise_fsdp(meas: Measured, target: Target, advice: Advice) -> None:
    state = meas.weight_bytes + meas.grad_bytes + meas.adam_bytes
    if target.world > 1:
        advice.overrides.append("train.fsdp=true")
        s = advice.setting
        advice.setting = Setting(s.micro, s.checkpointing, True, s.accumulate)
        return
    room = target.memory_bytes - meas.unit_bytes
    need = math.ceil(state / room) if room > 0 else None
    advice.notes.append(
        f"weights, gradients and AdamW state alone take {state / GiB:.2f} GiB, more than {target.memory_gib:g} GiB: "
        + (f"shard them with train.fsdp=true over at least {need} devices (plan with --world {need} or more)"
           if need else "one FSDP unit alone does not fit; use devices with more memory"))


def _try_micro(cfg: Config, meas: Measured, target: Target, advice: Advice, checkpointing: bool) -> bool:
    """Add the largest micro-batch dividing the per-rank batch that fits (accumulated as the objective allows; a
    mean that is not exact comes with its override and the accumulation note); False if none does."""
    b_local = per_rank_batch(cfg)
    accumulate, exact = split_mode(cfg)
    for m in divisors(b_local):
        s = Setting(m, checkpointing, advice.setting.fsdp, accumulate)
        if m < b_local and fits(cfg, meas, target, s):
            advice.overrides.append(f"train.micro_batch_size={m}")
            if not exact:
                advice.overrides.append("train.accumulate=mean")
                if ACCUMULATION_NOTE not in advice.notes:
                    advice.notes.append(ACCUMULATION_NOTE)
            advice.setting = s
            return True
    return False


# --------------------------------------------------------------------------------------------------- the plan


NOT_INCLUDED = ("the accelerator's runtime context and library workspaces, allocator fragmentation, communication "
                "buffers (DDP gradient buckets, FSDP prefetch), and the data loader")


def make_plan(cfg: Config, target: Target, meas: Measured | None = None) -> dict:
    """Every figure of the plan as plain numbers (what ``contrast plan --json`` prints)."""
    b_local = per_rank_batch(cfg)
    meas = meas or measure(cfg)
    current = current_setting(cfg, target)
    advice = advise(cfg, meas, target)
    return {
        "model": cfg.model.kind,
        "measured_on": "cpu",
        "not_included": NOT_INCLUDED,
        "precision": cfg.train.precision,
        "target": {**asdict(target), "memory_bytes": target.memory_bytes},
        "batch": {"global": b_local * target.world, "per_device": b_local, "world": target.world},
        "params": meas.params,
        "flops": _flops_summary(cfg, meas, target, current),
        "measured": {k: asdict(v) if isinstance(v, Linear) else v for k, v in asdict(meas).items()},
        "setting": asdict(current),
        "memory": memory(cfg, meas, target, current),
        "timing": _timing(cfg, meas, target, current),
        "largest_micro_batch": {
            "plain": largest_micro(cfg, meas, target, Setting(1, False, current.fsdp, current.accumulate)),
            "checkpointed": largest_micro(cfg, meas, target, Setting(1, True, current.fsdp, current.accumulate)),
        },
        "advice": {"fits_as_is": fits(cfg, meas, target, current), "fits": advice.fits, "overrides": advice.overrides, "notes": advice.notes,
                   "setting": asdict(advice.setting), "memory": memory(cfg, meas, target, advice.setting),
                   "timing": _timing(cfg, meas, target, advice.setting)},
    }


def _flops_summary(cfg: Config, meas: Measured, target: Target, s: Setting) -> dict:
    b_local = per_rank_batch(cfg)
    loss = loss_flops(cfg, meas.embed_dim, meas.queries, b_local, target.world)
    return {"per_sample_model": meas.flops_step.per_sample,
            "per_sample_model_checkpointed": meas.flops_step_ckpt.per_sample,
            "per_sample_forward": meas.flops_forward.per_sample,
            "per_sample_loss": loss / b_local,
            "per_sample": step_flops(cfg, meas, target, s) / b_local}


def _timing(cfg: Config, meas: Measured, target: Target, s: Setting) -> dict:
    flops = step_flops(cfg, meas, target, s)
    seconds = flops / (target.peak_tflops * 1e12 * target.mfu)
    return {"step_flops_per_device": flops, "step_seconds": seconds,
            "images_per_second": cfg.train.batch_size * target.world / seconds}


# --------------------------------------------------------------------------------------------------- the table


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def human_count(n: float, unit: str = "") -> str:
    for prefix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


ACCUMULATION = {"cache": "gradient caching", "mean": "mean of micro-batch losses"}


def describe(s: dict, b_local: int) -> str:
    micro = (f"micro-batches of {s['micro']} ({ACCUMULATION[s['accumulate']]})" if s["micro"] < b_local
             else "no micro-batches")
    return (f"{micro}, {'with' if s['checkpointing'] else 'no'} activation checkpointing, "
            f"{'FSDP' if s['fsdp'] else 'no FSDP'}")


MEMORY_ROWS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "AdamW state (2 moments)"),
               ("activations", "activations (saved for backward)"), ("workspace", "backward workspace"),
               ("loss", "loss logit blocks"), ("embedding_cache", "gradient-cache embeddings"))


def _memory_lines(mem: dict, budget: float) -> list[str]:
    lines = [f"  {label:<34}{human_bytes(mem[key]):>12}" for key, label in MEMORY_ROWS if mem[key] or key == "loss"]
    verdict = "fits" if mem["total"] <= budget else "does NOT fit"
    lines.append(f"  {'total':<34}{human_bytes(mem['total']):>12}   of {human_bytes(budget)}: {verdict}")
    return lines


def _timing_line(t: dict) -> str:
    return (f"{t['step_seconds'] * 1e3:.3g} ms per step, {t['images_per_second']:,.0f} images/s "
            f"({human_count(t['step_flops_per_device'], 'FLOP')} per device per step)")


def format_plan(plan: dict, recipe: str = "") -> str:
    """The plan as a readable table."""
    t, b, m = plan["target"], plan["batch"], plan["measured"]
    lines = [f"contrast plan {recipe} ({plan['model']}, {plan['precision']}); measured on this {plan['measured_on']} "
             f"at batches {' and '.join(map(str, PROBE_BATCHES))}",
             f"batch {b['global']} global = {b['per_device']} per device x {b['world']} device(s); target "
             f"{t['memory_gib']:g} GiB per device, {t['peak_tflops']:g} TFLOP/s peak, MFU {t['mfu']:g}", "",
             f"  {'parameters':<14}{'total':>12}{'trainable':>12}"]
    lines += [f"  {k:<14}{human_count(v['total']):>12}{human_count(v['trainable']):>12}"
              for k, v in plan["params"].items() if v["total"] or k == "all"]
    f = plan["flops"]
    lines += ["", f"FLOPs per sample (forward + backward): {human_count(f['per_sample'], 'FLOP')} at this setting "
              f"(model {human_count(f['per_sample_model'], 'FLOP')}, with checkpointing "
              f"{human_count(f['per_sample_model_checkpointed'], 'FLOP')}; loss {human_count(f['per_sample_loss'], 'FLOP')})",
              f"per sample: activations {human_bytes(m['saved']['per_sample'])}, backward workspace "
              f"{human_bytes(m['peak']['per_sample'] - m['saved']['per_sample'])} (with checkpointing "
              f"{human_bytes(m['saved_ckpt']['per_sample'])} and "
              f"{human_bytes(m['peak_ckpt']['per_sample'] - m['saved_ckpt']['per_sample'])})", "",
              f"memory per device as the recipe is written ({describe(plan['setting'], b['per_device'])}):"]
    lines += _memory_lines(plan["memory"], t["memory_bytes"])
    lines.append(f"  (not included: {plan['not_included']})")
    big = plan["largest_micro_batch"]
    lines += [f"largest micro-batch that fits {t['memory_gib']:g} GiB: {big['plain']} plain, {big['checkpointed']} "
              "with activation checkpointing",
              f"step time at {t['peak_tflops']:g} TFLOP/s x MFU {t['mfu']:g} on {b['world']} device(s): "
              + _timing_line(plan["timing"]), ""]
    return "\n".join(lines + _advice_lines(plan))


def _advice_lines(plan: dict) -> list[str]:
    a, b = plan["advice"], plan["batch"]
    if a["fits_as_is"]:
        return ["advice: it fits as written; nothing to add"]
    if not a["overrides"]:
        lines = ["advice: nothing the planner can turn on makes it fit"]
    else:
        budget, total = plan["target"]["memory_bytes"], a["memory"]["total"]
        lines = ["advice: add " + " ".join(f"--set {o}" for o in a["overrides"]),
                 f"  then: {describe(a['setting'], b['per_device'])}",
                 f"  total {human_bytes(total)} of {human_bytes(budget)} per device "
                 f"({'fits' if total <= budget else 'does NOT fit'}); " + _timing_line(a["timing"])]
    return lines + [f"note: {n}" for n in a["notes"]]
