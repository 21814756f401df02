"""The one causal language-model stack of the project and the packing of next-token targets.

:class:`CausalLM` is a pre-LN transformer with learned positions whose LM head is tied to the token embedding
(GPT-2's layout: Radford et al., "Language Models are Unsupervised Multitask Learners", 2019). BLIP-2's frozen
decoder (stage 2, ``caption_lm``) and the vision-language decoder (kind ``decoder``) are both this stack; the text
tower of CLIP is the same :class:`~contrast.layers.TokenTransformer` with pooling instead of a head.
"""

from __future__ import annotations

import torch
from torch import nn

from contrast.config import DecoderConfig
from contrast.layers import TokenTransformer
from contrast.models.outputs import LMOutput
from contrast.tokenizer import text_padding_mask


def trim_padding(input_ids: torch.Tensor) -> torch.Tensor:
    """Drop the columns after the batch's longest caption: they are padding everywhere and change no output."""
    keep = int(text_padding_mask(input_ids).sum(dim=1).max())
    return input_ids[:, :keep]  # (B, T')


def packed_targets(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(where, targets, rows)``: a (B, T-1) mask of the positions whose next token is real, those tokens (P,)
    and their caption numbers (P,). Logits are computed at those positions only."""
    real = text_padding_mask(input_ids)[:, 1:]  # (B, T-1)
    where = real
    targets = input_ids[:, 1:][where]
    return where, targets, where.nonzero()[:, 0]


def packed_lm_output(hidden: torch.Tensor, input_ids: torch.Tensor, head) -> LMOutput:
    """:class:`LMOutput` from caption hidden states (B, T, W): ``head`` runs only where a next token exists."""
    where, targets, rows = packed_targets(input_ids)
    return LMOutput(head(hidden[:, :-1][where]), targets, rows, input_ids.shape[0])


class CausalLM(TokenTransformer):
    """Token embedding + learned positions + causal blocks + final norm; logits through the tied embedding.

    ``blocks_hook(i, x)``, when given to :meth:`hidden`, runs before block ``i`` (the gated cross-attention of the
    vision-language decoder).
    """

    def __init__(self, cfg: DecoderConfig, vocab_size: int):
        super().__init__(vocab_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, context_length=cfg.max_positions)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    def hidden(self, inputs_embeds: torch.Tensor, blocks_hook=None) -> torch.Tensor:
        """(B, L, W) final hidden states of input embeddings (B, L, W), causally.

        Right padding under a causal mask never reaches a real position, so no padding mask is needed.
        """
        L = inputs_embeds.shape[1]
        if L > self.positional_embedding.shape[0]:
            raise ValueError(f"decoder input of {L} positions exceeds the decoder's max_positions "
                             f"{self.positional_embedding.shape[0]}; raise max_positions in the decoder config")
        x = inputs_embeds + self.positional_embedding[:L]
        for i, blk in enumerate(self.transformer.blocks):
            if blocks_hook is not None:
                x = blocks_hook(i, x)
            x = self.transformer.run_block(blk, x, None, True)
        return self.ln_final(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.token_embedding.weight.t()  # (..., V), head tied to the token embedding

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden(inputs_embeds))  # (B, L, V)
