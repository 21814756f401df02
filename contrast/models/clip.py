"""Dual image/text encoder trained with ITC (CLIP), the sigmoid loss (SigLIP) or with a locked tower (LiT).

References: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021;
Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023; Zhai et al., "LiT: Zero-Shot Transfer with
Locked-image text Tuning", 2022.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from contrast.config import ModelConfig
from contrast.towers import ImageTower
from contrast.towers.hf_text import build_text_tower


@dataclass
class ClipOutput:
    image_emb: torch.Tensor  # (B, E), L2-normalised
    text_emb: torch.Tensor  # (B, E), L2-normalised
    logit_scale: torch.Tensor  # scalar multiplier, exp of the learned log-scale, clamped
    logit_bias: torch.Tensor | None = None  # scalar, SigLIP only


class DualEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image = ImageTower(cfg.image, cfg.embed_dim)
        self.text = build_text_tower(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) if cfg.init_logit_bias is not None else None
        )
        if cfg.image.locked:
            self.image.lock(cfg.image.unlocked_groups)
        if cfg.text.locked:
            self.text.lock(cfg.text.unlocked_groups)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.image.embed(pixels)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.text.embed(input_ids)
        return F.normalize(emb, dim=-1) if normalize else emb

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def forward(self, batch: dict[str, torch.Tensor]) -> ClipOutput:
        return ClipOutput(
            image_emb=self.encode_image(batch["pixels"]),
            text_emb=self.encode_text(batch["input_ids"]),
            logit_scale=self.scale(),
            logit_bias=self.logit_bias,
        )
