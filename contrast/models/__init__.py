"""Model families. :func:`build_model` is a plain function over the config; nothing branches on a model's name."""

from __future__ import annotations

from torch import nn

from contrast.config import ConfigError, ModelConfig
from contrast.models.clip import ClipOutput, DualEncoder

KINDS = ("clip", "blip", "blip2_stage1", "blip2_stage2", "caption_lm", "decoder")


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.kind not in KINDS:
        import difflib

        near = difflib.get_close_matches(cfg.kind, KINDS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(f"model.kind '{cfg.kind}' is not a model family; {hint}choose one of {', '.join(KINDS)}")
    if cfg.kind in ("blip2_stage1", "blip2_stage2", "caption_lm"):
        from contrast.models import blip2

        builders = {"blip2_stage1": blip2.Blip2Stage1, "blip2_stage2": blip2.Blip2Stage2, "caption_lm": blip2.CaptionLM}
        return builders[cfg.kind](cfg)
    if cfg.kind == "decoder":
        from contrast.models.decoder import VisionLanguageDecoder

        return VisionLanguageDecoder(cfg)
    if cfg.kind == "blip":
        from contrast.models.blip import BlipModel

        return BlipModel(cfg)
    return DualEncoder(cfg)


__all__ = ["build_model", "DualEncoder", "ClipOutput"]
