"""The project's small causal LM (GPT-2's layout: Radford et al., "Language Models are Unsupervised Multitask
Learners", 2019): token embedding + learned positions + pre-LN causal blocks + final norm, the LM head tied to the
token embedding. It reads the open_clip BPE ids and is the fast decoder of the tests and the demo.

Its "cache" for generation is the input embeddings seen so far: each step recomputes the sequence (the model is small
and its sequences short), which keeps one code path for training and generation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from contrast.config import DecoderConfig
from contrast.decoders.base import LanguageModel, LayerHook, positions_of
from contrast.layers import TokenTransformer


class CausalLM(TokenTransformer, LanguageModel):
    """``blocks_hook(i, x)`` / ``layer_hook`` runs before block ``i`` (the seat of gated cross-attention)."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int, eos_token_ids: tuple[int, ...] = ()):
        super().__init__(vocab_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, context_length=cfg.max_positions)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.vocab_size = vocab_size
        self.num_layers, self.num_heads = cfg.layers, cfg.heads
        self.eos_token_ids = tuple(eos_token_ids)

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids)

    def hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               layer_hook: LayerHook | None = None, cache: Any = None, use_cache: bool = False
               ) -> tuple[torch.Tensor, Any]:
        new = inputs_embeds.shape[1]
        seq = inputs_embeds if cache is None else torch.cat([cache, inputs_embeds], dim=1)  # (B, past + L, W)
        L = seq.shape[1]
        if L > self.positional_embedding.shape[0]:
            raise ValueError(f"decoder input of {L} positions exceeds the decoder's max_positions "
                             f"{self.positional_embedding.shape[0]}; raise max_positions in the decoder config")
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):  # left padding (generation): mask it
            pos = positions_of(attention_mask, L)  # (B, L)
            x = seq + self.positional_embedding[pos]
            causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
            mask = (causal[None] & attention_mask.bool()[:, None, :])[:, None]  # (B, 1, L, L)
            mask = mask | torch.eye(L, dtype=torch.bool, device=seq.device)  # a padded row attends to itself
        else:  # right padding under a causal mask never reaches a real position
            x = seq + self.positional_embedding[:L]
        for i, blk in enumerate(self.transformer.blocks):
            if layer_hook is not None:
                x = layer_hook(i, x)
            x = self.transformer.run_block(blk, x, mask, mask is None)
        return self.ln_final(x)[:, -new:], (seq if use_cache else None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.token_embedding.weight.t()  # (..., V), head tied to the token embedding

    def reorder_cache(self, cache: Any, rows: torch.Tensor) -> Any:
        return cache[rows]

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden(inputs_embeds, attention_mask)[0])  # (B, L, V)
