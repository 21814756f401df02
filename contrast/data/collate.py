"""Samples and batches: an undecoded row becomes a sample (decoded through :mod:`contrast.data.decode`, transformed,
its caption cleaned), and samples become a batch (pixels stacked, captions tokenized). Tokenization happens here,
never in ``forward``."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

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


class ImageSamples:
    """An undecoded image-caption row -> ``{pixels (uint8), caption, index, note}``; raises ``BadSample`` for a row
    that cannot be used (the stream replaces it). ``rng`` draws the augmentation."""

    def __init__(self, transform: Callable, max_pixels: int):
        self.transform, self.max_pixels = transform, max_pixels

    def __call__(self, row: dict, rng: random.Random | None = None) -> dict:
        caption, note = clean_caption(row.get("caption"))
        plan = self.transform.crop_plan(rng)  # the random crop, drawn on the full-size image as the decoder opens it
        img = load_image(row.get("image"), max_pixels=self.max_pixels, draft=plan or self.transform.decode_size)
        pixels = self.transform.pixels(img, rng, plan)  # uint8: normalised on the training device
        return {"pixels": pixels, "caption": caption, "index": int(row.get("__index__", -1)), "note": note}


class FeatureSamples:
    """A saved-features row (BLIP-2) with its caption cleaned; raises ``BadSample`` for an empty caption."""

    def __call__(self, row: dict, rng: random.Random | None = None) -> dict:
        caption, note = clean_caption(row.get("caption"))
        return {**row, "caption": caption, "note": note}


class Collator:
    """Samples -> ``{pixels (B, 3, H, W) uint8, input_ids, index}``."""

    def __init__(self, tokenizer: Callable[[list[str]], Any]):
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return {"pixels": torch.stack([s["pixels"] for s in samples]),
                "index": torch.tensor([s["index"] for s in samples]),
                "input_ids": self.tokenizer([s["caption"] for s in samples])}

