"""Batching: decode images, transform them, tokenize captions. Tokenization happens here, never in ``forward``.

Unreadable or corrupt images are skipped and counted (``Collator.skipped``); empty captions likewise. A batch in which
every row was bad is returned empty (``None``) and the loop moves on.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)


def decode_image(value: Any) -> Image.Image:
    """A datasets Image cell (PIL, {'bytes','path'} dict, or a path) as a loaded PIL image."""
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, dict):
        img = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    else:
        img = Image.open(value)
    img.load()
    return img


class Rows(torch.utils.data.Dataset):
    """Random-access rows of a datasets.Dataset with images left undecoded: decoding, and its failures, belong to
    the collator, and skipping rows (on resume) costs nothing. Each row carries its number as ``__index__``."""

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


class Collator:
    def __init__(self, transform: Callable, tokenizer: Callable[[list[str]], Any]):
        self.transform = transform
        self.tokenizer = tokenizer
        self.skipped_images = 0
        self.skipped_captions = 0

    def _skip(self, kind: str, where: str, why: str) -> None:
        if kind == "image":
            self.skipped_images += 1
        else:
            self.skipped_captions += 1
        log.warning("skipping %s %s: %s", kind, where, why)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor] | None:
        pixels, captions, index = [], [], []
        for row in rows:
            where = f"row {row.get('__index__', '?')}"
            caption = row.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                self._skip("caption", where, "empty caption")
                continue
            try:
                img = decode_image(row["image"])
                pixels.append(self.transform(img))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                self._skip("image", where, f"unreadable image ({type(e).__name__}: {e})")
                continue
            captions.append(caption.strip())
            index.append(int(row.get("__index__", -1)))
        if not pixels:
            return None
        return {"pixels": torch.stack(pixels), "index": torch.tensor(index), "input_ids": self.tokenizer(captions)}
