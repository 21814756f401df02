"""CLIP_benchmark-style webdataset folders for zero-shot classification.

The layout (as written by ``clip_benchmark_export_wds`` and published as ``clip-benchmark/wds_*`` data sets)::

    ROOT/
      test/0.tar 1.tar ... (nshards.txt)     samples KEY.webp|png|jpg|jpeg + KEY.cls (the class index as text)
      train/...                               optional, for linear probes
      classnames.txt                          one class name per line, in class-index order
      zeroshot_classification_templates.txt   one template per line, {c} where the class name goes
      dataset_type.txt                        optional; "retrieval" folders hold captions instead of labels

For the linear probe, which needs random access, a split is read once into a ``datasets`` Dataset (an on-disk
Arrow cache keyed by the shards' names, sizes and modification times, so memory does not grow with the data) with
the columns ``image`` and the task's label column. Zero-shot evaluation streams the shards instead
(:class:`ShardRows`): read in order on every pass, never listed or copied. Streams also read the shards `contrast
data shard` writes, whose labels are fields of each sample's ``.json``. ``split: all`` reads the shards of every
split folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contrast.config import ConfigError
from contrast.evaluate.taskfile import read_lines

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")  # the extensions CLIP_benchmark reads, in its order
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


def _shards(folder: Path) -> list[Path]:
    def order(p: Path) -> tuple[int, str]:
        m = re.fullmatch(r"\d+", p.stem)
        return (int(p.stem), "") if m else (1 << 62, p.stem)

    return sorted(folder.glob("*.tar"), key=order)


def is_wds_folder(path: str | Path) -> bool:
    """True for a folder with split subfolders of .tar shards (the CLIP_benchmark layout)."""
    root = Path(path).expanduser()
    return root.is_dir() and any(_shards(root / s) for names in SPLIT_FOLDERS.values() for s in names
                                 if (root / s).is_dir())


def split_shards(root: str | Path, split: str) -> list[Path]:
    """The shards of ``split`` (``all``: of every split folder)."""
    root = Path(root).expanduser()
    wanted = [s for names in SPLIT_FOLDERS.values() for s in names] if split == "all" else SPLIT_FOLDERS.get(split)
    if wanted is None:
        raise ConfigError(f"split must be one of {', '.join([*SPLIT_FOLDERS, 'all'])}, got '{split}'")
    shards = [t for s in wanted if (root / s).is_dir() for t in _shards(root / s)]
    if not shards:
        present = [d.name for d in sorted(root.iterdir()) if d.is_dir() and _shards(d)]
        raise ConfigError(f"{root} has no .tar shards for split '{split}' (split folders with shards: "
                          f"{', '.join(present) or 'none'}); set the task's split to one of them, or 'all'")
    return shards


def folder_classnames(root: str | Path) -> list[str] | None:
    p = Path(root).expanduser() / CLASSNAMES_FILE
    return read_lines(p, "class names file") if p.is_file() else None


def folder_templates(root: str | Path) -> list[str] | None:
    p = Path(root).expanduser() / TEMPLATES_FILE
    return [t.replace("{c}", "{}") for t in read_lines(p, "templates file")] if p.is_file() else None


def _label(value: Any) -> int | None:
    """The class index of a ``.cls`` member (ASCII digits), or None when it is missing or not a number."""
    if value is None:
        return None
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    text = text.strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def _table_rows(shards: list[str], label_column: str, where: dict[str, Any]) -> Iterator[dict]:
    for row in ShardRows(shards, label_column, where):
        yield {"image": row["image"], label_column: row[label_column]}


def load_wds_split(root: str | Path, split: str, label_column: str = "label", cache_dir: str | None = None,
                   where: dict[str, Any] | None = None) -> Any:
    """One split of a shard folder as a Dataset with ``image`` and ``label_column``: the class index of CLIP_benchmark
    folders, or a field of each sample's ``.json`` (shards `contrast data shard` wrote); only the samples whose
    fields equal ``where``'s values."""
    import datasets
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    shards = [str(p) for p in split_shards(root, split)]
    where = dict(where or {})
    first = next(iter(ShardRows(shards, label_column, where)), None)
    if first is None:
        raise ConfigError(f"{root} has no samples in split '{split}'" + (f" where {where}" if where else ""))
    kind = "string" if isinstance(first[label_column], str) else "int64"
    stamp = [(s, Path(s).stat().st_size, Path(s).stat().st_mtime_ns) for s in shards] + [label_column, kind, where]
    features = Features({"image": ImageFeature(decode=False), label_column: Value(kind)})
    quiet = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return Dataset.from_generator(_table_rows, gen_kwargs={"shards": shards, "label_column": label_column,
                                                               "where": where},
                                      features=features, cache_dir=cache_dir,
                                      config_name="wds-" + hashlib.sha1(repr(stamp).encode()).hexdigest()[:16])
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _meta(value: Any) -> dict:
    """A sample's ``.json`` member as a dict ({} when it is missing or unreadable)."""
    try:
        meta = json.loads(value) if value is not None else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def stream_rows(shards: list[str], label_column: str) -> Iterator[dict]:
    """The samples of ``shards``, in order: the fields of each one's ``.json``, then ``image`` ({bytes, path}) and
    ``label_column`` (the ``.cls`` class index when the sample has one, else the ``.json`` field of that name)."""
    from webdataset.tariterators import tarfile_samples

    def stop(exc: Exception) -> bool:  # a damaged shard ends there; its readable samples stay
        return False

    for shard in shards:
        for sample in tarfile_samples([{"url": shard}], handler=stop):
            meta = _meta(sample.get("json"))
            key = f"{Path(shard).name}:{sample.get('__key__')}"
            image = next((sample[e] for e in IMAGE_KEYS if e in sample), None)
            label = _label(sample.get("cls")) if "cls" in sample else meta.get(label_column)
            yield {**meta, "image": {"bytes": image, "path": key}, label_column: label}


@dataclass
class ShardRows:
    """A task's shards as rows, streamed afresh on every iteration (never listed); ``where`` keeps the samples
    whose fields equal its values."""

    shards: list[str]
    label_column: str
    where: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[dict]:
        for row in stream_rows(self.shards, self.label_column):
            if all(row.get(c) == v for c, v in self.where.items()):
                yield row
