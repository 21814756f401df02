"""Dual image/text encoder trained with ITC (CLIP), the sigmoid loss (SigLIP) or with a locked tower (LiT).

References: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021;
Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023; Zhai et al., "LiT: Zero-Shot Transfer with
Locked-image text Tuning", 2022.
"""

from __future__ import annotations

import torch
from torch import nn

from contrast.config import ModelConfig
from contrast.models.outputs import Model, ModelOutput, clamped_scale, unit
from contrast.towers import ImageTower, Tower


class DualEncoder(Model):
    """Two towers, each projecting to the shared embedding width, and a learned logit scale (and SigLIP's bias)."""

    def __init__(self, cfg: ModelConfig, image: ImageTower, text: Tower):
        super().__init__()
        self.cfg = cfg
        self.image = image
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) if cfg.init_logit_bias is not None else None
        )
        if cfg.image.locked:
            self.image.lock(cfg.image.unlocked_groups)
        if cfg.text.locked:
            self.text.lock(cfg.text.unlocked_groups)

    @property
    def image_tower(self) -> ImageTower:
        return self.image

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return unit(self.image.embed(pixels), normalize)

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return unit(self.text.embed(input_ids), normalize)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for tower in (self.image, self.text):
            if any(p.requires_grad for p in tower.parameters()):  # a locked tower keeps nothing for backward
                tower.set_grad_checkpointing(enable)

    def scale(self) -> torch.Tensor:
        return clamped_scale(self.logit_scale, self.cfg.max_logit_scale)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        return ModelOutput(
            image_emb=self.encode_image(batch["pixels"]),
            text_emb=self.encode_text(batch["input_ids"]),
            logit_scale=self.scale(),
            logit_bias=self.logit_bias,
            pair_ids=batch.get("pair_ids"),
        )
