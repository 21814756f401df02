"""Text tower: a pre-LN transformer with learned positions, a causal mask and end-of-text pooling (CLIP's layout).

Reference: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from contrast.config import TextTowerConfig
from contrast.layers import TokenTransformer, activation, layer_indices
from contrast.tokenizer import text_padding_mask

TEXT_POOLS = ("eot", "eos", "last")


class TextTower(TokenTransformer):
    """:class:`TokenTransformer` + a bias-free projection; a :class:`~contrast.towers.Tower` over BPE token ids.

    State-dict keys: ``token_embedding.weight``, ``positional_embedding``, ``transformer.blocks.N.*``,
    ``ln_final.*``, ``proj.weight``. :meth:`embed` is the tower's ``(B, E)`` embedding (the stack's token lookup is
    :meth:`embed_tokens`).
    """

    def __init__(self, cfg: TextTowerConfig, embed_dim: int):
        super().__init__(
            cfg.vocab_size,
            cfg.width,
            cfg.layers,
            cfg.heads,
            cfg.mlp_ratio,
            context_length=cfg.context_length,
            act=activation(cfg.act),
            causal=cfg.causal,
        )
        self.cfg = cfg
        if cfg.pool not in TEXT_POOLS or (cfg.pool == "eos" and cfg.eos_token_id is None):
            raise ValueError(f"model.text.pool must be one of {', '.join(TEXT_POOLS)} (eos needs model.text.eos_token_id), "
                             f"got '{cfg.pool}'")
        for m in self.modules():  # imported towers keep their LayerNorm eps (SigLIP: 1e-6)
            if isinstance(m, nn.LayerNorm):
                m.eps = cfg.norm_eps
        self.proj = nn.Linear(cfg.width, embed_dim, bias=cfg.proj_bias)
        self.init_clip_()
        nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def embed_dim(self) -> int:
        return self.proj.out_features

    def forward_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self(input_ids)[0]  # (B, T, D)

    def token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) True up to the token the tower pools: by ``model.text.pool``, the end-of-text token (eot: the highest
        id of the vocabulary; eos: the first ``eos_token_id``), or every position (last: SigLIP's fixed-length ids)."""
        if self.cfg.pool == "last":
            return torch.ones_like(input_ids, dtype=torch.bool)  # (B, T)
        if self.cfg.pool == "eos":
            T = input_ids.shape[1]
            is_eos = input_ids == self.cfg.eos_token_id  # (B, T)
            first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), T - 1)  # (B,), none: the last position
            return torch.arange(T, device=input_ids.device)[None, :] <= first[:, None]  # (B, T)
        return text_padding_mask(input_ids)

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The output at the last True position of ``mask`` (the end-of-text token); the last position if None."""
        B, T = tokens.shape[:2]
        if mask is None:
            return tokens[:, -1]  # (B, D)
        positions = torch.arange(T, device=tokens.device)  # (T,)
        last = (mask.long() * positions).argmax(dim=-1)  # (B,), the largest True position
        return tokens[torch.arange(B, device=tokens.device), last]  # (B, D)

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features before the projection."""
        return self.pool(self.forward_tokens(input_ids), self.token_mask(input_ids))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pooled(input_ids))

    def forward_intermediates(self, input_ids: torch.Tensor, indices: int | Sequence[int]) -> list[torch.Tensor]:
        """Raw outputs of the chosen blocks (before ln_final), each (B, T, D), in block order."""
        layer_indices(len(self.transformer.blocks), indices)  # refuses bad indices (an empty list too) up front
        return self(input_ids, return_layers=indices)[1]

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Parameters by depth for layer-wise learning-rate decay: the embeddings, then each block; ``ln_final`` and the
        projection are in no group (full rate)."""
        blocks = [list(b.parameters()) for b in self.transformer.blocks]
        inside = {id(p) for ps in blocks for p in ps} | {id(p) for m in (self.ln_final, self.proj) for p in m.parameters()}
        return [[p for p in self.parameters() if id(p) not in inside], *blocks]

    def lock(self, unlocked_groups: int = 0, freeze_norm_stats: bool = True) -> None:
        """Freeze all but the last ``unlocked_groups`` layers (and then ln_final); ``proj`` stays trainable.

        ``freeze_norm_stats`` is accepted for the common interface: this tower has no running statistics or dropout.
        """
        n = len(self.transformer.blocks)
        if not 0 <= unlocked_groups <= n:
            raise ValueError(f"model.text.unlocked_groups must be between 0 and {n} (the layer count), got {unlocked_groups}")
        self.requires_grad_(False)
        if unlocked_groups > 0:
            for blk in self.transformer.blocks[n - unlocked_groups :]:
                blk.requires_grad_(True)
            self.ln_final.requires_grad_(True)
        self.proj.requires_grad_(True)
