"""Indexes built from, added to, evaluated with and queried with a trained ``contrast`` model (any model with
``encode_image`` / ``encode_text`` returning L2-normalised (B, E) embeddings).

Images are read through :mod:`contrast.data.decode` with the run's ``data.max_image_pixels`` and ``data.strict``,
decoded in DataLoader workers (:mod:`contrast.index.rows`): rows whose image (image index) or caption (text index)
cannot be used are left out of the index, counted by cause, and the counts written to ``INDEX_DIR/skipped.json``
(an addition's counts go to its manifest entry). JPEGs are decoded at reduced size where the model's input size
allows (the transform's ``decode_size``). Sources are anything ``data.source`` takes, webdataset shards included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from contrast.data.decode import BadSample, SampleReader, Skips, describe_cell, load_image
from contrast.data.transforms import build_transform
from contrast.index.evaluate import KS, QueryEval, evaluate_index, evaluate_queries, sample_rows
from contrast.index.rows import PROGRESS, SourceRows, Usable, data_config, resume_point, where
from contrast.index.store import (
    IndexStoreError,
    RetrievalIndex,
    SearchResult,
    add_to_index,
    build_index,
    file_sha256,
    open_index,
    pending_items,
)
from contrast.runs import WEIGHTS, load, load_config_of

MODALITIES = ("image", "text")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
QUERY_KINDS = ("text", "image", "stored")
SKIPPED = "skipped.json"  # what a build left out, by cause


def _weights_of(checkpoint: str | os.PathLike) -> tuple[Any, Path, Path]:
    """(run config, step directory, weights file) of a run directory or step directory."""
    cfg, ckpt = load_config_of(checkpoint)
    return cfg, Path(ckpt).resolve(), Path(ckpt).resolve() / WEIGHTS


class ModelEncoder:
    """Batches of PIL images, uint8 pixels or strings -> float32 (B, E) unit vectors through a loaded model, under
    autocast at ``precision`` (bf16 / fp16) when asked; vectors are re-normalised in float32 then."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, device: str = "cpu",
                 precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise IndexStoreError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        if precision == "fp16" and torch.device(device).type == "cpu":
            raise IndexStoreError("fp16 inference needs a GPU; use --precision bf16 or fp32 on the CPU")
        self.model, self.preprocess, self.tokenizer, self.device = model, preprocess, tokenizer, device
        self.precision = precision

    def _run(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return fn().float().cpu()
        with torch.autocast(torch.device(self.device).type, dtype=dtype):
            v = fn().float()
        return (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu()

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)  # (B, 3, H, W)
        return self._run(lambda: self.model.encode_image(pixels))

    @torch.no_grad()
    def pixels(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """uint8 (3, H, W) crops from the decoding workers, normalised on the device."""
        x = self.preprocess.normalise(torch.stack(pixels).to(self.device))  # (B, 3, H, W)
        return self._run(lambda: self.model.encode_image(x))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        return self._run(lambda: self.model.encode_text(self.tokenizer(list(texts)).to(self.device)))


def _encoder_for(enc: ModelEncoder, modality: str) -> Callable[[list[dict[str, Any]]], torch.Tensor]:
    def encode(batch: list[dict[str, Any]]) -> torch.Tensor:
        if modality == "image":
            return enc.pixels([r["__pixels__"] for r in batch])
        return enc.texts([r["caption"] for r in batch])

    return encode


class _Job:
    """A run's model and a source's rows, ready to encode into ``out``."""

    def __init__(self, checkpoint: str | os.PathLike, source: str, split: str, modality: str, out: Path,
                 device: str, precision: str, workers: int):
        if modality not in MODALITIES:
            raise IndexStoreError(f"modality must be one of {MODALITIES}, got {modality!r}")
        if workers < 0:
            raise IndexStoreError(f"workers must be 0 or more, got {workers}")
        cfg, ckpt, self.weights = _weights_of(checkpoint)
        self.digest = file_sha256(self.weights)
        data_cfg = data_config(cfg, source)
        self.rows = SourceRows(data_cfg, split, cfg.model.image.image_size, f"{source}:{split}")
        model, preprocess, tokenizer = load(ckpt, device=device)
        self.encode = _encoder_for(ModelEncoder(model, preprocess, tokenizer, device, precision), modality)
        self.reader = SampleReader.of(data_cfg, draft=build_transform(cfg.model.image).decode_size)
        self.transform, self.modality, self.out, self.workers = preprocess, modality, out, workers

    def usable(self, shard_size: int, overwrite: bool) -> Usable:
        self.out.mkdir(parents=True, exist_ok=True)
        resume = resume_point(self.out, pending_items(self.out), overwrite) if (self.out / "shards").is_dir() else None
        return Usable(self.rows, self.modality, self.reader, self.transform, self.out, shard_size, resume,
                      self.workers)


def build_from_checkpoint(
    checkpoint: str | os.PathLike,
    source: str,
    out_dir: str | os.PathLike,
    *,
    split: str = "test",
    modality: str = "image",
    factory: str = "Flat",
    on_disk: bool = False,
    memory_gib: float | None = None,
    target_recall: float = 0.95,
    rerank: int | None = None,
    batch_size: int = 64,
    shard_size: int = 4096,
    device: str = "cpu",
    precision: str = "fp32",
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> RetrievalIndex:
    """Index ``split`` of ``source`` (anything ``data.source`` takes, webdataset shards included) with a run's model.

    ``modality="image"`` indexes image embeddings (for text or image queries), ``"text"`` caption embeddings.
    The run's own data settings (synthetic set sizes, column names, max_image_pixels, strict) apply, with
    ``source`` replacing its source. Unusable rows are skipped (see the module docstring). ``workers`` processes
    decode images; ``precision`` bf16 / fp16 runs the model under autocast.
    """
    out = Path(out_dir)
    job = _Job(checkpoint, source, split, modality, out, device, precision, workers)
    usable = job.usable(shard_size, overwrite)
    ix = build_index(usable, job.encode, out, factory=factory, on_disk=on_disk, memory_gib=memory_gib,
                     target_recall=target_recall, rerank=rerank, describe=job.rows.describe, batch_size=batch_size,
                     shard_size=shard_size, checkpoint=str(job.weights), checkpoint_hash=job.digest, modality=modality,
                     source=str(source), split=split, overwrite=overwrite, progress=progress)
    if usable.passes or (out / PROGRESS).is_file():  # else: finished by an earlier run, which wrote the counts
        skips, first = _final_skips(out, usable, job.reader)
        write_skips(ix.path, skips, first)
    (out / PROGRESS).unlink(missing_ok=True)
    return ix


def _final_skips(out: Path, usable: Usable, reader: SampleReader) -> tuple[Skips, dict[str, str]]:
    """What the build left out: this run's counts, or (resumed after every vector was encoded) the last pass's."""
    if usable.passes or not (out / PROGRESS).is_file():
        return reader.skips, reader.skips.first
    last = json.loads((out / PROGRESS).read_text())[-1]
    return Skips(last["skipped"]), last["first"]


def add_from_checkpoint(
    index_dir: str | os.PathLike,
    checkpoint: str | os.PathLike,
    source: str,
    *,
    split: str = "test",
    batch_size: int = 64,
    device: str = "cpu",
    precision: str = "fp32",
    workers: int = 0,
    progress: bool = True,
) -> RetrievalIndex:
    """Append ``split`` of ``source`` to a finished index built with the same model (its weights' sha256 must match
    the manifest's); new items get ids after the existing ones, and the manifest records the addition with what it
    left out. Killed, it resumes when run again; run again after it finished, it adds nothing."""
    out = Path(index_dir)
    ix = open_index(out)
    m = ix.manifest
    job = _Job(checkpoint, source, split, m.modality or "image", out, device, precision, workers)
    if m.checkpoint_hash is not None and job.digest != m.checkpoint_hash:
        raise IndexStoreError(f"the index at {out} was built by another model: {job.weights} has sha256 "
                              f"{job.digest[:12]}..., the index was built from {m.checkpoint} with sha256 "
                              f"{m.checkpoint_hash[:12]}...; add with that checkpoint or build a new index")
    usable = job.usable(m.shard_size, False)

    def record() -> dict[str, Any]:
        skips, first = _final_skips(out, usable, job.reader)
        return {"skipped": skips.as_dict(), "first_skipped": first}

    ix = add_to_index(out, usable, job.encode, describe=job.rows.describe, batch_size=batch_size,
                      checkpoint_hash=job.digest, source=str(source), split=split, record=record, progress=progress)
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


# --------------------------------------------------------------------------------------------------- query


def _model_of(ix: RetrievalIndex, checkpoint: str | os.PathLike | None) -> tuple[Any, Path]:
    """(run config, step directory) of the model the index was built with (or ``checkpoint``, checked the same)."""
    ckpt = checkpoint if checkpoint is not None else ix.manifest.checkpoint
    if ckpt is None:
        raise IndexStoreError(f"the index at {ix.path} was not built from a checkpoint; search it with vectors "
                              f"(RetrievalIndex.search) or pass the checkpoint that made them")
    if checkpoint is None and not Path(ckpt).exists():
        raise IndexStoreError(f"the index at {ix.path} was built with {ckpt}, which no longer exists; pass the "
                              f"same model with --checkpoint, or rebuild the index")
    cfg, step, weights = _weights_of(Path(ckpt).parent if Path(ckpt).is_file() else ckpt)
    ix.check_model(weights)  # same weights file contents, or a clear refusal
    return cfg, step


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
    k_factor: int | None = None,
    rerank: int | None = None,
) -> SearchResult:
    """Encode a text or an image with the model the index was built with (or ``checkpoint``, which must be
    that same model) and return the top ``k`` items with their metadata."""

    if (text is None) == (image is None):
        raise IndexStoreError("give exactly one query: a text or an image")
    ix = index if isinstance(index, RetrievalIndex) else open_index(index)
    cfg, step = _model_of(ix, checkpoint)
    model, preprocess, tokenizer = load(step, device=device)
    enc = ModelEncoder(model, preprocess, tokenizer, device)
    if text is not None:
        vec = enc.texts([text] if isinstance(text, str) else text)
    else:
        vec = enc.images([_query_image(image, cfg.data.max_image_pixels)])
    ix.check_model(embed_dim=int(vec.shape[1]))
    return ix.search(vec, k, nprobe=nprobe, ef_search=ef_search, k_factor=k_factor, rerank=rerank)


def _query_image(image: str | os.PathLike | Image.Image, max_pixels: int) -> Image.Image:
    try:
        return load_image(image, max_pixels=max_pixels)
    except BadSample as e:
        raise IndexStoreError(f"cannot read the query image {describe_cell(image)}: {e.cause} ({e.detail}); pass an "
                              "image file (PNG, JPEG, ...)") from None


# --------------------------------------------------------------------------------------------------- evaluation


def evaluate_from_checkpoint(
    index: RetrievalIndex | str | os.PathLike,
    *,
    queries: Sequence[str] = ("text", "image"),
    query_split: str | None = None,
    num_queries: int = 1000,
    ks: Sequence[int] = KS,
    checkpoint: str | os.PathLike | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    nprobe: int | None = None,
    ef_search: int | None = None,
    k_factor: int | None = None,
    rerank: int | None = None,
    seed: int = 0,
) -> list[QueryEval]:
    """Recall@K against exact search (and hit@K against ground-truth pairs where there are some) for held-out
    queries encoded with the index's model:

    - ``text`` on an image index: the captions of indexed rows, each to find its own image (text->image); on a
      caption index: captions of ``query_split`` (text->text, no ground truth);
    - ``image`` on a caption index: the images of indexed rows, each to find its own caption (image->text); on an
      image index: images of ``query_split`` (image->image, no ground truth);
    - ``stored``: the index's own vectors as queries (overstates recall; kept for comparison).
    """
    ix = index if isinstance(index, RetrievalIndex) else open_index(index)
    bad = [q for q in queries if q not in QUERY_KINDS]
    if bad:
        raise IndexStoreError(f"query kinds must be among {QUERY_KINDS}, got {bad}")
    out = []
    for kind in queries:
        if kind == "stored":
            pick = sample_rows(len(ix), num_queries, seed)
            vec, truth, direction = ix.vectors(pick), None, f"stored->{ix.manifest.modality or 'vectors'}"
        else:
            cfg, step = _model_of(ix, checkpoint)
            model, preprocess, tokenizer = load(step, device=device)
            enc = ModelEncoder(model, preprocess, tokenizer, device)
            vec, truth, direction = _held_out(ix, kind, cfg, enc, query_split, num_queries, batch_size, seed)
        out.append(evaluate_queries(ix, vec, direction=direction, truth=truth, ks=ks, nprobe=nprobe,
                                    ef_search=ef_search, k_factor=k_factor, rerank=rerank))
    return out


def _held_out(ix: RetrievalIndex, kind: str, cfg: Any, enc: ModelEncoder, query_split: str | None, n: int,
              batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(query vectors, ground-truth rows or None, direction) of ``kind`` queries against the index."""
    m = ix.manifest
    if m.source is None or m.modality not in MODALITIES:
        raise IndexStoreError(f"the index at {ix.path} records no source and modality; evaluate it with stored "
                              "vectors (--queries stored) or with your own query vectors (evaluate_queries)")
    direction = f"{kind}->{m.modality}"
    if kind != m.modality:  # the other side of indexed pairs: each query's ground truth is its own row
        base = m.additions[0]["first_id"] if m.additions else m.count
        pick = sample_rows(base, n, seed)
        meta = [h[0] for h in ix.metadata(pick[:, None])]
        if kind == "text":
            keep = [i for i, mt in enumerate(meta) if isinstance(mt.get("caption"), str) and mt["caption"]]
            texts = [meta[i]["caption"] for i in keep]
            return _batched(enc.texts, texts, batch_size), pick[keep], direction
        images = _images_of(ix, cfg, [mt["row"] for mt in meta], m.split)
        keep = [i for i, im in enumerate(images) if im is not None]
        return _batched(enc.images, [images[i] for i in keep], batch_size), pick[keep], direction
    split = query_split or next(s for s in ("val", "test", "train") if s != m.split)
    rows = SourceRows(data_config(cfg, m.source), split, cfg.model.image.image_size, f"{m.source}:{split}")
    reader = SampleReader.of(data_config(cfg, m.source))
    got: list[Any] = []
    for row in rows.all():
        v = reader.caption(row.get("caption"), where(row)) if kind == "text" else reader.image(row["image"],
                                                                                               where(row))
        if v is not None:
            got.append(v)
        if len(got) >= n:
            break
    if not got:
        raise IndexStoreError(f"the {split} split of {m.source} holds no usable {kind} queries; pass --query-split")
    return _batched(enc.texts if kind == "text" else enc.images, got, batch_size), None, direction


def _images_of(ix: RetrievalIndex, cfg: Any, numbers: list[int], split: str | None) -> list[Image.Image | None]:
    """The images of source rows ``numbers`` (sorted) of the index's split, None where one cannot be read."""
    rows = SourceRows(data_config(cfg, ix.manifest.source), split or "test", cfg.model.image.image_size, "")
    reader = SampleReader.of(data_config(cfg, ix.manifest.source))
    found = {row["__index__"]: reader.image(row["image"], where(row)) for row in rows.pick(sorted(set(numbers)))}
    return [found.get(r) for r in numbers]


def _batched(fn: Callable[[list[Any]], torch.Tensor], items: list[Any], batch_size: int) -> np.ndarray:
    return torch.cat([fn(items[lo : lo + batch_size]) for lo in range(0, len(items), batch_size)]).numpy()


__all__ = ["ModelEncoder", "add_from_checkpoint", "build_from_checkpoint", "evaluate_from_checkpoint",
           "evaluate_index", "query", "read_skips", "write_skips"]
