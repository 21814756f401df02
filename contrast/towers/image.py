"""Image tower: any timm backbone, a pooling step and a linear projection to the shared embedding width."""

from __future__ import annotations

import timm
import torch
from torch import nn

from contrast.config import ImageTowerConfig
from contrast.towers.cache import attach_cache, check_frozen


class ImageTower(nn.Module):
    def __init__(self, cfg: ImageTowerConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        kwargs = dict(cfg.kwargs)
        try:
            self.backbone = timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(
                f"timm could not build image tower '{cfg.name}' with kwargs {kwargs}: {e}. "
                "Check model.image.name against timm.list_models() and the kwargs that model accepts."
            ) from e
        if cfg.weights:  # a local file or package:NAME; foreign layouts (lukemelas EfficientNet) are converted
            from contrast.towers.adapters import load_backbone_weights

            load_backbone_weights(self.backbone, cfg.weights)
        if cfg.pool not in ("default", "avg", "token"):
            raise ValueError(f"model.image.pool must be default, avg or token, got '{cfg.pool}'")
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.proj = nn.Linear(self.width, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=self.width**-0.5)
        self.feature_cache = attach_cache(self, cfg.feature_cache, lambda: list(self.backbone.parameters()))
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)

    @property
    def width(self) -> int:
        return int(self.backbone.num_features)

    @property
    def embed_dim(self) -> int:
        return self.proj.out_features

    @property
    def is_sequence(self) -> bool:
        """True for token backbones (ViT-like), whose features come as (B, N, D) with prefix tokens first."""
        return hasattr(self.backbone, "num_prefix_tokens")

    def forward_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(pixels)
        if feats.ndim == 4:  # CNN feature map (B, C, H, W)
            feats = feats.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return feats  # (B, N, D)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "avg":
            return tokens[:, self.num_prefix_tokens :].mean(dim=1)
        if self.cfg.pool == "token":
            return tokens[:, 0]
        if self.is_sequence:
            return self.backbone.forward_head(tokens, pre_logits=True)
        return tokens.mean(dim=1)  # global average pooling of a CNN map

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.feature_cache is not None:  # a fully locked backbone: reuse pooled features of seen images
            check_frozen(self.feature_cache, "model.image")
            feats = self.feature_cache(list(pixels), lambda idx: self.pool(self.forward_tokens(pixels[idx])))
            return self.proj(feats)
        return self.proj(self.pool(self.forward_tokens(pixels)))

    def forward_intermediates(self, pixels: torch.Tensor, indices: list[int] | int) -> list[torch.Tensor]:
        """Outputs of the chosen blocks as (B, N, D) token sequences (prefix tokens included for ViTs)."""
        if not self.is_sequence:
            maps = self.backbone.forward_intermediates(pixels, indices=indices, intermediates_only=True)
            return [m.flatten(2).transpose(1, 2) for m in maps]  # (B, H*W, C) each
        if self.num_prefix_tokens == 0:
            return self.backbone.forward_intermediates(pixels, indices=indices, intermediates_only=True, output_fmt="NLC")
        _, taps = self.backbone.forward_intermediates(
            pixels, indices=indices, output_fmt="NLC", return_prefix_tokens=True
        )
        return [torch.cat([prefix, tok], dim=1) for tok, prefix in taps]  # (B, prefix + N, D)

    def lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = True) -> None:
        """Freeze the backbone, leaving its last ``unlocked_groups`` timm parameter groups trainable."""
        for p in self.backbone.parameters():
            p.requires_grad = False
        if unlocked_groups > 0:
            from timm.models import group_parameters

            groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True), reverse=False)
            names = dict(self.backbone.named_parameters())
            for group in list(groups.values())[-unlocked_groups:]:
                for n in group:
                    names[n].requires_grad = True
        self.freeze_norm_stats = freeze_norm_stats
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageTower:
        super().train(mode)
        if getattr(self, "freeze_norm_stats", False):  # a locked tower keeps its batch-norm statistics
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
