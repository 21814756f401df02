"""The rows an index is built from: a split of a source read in order (random access for tables and folders,
a stream for webdataset tar shards), decoded in DataLoader workers, with the unusable rows counted by cause.

Decoding runs in ``workers`` processes: worker ``w`` of ``W`` decodes chunks ``w, w + W, ...`` of ``CHUNK`` rows and
the DataLoader hands the chunks back round-robin, so the main process sees the rows in source order whatever the
worker count, and the index (ids, vectors, skip counts) is the same with 0 workers or 8.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from contrast.data.collate import Rows
from contrast.data.decode import BadSample, SampleReader, Skips, describe_cell, load_image
from contrast.data.sources import load_source, open_rows
from contrast.data.units import TarUnit
from contrast.runs import atomic_write_text

CHUNK = 64  # rows a worker decodes at a time
SCALARS = ("string", "int32", "int64", "float32", "float64", "bool")
PROGRESS = "skipped.progress.json"  # an unfinished build's resume positions (removed when it finishes)


class SourceRows:
    """Rows of ``split`` of a source in order, each with ``__index__`` (its number in the split): random access
    (``len``) for what :func:`contrast.data.load_source` reads, a stream for webdataset tar shards."""

    def __init__(self, data_cfg: Any, split: str, image_size: int, label: str):
        self.label = label
        opened = None if _saved_dataset(data_cfg.source) else open_rows(data_cfg, split, image_size)
        units = opened.units if opened is not None else None
        self.units = units if units and all(isinstance(u, TarUnit) for u in units) else None
        self.rows = None if self.units else opened.rows if opened is not None and opened.rows is not None else Rows(
            load_source(data_cfg, split, image_size))
        self.scalars = [] if self.rows is None else [
            c for c, f in self.rows.ds.features.items()
            if c not in ("image", "caption") and getattr(f, "dtype", None) in SCALARS]

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else 0

    def chunks(self, start: int, part: int = 0, parts: int = 1) -> Iterator[list[dict[str, Any]]]:
        """Chunks ``part, part + parts, ...`` of ``CHUNK`` rows from row ``start`` on (others are not decoded, and
        with random access not read)."""
        if self.rows is not None:
            los = range(start, len(self.rows), CHUNK)
            for lo in itertools.islice(los, part, None, parts):
                yield self.rows.__getitems__(list(range(lo, min(len(self.rows), lo + CHUNK))))
            return
        stream = itertools.islice(self._stream(), start, None)
        for c in itertools.count():
            chunk = list(itertools.islice(stream, CHUNK))
            if not chunk:
                return
            if c % parts == part:
                yield chunk

    def all(self) -> Iterator[dict[str, Any]]:
        for chunk in self.chunks(0):
            yield from chunk

    def _stream(self) -> Iterator[dict[str, Any]]:
        rows = (r for unit in self.units for r in unit.rows(0, 1))
        for n, row in enumerate(rows):
            row["__index__"] = n
            yield row

    def pick(self, numbers: list[int]) -> Iterator[dict[str, Any]]:
        """The rows numbered ``numbers`` (sorted), read by number or by one pass over the stream."""
        if self.rows is not None:
            for lo in range(0, len(numbers), CHUNK):
                yield from self.rows.__getitems__(numbers[lo : lo + CHUNK])
            return
        want = set(numbers)
        for row in self._stream():
            if row["__index__"] in want:
                yield row
                if row["__index__"] == numbers[-1]:
                    return

    def describe(self, row: dict[str, Any]) -> dict[str, Any]:
        """The metadata an index stores beside a row's vector."""
        image = row.get("image")
        path = image.get("path") if isinstance(image, dict) else row.get("__key__")
        # the row number in the split: ids count indexed rows only, so they differ from it once a row was skipped
        meta = {"path": path or f"{self.label}[{row['__index__']}]", "caption": row["caption"],
                "row": row["__index__"]}
        meta.update({c: row[c] for c in self.scalars})
        extra = row.get("json")
        if isinstance(extra, dict):
            meta.update({k: v for k, v in extra.items() if k not in meta and k != "id"
                         and isinstance(v, str | int | float | bool)})
        return meta


def _saved_dataset(source: Any) -> bool:
    """A ``save_to_disk`` folder: random access (its split subfolders are not shard folders)."""
    path = Path(str(source)).expanduser()
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file())


def where(row: dict[str, Any]) -> str:
    return row["__key__"] if "__key__" in row else describe_cell(row.get("image"), row["__index__"])


class _Decoded(torch.utils.data.IterableDataset):
    """Chunks of rows with their images decoded and cropped to uint8 pixels (``__pixels__``), or the reason they
    cannot be (``__bad__``); the encoded image bytes are dropped so only pixels cross to the main process."""

    def __init__(self, rows: SourceRows, start: int, modality: str, reader: SampleReader, transform: Any):
        self.rows, self.start, self.modality = rows, start, modality
        self.max_pixels, self.draft, self.transform = reader.max_pixels, reader.draft, transform

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = torch.utils.data.get_worker_info()
        part, parts = (info.id, info.num_workers) if info is not None else (0, 1)
        for chunk in self.rows.chunks(self.start, part, parts):
            yield [self._prepare(row) for row in chunk]

    def _prepare(self, row: dict[str, Any]) -> dict[str, Any]:
        if self.modality == "image":
            try:
                row["__pixels__"] = self.transform.pixels(load_image(row["image"], self.max_pixels, self.draft))
            except BadSample as e:
                row["__bad__"] = (e.cause, e.detail)
        image = row["image"]
        row["image"] = {"path": image.get("path")} if isinstance(image, dict) else None
        return row


class Usable:
    """Iterating yields the rows an index can use, in order, each with its pixels (``__pixels__``, image index)
    or cleaned caption (text index); the others are counted in ``reader.skips``.

    Resuming a build: before the first item of every shard, the position (usable items so far, next row, counts) is
    saved in ``PROGRESS``; a build resumed after ``n`` finished items starts from the saved position of ``n`` (its
    first ``n`` items are placeholders the store skips), so the finished part is not decoded again and the counts
    still cover the whole source."""

    def __init__(self, rows: SourceRows, modality: str, reader: SampleReader, transform: Any, out: Path,
                 shard_size: int, resume: dict | None, workers: int = 0):
        self.rows, self.modality, self.reader, self.transform = rows, modality, reader, transform
        self.out, self.shard_size, self.resume, self.workers = out, shard_size, resume, workers
        self.passes, self.records = 0, []

    def __iter__(self) -> Iterator[Any]:
        self.passes += 1
        start = self.resume or {"items": 0, "row": 0, "skipped": {}, "first": {}}
        self.reader.skips = Skips(start["skipped"])
        self.reader.skips.first.update(start["first"])
        yield from itertools.repeat(None, start["items"])  # the items the finished shards hold
        items, next_row = start["items"], start["row"]
        decoded = _Decoded(self.rows, start["row"], self.modality, self.reader, self.transform)
        loader = torch.utils.data.DataLoader(decoded, batch_size=None, num_workers=self.workers)
        for chunk in loader:
            for row in chunk:
                next_row = row["__index__"] + 1
                if self._usable(row):
                    if items % self.shard_size == 0:  # every earlier shard is written by now
                        self._mark(items, row["__index__"])
                    yield row
                    items += 1
        self._mark(items, next_row)

    def _usable(self, row: dict[str, Any]) -> bool:
        at = where(row)
        if self.modality == "text":
            row["caption"] = self.reader.caption(row.get("caption"), at)
            return row["caption"] is not None
        if "__bad__" in row:
            self.reader.bad(BadSample(*row["__bad__"]), at)
            return False
        # an image index keeps captions as metadata only: text is cleaned (a repair is counted); a missing or empty
        # caption is stored as it is, and the image indexed all the same
        caption = row.get("caption")
        row["caption"] = self.reader.caption(caption, at) if isinstance(caption, str) and caption.strip() else caption
        return True

    def _mark(self, items: int, next_row: int) -> None:
        self.records = [*self.records[-2:], {"items": items, "row": next_row, "skipped": self.reader.skips.as_dict(),
                                              "first": dict(self.reader.skips.first)}]
        atomic_write_text(self.out / PROGRESS, json.dumps(self.records))


def resume_point(out: Path, done: int, overwrite: bool) -> dict | None:
    """The saved position matching the ``done`` items an unfinished build in ``out`` holds (None: from the top)."""
    if overwrite or not (out / PROGRESS).is_file() or not (out / "shards").is_dir():
        return None
    return next((r for r in json.loads((out / PROGRESS).read_text()) if r["items"] == done), None)


def data_config(cfg: Any, source: str) -> Any:
    return dataclasses.replace(cfg.data, source=str(source))
