"""Transformer building blocks shared by every tower and head.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` so the fused kernels are used wherever
torch has them. Blocks are pre-LayerNorm (as in CLIP / GPT-2) and can carry an optional cross-attention sub-layer
(as in BLIP's image-grounded text encoder), placed between self-attention and the MLP.
"""

from __future__ import annotations

from collections.abc import Sequence

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


class TanhGELU(nn.GELU):
    """GELU with the tanh approximation (SigLIP's ``gelu_pytorch_tanh``)."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "gelu_tanh": TanhGELU}


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

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def run_block(self, blk: nn.Module, *args) -> torch.Tensor:
        """``blk(*args)``, under activation checkpointing when it is on and gradients are being recorded."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

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
            x = self.run_block(blk, x, mask, causal, context, context_mask)
            if i in return_layers:
                taps.append(x)
        return x, taps


def layer_indices(num_layers: int, indices: int | Sequence[int]) -> list[int]:
    """Block indices in timm's ``forward_intermediates`` convention, as sorted non-negative positions.

    An int ``n`` selects the last ``n`` blocks; a sequence selects those blocks, negative entries counting from the
    end (-1 is the last block). Outputs are returned in block order, each block once.
    """
    if isinstance(indices, int):
        if not 0 < indices <= num_layers:
            raise ValueError(f"the last-n index {indices} is out of range: n must be between 1 and {num_layers}")
        return list(range(num_layers - indices, num_layers))
    picked = set()
    for i in indices:
        if not -num_layers <= i < num_layers:
            raise ValueError(
                f"block index {i} is out of range for {num_layers} blocks: use 0..{num_layers - 1} or "
                f"-{num_layers}..-1 (counting from the end)"
            )
        picked.add(i % num_layers)
    if not picked:
        raise ValueError("no block indices given: pass an int n (the last n blocks) or a non-empty list")
    return sorted(picked)


class TokenTransformer(nn.Module):
    """Token embedding + learned positions + a pre-LN :class:`Transformer` + a final LayerNorm.

    The text tower (CLIP's text transformer) and the small causal decoders are this stack. Positions start at zero
    and the token embedding at PyTorch's default; :meth:`init_clip_` applies CLIP's text-tower initialisation.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        context_length: int = 77,
        act: type[nn.Module] = nn.GELU,
        causal: bool = True,
    ):
        super().__init__()
        self.context_length = context_length
        self.causal = causal
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act=act)
        self.ln_final = nn.LayerNorm(width)

    def init_clip_(self) -> None:
        """CLIP's text init: token std 0.02, positions std 0.01, attention / projection / MLP stds by width and depth."""
        w, L = self.token_embedding.embedding_dim, len(self.transformer.blocks)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std, proj_std, fc_std = w**-0.5, (w**-0.5) * ((2 * L) ** -0.5), (2 * w) ** -0.5
        for blk in self.transformer.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=attn_std)
            nn.init.normal_(blk.attn.proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.set_grad_checkpointing(enable)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, W), without positions."""
        return self.token_embedding(ids)

    def forward(
        self,
        ids: torch.Tensor | None = None,
        *,
        embeds: torch.Tensor | None = None,
        return_layers: int | Sequence[int] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(hidden (B, T, W) after ln_final, taps)`` from token ids or ready token embeddings (B, T, W).

        ``return_layers`` picks blocks whose raw outputs (before ln_final) are returned as taps, in block order
        (:func:`layer_indices`: an int n is the last n blocks, negative entries count from the end).
        """
        if (ids is None) == (embeds is None):
            raise ValueError("TokenTransformer takes exactly one of ids or embeds")
        x = self.token_embedding(ids) if embeds is None else embeds  # (B, T, W)
        T = x.shape[1]
        if T > self.context_length:
            raise ValueError(f"a sequence of {T} tokens exceeds the context length {self.context_length}")
        no_taps = not isinstance(return_layers, int) and len(return_layers) == 0
        layers = () if no_taps else tuple(layer_indices(len(self.transformer.blocks), return_layers))
        x = x + self.positional_embedding[:T]  # (B, T, W)
        x, tapped = self.transformer(x, causal=self.causal, return_layers=layers)
        return self.ln_final(x), tapped
