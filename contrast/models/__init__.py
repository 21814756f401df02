"""Model families. :func:`build_model` is a plain function over the config; nothing branches on a model's name."""

from __future__ import annotations

from torch import nn

from contrast.config import ModelConfig
from contrast.models.clip import ClipOutput, DualEncoder


def build_model(cfg: ModelConfig) -> nn.Module:
    return DualEncoder(cfg)


__all__ = ["build_model", "DualEncoder", "ClipOutput"]
