"""Image and text towers, all behind one small interface: :class:`Tower`.

The Q-Former, the decoder bridges and the models depend on that interface only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from contrast.towers.image import ImageTower
from contrast.towers.text import TextTower


@runtime_checkable
class Tower(Protocol):
    """What every tower offers (:class:`ImageTower`, :class:`TextTower`, :class:`~contrast.towers.hf_text.HFTextTower`).

    ``x`` is pixels (B, 3, H, W) for an image tower and token ids (B, T) for a text tower.

    - ``width``: the token width D; ``embed_dim``: the projection's output width E.
    - ``forward_tokens(x) -> (B, N, D)``: the token outputs.
    - ``token_mask(x) -> (B, N) bool | None``: True at real tokens; None when all are real (images).
    - ``pool(tokens, mask=None) -> (B, D)``: the tower's pooling (image: its timm pooling; CLIP text: the output at
      the last real token, the end-of-text token; HF text: the mean over real tokens).
    - ``pooled(x) -> (B, D)``: ``pool(forward_tokens(x), token_mask(x))``, through the feature cache if any.
    - ``embed(x) -> (B, E)``: ``proj(pooled(x))``.
    - ``lock(unlocked_groups=0, freeze_norm_stats=True)``: freeze all but the last ``unlocked_groups`` groups (timm
      parameter groups / transformer layers); the projection ``proj`` stays trainable; with ``freeze_norm_stats`` the
      frozen part keeps its normalisation statistics and has no dropout in ``train()``. Out of range: ValueError.
    - ``set_grad_checkpointing(enable=True)``: activation checkpointing of the blocks.
    - ``forward_intermediates(x, indices) -> list[(B, N, D)]``: block outputs in block order, indices as in timm (an
      int n is the last n blocks; a list may count from the end, -1 being the last block). Out of range: ValueError.
    """

    @property
    def width(self) -> int: ...

    @property
    def embed_dim(self) -> int: ...

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor: ...

    def token_mask(self, x: torch.Tensor) -> torch.Tensor | None: ...

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def pooled(self, x: torch.Tensor) -> torch.Tensor: ...

    def embed(self, x: torch.Tensor) -> torch.Tensor: ...

    def lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = True) -> None: ...

    def set_grad_checkpointing(self, enable: bool = True) -> None: ...

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int]) -> list[torch.Tensor]: ...


__all__ = ["ImageTower", "TextTower", "Tower"]
