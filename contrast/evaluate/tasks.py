"""Task files of both kinds and one entry point that runs either: zero-shot classification
(:class:`contrast.evaluate.zeroshot.ZeroShotTask`) and image-text retrieval (:class:`RetrievalTask`)::

    # eval/tasks/coco_karpathy.yaml
    kind: retrieval
    name: coco_karpathy_test
    data: ~/data/coco/dataset_coco.json     # a Karpathy-split JSON, or any retrieval source (captions folder, ...)
    images: ~/data/coco                     # where the JSON's filepath/filename live (default: the JSON's folder)
    split: test

:func:`evaluate_task` is what a training loop calls: a model, a task (or task file), a device; it returns the
task's headline metrics as a flat dict of floats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from contrast.config import ConfigError, DataConfig, ImageTowerConfig, from_dict
from contrast.evaluate.karpathy import is_karpathy_json, load_karpathy
from contrast.evaluate.taskfile import read_yaml
from contrast.evaluate.zeroshot import ZeroShotTask, load_task, missing_data_error, zeroshot_metrics


@dataclass
class RetrievalTask:
    name: str = ""
    kind: str = "retrieval"
    data: str = "synthetic"  # a Karpathy-split JSON, synthetic, a captions folder, parquet / arrow, save_to_disk
    split: str = "test"
    images: str | None = None  # Karpathy JSON: the folder its image paths are relative to (default: its folder)
    max_captions: int = 5  # Karpathy JSON: captions kept per image (0: all)
    image_column: str = "image"
    caption_column: str = "caption"
    group_by: str | None = None
    limit: int = 0  # evaluate only the first N rows (0: all)
    get: str = ""  # how to obtain the data, shown when it is not on disk


def load_retrieval_task(path: str | Path, data: str | None = None) -> RetrievalTask:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task file not found: {p} (task files live in eval/tasks/)")
    raw = read_yaml(p) or {}
    if not isinstance(raw, dict) or raw.get("kind") != "retrieval":
        raise ConfigError(f"task file {p} is not a retrieval task (it needs kind: retrieval); zero-shot task files "
                          f"run with `contrast eval zeroshot --task {p}`")
    if data is not None:
        raw = {**raw, "data": data}
    task = from_dict(raw, RetrievalTask)
    task.name = task.name or p.stem
    return task


def load_any_task(path: str | Path, data: str | None = None) -> ZeroShotTask | RetrievalTask:
    """A task file of either kind (``kind: retrieval``, else zero-shot)."""
    raw = read_yaml(path) if Path(path).is_file() else None
    if isinstance(raw, dict) and raw.get("kind") == "retrieval":
        return load_retrieval_task(path, data)
    return load_task(path, data)


def retrieval_dataset(task: RetrievalTask, data_cfg: DataConfig | None = None,
                      image_size: int = ImageTowerConfig.image_size) -> Any:
    """The task's image-caption rows (``image`` and ``caption`` columns; Karpathy JSON: a list of captions per row)."""
    from contrast.data import load_source

    if task.data != "synthetic" and not Path(task.data).expanduser().exists():
        raise missing_data_error(task.name, task.data, task.get, None)
    if is_karpathy_json(task.data):
        ds = load_karpathy(task.data, task.split, task.images, task.max_captions)
    else:
        base = data_cfg if data_cfg is not None else DataConfig()
        if task.data == "synthetic" and base.source != "synthetic":
            base = dataclasses.replace(base, source="synthetic")
        cfg = base if task.data == "synthetic" else dataclasses.replace(
            base, source=task.data, image_column=task.image_column, caption_column=task.caption_column)
        ds = load_source(cfg, task.split, image_size)
    if task.limit:
        ds = ds.select(range(min(task.limit, len(ds))))
    return ds


RETRIEVAL_KS = (1, 5, 10)


def retrieval_metrics(model: Any, preprocess: Callable, tokenizer: Callable, task: RetrievalTask | str | Path, *,
                      device: str | torch.device = "cpu", data_cfg: DataConfig | None = None,
                      image_size: int = ImageTowerConfig.image_size, batch_size: int = 64) -> dict[str, float]:
    """Recall@1/5/10 both ways of ``model`` on a retrieval task (or task file) as plain floats, keyed
    ``retrieval/<task>/image_to_text/R@1`` and so on; the model is left in the training mode it came in."""
    from contrast.data.decode import SampleReader
    from contrast.evaluate.retrieval import evaluate_retrieval

    task = task if isinstance(task, RetrievalTask) else load_retrieval_task(task)
    ds = retrieval_dataset(task, data_cfg, image_size)
    reader = SampleReader.of(data_cfg) if data_cfg is not None else SampleReader()
    r = evaluate_retrieval(model, preprocess, tokenizer, ds, group_by=task.group_by, ks=RETRIEVAL_KS,
                           batch_size=batch_size, device=device, reader=reader)
    return {f"retrieval/{task.name}/{d}/R@{k}": float(r[d][f"R@{k}"])
            for d in ("image_to_text", "text_to_image") for k in RETRIEVAL_KS}


def evaluate_task(model: Any, preprocess: Callable, tokenizer: Callable, task: ZeroShotTask | RetrievalTask | str | Path,
                  *, device: str | torch.device = "cpu", data_cfg: DataConfig | None = None,
                  image_size: int = ImageTowerConfig.image_size, batch_size: int = 64) -> dict[str, float]:
    """Run one task of either kind; its metrics as a flat dict of floats (see :func:`zeroshot_metrics` and
    :func:`retrieval_metrics`). Loading a task file is cheap; a loop evaluating often may load it once."""
    if isinstance(task, str | Path):
        task = load_any_task(task)
    run = retrieval_metrics if isinstance(task, RetrievalTask) else zeroshot_metrics
    return run(model, preprocess, tokenizer, task, device=device, data_cfg=data_cfg, image_size=image_size,
               batch_size=batch_size)
