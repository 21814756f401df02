"""Data sources as Hugging Face ``datasets`` Datasets with an ``image`` column (decoded to PIL) and a ``caption``.

``source`` may be:
- ``synthetic``: the built-in shapes set (splits train / val / test);
- a folder of images with ``captions.jsonl`` or ``captions.csv`` (columns ``file`` and ``caption``) inside it;
- a ``.parquet`` / ``.arrow`` file or a folder of them, read through ``datasets``;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
- for training (:func:`open_rows`): webdataset tar shards (a brace pattern, a folder of .tar files, or a list of
  either; a folder with train / val / test subfolders of shards has splits), and parquet / arrow files streamed
  through ``datasets`` instead of copied into its cache.
User data without splits is split deterministically into train / val / test (90 / 5 / 5) by row index.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature

from contrast.config import ConfigError, DataConfig, ImageTowerConfig, read_text
from contrast.data.units import TABLE_EXTS, TableUnit, TarUnit, expand_shards, table_rows
from contrast.errors import UserError

SPLITS = ("train", "val", "test")
ALL = "all"  # every row of a source: its splits together, or the whole of a source without splits


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


def _utf8(path: Path) -> str:
    """The text of a captions file, which must be UTF-8; else a one-line error naming the file and the fix."""
    try:
        return read_text(path, "captions file")
    except ConfigError as e:
        raise DataError(str(e)) from None


def _read_captions(folder: Path) -> list[dict]:
    jl, cs = folder / "captions.jsonl", folder / "captions.csv"
    rows: list[dict] = []
    if jl.is_file():
        for n, line in enumerate(_utf8(jl).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{jl}:{n} is not valid JSON ({e}); each line must be {{\"file\": ..., \"caption\": ...}}") from e
    elif cs.is_file():
        rows = list(csv.DictReader(io.StringIO(_utf8(cs), newline="")))
    else:
        raise DataError(
            f"{folder} holds no captions.jsonl or captions.csv; add one with a 'file' and a 'caption' per image"
        )
    out = []
    for n, r in enumerate(rows, 1):
        if "file" not in r or "caption" not in r:
            raise DataError(f"captions row {n} in {folder} lacks 'file' or 'caption': {r}")
        # a file that is missing is skipped and counted when the row is read, like any unreadable image
        out.append({"image": str(folder / str(r["file"])), "caption": _text(r["caption"])})
    return out


def _text(value: Any) -> str | None:
    """A caption cell as storable text: lone surrogates (from JSON escapes) become U+FFFD; None stays None."""
    if value is None:
        return None
    return str(value).encode("utf-16-le", errors="surrogatepass").decode("utf-16-le", errors="replace")


def _split_rows(ds: Dataset, split: str) -> Dataset:
    if split == ALL:
        return ds
    n = len(ds)
    n_val = n_test = max(1, n // 20) if n >= 20 else 0
    bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
    lo, hi = bounds[split]
    if lo == hi:
        raise DataError(f"the '{split}' split is empty: a source without splits of {n} rows has only a train split "
                        "(val and test take 5% each from 20 rows up); use a larger source or one with splits")
    return ds.select(range(lo, hi))


def _from_dict_or_split(obj: Dataset | DatasetDict, split: str, where: str) -> Dataset:
    if isinstance(obj, DatasetDict):
        if split == ALL:
            return datasets.concatenate_datasets(list(obj.values()))
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
    if split not in (*SPLITS, ALL):
        raise DataError(f"split must be one of {', '.join((*SPLITS, ALL))}, got '{split}'")
    if cfg.source == "synthetic":
        if split == ALL:
            return datasets.concatenate_datasets([_synthetic(cfg, s, image_size) for s in SPLITS])
        return _synthetic(cfg, split, image_size)
    if not isinstance(cfg.source, str) or expand_shards(cfg.source) is not None or shard_units(cfg, split):
        raise DataError(f"{cfg.source} names webdataset shards, which are read as a stream, not as a table: train on "
                        "them, evaluate retrieval on their val / test shards (eval.retrieval_split, contrast eval "
                        "retrieval --data) or index them (contrast index build --data; --split all takes a folder "
                        "without split subfolders whole); for this command use the source the shards came from "
                        "(a captions folder, parquet files or a save_to_disk folder)")
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


# --------------------------------------------------------------------------------------------------- streams


@dataclass
class RowSource:
    """What a training stream reads: random-access ``rows`` (``len`` and ``[i]`` give undecoded row dicts), or
    shard ``units`` read in sequence."""

    name: str
    rows: Any = None
    units: list | None = None


def open_rows(cfg: DataConfig, split: str, image_size: int, spec: str | list[str] | None = None) -> RowSource:
    """``split`` of ``spec`` (default ``cfg.source``) for streaming: tar shards and parquet / arrow files as units,
    everything else as random-access rows (undecoded)."""
    from contrast.data.collate import Rows

    spec = cfg.source if spec is None else spec
    name = spec if isinstance(spec, str) else ", ".join(spec)
    shards = _split_shards(spec, split)
    if shards is not None:
        return RowSource(name, units=[TarUnit(s) for s in shards])
    tables = _table_units(cfg, spec, split)
    if tables is not None:
        return RowSource(name, units=tables)
    if not isinstance(spec, str):
        raise DataError(f"a list in data.source is for webdataset shards; {spec} is not; mix sources with data.mixture")
    return RowSource(name, rows=Rows(load_source(dataclasses.replace(cfg, source=spec), split, image_size)))


SPLIT_FOLDERS = ("train", "val", "validation", "test")  # the subfolders of shards that make a source's splits


def _shard_split_folders(folder: Path) -> list[Path]:
    return [folder / s for s in SPLIT_FOLDERS if (folder / s).is_dir() and any((folder / s).glob("*.tar"))]


def has_splits(spec: str | list[str]) -> bool:
    """False for webdataset shards without split subfolders (a flat folder as img2dataset writes it, a brace
    pattern, a list): one collection, whose only split is ``all`` (training also reads it as ``train``)."""
    if isinstance(spec, str) and Path(spec).expanduser().is_dir() and (
            _shard_split_folders(Path(spec).expanduser()) or any((Path(spec).expanduser() / s).is_dir() for s in SPLITS)):
        return True
    return expand_shards(spec) is None


def _split_shards(spec: str | list[str], split: str) -> list[str] | None:
    """Tar shards of ``split``: a folder's ``split`` subfolder of shards (``all``: of every split folder), else the
    shards themselves (``all``, or ``train`` for training)."""
    if isinstance(spec, str) and Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        present = _shard_split_folders(folder)
        if split == ALL and present:
            return [s for d in present for s in expand_shards(str(d))]
        subs = [folder / s for s in (split, {"val": "validation"}.get(split, split))]
        sub = next((d for d in subs if d in present), None)
        if sub is not None:
            return expand_shards(str(sub))
        if present:
            raise DataError(f"{folder} has split folders of .tar shards but none named '{split}' (it has "
                            f"{', '.join(d.name for d in present)}); choose one of them, or all (--split all)")
        if any((folder / s).is_dir() for s in SPLITS):
            return None  # split folders of another kind (a save_to_disk DatasetDict, image folders)
    shards = expand_shards(spec)
    if shards is None:
        return None
    if split not in ("train", ALL):
        raise DataError(f"the shards {spec} are one collection without train / val / test subfolders, so they have "
                        f"no '{split}' split: take them whole with split 'all' (--split all), or put train / val / "
                        "test subfolders of shards in one folder to give them splits")
    missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not Path(s).is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(shards)} shards do not exist, e.g. {missing[0]}; fix data.source")
    return shards


def _table_units(cfg: DataConfig, spec: Any, split: str) -> list[TableUnit] | None:
    """Row ranges of the parquet / arrow files of ``spec`` that make up ``split`` (90 / 5 / 5 by row)."""
    if not isinstance(spec, str):
        return None
    path = Path(spec).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
        return None  # save_to_disk: memory-mapped already, read with random access
    files = [path] if path.suffix in TABLE_EXTS and path.is_file() else (
        sorted(f for f in path.glob("*") if f.suffix in TABLE_EXTS) if path.is_dir() else [])
    if not files or (path.is_dir() and ((path / "captions.jsonl").is_file() or (path / "captions.csv").is_file())):
        return None
    counts = [table_rows(f) for f in files]
    n = sum(counts)
    n_val = n_test = max(1, n // 20) if n >= 20 else 0
    lo, hi = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n),
              ALL: (0, n)}[split]
    units, start = [], 0
    for f, c in zip(files, counts):
        a, b = max(lo, start) - start, min(hi, start + c) - start
        if a < b:
            units.append(TableUnit(str(f), a, b, cfg.image_column, cfg.caption_column))
        start += c
    if not units:
        raise DataError(f"the '{split}' split of {spec} is empty ({n} rows in all)")
    return units


def shard_units(cfg: DataConfig, split: str) -> list[TarUnit] | None:
    """The tar shards of ``split`` of ``cfg.source`` as units to stream (None when the source is not shards)."""
    shards = None if cfg.source == "synthetic" else _split_shards(cfg.source, split)
    return None if shards is None else [TarUnit(s) for s in shards]


def captions_per_line(cfg: DataConfig) -> bool:
    """True for a CLIP_benchmark retrieval folder (``dataset_type.txt`` says retrieval): each sample's text holds
    its image's captions, one a line."""
    if not isinstance(cfg.source, str):
        return False
    kind = Path(cfg.source).expanduser() / "dataset_type.txt"
    return kind.is_file() and kind.read_text(errors="replace").strip() == "retrieval"
