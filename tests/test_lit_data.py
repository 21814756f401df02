"""Training data for LiT: a fixed number of crops per image (``data.augment.views``), so a locked tower's feature
cache keeps hitting under augmentation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from contrast.config import AugmentConfig, ConfigError, ImageTowerConfig
from contrast.data.collate import ImageSamples
from contrast.data.transforms import build_transform


def _image(seed: int) -> Image.Image:
    rs = np.random.RandomState(seed)
    return Image.fromarray(rs.randint(0, 255, (40, 40, 3), dtype=np.uint8))


def _crops(views: int, index: int, draws: int = 30) -> set[bytes]:
    prepare = ImageSamples(build_transform(ImageTowerConfig(image_size=16), AugmentConfig(scale=(0.3, 1.0),
                                                                                          views=views)), 10**6)
    row = {"image": _image(index), "caption": "x", "__index__": index}
    return {prepare(row, random.Random(slot))["pixels"].numpy().tobytes() for slot in range(draws)}


def test_views_limit_the_crops_of_each_image():
    assert len(_crops(0, 3)) > 20  # a fresh crop for (nearly) every sample
    two = _crops(2, 3)
    assert len(two) == 2
    assert _crops(2, 3) == two  # the same two crops every time: a pure function of the image and the view
    assert _crops(2, 4).isdisjoint(two)


def test_views_keep_the_feature_cache_hitting():
    from contrast.towers.cache import FeatureCache

    prepare = ImageSamples(build_transform(ImageTowerConfig(image_size=16), AugmentConfig(views=3)), 10**6)
    rows = [{"image": _image(i), "caption": "x", "__index__": i} for i in range(4)]
    cache = FeatureCache(100)

    def epochs(start: int, n: int) -> None:
        for slot in range(start, start + n):
            pixels = prepare(rows[slot % 4], random.Random(slot))["pixels"]
            cache([pixels], lambda idx: torch.zeros(len(idx), 2))

    epochs(0, 80)
    assert 4 < cache.misses <= 12  # at most 4 images x 3 views
    seen = cache.misses
    epochs(80, 200)
    assert cache.misses == seen and cache.hits == 280 - seen  # then only hits


def test_negative_views_are_refused():
    with pytest.raises(ConfigError, match="data.augment.views"):
        build_transform(ImageTowerConfig(image_size=16), AugmentConfig(views=-1))
