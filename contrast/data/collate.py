"""Samples and batches: an undecoded row becomes a sample (decoded through :mod:`contrast.data.decode`, transformed,
its caption cleaned), and samples become a batch (pixels stacked, captions tokenized). Tokenization happens here,
never in ``forward``.

With ``loss.positives`` a batch also carries ``pair_ids`` (B, K) int64: for each of K keys (the caption, the
``data.group_column`` value) a 64-bit hash of the sample's value, so pairs sharing a caption or a group can be told
apart from true negatives by the loss, on any rank (equal values hash equal everywhere)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from contrast.config import Config, ConfigError
from contrast.data.decode import clean_caption, load_image


class Rows(torch.utils.data.Dataset):
    """Random-access rows of a datasets.Dataset with images left undecoded: decoding, and its failures, belong to
    the sample step. Each row carries its number as ``__index__``."""

    def __init__(self, ds: Any):
        from datasets import Image as ImageFeature

        if isinstance(ds.features.get("image"), ImageFeature):
            ds = ds.cast_column("image", ImageFeature(decode=False))
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {**self.ds[int(i)], "__index__": int(i)}

    def __getitems__(self, idx: list[int]) -> list[dict]:
        cols = self.ds[[int(i) for i in idx]]
        return [{**{k: v[j] for k, v in cols.items()}, "__index__": int(i)} for j, i in enumerate(idx)]


def pair_id_keys(cfg: Config) -> tuple[str, ...]:
    """The sample keys hashed into ``pair_ids`` for ``loss.positives`` (``caption``, the group column), in order;
    empty when the loss treats only each image's own caption as its positive."""
    keys = []
    for what in cfg.loss.positives:
        if what == "group" and not cfg.data.group_column:
            raise ConfigError("loss.positives holds 'group' but data.group_column is not set; name the column whose "
                              "equal values mark pairs alike (e.g. data.group_column: emoji_id)")
        keys.append("caption" if what == "caption" else (cfg.data.group_column if what == "group" else what))
    return tuple(dict.fromkeys(keys))


def id_hash(value: Any) -> int:
    """A signed 64-bit hash of ``str(value)``, the same in every process."""
    return int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "little", signed=True)


def pick_caption(value: Any, rng: random.Random | None) -> Any:
    """A caption cell that holds several captions (a list: templates, keywords, several annotators) gives one drawn
    from ``rng`` for a training sample, its first without one; any other cell is itself."""
    if not isinstance(value, list | tuple):
        return value
    if not value:
        return None  # no caption: the sample is replaced
    return value[rng.randrange(len(value))] if rng is not None else value[0]


def view_rng(row: dict, rng: random.Random | None, views: int) -> random.Random | None:
    """The generator of a sample's crop: ``rng`` itself, or with ``data.augment.views`` V > 0 one of V generators
    fixed per image (by its row number or shard key), picked by ``rng`` -- so each image has V crops in all."""
    if rng is None or views <= 0:
        return rng
    ident = row.get("__index__", row.get("__key__", ""))
    return random.Random(id_hash((ident, rng.randrange(views))))


class ImageSamples:
    """An undecoded image-caption row -> ``{pixels (uint8), caption, index, note}`` plus the row's ``keep`` columns;
    raises ``BadSample`` for a row that cannot be used (the stream replaces it). ``rng`` draws the augmentation, and
    the caption of a row with several (:func:`pick_caption`)."""

    def __init__(self, transform: Callable, max_pixels: int, keep: Sequence[str] = ()):
        self.transform, self.max_pixels = transform, max_pixels
        self.keep = tuple(k for k in keep if k != "caption")

    def __call__(self, row: dict, rng: random.Random | None = None) -> dict:
        caption, note = clean_caption(pick_caption(row.get("caption"), rng))
        rng = view_rng(row, rng, self.transform.views)
        plan = self.transform.crop_plan(rng)  # the random crop, drawn on the full-size image as the decoder opens it
        img = load_image(row.get("image"), max_pixels=self.max_pixels, draft=plan or self.transform.decode_size)
        pixels = self.transform.pixels(img, rng, plan)  # uint8: normalised on the training device
        image = pixels if isinstance(pixels, dict) else {"pixels": pixels}  # a tiled image brings its tile mask and ratio
        sample = {**image, "caption": caption, "index": int(row.get("__index__", -1)), "note": note}
        for k in self.keep:
            if k not in row:
                raise ConfigError(f"data.group_column '{k}' is not a column of the training rows (they have "
                                  f"{sorted(c for c in row if not c.startswith('__'))}); name one of those")
            sample[k] = row[k]
        return sample


class FeatureSamples:
    """A saved-features row (BLIP-2) with its caption cleaned; raises ``BadSample`` for an empty caption."""

    def __call__(self, row: dict, rng: random.Random | None = None) -> dict:
        caption, note = clean_caption(row.get("caption"))
        return {**row, "caption": caption, "note": note}


IMAGE_KEYS = ("pixels", "aspect_ratio_ids", "tile_mask")  # what an image brings to a batch (tiled: the last two)


def stack_images(images: Sequence[dict | torch.Tensor]) -> dict[str, torch.Tensor]:
    """Preprocessed images (tensors, or a tiled transform's dicts) -> ``{pixels, ...}`` stacked along a batch axis."""
    items = [x if isinstance(x, dict) else {"pixels": x} for x in images]
    return {k: torch.stack([x[k] for x in items]) for k in IMAGE_KEYS if k in items[0]}


class Collator:
    """Samples -> ``{pixels (B, 3, H, W) uint8, input_ids, index}`` (a decoder's prompt tokenizer adds
    ``attention_mask``, ``labels``, ``visual_mask`` and ``image_rows``), and ``pair_ids`` (B, K) int64 hashes of each
    sample's ``id_keys`` values when given."""

    def __init__(self, tokenizer: Callable[[list[str]], Any], id_keys: Sequence[str] = ()):
        self.tokenizer, self.id_keys = tokenizer, tuple(id_keys)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        text = self.tokenizer([s["caption"] for s in samples])  # ids, or a prompt tokenizer's dict of (B, T) tensors
        batch = {**stack_images(samples), "index": torch.tensor([s["index"] for s in samples]),
                 **(text if isinstance(text, dict) else {"input_ids": text})}
        if self.id_keys:
            batch["pair_ids"] = torch.tensor([[id_hash(s[k]) for k in self.id_keys] for s in samples],
                                             dtype=torch.long)  # (B, K)
        return batch

