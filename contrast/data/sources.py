"""Data sources as Hugging Face ``datasets`` Datasets with an ``image`` column (decoded to PIL) and a ``caption``.

``source`` may be:
- ``synthetic``: the built-in shapes set (splits train / val / test);
- a folder of images with ``captions.jsonl`` or ``captions.csv`` (columns ``file`` and ``caption``) inside it;
- a ``.parquet`` / ``.arrow`` file or a folder of them, read through ``datasets``;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
User data without splits is split deterministically into train / val / test (90 / 5 / 5) by row index.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature

from contrast.config import DataConfig, ImageTowerConfig
from contrast.errors import UserError

SPLITS = ("train", "val", "test")


class DataError(UserError, ValueError):
    """Data that cannot be read as an image-caption source."""


def _synthetic(cfg: DataConfig, split: str, image_size: int) -> Dataset:

    features = Features(
        {
            "image": ImageFeature(),
            "caption": Value("string"),
            "shape": Value("string"),
            "colour": Value("string"),
            "size": Value("string"),
            "n_shapes": Value("int32"),
        }
    )
    quiet = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return _generate(cfg, split, features, image_size)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _generate(cfg: DataConfig, split: str, features: Features, image_size: int) -> Dataset:
    from contrast.data.synthetic import generate

    s = cfg.synthetic
    return Dataset.from_generator(
        generate,
        gen_kwargs={"cfg": s, "split": split, "image_size": image_size},
        features=features,
        cache_dir=cfg.cache_dir,
        # the config's values identify the generated set; the cache is reused across runs
        config_name=f"shapes-{s.seed}-{image_size}-{s.max_shapes}-{split}-{getattr(s, f'{split}_size')}",
    )


def _read_captions(folder: Path) -> list[dict]:
    jl, cs = folder / "captions.jsonl", folder / "captions.csv"
    rows: list[dict] = []
    if jl.is_file():
        for n, line in enumerate(jl.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{jl}:{n} is not valid JSON ({e}); each line must be {{\"file\": ..., \"caption\": ...}}") from e
    elif cs.is_file():
        with cs.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise DataError(
            f"{folder} holds no captions.jsonl or captions.csv; add one with a 'file' and a 'caption' per image"
        )
    out = []
    for n, r in enumerate(rows, 1):
        if "file" not in r or "caption" not in r:
            raise DataError(f"captions row {n} in {folder} lacks 'file' or 'caption': {r}")
        path = folder / str(r["file"])
        if not path.is_file():
            raise DataError(f"captions row {n} names {path}, which does not exist; fix the path or remove the row")
        out.append({"image": str(path), "caption": str(r["caption"])})
    return out


def _split_rows(ds: Dataset, split: str) -> Dataset:
    n = len(ds)
    n_val = n_test = max(1, n // 20) if n >= 20 else 0
    bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
    lo, hi = bounds[split]
    return ds.select(range(lo, hi))


def _from_dict_or_split(obj: Dataset | DatasetDict, split: str, where: str) -> Dataset:
    if isinstance(obj, DatasetDict):
        if split in obj:
            return obj[split]
        alias = {"val": "validation"}.get(split)
        if alias and alias in obj:
            return obj[alias]
        raise DataError(f"{where} has splits {list(obj)}, not '{split}'")
    return _split_rows(obj, split)


def load_source(cfg: DataConfig, split: str, image_size: int = ImageTowerConfig.image_size) -> Dataset:
    """Open ``cfg.source`` and return ``split`` with ``image`` and ``caption`` columns.

    ``image_size`` is the model's (``model.image.image_size``): the built-in set is drawn at it.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got '{split}'")
    if cfg.source == "synthetic":
        return _synthetic(cfg, split, image_size)
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise DataError(
            f"data source not found: {path}. Use 'synthetic', a folder of images with captions.jsonl/csv, "
            "a .parquet/.arrow file, or a folder written by save_to_disk"
        )
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        ds = _from_dict_or_split(datasets.load_from_disk(str(path)), split, str(path))
    elif path.is_dir() and ((path / "captions.jsonl").is_file() or (path / "captions.csv").is_file()):
        rows = _read_captions(path)
        ds = Dataset.from_list(rows).cast_column("image", ImageFeature())
        ds = _split_rows(ds, split)
    elif path.suffix in (".parquet", ".arrow") or path.is_dir():
        files = [path] if path.is_file() else sorted([*path.glob("*.parquet"), *path.glob("*.arrow")])
        if not files:
            raise DataError(f"{path} holds no captions file, .parquet or .arrow files")
        kind = "parquet" if files[0].suffix == ".parquet" else "arrow"
        ds = _split_rows(datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train"), split)
    else:
        raise DataError(f"cannot read {path}: expected a folder, .parquet or .arrow file")
    for col in (cfg.image_column, cfg.caption_column):
        if col not in ds.column_names:
            raise DataError(
                f"{path} has columns {ds.column_names}, no '{col}'; set data.image_column / data.caption_column"
            )
    if cfg.image_column != "image":
        ds = ds.rename_column(cfg.image_column, "image")
    if cfg.caption_column != "caption":
        if "caption" in ds.column_names:  # the configured column wins over one that happens to be named caption
            ds = ds.remove_columns("caption")
        ds = ds.rename_column(cfg.caption_column, "caption")
    if not isinstance(ds.features["image"], ImageFeature):
        ds = ds.cast_column("image", ImageFeature())
    return ds
