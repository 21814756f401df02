"""Indexes built from and queried with a trained ``contrast`` model (any model with ``encode_image`` /
``encode_text`` returning L2-normalised (B, E) embeddings)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from contrast.data.collate import Rows, decode_image
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
        meta = {"path": path or f"{self.label}[{row['__index__']}]", "caption": row["caption"]}
        meta.update({c: row[c] for c in self.scalars})
        return meta


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
    The run's own data settings (synthetic set sizes, column names) apply, with ``source`` replacing its source.
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

    def encode(batch: list[dict[str, Any]]) -> torch.Tensor:
        if modality == "image":
            return enc.images([decode_image(r["image"]) for r in batch])
        return enc.texts([r["caption"] for r in batch])

    return build_index(rows, encode, out_dir, factory=factory, describe=rows.describe, batch_size=batch_size,
                       shard_size=shard_size, checkpoint=str(weights), checkpoint_hash=digest, modality=modality,
                       source=str(source), split=split, overwrite=overwrite, progress=progress)


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
    _, step, weights = _weights_of(Path(ckpt).parent if Path(ckpt).is_file() else ckpt)
    ix.check_model(weights)  # same weights file contents, or a clear refusal
    model, preprocess, tokenizer = load(step, device=device)
    enc = ModelEncoder(model, preprocess, tokenizer, device)
    if text is not None:
        vec = enc.texts([text] if isinstance(text, str) else text)
    else:
        img = image if isinstance(image, Image.Image) else Image.open(Path(image))
        vec = enc.images([img])
    ix.check_model(embed_dim=int(vec.shape[1]))
    return ix.search(vec, k, nprobe=nprobe, ef_search=ef_search)
