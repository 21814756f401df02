"""Text tower: a pre-LN transformer with learned positions, a causal mask and end-of-text pooling (CLIP's layout)."""

from __future__ import annotations

import torch
from torch import nn

from contrast.config import TextTowerConfig
from contrast.layers import Transformer, activation


class TextTower(nn.Module):
    def __init__(self, cfg: TextTowerConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, act=activation(cfg.act))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self._init()
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)

    def _init(self) -> None:
        w, L = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std, proj_std, fc_std = w**-0.5, (w**-0.5) * ((2 * L) ** -0.5), (2 * w) ** -0.5
        for blk in self.transformer.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=attn_std)
            nn.init.normal_(blk.attn.proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)
        nn.init.normal_(self.proj.weight, std=w**-0.5)

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def embed_dim(self) -> int:
        return self.proj.out_features

    def forward_tokens(self, input_ids: torch.Tensor, return_layers: tuple[int, ...] = ()) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.cfg.context_length:
            raise ValueError(f"text of {T} tokens exceeds the tower's context length {self.cfg.context_length}")
        x = self.token_embedding(input_ids) + self.positional_embedding[:T]  # (B, T, D)
        x, _ = self.transformer(x, causal=self.cfg.causal)
        return self.ln_final(x)  # (B, T, D)

    def pool(self, tokens: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The end-of-text token's output; it has the highest id in the vocabulary."""
        eot = input_ids.argmax(dim=-1)  # (B,)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), eot]  # (B, D)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.forward_tokens(input_ids), input_ids))

    def forward_intermediates(self, input_ids: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        T = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:T]
        return self.transformer(x, causal=self.cfg.causal, return_layers=tuple(indices))[1]

    def lock(self, unlocked_layers: int = 0) -> None:
        for p in self.parameters():
            p.requires_grad = False
        if unlocked_layers > 0:
            for blk in self.transformer.blocks[-unlocked_layers:]:
                blk.requires_grad_(True)
            self.ln_final.requires_grad_(True)
        self.proj.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
