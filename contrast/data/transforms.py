"""Image preprocessing through timm's transform factory, sized and normalised as the image tower expects."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.data import create_transform

from contrast.config import ImageTowerConfig


def build_transform(cfg: ImageTowerConfig, train: bool = False) -> Callable:
    """PIL image -> normalised (3, H, W) float tensor. Images are converted to RGB first (greyscale, RGBA, P)."""
    tf = create_transform(
        input_size=(3, cfg.image_size, cfg.image_size),
        is_training=False,  # captions describe positions: no flips or crops that would contradict them
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=1.0,
        interpolation="bicubic",
    )

    def apply(img) -> torch.Tensor:
        return tf(img.convert("RGB"))

    return apply
