"""Loading trained models from Python: ``model, preprocess, tokenizer = contrast.load(RUN_DIR)``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from contrast.config import Config, load_config
from contrast.data.transforms import build_transform
from contrast.models import build_model
from contrast.tokenizer import build_tokenizer
from contrast.train import checkpoint as C


def load_config_of(path: str | Path) -> tuple[Config, Path]:
    """The config and the step directory of a run directory or checkpoint."""
    ckpt = C.resolve(path)
    return load_config(C.run_dir_of(ckpt) / "config.yaml"), ckpt


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Callable, Callable]:
    """Rebuild the model of a run (its latest checkpoint, or the step directory given) in eval mode.

    Returns ``(model, preprocess, tokenizer)``: ``preprocess(PIL.Image) -> (3, H, W)``,
    ``tokenizer(list[str]) -> token ids``.
    """
    cfg, ckpt = load_config_of(path)
    model = build_model(cfg.model)
    C.load_model_weights(model, ckpt / C.WEIGHTS)
    model.to(device).eval()
    return model, build_transform(cfg.model.image), build_tokenizer(cfg.model.text)
