"""Transformer building blocks shared by every tower and head.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` so the fused kernels are used wherever
torch has them. Blocks are pre-LayerNorm (as in CLIP / GPT-2) and can carry an optional cross-attention sub-layer
(as in BLIP's image-grounded text encoder), placed between self-attention and the MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None, cross-attention otherwise."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads; pick heads dividing width")
        self.heads = heads
        self.head_dim = dim // heads
        self.cross = context_dim is not None
        if self.cross:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        B, T, D = x.shape
        if self.cross:
            if context is None:
                raise ValueError("cross-attention layer called without image tokens (context)")
            S = context.shape[1]
            q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
            kv = self.kv(context).view(B, S, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k, v = kv[0], kv[1]  # (B, heads, S, head_dim)
        else:
            qkv = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(out)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation used by the original OpenAI CLIP models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: self-attention, optional cross-attention, MLP."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        act: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln_x = nn.LayerNorm(dim) if context_dim is not None else None
        self.xattn = Attention(dim, heads, context_dim=context_dim) if context_dim is not None else None
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask=mask, causal=causal)
        if self.xattn is not None and context is not None:
            x = x + self.xattn(self.ln_x(x), context=context, mask=context_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`Block` with optional activation checkpointing."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        act: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, context_dim, act) for _ in range(depth))
        self.grad_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        return_layers: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        taps: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, mask, causal, context, context_mask, use_reentrant=False)
            else:
                x = blk(x, mask, causal, context, context_mask)
            if i in return_layers:
                taps.append(x)
        return x, taps
