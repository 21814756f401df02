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


class Collator:
    def __init__(self, transform: Callable, tokenizer: Callable[[list[str]], Any]):
        self.transform = transform
        self.tokenizer = tokenizer
        self.skipped_images = 0
        self.skipped_captions = 0
        self.bad_examples: list[str] = []

    def _skip(self, kind: str, where: str, why: str) -> None:
        if kind == "image":
            self.skipped_images += 1
        else:
            self.skipped_captions += 1
        if len(self.bad_examples) < 5:
            self.bad_examples.append(f"{where}: {why}")
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
        tokens = self.tokenizer(captions)
        batch = {"pixels": torch.stack(pixels), "index": torch.tensor(index)}
        if isinstance(tokens, dict):  # Hugging Face tokenizers also return an attention mask
            batch.update({k: v for k, v in tokens.items()})
        else:
            batch["input_ids"] = tokens
        return batch
