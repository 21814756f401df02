"""Evaluation while training: a list of evaluation parts (the recipe's zero-shot tasks, retrieval on a held-out
split), each giving plain floats for metrics.jsonl and TensorBoard and saying beforehand which metric names it
gives; and the best value of a named metric for keeping the best checkpoint.

A part is opened when the run is set up (its task file read, its data opened and checked), so a bad one stops the run
before its first step; a part that fails while the run evaluates is reported with the ``contrast eval`` command that
reruns it on a checkpoint. A new kind of evaluation is one more class with the :class:`EvalPart` methods.

Every rank evaluates the same images (an FSDP model's forward needs every rank; a DDP rank's bare model needs
none), so no rank waits for another past a collective timeout and no rank leaves the process group early; only the
main process logs.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from contrast.config import Config, ConfigError, DataConfig
from contrast.data import load_source
from contrast.data.decode import SampleReader
from contrast.data.sources import captions_per_line, shard_units
from contrast.data.transforms import build_transform, model_transform
from contrast.errors import UserError
from contrast.evaluate.captions import caption_batches, caption_loss, caption_rows
from contrast.evaluate.retrieval import evaluate_retrieval, evaluate_retrieval_stream
from contrast.evaluate.tasks import RETRIEVAL_KS
from contrast.evaluate.wds import ShardRows
from contrast.evaluate.zeroshot import load_task, task_rows, zeroshot_metric_names, zeroshot_metrics
from contrast.models import Model
from contrast.tokenizer import build_tokenizer
from contrast.train.fsdp import evaluating


class EvalPart(Protocol):
    """One evaluation of a run: what it is called in messages, the metric names it gives, how to run it, and the
    ``contrast eval`` command that runs it again on a checkpoint."""

    name: str

    def metric_names(self) -> list[str]: ...

    def __call__(self, model: Model) -> dict[str, float]: ...

    def command(self, checkpoint: str | Path) -> str: ...


@dataclasses.dataclass
class Inputs:
    """What every part encodes with: the model's eval transform and tokenizer, the device, the run's config."""

    cfg: Config
    preprocess: Callable
    tokenizer: Callable
    device: torch.device


class ZeroShotPart:
    """A zero-shot task file; its data is opened (and its columns and class count checked) when the part is made."""

    def __init__(self, path: str, inputs: Inputs):
        self.path, self.inputs = path, inputs
        self.task = load_task(path)
        self.name = f"zero-shot task '{self.task.name}' ({path})"
        cfg = inputs.cfg
        self.dataset = task_rows(self.task, cfg.data, cfg.model.image.image_size)  # shards: checked, streamed
        if not isinstance(self.dataset, ShardRows) and len(self.dataset) == 0:
            where = f" where {self.task.where}" if self.task.where else ""
            raise ConfigError(f"{self.name}: no rows of {self.task.data} (split {self.task.split}{where}) to "
                              "classify; point the task at data that has them, or drop it from eval.tasks")

    def metric_names(self) -> list[str]:
        return zeroshot_metric_names(self.task)

    def __call__(self, model: Model) -> dict[str, float]:
        i = self.inputs
        return zeroshot_metrics(model, i.preprocess, i.tokenizer, self.task, device=i.device, data_cfg=i.cfg.data,
                                image_size=i.cfg.model.image.image_size, batch_size=i.cfg.eval.batch_size,
                                dataset=self.dataset)

    def command(self, checkpoint: str | Path) -> str:
        return f"contrast eval zeroshot --checkpoint {shlex.quote(str(checkpoint))} --task {shlex.quote(self.path)}"


def _open_split(part: object, inputs: Inputs, what: str, split: str, limit: int) -> None:
    """The attributes every part over a split of the training source has: its inputs, split, row limit, name and
    the split's webdataset shards (None for a table, which the part loads itself)."""
    part.inputs, part.split, part.limit = inputs, split, limit
    part.name = f"{what} on the '{split}' split of {_source_name(inputs.cfg.data)}"
    part.units = shard_units(inputs.cfg.data, split)  # webdataset shards: streamed


class RetrievalPart:
    """Image-text retrieval on ``eval.retrieval_split`` of the training source (at most ``eval.retrieval_limit``
    rows), opened when the part is made: a table (the first rows), or the split's webdataset shards, streamed (the
    first usable samples; only their embeddings are kept)."""

    def __init__(self, inputs: Inputs):
        cfg = inputs.cfg
        _open_split(self, inputs, "retrieval", cfg.eval.retrieval_split, cfg.eval.retrieval_limit)
        self.pairs = None
        if self.units is None:
            ds = load_source(cfg.data, self.split, cfg.model.image.image_size)
            self.pairs = ds.select(range(min(self.limit, len(ds)))) if self.limit else ds

    def metric_names(self) -> list[str]:
        return [f"retrieval/{d}/R@{k}" for d in ("image_to_text", "text_to_image") for k in RETRIEVAL_KS]

    def __call__(self, model: Model) -> dict[str, float]:
        i = self.inputs
        reader, batch = SampleReader.of(i.cfg.data), i.cfg.eval.batch_size
        if self.units is not None:
            rows = (row for unit in self.units for row in unit.rows(0, 1))
            r = evaluate_retrieval_stream(model, i.preprocess, i.tokenizer, rows, limit=self.limit, ks=RETRIEVAL_KS,
                                          batch_size=batch, device=i.device, reader=reader,
                                          split_lines=captions_per_line(i.cfg.data))
        else:
            r = evaluate_retrieval(model, i.preprocess, i.tokenizer, self.pairs, ks=RETRIEVAL_KS, batch_size=batch,
                                   device=i.device, reader=reader)
        return {f"retrieval/{d}/R@{k}": float(r[d][f"R@{k}"]) for d in ("image_to_text", "text_to_image")
                for k in RETRIEVAL_KS}

    def command(self, checkpoint: str | Path) -> str:
        data = self.inputs.cfg.data
        args = ["contrast", "eval", "retrieval", "--checkpoint", str(checkpoint), "--data", _source_name(data),
                "--split", str(self.split)]
        if self.limit:
            args += ["--limit", str(self.limit)]
        if data.image_column != "image":
            args += ["--image-column", data.image_column]
        if data.caption_column != "caption":
            args += ["--caption-column", data.caption_column]
        return shlex.join(args)


class CaptionLossPart:
    """A decoder model's held-out caption loss (nats per answer token) on ``eval.caption_split`` of the training
    source (at most ``eval.caption_limit`` rows), opened when the part is made; lower is better."""

    def __init__(self, inputs: Inputs):
        cfg = inputs.cfg
        _open_split(self, inputs, "caption loss", cfg.eval.caption_split, cfg.eval.caption_limit)
        self.dataset = None if self.units is not None else load_source(cfg.data, self.split, cfg.model.image.image_size)

    def metric_names(self) -> list[str]:
        return ["caption/nats_per_token"]

    def __call__(self, model: Model) -> dict[str, float]:
        i = self.inputs
        rows = (caption_rows(self.dataset) if self.units is None
                else (row for unit in self.units for row in unit.rows(0, 1)))
        batches = caption_batches(rows, i.preprocess, i.tokenizer, SampleReader.of(i.cfg.data), i.cfg.eval.batch_size,
                                  self.limit)
        return {"caption/nats_per_token": caption_loss(model, batches, i.device)["nats_per_token"]}

    def command(self, checkpoint: str | Path) -> str:
        args = ["contrast", "eval", "caption", "--checkpoint", str(checkpoint), "--data",
                _source_name(self.inputs.cfg.data), "--split", str(self.split), "--limit", str(self.limit)]
        return shlex.join(args)


LOWER_IS_BETTER = frozenset({"caption/nats_per_token"})


def _source_name(data: DataConfig) -> str:
    return data.source if isinstance(data.source, str) else ",".join(data.source)


@dataclasses.dataclass
class Failure:
    """A part that raised: its index in :attr:`Evaluator.parts` (-1: on another process) and the error, one line."""

    part: int
    error: str


class EvaluationError(UserError):
    """Evaluations failed; the message names each and the command that reruns it."""


class Evaluator:
    """``cfg.eval.tasks`` (zero-shot) and, with ``eval.retrieval_split``, retrieval on that split, as a list of
    :class:`EvalPart`; ``__call__(model) -> {name: value}``, :meth:`run` also returns the parts that failed."""

    def __init__(self, cfg: Config, model: Model, device: torch.device):
        if (cfg.eval.tasks or cfg.eval.retrieval_split) and not model.supports("embed"):
            raise ConfigError(f"eval.tasks and eval.retrieval_split need a model that embeds images and texts; "
                              f"{type(model).__name__} (model.kind {cfg.model.kind}) does not: remove them (a decoder "
                              "run's tower is evaluated after training: contrast eval zeroshot --checkpoint RUN)")
        if cfg.eval.caption_split and not model.supports("decoder"):
            raise ConfigError(f"eval.caption_split needs a decoder model; {type(model).__name__} (model.kind "
                              f"{cfg.model.kind}) has none: remove it")
        self.parts: list[EvalPart] = []
        if cfg.eval.tasks or cfg.eval.retrieval_split:
            inputs = Inputs(cfg, build_transform(cfg.model.image), build_tokenizer(cfg.model.text), device)
            self.parts += [ZeroShotPart(t, inputs) for t in cfg.eval.tasks]
            if cfg.eval.retrieval_split:
                self.parts.append(RetrievalPart(inputs))
        if cfg.eval.caption_split:
            self.parts.append(CaptionLossPart(Inputs(cfg, model_transform(cfg.model), model.text_tokenizer(), device)))

    def metric_names(self) -> list[str]:
        """Every metric name the parts give, known before anything is evaluated."""
        return [n for part in self.parts for n in part.metric_names()]

    @torch.no_grad()
    def run(self, model: Model) -> tuple[dict[str, float], list[Failure]]:
        """Every part, in order; a part that raises is recorded and the others still run."""
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        failures: list[Failure] = []
        try:
            with evaluating(model):  # an FSDP model's eval methods run as sharded forwards
                for n, part in enumerate(self.parts):
                    try:
                        metrics.update(part(model))
                    except dist.DistError:  # a lost process: the run's fault handling names it
                        raise
                    except Exception as e:
                        failures.append(Failure(n, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        finally:
            model.train(was_training)
        return metrics, failures

    def __call__(self, model: Model) -> dict[str, float]:
        metrics, failures = self.run(model)
        if failures:
            raise EvaluationError(self.describe(failures))
        return metrics

    def describe(self, failures: list[Failure], checkpoint: str | Path | None = None) -> str:
        """One line naming each failed part and its error; with ``checkpoint``, the command to rerun it there."""
        said = []
        for f in failures:
            if f.part < 0:
                said.append(f.error)
                continue
            part = self.parts[f.part]
            rerun = f" (rerun it with: {part.command(checkpoint)})" if checkpoint is not None else ""
            said.append(f"{part.name} failed: {f.error}{rerun}")
        return "; ".join(said)


def check_best_metric(metric: str, evaluator: Evaluator | None) -> None:
    """``train.best_metric`` must be one the configured evaluations give; else an error naming those."""
    if evaluator is None:
        raise ConfigError("train.best_metric needs eval.tasks or eval.retrieval_split to evaluate")
    names = evaluator.metric_names()
    if metric.startswith("ema/") and metric.removeprefix("ema/") in names:
        raise ConfigError(f"train.best_metric '{metric}': the moving average's metrics are reported, not tracked (a "
                          "checkpoint is the live weights; the average is written to RUN/ema at the end); track "
                          f"'{metric.removeprefix('ema/')}' or set best_metric: null")
    if metric not in names:
        raise ConfigError(f"train.best_metric '{metric}' is not among the eval metrics the configured evaluations "
                          f"will produce: {', '.join(names)}; set it to one of them, or to null")


@dataclasses.dataclass
class Best:
    """The best value of ``metric`` so far (higher is better; lower for a loss, :data:`LOWER_IS_BETTER`) and its step;
    kept in the checkpoint state."""

    metric: str
    value: float = -math.inf
    step: int = 0

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """True when ``metrics`` improves on the best (the caller keeps this step's checkpoint)."""
        if self.metric not in metrics:
            raise ConfigError(f"train.best_metric '{self.metric}' is not among the eval metrics: "
                              f"{', '.join(sorted(metrics)) or 'none (set eval.tasks or eval.retrieval_split)'}")
        value = metrics[self.metric]
        lower = self.metric in LOWER_IS_BETTER  # a loss: the lowest is the best
        if self.value != -math.inf and not (value < self.value if lower else value > self.value):
            return False
        self.value, self.step = value, step
        return True

    def state(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step}


def failure_elsewhere() -> Failure:
    """What a process whose own evaluations all ran reports when another process's failed."""
    return Failure(-1, "an evaluation failed on another process (its output names it)")


__all__ = ["Best", "EvalPart", "EvaluationError", "Evaluator", "Failure", "RetrievalPart", "ZeroShotPart",
           "check_best_metric", "failure_elsewhere"]
