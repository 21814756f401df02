"""Zero-shot classification: class embeddings from prompt templates, averaged per class; top-k via torchmetrics.

Reference: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021 (prompt
ensembling, section 3.1.4).

A task file (eval/tasks/*.yaml) names the data, the label column, the class names and the templates, where ``{}``
stands for the class name::

    name: shapes
    data: synthetic
    split: test
    label_column: shape
    where: {n_shapes: 1}
    classnames: [circle, square, triangle]
    templates: ["a {}.", "a picture of a {}."]

``data`` may also be a class folder or a CLIP_benchmark webdataset folder (:mod:`contrast.evaluate.wds`), whose
``classnames.txt`` / ``zeroshot_classification_templates.txt`` serve a task that lists none; ``classnames`` and
``templates`` may be references such as ``open_clip:imagenet`` (:mod:`contrast.evaluate.taskfile`); ``split: all``
takes every image of a folder. :func:`zeroshot_metrics` gives the headline figures as plain floats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from contrast.config import ConfigError, DataConfig, ImageTowerConfig, from_dict
from contrast.data import load_source
from contrast.data.decode import SampleReader, describe_cell
from contrast.data.units import expand_shards
from contrast.evaluate.labelled import is_class_folder, load_class_folder, split_description
from contrast.evaluate.metrics import classification_metrics
from contrast.evaluate.taskfile import read_yaml, resolve_list
from contrast.evaluate.wds import (
    ShardRows,
    folder_classnames,
    folder_templates,
    is_wds_folder,
    load_wds_split,
    split_shards,
)


@dataclass
class ZeroShotTask:
    name: str = ""
    kind: str = "zeroshot"
    data: str = "synthetic"
    split: str = "test"  # train | val | test, or all (every image of a class folder or CLIP_benchmark folder)
    label_column: str = "label"
    image_column: str = "image"
    where: dict[str, Any] = field(default_factory=dict)  # keep rows whose columns equal these values
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    train_split: str = "train"  # linear probe: fit on this split
    val_split: str | None = "val"  # linear probe: choose the L2 strength here; None holds out part of train_split
    get: str = ""  # how to obtain the data, shown when it is not on disk


def _data_path(data: str) -> Path | None:
    return None if data == "synthetic" else Path(data).expanduser()


def missing_data_error(name: str, data: str, get: str, path: str | Path | None) -> ConfigError:
    how = f" {get.rstrip('.')}." if get else ""
    where = f"edit data: in {path}" if path else "edit the task's data:"
    return ConfigError(f"task '{name}': data folder {Path(data).expanduser()} not found.{how} Or point the task "
                       f"at your copy: {where}, or pass --task-data PATH")


def _from_folder(raw: dict, p: Path) -> dict:
    """Class names and templates a CLIP_benchmark-style data folder supplies where the task file lists none."""
    data = raw.get("data")
    root = _data_path(data) if isinstance(data, str) else None
    if root is None or "classnames" in raw and "templates" in raw:
        return raw
    if not root.exists():
        if "classnames" in raw:
            return raw
        raise missing_data_error(str(raw.get("name") or p.stem), str(data), str(raw.get("get") or ""), p)
    raw = dict(raw)
    if "classnames" not in raw and (names := folder_classnames(root)) is not None:
        raw["classnames"] = names
    if "templates" not in raw and (templates := folder_templates(root)) is not None:
        raw["templates"] = templates
    return raw


def load_task(path: str | Path, data: str | None = None) -> ZeroShotTask:
    """A zero-shot task file, its class name and template references resolved; ``data`` replaces its data path."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"task file not found: {p} (task files live in eval/tasks/)")
    raw = read_yaml(p) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"task file {p} must be a mapping (name:, data:, classnames:, templates:, ...)")
    if raw.get("kind", "zeroshot") != "zeroshot":
        raise ConfigError(f"task file {p} is a {raw['kind']} task, not zero-shot classification; run it with "
                          f"`contrast eval {raw['kind']} --task {p}`")
    if data is not None:
        raw = {**raw, "data": data}
    raw = _from_folder(raw, p)
    for key in ("classnames", "templates"):
        if key in raw:
            raw[key] = resolve_list(raw[key], key, f"task {p}")
    task = from_dict(raw, ZeroShotTask)
    if not task.classnames:
        raise ConfigError(f"task {p} lists no classnames")
    bad = [t for t in task.templates if "{}" not in t]
    if bad:
        raise ConfigError(f"task {p}: templates must contain '{{}}' where the class name goes; these do not: {bad}")
    if not task.templates:
        raise ConfigError(f"task {p} lists no templates")
    task.name = task.name or p.stem
    return task


@torch.no_grad()
def zeroshot_classifier(
    model, tokenizer: Callable, classnames: list[str], templates: list[str], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """(E, C) matrix of class embeddings: each class's template embeddings, normalised, averaged, renormalised."""
    weights = []
    for name in classnames:
        texts = [t.format(name) for t in templates]
        emb = model.encode_text(tokenizer(texts).to(device))
        weights.append(F.normalize(F.normalize(emb, dim=-1).mean(dim=0), dim=-1))
    return torch.stack(weights, dim=1)


def _check_class_count(task: ZeroShotTask, found: list[str] | int, what: str) -> None:
    n = found if isinstance(found, int) else len(found)
    if n != len(task.classnames):
        shown = f" {found[:10]}" if isinstance(found, list) else ""
        raise ConfigError(f"task '{task.name}': {task.data} has {n} {what} but the task lists {len(task.classnames)} "
                          f"classnames; list one name per class, in the data's class order{shown}")


def _labelled_source(task: ZeroShotTask, data_cfg: DataConfig | None):
    """A class folder, a CLIP_benchmark folder, or any other source with a label column."""
    if is_wds_folder(task.data):  # CLIP_benchmark layout: labels are class indices
        names = folder_classnames(task.data)
        if names is not None:
            _check_class_count(task, names, "class names in classnames.txt")
        cache = data_cfg.cache_dir if data_cfg is not None else None
        return load_wds_split(task.data, task.split, task.label_column, cache, where=task.where)  # where: applied
    if is_class_folder(task.data):  # ROOT/CLASS/*.jpg: labels index the sorted class folder names
        ds = load_class_folder(task.data, task.split, task.label_column)
        _check_class_count(task, ds.features[task.label_column].names, "class folders")
        return ds
    if task.split == "all":
        raise ConfigError(f"task '{task.name}': split 'all' is for class folders and CLIP_benchmark folders; "
                          f"{task.data} is neither, so choose train, val or test")
    # labelled data: the label column stands where a caption would; keep its own name
    cfg = DataConfig(source=task.data, image_column=task.image_column, caption_column=task.label_column)
    ds = load_source(cfg, task.split)
    if task.label_column != "caption" and "caption" in ds.column_names:
        ds = ds.rename_column("caption", task.label_column)
    return ds


def task_dataset(task: ZeroShotTask, data_cfg: DataConfig | None = None,
                 image_size: int = ImageTowerConfig.image_size):
    """The task's rows; ``data_cfg`` supplies the run's own settings when the task uses the built-in set, which is
    drawn at ``image_size`` (the model's)."""
    if task.data == "synthetic":
        cfg = data_cfg if data_cfg is not None and data_cfg.source == "synthetic" else DataConfig()
        ds = load_source(cfg, task.split, image_size)
    elif not Path(task.data).expanduser().exists():
        raise missing_data_error(task.name, task.data, task.get, None)
    else:
        ds = _labelled_source(task, data_cfg)
    filtered = task.data != "synthetic" and is_wds_folder(task.data)  # shard folders apply where: as they read
    for col, value in ({} if filtered else task.where).items():
        if col not in ds.column_names:
            raise ConfigError(f"task '{task.name}': where-column '{col}' is not in the data ({ds.column_names})")
        ds = ds.filter(lambda v, value=value: v == value, input_columns=col)
    if task.label_column not in ds.column_names:
        raise ConfigError(f"task '{task.name}': label column '{task.label_column}' is not in {ds.column_names}")
    return ds


def _task_shards(task: ZeroShotTask) -> list[str] | None:
    """The shards of the task's split when its data is webdataset shards (a folder with split subfolders of them, as
    CLIP_benchmark and `contrast data shard` lay them out; or, with ``split: all``, a flat folder of them)."""
    if task.data == "synthetic" or not Path(task.data).expanduser().exists():
        return None
    if is_wds_folder(task.data):
        names = folder_classnames(task.data)
        if names is not None:
            _check_class_count(task, names, "class names in classnames.txt")
        return [str(p) for p in split_shards(task.data, task.split)]
    flat = expand_shards(str(Path(task.data).expanduser()))
    if flat is not None and task.split != "all":
        raise ConfigError(f"task '{task.name}': {task.data} is a folder of shards without train / val / test "
                          "subfolders, one collection: set the task's split to all")
    return flat


def task_rows(task: ZeroShotTask, data_cfg: DataConfig | None = None, image_size: int = ImageTowerConfig.image_size):
    """What zero-shot evaluation reads: a task on shards streamed (:class:`ShardRows`, checked on its first sample),
    any other the table of :func:`task_dataset`."""
    shards = _task_shards(task)
    if shards is None:
        return task_dataset(task, data_cfg, image_size)
    rows = ShardRows(shards, task.label_column, dict(task.where))
    first = next(iter(rows), None)
    if first is None:
        where = f" where {task.where}" if task.where else ""
        raise ConfigError(f"task '{task.name}': no samples of {task.data} (split {task.split}{where}) to classify; "
                          "point the task at data that has them")
    if first[task.label_column] is None:
        raise ConfigError(f"task '{task.name}': sample {first['image']['path']} has no label '{task.label_column}' "
                          f"(no .cls member and no such field in its .json: {', '.join(sorted(first)[:12])}); set "
                          "label_column to one of its fields")
    return rows


def describe_split(task: ZeroShotTask) -> str:
    """Which images of the task's data a result covers, in words."""
    if task.data != "synthetic" and is_class_folder(task.data) and not is_wds_folder(task.data):
        return f"{task.split}: {split_description(task.data, task.split)}"
    return task.split


def iterate_images(ds, preprocess: Callable, label_column: str, classnames: list[str], batch_size: int,
                   reader: SampleReader | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (pixels, label indices). Rows whose label is missing or damaged, or whose image cannot be read,
    are left out and counted in ``reader.skips`` (``data.strict`` readers stop at the first instead)."""
    reader = reader if reader is not None else SampleReader()
    index = {c: i for i, c in enumerate(classnames)}
    for batch in _labelled_batches(ds, label_column, batch_size):
        pix, lab = [], []
        for cell, raw, where in batch:
            label = reader.label(raw, where)
            if label is None or (img := reader.image(cell, where)) is None:
                continue
            if isinstance(label, str):
                if label not in index:
                    shown = ", ".join(classnames[:8]) + (", ..." if len(classnames) > 8 else "")
                    raise ConfigError(f"label '{label}' ({where}) is not among the task's {len(classnames)} classnames "
                                      f"({shown}); list it in the task file or filter it out with where:")
                label = index[label]
            pix.append(preprocess(img))
            lab.append(int(label))
        if pix:
            yield torch.stack(pix), torch.tensor(lab)


def _labelled_batches(ds, label_column: str, batch_size: int) -> Iterator[list[tuple[Any, Any, str]]]:
    """(image cell, raw label, where) of ``batch_size`` rows at a time, from a table or a stream of shards."""
    if isinstance(ds, ShardRows):
        batch = []
        for row in ds:
            batch.append((row["image"], row[label_column], row["image"]["path"]))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
        return
    from datasets import Image as ImageFeature

    if isinstance(ds.features.get("image"), ImageFeature):
        ds = ds.cast_column("image", ImageFeature(decode=False))
    for lo in range(0, len(ds), batch_size):
        rows = ds[lo : lo + batch_size]
        yield [(cell, raw, describe_cell(cell, lo + j)) for j, (cell, raw) in enumerate(zip(rows["image"],
                                                                                         rows[label_column]))]


@torch.no_grad()
def evaluate_zeroshot(model, preprocess: Callable, tokenizer: Callable, task: ZeroShotTask, *,
                      data_cfg: DataConfig | None = None, image_size: int = ImageTowerConfig.image_size,
                      batch_size: int = 256, device: str | torch.device = "cpu",
                      reader: SampleReader | None = None, dataset: Any = None) -> dict:
    """Top-1 / top-5 accuracy, mean per-class recall and the confusion matrix of zero-shot classification.

    Unusable rows (see :func:`iterate_images`) are left out and counted under ``skipped`` ({cause: n}); ``reader``
    defaults to one with ``data_cfg``'s ``max_image_pixels`` and ``strict``. ``dataset``: the task's rows when the
    caller opened them already (:func:`task_rows`)."""
    model.eval()
    classifier = zeroshot_classifier(model, tokenizer, task.classnames, task.templates, device)  # (E, C)
    C = len(task.classnames)
    metrics = {k: MulticlassAccuracy(num_classes=C, top_k=min(k, C), average="micro") for k in (1, 5)}
    if reader is None:
        reader = SampleReader.of(data_cfg) if data_cfg is not None else SampleReader()
    n = 0
    ds = dataset if dataset is not None else task_rows(task, data_cfg, image_size)
    all_logits, all_labels = [], []
    for pixels, labels in iterate_images(ds, preprocess, task.label_column, task.classnames, batch_size, reader):
        logits = model.similarity(model.encode_image(pixels.to(device)), classifier.t())  # (B, C)
        for m in metrics.values():
            m.update(logits.cpu(), labels)
        all_logits.append(logits.float().cpu())
        all_labels.append(labels)
        n += len(labels)
    if n == 0:
        raise ConfigError(f"task '{task.name}' matched no readable images ({reader.skips.summary()})")
    per_class = classification_metrics(torch.cat(all_logits), torch.cat(all_labels), C)
    return {
        "task": task.name,
        "n": n,
        "classes": C,
        "top1": float(metrics[1].compute()),
        "top5": float(metrics[5].compute()),
        "chance_top1": 1.0 / C,
        "skipped": reader.skips.as_dict(),  # {cause: rows left out}
        "mean_per_class_recall": per_class["mean_per_class_recall"],
        "per_class_recall": per_class["per_class_recall"],
        "confusion": per_class["confusion"],  # [true][predicted] counts
        "classnames": list(task.classnames),
        "split": describe_split(task),
    }


ZEROSHOT_KEYS = ("top1", "top5", "mean_per_class_recall")


def zeroshot_metrics(model, preprocess: Callable, tokenizer: Callable, task: ZeroShotTask | str | Path, *,
                     device: str | torch.device = "cpu", data_cfg: DataConfig | None = None,
                     image_size: int = ImageTowerConfig.image_size, batch_size: int = 256,
                     dataset: Any = None) -> dict[str, float]:
    """Zero-shot top-1, top-5 and mean per-class recall of ``model`` on a task (or task file) as plain floats,
    keyed as :func:`zeroshot_metric_names` says; the model is left in the training mode it came in."""
    task = task if isinstance(task, ZeroShotTask) else load_task(task)
    was_training = model.training
    try:
        r = evaluate_zeroshot(model, preprocess, tokenizer, task, data_cfg=data_cfg, image_size=image_size,
                              batch_size=batch_size, device=device, dataset=dataset)
    finally:
        model.train(was_training)
    return dict(zip(zeroshot_metric_names(task), (float(r[k]) for k in ZEROSHOT_KEYS)))


def zeroshot_metric_names(task: ZeroShotTask) -> list[str]:
    """The names :func:`zeroshot_metrics` gives a task's figures: ``zeroshot/<task>/<metric>``."""
    return [f"zeroshot/{task.name}/{k}" for k in ZEROSHOT_KEYS]
