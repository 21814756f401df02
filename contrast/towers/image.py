"""Image tower: any timm backbone, a pooling step and a linear projection to the shared embedding width."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from contrast.config import ImageTowerConfig
from contrast.layers import layer_indices
from contrast.towers.cache import attach_cache, check_frozen


def _same_size(img_size: Any, image_size: int) -> bool:
    sizes = list(img_size) if isinstance(img_size, list | tuple) else [img_size]
    return all(int(s) == image_size for s in sizes)


def _create(name: str, kwargs: dict[str, Any]) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def create_backbone(cfg: ImageTowerConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The timm model ``cfg.name`` (no classifier) and the kwargs it was built with.

    The input size is stated once, in ``cfg.image_size``: it is passed as ``img_size`` to architectures that take one
    (ViTs, EVA, ...), and left out for those that do not (CNNs raise TypeError on an unknown ``img_size``).
    """
    kwargs = dict(cfg.kwargs)
    if "img_size" in kwargs and not _same_size(kwargs["img_size"], cfg.image_size):
        raise ValueError(
            f"model.image.kwargs.img_size {kwargs['img_size']} differs from model.image.image_size {cfg.image_size}: "
            "remove img_size from model.image.kwargs (model.image.image_size is the one place for the input size)"
        )
    try:
        if "img_size" in kwargs:
            return _create(cfg.name, kwargs), kwargs
        sized = {**kwargs, "img_size": cfg.image_size}
        try:
            return _create(cfg.name, sized), sized
        except TypeError as e:
            if "img_size" not in str(e):  # another bad kwarg: report it below
                raise
            return _create(cfg.name, kwargs), kwargs  # an architecture without an input size (a CNN)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"timm could not build image tower '{cfg.name}' with kwargs {kwargs}: {e}. "
            "Check model.image.name against timm.list_models() and the kwargs that model accepts."
        ) from e


POS_EMBEDS = ("default", "sincos")


def sincos_2d_table(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(h * w, dim) fixed 2-D sin-cos positions, row-major over the patch grid: the first half of the channels
    encodes the row, the second the column, each as [sin(p * f), cos(p * f)] over dim / 4 frequencies
    f_k = temperature ** (-k / (dim / 4)) (He et al., "Masked Autoencoders Are Scalable Vision Learners", 2022)."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    freqs = temperature ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")  # (h, w) each
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):  # (h*w,)
        angles = coord[:, None] * freqs[None, :]  # (h*w, dim/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()  # (h*w, dim)


def fix_sincos_positions(backbone: nn.Module, name: str) -> None:
    """Replace a ViT's learned absolute position table by a fixed 2-D sin-cos table (a buffer of the same name, so
    checkpoints and exports keep their layout and no lock setting can make it trainable). Prefix tokens get zeros."""
    pe = getattr(backbone, "pos_embed", None)
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    if not isinstance(pe, nn.Parameter) or grid is None or pe.ndim != 3:
        raise ValueError(f"model.image.pos_embed sincos needs a ViT with a learned absolute position table; '{name}' "
                         "has none (use pos_embed: default)")
    h, w = grid
    table = torch.zeros_like(pe.data)  # (1, prefix + h*w, D)
    table[0, pe.shape[1] - h * w :] = sincos_2d_table(h, w, pe.shape[-1])
    del backbone.pos_embed
    backbone.register_buffer("pos_embed", table)


class ImageTower(nn.Module):
    """A timm backbone as a :class:`~contrast.towers.Tower`: pixels (B, 3, H, W) -> tokens, pooled, projected.

    ``timm_kwargs`` are the kwargs the backbone was built with (``img_size`` included where the architecture takes
    one): what ``timm.create_model`` needs to rebuild it, e.g. as an export's ``model_args``.
    """

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.backbone, self.timm_kwargs = create_backbone(cfg)
        if cfg.pos_embed not in POS_EMBEDS:
            raise ValueError(f"model.image.pos_embed must be one of {', '.join(POS_EMBEDS)}, got '{cfg.pos_embed}'")
        if cfg.pos_embed == "sincos":
            fix_sincos_positions(self.backbone, cfg.name)
        self.freeze_norm_stats = False
        self._frozen_norms: tuple[str, ...] = ()  # batch-norm layers train() keeps in eval mode
        if cfg.weights:  # a local file or package:NAME; foreign layouts (lukemelas EfficientNet) are converted
            from contrast.towers.adapters import load_backbone_weights

            load_backbone_weights(self.backbone, cfg.weights)
        if cfg.pool not in ("default", "avg", "token", "head"):
            raise ValueError(f"model.image.pool must be default, avg, token or head, got '{cfg.pool}'")
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.num_register_tokens = int(getattr(self.backbone, "num_reg_tokens", 0))  # prefix tokens after the class token
        self.proj = nn.Linear(self.width, embed_dim, bias=cfg.proj_bias)
        nn.init.normal_(self.proj.weight, std=self.width**-0.5)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)
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
        return self._as_tokens(self.backbone.forward_features(pixels))

    def _as_tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """The backbone's final features as (B, N, D) tokens."""
        if feats.ndim == 4 and getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":  # Swin, MaxViT: channels last
            return feats.flatten(1, 2)  # (B, H*W, C)
        if feats.ndim == 4:  # CNN feature map (B, C, H, W)
            feats = feats.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return feats  # (B, N, D)

    def token_mask(self, pixels: torch.Tensor) -> None:
        """Every image token is real."""
        return None

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) by ``model.image.pool``; ``mask`` is ignored (image tokens have no padding)."""
        if self.cfg.pool == "avg":
            return tokens[:, self.num_prefix_tokens :].mean(dim=1)
        if self.cfg.pool == "token":
            return tokens[:, 0]
        if self.is_sequence:
            return self.backbone.forward_head(tokens, pre_logits=True)
        if self.cfg.pool == "head":  # a CNN's own head (ConvNeXt's norm, an attention pool) on the square map
            return self.backbone.forward_head(self._feature_map(tokens), pre_logits=True)
        return tokens.mean(dim=1)  # global average pooling of a CNN map

    def _feature_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, H*W, C) tokens of a CNN back to the square map its head takes (NCHW, or NHWC for Swin-like nets)."""
        B, N, C = tokens.shape
        side = math.isqrt(N)
        if side * side != N:
            raise ValueError(f"model.image.pool head needs a square feature map, got {N} positions")
        grid = tokens.reshape(B, side, side, C)  # (B, H, W, C)
        return grid if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC" else grid.permute(0, 3, 1, 2)

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features before the projection, through the feature cache if any."""
        if self.feature_cache is not None:  # a fully locked backbone: reuse pooled features of seen images
            check_frozen(self.feature_cache, "model.image")
            return self.feature_cache(list(pixels), lambda idx: self.pool(self.forward_tokens(pixels[idx])))
        return self.pool(self.forward_tokens(pixels))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pooled(pixels))

    @property
    def num_blocks(self) -> int:
        """How many outputs :meth:`forward_intermediates` can tap: blocks of a ViT, feature stages of a CNN."""
        return len(self.backbone.feature_info)

    def forward_intermediates(self, pixels: torch.Tensor, indices: int | Sequence[int],
                              final: bool = False) -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]:
        """Outputs of the chosen blocks as (B, N, D) token sequences, in block order.

        ``indices`` as in timm: an int n is the last n blocks, negative entries count from the end. ViT outputs keep
        their prefix tokens where timm returns them (XCiT adds its class token only after its blocks). With ``final``
        the same pass also returns the backbone's final tokens, as :meth:`forward_tokens` gives them: ``(taps,
        tokens)``, so a reader of both (a bridge with the pooled image embedding) runs the tower once.
        """
        take = layer_indices(self.num_blocks, indices)
        fwd = self.backbone.forward_intermediates
        only = not final
        if not self.is_sequence:
            out = fwd(pixels, indices=take, intermediates_only=only)
            maps = out if only else out[1]
            taps = [m.flatten(2).transpose(1, 2) for m in maps]  # (B, H*W, C) each
        elif self.num_prefix_tokens == 0 or "return_prefix_tokens" not in inspect.signature(fwd).parameters:
            out = fwd(pixels, indices=take, intermediates_only=only, output_fmt="NLC")
            taps = out if only else out[1]
        else:
            out = fwd(pixels, indices=take, output_fmt="NLC", return_prefix_tokens=True)
            taps = [torch.cat([prefix, tok], dim=1) for tok, prefix in out[1]]  # (B, prefix + N, D)
        return taps if only else (taps, self._as_tokens(out[0]))

    def _groups(self) -> list[list[str]]:
        """The backbone's coarse timm parameter groups, first to last (parameter names)."""
        from timm.models import group_parameters

        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True), reverse=False)
        return list(groups.values())

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The backbone's parameters by depth, input side first (timm's fine groups: the stem / patch embedding, then
        each block; a final norm or head goes with the last group), for layer-wise learning-rate decay. The projection
        is not in any group: it trains at the full rate."""
        from timm.models import group_parameters

        params = dict(self.backbone.named_parameters())
        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=False), reverse=False)
        return [[params[n] for n in names] for names in groups.values()]

    def lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = True) -> None:
        """Freeze the backbone but its last ``unlocked_groups`` timm parameter groups; ``proj`` stays trainable.

        With ``freeze_norm_stats`` the batch-norm layers of the frozen part keep their running statistics (eval mode).
        """
        groups = self._groups()
        if not 0 <= unlocked_groups <= len(groups):
            raise ValueError(
                f"model.image.unlocked_groups must be between 0 and {len(groups)} (the parameter groups of "
                f"'{self.cfg.name}'), got {unlocked_groups}"
            )
        self.backbone.requires_grad_(False)
        params = dict(self.backbone.named_parameters())
        for group in groups[len(groups) - unlocked_groups :]:
            for name in group:
                params[name].requires_grad = True
        self.proj.requires_grad_(True)
        self.freeze_norm_stats = freeze_norm_stats
        self._frozen_norms = tuple(
            name
            for name, m in self.backbone.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters())
        )
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageTower:
        super().train(mode)
        if self.cfg.frozen_norm_stats:  # model.image.frozen_norm_stats: every batch-norm layer
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        elif self.freeze_norm_stats:  # the locked part keeps its batch-norm statistics
            for name in self._frozen_norms:
                self.backbone.get_submodule(name).eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)
