"""Image-text retrieval evaluation: recall@K in both directions, several captions per image, optional ITM re-ranking.

Metric definition and tie rule: see :mod:`contrast.evaluate.metrics` (CLIP paper definition; ties count against the
query). Captions are grouped by image in one of three ways, chosen by :func:`group_captions`:

- the caption column holds a list of strings per row (one row per image);
- several rows share a value of a grouping column (``image_id`` by default when present, or ``--group-by COLUMN``);
- several rows hold the same image (the same file, or identical stored bytes);
otherwise each row is its own image with one caption.

Bad samples (:mod:`contrast.data.decode`): a caption that is missing or empty is left out; a damaged one is repaired
and kept; an image that cannot be read is left out with all its captions (its pairs are dropped), and an image left
without any usable caption is left out too. The result counts them: ``skipped`` ({cause: n}),
``captions_of_skipped_images`` and ``images_without_captions``.

Re-ranking (BLIP, Li et al. 2022, section 4.2): each query's top-k shortlist by embedding similarity is re-ordered
by an image-text matching head. A model takes part when it offers ``itm_score(pixels, input_ids) -> (B,)`` match
logits (models with the ``itm`` capability).

Streams (webdataset shards, :func:`evaluate_retrieval_stream`): the samples are read once, in order, and only the
embeddings of the first ``limit`` usable ones are kept; each sample is one image with its caption (several, one a
line, in CLIP_benchmark's retrieval shards). The same bad-sample rules and counts apply.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from contrast.data.decode import SampleReader, describe_cell
from contrast.evaluate.metrics import (
    RETRIEVAL_DEFINITION,
    image_text_ranks,
    rank_summary,
    rerank,
    retrieval_ranks,
)
from contrast.models import Model
from contrast.objectives import similarity


@dataclass
class CaptionGroups:
    """Distinct images and all captions, with the image each caption belongs to."""

    image_rows: list[int]  # dataset row holding each distinct image
    captions: list[Any]  # every caption as stored (text, or None where a row has none), in dataset order
    text_to_image: torch.Tensor  # (T,) long: index into image_rows of each caption
    grouped_by: str  # how captions were grouped (for the report)
    text_rows: list[int] = field(default_factory=list)  # dataset row of each caption


def undecoded(dataset: Any, image_column: str = "image") -> Any:
    """``dataset`` with its image column left as stored ({'bytes', 'path'} cells): decoding, and its failures,
    belong to :mod:`contrast.data.decode`."""
    from datasets import Image as ImageFeature

    if isinstance(dataset.features.get(image_column), ImageFeature) and dataset.features[image_column].decode:
        return dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


def _image_keys(dataset: Any, image_column: str) -> list[Any] | None:
    """An identity per row's image: a digest of its bytes when they are stored in the data, else its file path;
    None when some row has neither. (Stored bytes win over a path, which may be a bare, repeated file name.)"""
    import hashlib

    cells = undecoded(dataset, image_column)[image_column]
    keys: list[Any] = []
    for c in cells:
        if isinstance(c, dict) and c.get("bytes"):
            keys.append(hashlib.sha1(c["bytes"]).hexdigest())
        elif isinstance(c, dict) and c.get("path"):
            keys.append(c["path"])
        elif isinstance(c, str):
            keys.append(c)
        else:
            return None
    return keys


def group_captions(
    dataset: Any, image_column: str = "image", caption_column: str = "caption", group_by: str | None = None
) -> CaptionGroups:
    """Group a dataset's captions by image (see the module docstring for the rules)."""
    cols = dataset.column_names
    for col in (image_column, caption_column):
        if col not in cols:
            raise ValueError(f"retrieval data has no column '{col}' (columns: {', '.join(cols)}); name the right one")
    if len(dataset) == 0:
        raise ValueError("retrieval data is empty")
    captions_col = dataset[caption_column]
    if isinstance(next((c for c in captions_col if c is not None), None), list | tuple):  # a list per row
        if group_by:
            raise ValueError(f"caption column '{caption_column}' already holds lists of captions; drop --group-by")
        captions: list[Any] = []
        owner: list[int] = []
        for row, caps in enumerate(captions_col):
            caps = list(caps) if caps else [None]  # no captions: counted as a missing caption
            captions.extend(caps)
            owner.extend([row] * len(caps))
        return CaptionGroups(list(range(len(dataset))), captions, torch.tensor(owner), "caption lists", owner)
    if group_by is not None and group_by not in cols:
        raise ValueError(f"group-by column '{group_by}' is not in the data (columns: {', '.join(cols)})")
    key_col = group_by or ("image_id" if "image_id" in cols else None)
    if key_col is not None:
        keys, how = dataset[key_col], f"column '{key_col}'"
    else:
        keys, how = _image_keys(dataset, image_column), "image (same file or same bytes)"
        if keys is None:
            keys, how = list(range(len(dataset))), "row (one caption per image)"
    first_row: dict[Any, int] = {}  # group key -> first row holding it (insertion order = image index)
    for row, key in enumerate(keys):
        first_row.setdefault(key, row)
    index_of = {key: i for i, key in enumerate(first_row)}
    owner = [index_of[k] for k in keys]
    return CaptionGroups(list(first_row.values()), list(captions_col), torch.tensor(owner), how,
                         list(range(len(dataset))))


@torch.no_grad()
def encode_images(
    model: Any,
    preprocess: Callable,
    dataset: Any,
    rows: Sequence[int],
    image_column: str = "image",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    keep_pixels: bool = False,
    reader: SampleReader | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """L2-normalised image embeddings (N, E), or (N, Q, E) for multi-query models, of the readable images among
    the given rows; the preprocessed pixels if asked for; and the positions in ``rows`` of the N readable ones
    (the others are counted in ``reader.skips``)."""
    reader = reader if reader is not None else SampleReader()
    dataset = undecoded(dataset, image_column)
    embs, kept, ok = [], [], []
    for s in range(0, len(rows), batch_size):
        chunk = list(rows[s : s + batch_size])
        pixels = []
        for j, cell in enumerate(dataset.select(chunk)[image_column]):
            img = reader.image(cell, describe_cell(cell, chunk[j]))
            if img is not None:
                pixels.append(preprocess(img))
                ok.append(s + j)
        if not pixels:
            continue
        batch = torch.stack(pixels)  # (b, 3, H, W)
        embs.append(model.encode_image(batch.to(device)).float().cpu())
        if keep_pixels:
            kept.append(batch)
    if not embs:
        return torch.empty(0), (torch.empty(0) if keep_pixels else None), ok
    return torch.cat(embs), (torch.cat(kept) if keep_pixels else None), ok


@dataclass
class UsablePairs:
    """The images and captions left once bad samples are out; counts of what left with them."""

    image_rows: list[int]  # dataset row of each kept image
    captions: list[str]  # kept captions, cleaned
    text_to_image: torch.Tensor  # (T,) index into image_rows
    image_emb: torch.Tensor  # (I, E) or (I, Q, E)
    pixels: torch.Tensor | None  # (I, 3, H, W) when kept for re-ranking
    captions_of_skipped_images: int
    images_without_captions: int


def usable_pairs(model: Any, preprocess: Callable, dataset: Any, groups: CaptionGroups, reader: SampleReader,
                 image_column: str, batch_size: int, device: Any, keep_pixels: bool) -> UsablePairs:
    """Clean the captions, encode the images that still have one, and drop the pairs of unreadable images."""
    texts = [reader.caption(c, f"row {r}") for c, r in zip(groups.captions, groups.text_rows)]
    owner = groups.text_to_image.tolist()
    with_text = sorted({owner[t] for t, c in enumerate(texts) if c is not None})
    emb, pixels, ok = encode_images(model, preprocess, dataset, [groups.image_rows[i] for i in with_text],
                                    image_column, batch_size, device, keep_pixels, reader)
    new_index = {with_text[k]: n for n, k in enumerate(ok)}  # old image index -> kept image index
    keep = [t for t, c in enumerate(texts) if c is not None and owner[t] in new_index]
    n_good_texts = sum(c is not None for c in texts)
    return UsablePairs(
        image_rows=[groups.image_rows[with_text[k]] for k in ok], captions=[texts[t] for t in keep],
        text_to_image=torch.tensor([new_index[owner[t]] for t in keep], dtype=torch.long), image_emb=emb,
        pixels=pixels, captions_of_skipped_images=n_good_texts - len(keep),
        images_without_captions=len(groups.image_rows) - len(with_text),
    )


@torch.no_grad()
def encode_texts(
    model: Model, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised text embeddings (T, E) and the token ids (T, L)."""
    ids = tokenizer(list(texts))
    embs = [model.encode_text(ids[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(texts), batch_size)]
    return torch.cat(embs), ids


def _itm_scorer(model: Model, pixels: torch.Tensor, ids: torch.Tensor, image_query: bool, device: Any) -> Callable:
    @torch.no_grad()
    def score(qi: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
        img, txt = (qi, ci) if image_query else (ci, qi)
        out = model.itm_score(pixels[img].to(device), ids[txt].to(device))
        if out.shape != (len(qi),):
            raise ValueError(f"itm_score must return one logit per pair, shape ({len(qi)},), got {tuple(out.shape)}")
        return out.float().cpu()

    return score


def retrieval_from_embeddings(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    sim_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = similarity,
) -> dict[str, Any]:
    """recall@K both ways from embeddings (cosine similarity when they are L2-normalised)."""
    sim = sim_fn(image_emb, text_emb)  # (I, T)
    i2t, t2i = image_text_ranks(sim, text_to_image)
    return {"image_to_text": rank_summary(i2t, ks), "text_to_image": rank_summary(t2i, ks)}


def evaluate_retrieval(
    model: Any,
    preprocess: Callable,
    tokenizer: Callable,
    dataset: Any,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    group_by: str | None = None,
    ks: Sequence[int] = (1, 5, 10),
    rerank_itm: int = 0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    reader: SampleReader | None = None,
) -> dict[str, Any]:
    """Retrieval metrics of ``model`` on ``dataset`` (a datasets.Dataset with an image and a caption column).

    The leading arguments come in the order ``contrast.load`` returns them: ``evaluate_retrieval(*contrast.load(run),
    dataset)``.

    Returns a dict with ``image_to_text`` and ``text_to_image`` summaries (R@K, mean and median rank), the data
    sizes, the grouping used, the metric definition and what bad samples left out (see the module docstring);
    with ``rerank_itm=k`` also ``itm_reranked`` summaries. ``reader`` decodes the images (default: skip and count).
    """
    if rerank_itm and not model.supports("itm"):
        raise ValueError(
            f"--rerank-itm needs a model with an image-text matching head (an itm_score(pixels, input_ids) method); "
            f"{type(model).__name__} has none. Drop --rerank-itm for this model."
        )
    groups = group_captions(dataset, image_column, caption_column, group_by)
    reader = reader if reader is not None else SampleReader()
    was_training = model.training
    model.eval()
    try:
        pairs = usable_pairs(model, preprocess, dataset, groups, reader, image_column, batch_size, device,
                             keep_pixels=bool(rerank_itm))
        if not pairs.captions:
            raise ValueError(f"no usable image-caption pairs are left in the retrieval data ({reader.skips.summary()})")
        img, pixels, owner = pairs.image_emb, pairs.pixels, pairs.text_to_image
        txt, ids = encode_texts(model, tokenizer, pairs.captions, max(batch_size, 256), device)
        result: dict[str, Any] = {
            "num_images": len(pairs.image_rows),
            "num_texts": len(pairs.captions),
            "captions_grouped_by": groups.grouped_by,
            "definition": RETRIEVAL_DEFINITION,
            "skipped": reader.skips.as_dict(),
            "captions_of_skipped_images": pairs.captions_of_skipped_images,
            "images_without_captions": pairs.images_without_captions,
        }
        sim_fn = model.similarity  # the model's own rule (BLIP-2: the best query)
        result.update(retrieval_from_embeddings(img, txt, owner, ks, sim_fn))
        if rerank_itm:
            sim = sim_fn(img, txt)  # (I, T)
            pos = owner.reshape(1, -1) == torch.arange(len(pairs.image_rows)).reshape(-1, 1)  # (I, T)
            i2t = rerank(sim, rerank_itm, _itm_scorer(model, pixels, ids, True, device), pos, batch_size)
            t2i = rerank(sim.T, rerank_itm, _itm_scorer(model, pixels, ids, False, device), pos.T, batch_size)
            result["itm_reranked"] = {
                "shortlist": int(rerank_itm),
                "image_to_text": rank_summary(retrieval_ranks(i2t, pos), ks),
                "text_to_image": rank_summary(retrieval_ranks(t2i, pos.T), ks),
            }
    finally:
        model.train(was_training)
    return result


# --------------------------------------------------------------------------------------------------- streams


@dataclass
class _Batch:
    pixels: list = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # image number of each caption


def _sample_pairs(rows: Iterable[dict], preprocess: Callable, reader: SampleReader, limit: int, split_lines: bool,
                  dropped: dict[str, int]) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """(pixels, captions) of each usable sample, at most ``limit`` (0: all); bad ones are counted (``reader.skips``;
    the captions of unreadable images in ``dropped``) and left out. Captions are read first, as for tables."""
    n = 0
    for row in rows:
        where = str(row.get("__key__", "a sample"))
        raw = row.get("caption")
        parts = raw.splitlines() if split_lines and isinstance(raw, str) else [raw]
        captions = [c for c in (reader.caption(p, where) for p in parts) if c is not None]
        if not captions:
            dropped["images_without_captions"] += 1
            continue
        img = reader.image(row.get("image"), where)
        if img is None:
            dropped["captions_of_skipped_images"] += len(captions)
            continue
        yield preprocess(img), captions
        n += 1
        if limit and n >= limit:
            return


@torch.no_grad()
def evaluate_retrieval_stream(
    model: Any,
    preprocess: Callable,
    tokenizer: Callable,
    rows: Iterable[dict],
    *,
    limit: int = 0,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    reader: SampleReader | None = None,
    split_lines: bool = False,
) -> dict[str, Any]:
    """Retrieval metrics of ``model`` on a stream of samples (webdataset shards: ``image`` bytes and ``caption``
    text, each sample its own image), read once and never listed: only the embeddings of the first ``limit`` usable
    images (0: all) and their captions are kept. ``split_lines``: a caption text holds one caption per line
    (CLIP_benchmark's retrieval shards). Bad samples are left out and counted as in :func:`evaluate_retrieval`."""
    reader = reader if reader is not None else SampleReader()
    was_training = model.training
    model.eval()
    img_embs, txt_embs, owners = [], [], []
    n_images, dropped = 0, {"captions_of_skipped_images": 0, "images_without_captions": 0}

    def flush(batch: _Batch) -> None:
        img_embs.append(model.encode_image(torch.stack(batch.pixels).to(device)).float().cpu())  # (b, E)
        ids = tokenizer(batch.captions)
        txt_embs.append(model.encode_text(ids.to(device)).float().cpu())
        owners.extend(batch.owners)

    try:
        batch = _Batch()
        for pixels, captions in _sample_pairs(rows, preprocess, reader, limit, split_lines, dropped):
            batch.pixels.append(pixels)
            batch.captions.extend(captions)
            batch.owners.extend([n_images] * len(captions))
            n_images += 1
            if len(batch.pixels) == batch_size:
                flush(batch)
                batch = _Batch()
        if batch.pixels:
            flush(batch)
    finally:
        model.train(was_training)
    if not n_images:
        raise ValueError(f"no usable image-caption pairs are in the retrieval data ({reader.skips.summary()})")
    owner = torch.tensor(owners, dtype=torch.long)
    result: dict[str, Any] = {"num_images": n_images, "num_texts": len(owners),
                              "captions_grouped_by": "sample (the captions of one shard sample)",
                              "definition": RETRIEVAL_DEFINITION, "skipped": reader.skips.as_dict(), **dropped}
    result.update(retrieval_from_embeddings(torch.cat(img_embs), torch.cat(txt_embs), owner, ks, model.similarity))
    return result
