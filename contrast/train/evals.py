"""Evaluation while training: the recipe's zero-shot tasks and retrieval on a held-out split, as plain floats for
metrics.jsonl and TensorBoard, and the best value of a named metric for keeping the best checkpoint.

Every rank evaluates the same images (an FSDP model's forward needs every rank; a DDP rank's bare model needs
none), so no rank waits for another past a collective timeout and no rank leaves the process group early; only the
main process logs. Task files and the retrieval split are opened when the run is set up, so a bad one stops the
run before its first step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from contrast.config import Config, ConfigError
from contrast.data import load_source
from contrast.data.decode import SampleReader
from contrast.data.transforms import build_transform
from contrast.evaluate.retrieval import evaluate_retrieval
from contrast.evaluate.zeroshot import load_task, zeroshot_metrics
from contrast.models import Model
from contrast.tokenizer import build_tokenizer
from contrast.train.fsdp import evaluating


class Evaluator:
    """Runs ``cfg.eval.tasks`` (zero-shot) and, with ``eval.retrieval_split``, image-text retrieval on that split of
    the training source (at most ``eval.retrieval_limit`` pairs); ``__call__(model) -> {name: value}``."""

    def __init__(self, cfg: Config, model: Model, device: torch.device):
        self.cfg, self.device = cfg, device
        self.tasks = [load_task(t) for t in cfg.eval.tasks]
        if not model.supports("embed"):
            raise ConfigError(f"eval.tasks and eval.retrieval_split need a model that embeds images and texts; "
                              f"{type(model).__name__} (model.kind {cfg.model.kind}) does not: remove them")
        self.preprocess: Callable = build_transform(cfg.model.image)
        self.tokenizer: Callable = build_tokenizer(cfg.model.text)
        self.pairs = self._retrieval_pairs() if cfg.eval.retrieval_split else None

    def _retrieval_pairs(self) -> Any:
        cfg = self.cfg
        ds = load_source(cfg.data, cfg.eval.retrieval_split, cfg.model.image.image_size)
        return ds.select(range(min(cfg.eval.retrieval_limit, len(ds)))) if cfg.eval.retrieval_limit else ds

    @torch.no_grad()
    def __call__(self, model: Model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            metrics: dict[str, float] = {}
            with evaluating(model):  # an FSDP model's eval methods run as sharded forwards
                for task in self.tasks:
                    metrics.update(zeroshot_metrics(model, self.preprocess, self.tokenizer, task, device=self.device,
                                                    data_cfg=self.cfg.data, image_size=self.cfg.model.image.image_size,
                                                    batch_size=self.cfg.eval.batch_size))
                if self.pairs is not None:
                    metrics.update(self._retrieval(model))
            return metrics
        finally:
            model.train(was_training)

    def _retrieval(self, model: Model) -> dict[str, float]:
        r = evaluate_retrieval(model, self.preprocess, self.tokenizer, self.pairs, batch_size=self.cfg.eval.batch_size,
                               device=self.device, reader=SampleReader.of(self.cfg.data))
        return {f"retrieval/{direction}/{k}": float(v) for direction in ("image_to_text", "text_to_image")
                for k, v in r[direction].items() if k.startswith("R@")}


@dataclasses.dataclass
class Best:
    """The best value of ``metric`` so far (higher is better) and its step; kept in the checkpoint state."""

    metric: str
    value: float = -math.inf
    step: int = 0

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """True when ``metrics`` improves on the best (the caller keeps this step's checkpoint)."""
        if self.metric not in metrics:
            raise ConfigError(f"train.best_metric '{self.metric}' is not among the eval metrics: "
                              f"{', '.join(sorted(metrics)) or 'none (set eval.tasks or eval.retrieval_split)'}")
        value = metrics[self.metric]
        if not value > self.value:
            return False
        self.value, self.step = value, step
        return True

    def state(self) -> dict:
        return {"metric": self.metric, "value": self.value, "step": self.step}
