"""Bridges from a vision tower to a language decoder.

- Unified embedding (LLaVA): the output of one tower block (by default the penultimate, as LLaVA-1.5 uses CLIP's
  second-to-last layer), patch tokens or class + patch tokens (register tokens dropped), mapped to the decoder's
  width by a projector -- ``mlp2x_gelu`` (LLaVA-1.5), ``linear`` (LLaVA) or ``pixel_shuffle`` (nanoVLM: r x r
  neighbouring patches folded into one token, then a linear map) -- and used as visual tokens (B, N, D_decoder) in
  the decoder's input sequence.
  Liu et al., "Visual Instruction Tuning", 2023; Liu et al., "Improved Baselines with Visual Instruction Tuning", 2023.
- Cross-attention (Llama 3.2 Vision): features of several tower blocks concatenated along the feature axis,
  projected to the decoder's width, and read by gated cross-attention blocks interleaved with the decoder's layers.
  Each block's attention and MLP outputs are scaled by ``tanh(gate)`` with the gate starting at zero, so the decoder
  computes exactly what it computed without images at initialisation.
  Llama Team, "The Llama 3 Herd of Models", 2024; the tanh gate: Alayrac et al., "Flamingo: a Visual Language
  Model for Few-Shot Learning", 2022.

Bridges use only the tower interface (``forward_intermediates``, ``num_prefix_tokens``, ``width``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from contrast.layers import MLP, Attention

TOKEN_CHOICES = ("patch", "cls_patch")
PROJECTORS = ("mlp2x_gelu", "linear", "pixel_shuffle")


def select_tokens(tokens: torch.Tensor, num_prefix: int, which: str, num_registers: int = 0) -> torch.Tensor:
    """(B, prefix + N, D) -> patch tokens (B, N, D), or the class token and the patch tokens (B, 1 + N, D); register
    tokens (the prefix tokens after the class token, Darcet et al. 2024) are dropped either way."""
    if which == "patch":
        return tokens[:, num_prefix:]
    if which == "cls_patch":
        if num_prefix - num_registers < 1:
            raise ValueError("bridge tokens 'cls_patch' needs a tower with a class token; this one has none (use patch)")
        return torch.cat([tokens[:, :1], tokens[:, num_prefix:]], dim=1)
    raise ValueError(f"bridge tokens must be one of {', '.join(TOKEN_CHOICES)}, got '{which}'")


class UnifiedProjector(nn.Module):
    """LLaVA-1.5's ``mlp2x_gelu``: Linear(tower width, D) -> GELU -> Linear(D, D)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, g*g, D) tokens of a square grid -> (B, (g/r)^2, r*r*D): each r x r block of neighbours becomes one token,
    their features side by side (nanoVLM's modality projector; Shi et al. call it space-to-depth)."""
    B, N, D = x.shape
    g = math.isqrt(N)
    if g * g != N:
        raise ValueError(f"pixel_shuffle needs a square grid of tokens, got {N} (use tokens: patch, or another projector)")
    if g % r:
        raise ValueError(f"pixel_shuffle factor {r} does not divide the {g}x{g} token grid; pick a divisor of {g}")
    x = x.view(B, g // r, r, g // r, r, D).permute(0, 1, 3, 2, 4, 5)  # (B, g/r, g/r, r, r, D)
    return x.reshape(B, (g // r) ** 2, r * r * D)


class ShuffleProjector(nn.Module):
    """Pixel shuffle by ``r`` then one linear map: r^2 times fewer visual tokens."""

    def __init__(self, in_dim: int, out_dim: int, r: int):
        super().__init__()
        if r < 1:
            raise ValueError(f"model.bridge.pixel_shuffle must be >= 1, got {r}")
        self.r = r
        self.proj = nn.Linear(in_dim * r * r, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(x, self.r))


def build_projector(kind: str, in_dim: int, out_dim: int, r: int = 2) -> nn.Module:
    if kind == "mlp2x_gelu":
        return UnifiedProjector(in_dim, out_dim)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "pixel_shuffle":
        return ShuffleProjector(in_dim, out_dim, r)
    raise ValueError(f"model.bridge.projector must be one of {', '.join(PROJECTORS)}, got '{kind}'")


class UnifiedBridge(nn.Module):
    """One tower layer -> token selection -> projector -> visual tokens (B, N, D_decoder)."""

    def __init__(self, tower_width: int, num_prefix_tokens: int, decoder_width: int, layer: int = -2,
                 tokens: str = "patch", projector: str = "mlp2x_gelu", shuffle: int = 2, num_registers: int = 0):
        super().__init__()
        select_tokens(torch.zeros(1, num_prefix_tokens + 1, 1), num_prefix_tokens, tokens, num_registers)  # validate
        if projector == "pixel_shuffle" and tokens != "patch":
            raise ValueError("projector pixel_shuffle folds a grid of patch tokens; set model.bridge.tokens: patch")
        self.layer, self.tokens, self.num_prefix_tokens = layer, tokens, num_prefix_tokens
        self.num_registers = num_registers
        self.projector = build_projector(projector, tower_width, decoder_width, shuffle)

    @property
    def layers(self) -> list[int]:
        return [self.layer]

    def features(self, tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return self.from_taps(tower.forward_intermediates(pixels, self.layers))

    def from_taps(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """The tapped layer's output (B, prefix + N, D_tower) -> the tokens the projector reads."""
        return select_tokens(taps[0], self.num_prefix_tokens, self.tokens, self.num_registers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)  # (B, N', D_decoder)


def common_grid(taps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Token maps of several blocks on one grid: a CNN's stages differ in resolution, so the larger square grids are
    average-pooled to the smallest (each output token the mean of the block of tokens it covers)."""
    n = min(t.shape[1] for t in taps)
    if all(t.shape[1] == n for t in taps):
        return taps
    g = math.isqrt(n)
    out = []
    for t in taps:
        B, N, D = t.shape
        side = math.isqrt(N)
        if side * side != N or g * g != n or side % g:
            raise ValueError(f"model.bridge.taps give token grids of {[x.shape[1] for x in taps]} tokens, which cannot "
                             "be brought to one grid; tap blocks of the same resolution")
        grid = t.transpose(1, 2).reshape(B, D, side, side)  # (B, D, side, side)
        out.append(F.avg_pool2d(grid, side // g).flatten(2).transpose(1, 2))  # (B, n, D)
    return out


class MultiLayerTaps(nn.Module):
    """Several tower blocks' outputs concatenated along features (on one grid), then a linear map to the decoder's
    width. ``widths``: each tapped block's feature width (a CNN's stages differ)."""

    def __init__(self, widths: list[int] | int, decoder_width: int, layers: list[int] | tuple[int, ...]):
        super().__init__()
        if not layers:
            raise ValueError("model.bridge.taps is empty; name at least one tower block (e.g. [-1])")
        self.layers = [int(i) for i in layers]
        widths = [widths] * len(self.layers) if isinstance(widths, int) else list(widths)
        self.norm = nn.LayerNorm(sum(widths))
        self.proj = nn.Linear(sum(widths), decoder_width)

    def features(self, tower: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return self.from_taps(tower.forward_intermediates(pixels, self.layers))

    def from_taps(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """k x (B, N_i, D_i) block outputs, in block order -> (B, N, sum D_i) on one grid."""
        return torch.cat(common_grid(taps), dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(features))  # (B, N, D_decoder)


class GatedCrossAttention(nn.Module):
    """``x + tanh(a) * xattn(ln(x), ctx)`` then ``x + tanh(m) * mlp(ln(x))``; ``a = m = 0`` at initialisation.

    ``rows`` (B, T) marks the text positions that may see the image; the others are left unchanged (Mllama's
    full-text-row mask: text before the image, or a sample without one). ``mlp_ratio`` 0: cross-attention alone, no
    gated MLP (the MLP adapts the LM whether or not the context carries an image)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, mlp_ratio: float = 4.0):
        super().__init__()
        if mlp_ratio < 0:
            raise ValueError(f"model.bridge.xattn_mlp_ratio must be >= 0 (0: no MLP), got {mlp_ratio}")
        self.ln_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, context_dim=context_dim or dim)
        self.gate_attn = nn.Parameter(torch.zeros(()))
        hidden = int(dim * mlp_ratio)
        self.ln_mlp = nn.LayerNorm(dim) if hidden else None
        self.mlp = MLP(dim, hidden) if hidden else None
        self.gate_mlp = nn.Parameter(torch.zeros(())) if hidden else None

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        keep = 1.0 if rows is None else rows[..., None].to(x.dtype)  # (B, T, 1)
        a = self.attn(self.ln_attn(x), context=context, mask=context_mask)
        x = x + torch.tanh(self.gate_attn).to(x.dtype) * a * keep
        if self.mlp is None:
            return x
        return x + torch.tanh(self.gate_mlp).to(x.dtype) * self.mlp(self.ln_mlp(x)) * keep
