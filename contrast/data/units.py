"""Shard sources read as a stream of units: webdataset tar shards (read with the ``webdataset`` package) and
parquet / arrow files streamed through ``datasets`` (never copied into a cache).

A tar shard holds samples in the img2dataset layout: ``KEY.jpg|png|webp|...`` with ``KEY.txt`` (the caption) and an
optional ``KEY.json``. A table file is cut into units by row range, so that a split (90 / 5 / 5 by row, as for
map-style files) is streamed without reading the rows of the others.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "jxl", "avif")
TABLE_EXTS = (".parquet", ".arrow")


@dataclass
class TarUnit:
    """A webdataset tar shard (a local path or any URL ``webdataset.gopen`` opens, e.g. ``pipe:``)."""

    name: str

    def rows(self, part: int, parts: int) -> Iterator[dict]:
        from webdataset.tariterators import tarfile_samples

        errors: list[Exception] = []

        def stop(exc: Exception) -> bool:  # the rest of a damaged shard is skipped; the error is reported below
            errors.append(exc)
            return False

        for n, sample in enumerate(tarfile_samples([{"url": self.name}], handler=stop)):
            if n % parts == part:
                yield tar_row(sample, self.name)
        if errors:
            log.warning("shard %s stopped being readable: %s; its remaining samples are skipped", self.name, errors[0])


def tar_row(sample: dict, shard: str) -> dict:
    """A webdataset sample as a row: the image's bytes, the caption and the sample's JSON metadata."""
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    caption = sample.get("txt")
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="surrogateescape")  # clean_caption repairs and counts these
    row = {"image": image, "caption": caption, "__key__": f"{shard}:{sample.get('__key__')}"}
    if "json" in sample:
        try:
            row["json"] = json.loads(sample["json"])
        except (ValueError, UnicodeDecodeError):
            row["json"] = None
    return row


@dataclass
class TableUnit:
    """Rows ``[lo, hi)`` of one parquet or arrow file, streamed through ``datasets``."""

    name: str
    lo: int
    hi: int
    image_column: str = "image"
    caption_column: str = "caption"

    def rows(self, part: int, parts: int) -> Iterator[dict]:
        import datasets

        kind = "parquet" if self.name.endswith(".parquet") else "arrow"
        ds = datasets.load_dataset(kind, data_files=[self.name], split="train", streaming=True)
        ds = ds.skip(self.lo).take(self.hi - self.lo)
        for n, row in enumerate(ds):
            if n % parts == part:
                yield {"image": row.get(self.image_column), "caption": row.get(self.caption_column),
                       "__key__": f"{self.name}:{self.lo + n}"}


def table_rows(path: Path) -> int:
    """The number of rows of a parquet or arrow file, from its metadata (parquet) or batch headers (arrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with pa.memory_map(str(path)) as src:
        try:
            reader = pa.ipc.open_stream(src)
        except pa.ArrowInvalid:
            return pa.ipc.open_file(src).read_all().num_rows
        return sum(b.num_rows for b in reader)


def expand_shards(spec: str | list[str]) -> list[str] | None:
    """Tar shard names of ``spec`` (a brace pattern, a .tar, a folder of .tar files, or a list of these), or None
    when ``spec`` names no tar shards."""
    from webdataset.shardlists import expand_urls

    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        p = Path(s).expanduser()
        if p.is_dir():
            tars = sorted(str(t) for t in p.glob("*.tar"))
            if not tars:
                return None
            out += tars
        elif "{" in s or s.endswith(".tar") or s.startswith("pipe:"):
            out += expand_urls(s)
        else:
            return None
    return out
