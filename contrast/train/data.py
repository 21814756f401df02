"""The training rows and collator of a recipe: a data source's rows with images decoded in the collator, or saved
frozen-tower features (BLIP-2) in their place."""

from __future__ import annotations

from collections.abc import Callable

from contrast.config import Config
from contrast.data import load_source
from contrast.data.collate import Collator, Rows
from contrast.data.transforms import build_transform
from contrast.features import build_feature_data


def build_data(cfg: Config, tokenizer: Callable, split: str):
    """``(rows, collate)`` for ``split``: a map-style dataset of undecoded rows and the collator that decodes them."""
    if cfg.model.features_dir:  # saved frozen-tower features replace images (BLIP-2 stage 1 / 2)
        return build_feature_data(cfg, tokenizer, split)
    ds = load_source(cfg.data, split, cfg.model.image.image_size)
    return Rows(ds), Collator(build_transform(cfg.model.image, train=split == cfg.data.train_split), tokenizer)
