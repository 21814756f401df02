"""Indexes built from and queried with a trained ``contrast`` model (any model with ``encode_image`` /
``encode_text`` returning L2-normalised (B, E) embeddings).

Images are read through :mod:`contrast.data.decode` with the run's ``data.max_image_pixels`` and ``data.strict``:
rows whose image (image index) or caption (text index) cannot be used are left out of the index, counted by cause,
and the counts written to ``INDEX_DIR/skipped.json`` (the manifest's fields are the store's). JPEGs are decoded at
reduced size where the model's input size allows (the transform's ``decode_size``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from contrast.data.collate import Rows
from contrast.data.decode import BadSample, SampleReader, Skips, describe_cell, load_image
from contrast.data.transforms import build_transform
from contrast.index.store import (
    IndexStoreError,
    RetrievalIndex,
    SearchResult,
    build_index,
    file_sha256,
    open_index,
)
from contrast.runs import WEIGHTS, load, load_config_of

MODALITIES = ("image", "text")
SKIPPED = "skipped.json"  # what a build left out, by cause
PROGRESS = "skipped.progress.json"  # an unfinished build's resume positions (removed when it finishes)
CHUNK = 256  # rows read from the source at a time


def _weights_of(checkpoint: str | os.PathLike) -> tuple[Any, Path, Path]:
    """(run config, step directory, weights file) of a run directory or step directory."""
    cfg, ckpt = load_config_of(checkpoint)
    return cfg, Path(ckpt).resolve(), Path(ckpt).resolve() / WEIGHTS


class ModelEncoder:
    """Batches of PIL images or strings -> float32 (B, E) unit vectors through a loaded model."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, device: str = "cpu"):
        self.model, self.preprocess, self.tokenizer, self.device = model, preprocess, tokenizer, device

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)  # (B, 3, H, W)
        return self.model.encode_image(pixels).float().cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float().cpu()


class _Rows(Rows):
    """Rows of a source with the metadata an index stores beside each vector."""

    def __init__(self, ds: Any, label: str):
        super().__init__(ds)
        self.label = label
        self.scalars = [c for c, f in self.ds.features.items() if c not in ("image", "caption")
                        and getattr(f, "dtype", None) in ("string", "int32", "int64", "float32", "float64", "bool")]

    def describe(self, row: dict[str, Any]) -> dict[str, Any]:
        image = row["image"]
        path = image.get("path") if isinstance(image, dict) else getattr(image, "filename", None)
        # the row number in the split: ids count indexed rows only, so they differ from it once a row was skipped
        meta = {"path": path or f"{self.label}[{row['__index__']}]", "caption": row["caption"], "row": row["__index__"]}
        meta.update({c: row[c] for c in self.scalars})
        return meta


class _Usable:
    """Iterating yields the rows an index can use, in order, each with its decoded image (``__image__``, image
    index) or cleaned caption (text index); the others are counted in ``reader.skips``.

    Resuming a build: before the first item of every shard, the position (usable items so far, next row, counts) is
    saved in ``PROGRESS``; a build resumed after ``n`` finished items starts from the saved position of ``n`` (its
    first ``n`` items are placeholders the store skips), so the finished part is not decoded again and the counts
    still cover the whole source."""

    def __init__(self, rows: _Rows, modality: str, reader: SampleReader, out: Path, shard_size: int,
                 resume: dict | None):
        self.rows, self.modality, self.reader, self.out, self.shard_size = rows, modality, reader, out, shard_size
        self.resume, self.passes, self.records = resume, 0, []

    def __iter__(self):
        self.passes += 1
        start = self.resume or {"items": 0, "row": 0, "skipped": {}, "first": {}}
        self.reader.skips = Skips(start["skipped"])
        self.reader.skips.first.update(start["first"])
        yield from itertools.repeat(None, start["items"])  # the items the finished shards hold
        items = start["items"]
        for lo in range(start["row"], len(self.rows), CHUNK):
            for row in self.rows.__getitems__(list(range(lo, min(len(self.rows), lo + CHUNK)))):
                if self._usable(row):
                    if items % self.shard_size == 0:  # every earlier shard is written by now
                        self._mark(items, row["__index__"])
                    yield row
                    items += 1
        self._mark(items, len(self.rows))

    def _usable(self, row: dict[str, Any]) -> bool:
        where = describe_cell(row["image"], row["__index__"])
        if self.modality == "text":
            row["caption"] = self.reader.caption(row.get("caption"), where)
            return row["caption"] is not None
        row["__image__"] = self.reader.image(row["image"], where)
        if row["__image__"] is None:
            return False
        # an image index keeps captions as metadata only: text is cleaned (a repair is counted); a missing or empty
        # caption is stored as it is, and the image indexed all the same
        caption = row.get("caption")
        row["caption"] = self.reader.caption(caption, where) if isinstance(caption, str) and caption.strip() else caption
        return True

    def _mark(self, items: int, next_row: int) -> None:
        self.records = [*self.records[-2:], {"items": items, "row": next_row, "skipped": self.reader.skips.as_dict(),
                                              "first": dict(self.reader.skips.first)}]
        tmp = self.out / (PROGRESS + ".tmp")
        tmp.write_text(json.dumps(self.records))
        tmp.replace(self.out / PROGRESS)


def _resume_point(out: Path, overwrite: bool) -> dict | None:
    """The saved position matching the items an unfinished build in ``out`` holds (None: start from the top)."""
    from contrast.index.store import _finished_shards  # the store's own count of finished items

    if overwrite or not (out / PROGRESS).is_file() or not (out / "shards").is_dir():
        return None
    done = sum(_finished_shards(out))
    return next((r for r in json.loads((out / PROGRESS).read_text()) if r["items"] == done), None)


def build_from_checkpoint(
    checkpoint: str | os.PathLike,
    source: str,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    modality: str = "image",
    factory: str = "Flat",
    batch_size: int = 64,
    shard_size: int = 4096,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> RetrievalIndex:
    """Index ``split`` of ``source`` (anything ``contrast.data.load_source`` reads) with a run's model.

    ``modality="image"`` indexes image embeddings (for text or image queries), ``"text"`` caption embeddings.
    The run's own data settings (synthetic set sizes, column names, max_image_pixels, strict) apply, with
    ``source`` replacing its source. Unusable rows are skipped (see the module docstring).
    """
    from contrast.data import load_source  # noqa: I001

    if modality not in MODALITIES:
        raise IndexStoreError(f"modality must be one of {MODALITIES}, got {modality!r}")
    cfg, ckpt, weights = _weights_of(checkpoint)
    digest = file_sha256(weights)
    data_cfg = dataclasses.replace(cfg.data, source=str(source))
    rows = _Rows(load_source(data_cfg, split, cfg.model.image.image_size), f"{source}:{split}")
    model, preprocess, tokenizer = load(ckpt, device=device)
    enc = ModelEncoder(model, preprocess, tokenizer, device)
    reader = SampleReader.of(data_cfg, draft=build_transform(cfg.model.image).decode_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    usable = _Usable(rows, modality, reader, out, shard_size, _resume_point(out, overwrite))

    def encode(batch: list[dict[str, Any]]) -> torch.Tensor:
        if modality == "image":
            return enc.images([r["__image__"] for r in batch])
        return enc.texts([r["caption"] for r in batch])

    ix = build_index(usable, encode, out_dir, factory=factory, describe=rows.describe, batch_size=batch_size,
                     shard_size=shard_size, checkpoint=str(weights), checkpoint_hash=digest, modality=modality,
                     source=str(source), split=split, overwrite=overwrite, progress=progress)
    if usable.passes:
        write_skips(ix.path, reader.skips)
    elif (out / PROGRESS).is_file():  # resumed after every vector was encoded: the last pass's final position
        last = json.loads((out / PROGRESS).read_text())[-1]
        write_skips(ix.path, Skips(last["skipped"]), last["first"])
    (out / PROGRESS).unlink(missing_ok=True)
    return ix


def write_skips(index_dir: str | os.PathLike, skips: Skips, first: dict[str, str] | None = None) -> Path:
    """``INDEX_DIR/skipped.json``: ``{"skipped": {cause: n}, "first": {cause: sample}}`` of a build."""
    path = Path(index_dir) / SKIPPED
    doc = {"skipped": skips.as_dict(), "first": first if first is not None else skips.first}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def read_skips(index_dir: str | os.PathLike) -> dict[str, int]:
    """The ``{cause: n}`` counts of what a build left out ({} when it left out nothing or predates the file)."""
    path = Path(index_dir) / SKIPPED
    return json.loads(path.read_text())["skipped"] if path.is_file() else {}


def query(
    index: RetrievalIndex | str | os.PathLike,
    *,
    text: str | list[str] | None = None,
    image: str | os.PathLike | Image.Image | None = None,
    k: int = 10,
    checkpoint: str | os.PathLike | None = None,
    device: str = "cpu",
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> SearchResult:
    """Encode a text or an image with the model the index was built with (or ``checkpoint``, which must be
    that same model) and return the top ``k`` items with their metadata."""

    if (text is None) == (image is None):
        raise IndexStoreError("give exactly one query: a text or an image")
    ix = index if isinstance(index, RetrievalIndex) else open_index(index)
    ckpt = checkpoint if checkpoint is not None else ix.manifest.checkpoint
    if ckpt is None:
        raise IndexStoreError(f"the index at {ix.path} was not built from a checkpoint; search it with vectors "
                              f"(RetrievalIndex.search) or pass the checkpoint that made them")
    if checkpoint is None and not Path(ckpt).exists():
        raise IndexStoreError(f"the index at {ix.path} was built with {ckpt}, which no longer exists; pass the "
                              f"same model with --checkpoint, or rebuild the index")
    cfg, step, weights = _weights_of(Path(ckpt).parent if Path(ckpt).is_file() else ckpt)
    ix.check_model(weights)  # same weights file contents, or a clear refusal
    model, preprocess, tokenizer = load(step, device=device)
    enc = ModelEncoder(model, preprocess, tokenizer, device)
    if text is not None:
        vec = enc.texts([text] if isinstance(text, str) else text)
    else:
        vec = enc.images([_query_image(image, cfg.data.max_image_pixels)])
    ix.check_model(embed_dim=int(vec.shape[1]))
    return ix.search(vec, k, nprobe=nprobe, ef_search=ef_search)


def _query_image(image: str | os.PathLike | Image.Image, max_pixels: int) -> Image.Image:
    try:
        return load_image(image, max_pixels=max_pixels)
    except BadSample as e:
        raise IndexStoreError(f"cannot read the query image {describe_cell(image)}: {e.cause} ({e.detail}); pass an "
                              "image file (PNG, JPEG, ...)") from None
