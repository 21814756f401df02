"""Write any image-caption source as webdataset tar shards in the img2dataset layout.

Each sample ``KEY`` (a zero-padded running number over the samples written) is three members of a shard:

- ``KEY.jpg`` / ``KEY.png`` / ``KEY.webp`` / ...: the image's ORIGINAL encoded bytes (never re-encoded), named by
  their real format, read from the bytes' magic number (a decoded PIL cell, which has no bytes, is stored as PNG);
- ``KEY.txt``: the caption, UTF-8 (cleaned by :func:`contrast.data.decode.clean_caption`);
- ``KEY.json``: the source's other columns, plus ``key`` and ``source_index`` (the sample's row in the source).

Samples whose image fails the one decode check (:func:`contrast.data.decode.load_image`) or whose caption fails
:func:`~contrast.data.decode.clean_caption` are skipped and counted by cause. The output is a pure function of the
input: the same rows give byte-identical shards (fixed mtime, owner and mode, members in key order). Shards are
named ``{split}-{i:05d}.tar``; ``sizes.json`` holds each shard's sample count (the file open_clip's
``get_wds_dataset`` reads) and ``info.json`` the source, the counts and the skips. Every file is written under a
temporary name and renamed when complete, so a killed run never leaves a half shard under a final name.

A shard folder holds one split (a reader given the folder reads every ``.tar`` in it): write each split to its own.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from contrast.config import DataConfig, ImageTowerConfig
from contrast.data.decode import REPAIRED, BadSample, Skips, clean_caption, load_image
from contrast.data.sources import DataError, load_source

DEFAULT_SHARD_SIZE = 10_000
KEY_DIGITS = 9  # keys sort as numbers up to a billion samples
READ_BATCH = 256  # rows read from the source at a time
TMP_SUFFIX = ".tmp"

# (magic bytes at offset, offset, extension); checked in order
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"WEBP", 8, "webp"),  # RIFF....WEBP
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"ftypavif", 4, "avif"),
    (b"ftypavis", 4, "avif"),
    (b"\x00\x00\x00\x0cjP  ", 0, "jp2"),
    (b"\x00\x00\x01\x00", 0, "ico"),
)


def sniff_extension(data: bytes) -> str | None:
    """The file extension of encoded image bytes from their magic number (``jpg``, ``png``, ``webp``...), or None."""
    for magic, offset, ext in _MAGIC:
        if data[offset: offset + len(magic)] == magic:
            if ext == "webp" and data[:4] != b"RIFF":
                continue
            return ext
    return None


# --------------------------------------------------------------------------------------------------- one sample


@dataclass
class Sample:
    """One sample ready for a shard: its encoded image, extension, caption and metadata."""

    image: bytes
    ext: str
    caption: str
    meta: dict


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    try:
        img.save(buf, format="PNG")
    except (OSError, ValueError):  # a mode PNG cannot hold (CMYK, ...): its RGB rendering
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def encoded_image(value: Any, max_pixels: int) -> tuple[bytes, str]:
    """``(bytes, extension)`` of an image cell that passes the decode check; raises :class:`BadSample` otherwise.

    A ``{'bytes', 'path'}`` cell or a path gives the file's own bytes; a decoded PIL image is encoded as PNG.
    """
    load_image(value, max_pixels=max_pixels)  # the project's one check; raises BadSample with a cause
    if isinstance(value, Image.Image):
        return _png(value), "png"
    if isinstance(value, dict) and value.get("bytes"):
        data = bytes(value["bytes"])
    elif isinstance(value, bytes | bytearray):
        data = bytes(value)
    else:
        path = value["path"] if isinstance(value, dict) else value
        try:
            data = Path(path).read_bytes()
        except OSError as e:  # gone since the check
            raise BadSample("missing", f"{path}: {e}") from e
    ext = sniff_extension(data)
    if ext is None:  # decodable but not a format we know by its magic (ppm, tga, ...): ask Pillow
        with Image.open(io.BytesIO(data)) as im:
            ext = (im.format or "bin").lower()
    return data, ext


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, Image.Image):
        return None
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    return str(value)


def make_sample(row: dict, index: int, key: str, max_pixels: int) -> tuple[Sample, str | None]:
    """The shard sample of one source row and the caption's repair note; raises :class:`BadSample` if unusable."""
    caption, note = clean_caption(row.get("caption"))
    image, ext = encoded_image(row.get("image"), max_pixels)
    meta = {k: v for k, v in row.items() if k not in ("image", "caption")}
    meta.update(key=key, source_index=index)
    return Sample(image, ext, caption, meta), note


# --------------------------------------------------------------------------------------------------- tar writing


def _member(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def add_sample(tar: tarfile.TarFile, s: Sample) -> None:
    """Append one sample's members (image, caption, metadata) to an open tar, in a fixed order."""
    key = s.meta["key"]
    meta = json.dumps(s.meta, ensure_ascii=False, default=_jsonable).encode("utf-8")
    for name, data in ((f"{key}.{s.ext}", s.image), (f"{key}.txt", s.caption.encode("utf-8")), (f"{key}.json", meta)):
        tar.addfile(_member(name, data), io.BytesIO(data))


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ShardWriter:
    """Writes ``{split}-{i:05d}.tar`` files of ``shard_size`` samples each, each under a temporary name until full."""

    def __init__(self, out: Path, split: str, shard_size: int):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._count = 0

    def write(self, sample: Sample) -> None:
        if self._tar is None:
            self._name = f"{self.split}-{len(self.sizes):05d}.tar"
            tmp = self.out / (self._name + TMP_SUFFIX)
            self._tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
            self._count = 0
        add_sample(self._tar, sample)
        self._count += 1
        if self._count == self.shard_size:
            self.close()

    def close(self) -> None:
        """Finish the open shard (if any) and give it its final name."""
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self.out / (self._name + TMP_SUFFIX), self.out / self._name)
        self.sizes[self._name] = self._count
        self._tar = None

    def abandon(self) -> None:
        """Drop the open shard's temporary file (after an error)."""
        if self._tar is not None:
            self._tar.close()
            (self.out / (self._name + TMP_SUFFIX)).unlink(missing_ok=True)
            self._tar = None


# --------------------------------------------------------------------------------------------------- the source


def source_rows(ds: Any) -> Iterator[dict]:
    """The rows of a ``datasets`` Dataset or IterableDataset in order, images left undecoded."""
    from datasets import Dataset, IterableDataset
    from datasets import Image as ImageFeature

    if not isinstance(ds, Dataset | IterableDataset):
        raise DataError(f"cannot shard a source read as {type(ds).__name__}; shard a datasets-readable source")
    features = ds.features or {}
    if isinstance(features.get("image"), ImageFeature):
        ds = ds.cast_column("image", ImageFeature(decode=False))
    for batch in ds.iter(batch_size=READ_BATCH):
        cols = list(batch)
        for j in range(len(batch[cols[0]]) if cols else 0):
            yield {c: batch[c][j] for c in cols}


@dataclass
class ShardReport:
    """What :func:`write_shards` wrote and skipped."""

    out: Path
    split: str
    source: str
    shard_size: int
    samples: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    skips: Skips = field(default_factory=Skips)  # by cause, with the first sample of each; captions repaired too

    def info(self) -> dict:
        counts = self.skips.as_dict()
        return {
            "source": self.source, "split": self.split, "shard_size": self.shard_size, "samples": self.samples,
            "shards": len(self.sizes), "skipped": {c: n for c, n in counts.items() if c != REPAIRED},
            "skipped_total": self.skips.total, "repaired": {c: n for c, n in counts.items() if c == REPAIRED},
            "first_skipped": {c: self.skips.first[c] for c in counts if c in self.skips.first and c != REPAIRED},
            "layout": "img2dataset: KEY.<image ext>, KEY.txt (caption), KEY.json (other columns, key, source_index)",
        }

    def summary(self) -> str:
        total = self.skips.total
        causes = ", ".join(f"{c} {n}" for c, n in self.info()["skipped"].items())
        n = len(self.sizes)
        return (f"wrote {self.samples} {self.split} samples in {n} shard{'' if n == 1 else 's'} to {self.out} "
                + (f"(skipped {total}: {causes})" if total else "(nothing skipped)"))


# --------------------------------------------------------------------------------------------------- the writer


def _check_out(out: Path, split: str, overwrite: bool) -> list[Path]:
    """Refuse a folder holding another split, or this split without ``overwrite``; this split's earlier files."""
    old = sorted(out.glob("*.tar")) if out.is_dir() else []
    info = out / "info.json"
    other = [p.name for p in old if not p.name.startswith(f"{split}-")]
    if info.is_file():
        prev = json.loads(info.read_text()).get("split")
        if prev and prev != split:
            other.append(f"info.json of split {prev}")
    if other:
        raise DataError(f"{out} already holds other shards ({other[0]}, ...); write each split to its own folder")
    if old and not overwrite:
        raise DataError(f"{out} already holds {len(old)} {split} shards; pass --overwrite to replace them")
    return [*old, info, out / "sizes.json", *out.glob(f"*{TMP_SUFFIX}")]


def _clear_out(out: Path, old: list[Path]) -> None:
    """Remove the earlier write's files (and temporary files of a killed run). ``info.json`` is written last, so a
    folder without it holds an unfinished write."""
    out.mkdir(parents=True, exist_ok=True)
    for p in old:
        p.unlink(missing_ok=True)


def _write_all(rows: Iterator[dict], writer: ShardWriter, report: ShardReport, cfg: DataConfig) -> None:
    for index, row in enumerate(rows):
        key = f"{report.samples:0{KEY_DIGITS}d}"
        try:
            sample, note = make_sample(row, index, key, cfg.max_image_pixels)
        except BadSample as e:
            if cfg.strict:
                raise DataError(f"row {index} of {cfg.source} is unusable ({e}); data.strict is on") from e
            report.skips.add(e.cause, where=f"row {index}: {e.detail}")
            continue
        if note:
            report.skips.add(note)
        writer.write(sample)
        report.samples += 1
    writer.close()


def write_shards(
    cfg: DataConfig,
    out: str | Path,
    split: str = "train",
    shard_size: int = DEFAULT_SHARD_SIZE,
    image_size: int = ImageTowerConfig.image_size,
    overwrite: bool = False,
) -> ShardReport:
    """Write ``split`` of the source ``cfg`` (anything :func:`contrast.data.load_source` reads) as shards in ``out``.

    ``image_size`` is only used by the built-in synthetic set (drawn at that size).
    """
    if shard_size < 1:
        raise DataError(f"shard size must be at least 1, got {shard_size}")
    out = Path(out).expanduser()
    old = _check_out(out, split, overwrite)
    ds = load_source(cfg, split, image_size)
    _clear_out(out, old)
    report = ShardReport(out, split, str(cfg.source), shard_size)
    writer = ShardWriter(out, split, shard_size)
    try:
        _write_all(source_rows(ds), writer, report, cfg)
    except BaseException:
        writer.abandon()
        raise
    report.sizes = writer.sizes
    write_atomic(out / "sizes.json", (json.dumps(report.sizes, indent=1) + "\n").encode())
    write_atomic(out / "info.json", (json.dumps(report.info(), indent=1, ensure_ascii=False) + "\n").encode())
    return report
