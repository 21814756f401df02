"""The Querying Transformer (Q-Former): learned query tokens and text sharing one BERT-style transformer.

Reference: Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large
Language Models", ICML 2023 (section 3.1 and figure 2).

Layout (post-LayerNorm, as BERT):

* ``query_tokens`` (1, Q, D) and text embeddings (word + position) are concatenated, then LayerNorm'd;
* every layer: self-attention over queries and text under one of three masks (:func:`attention_mask`);
  every ``cross_attention_every``-th layer (0, k, 2k, ...) the query positions alone cross-attend to the frozen
  image features; query positions and text positions then go through separate feed-forward weights.

Masks are boolean, ``True`` where a row (the attending token) may see a column (the attended token):

* ``itc``: queries see queries, text sees text (the two streams are independent; unimodal encoders);
* ``itm``: queries and text see each other (bidirectional; image-grounded text encoder);
* ``itg``: queries see queries only, text sees all queries and the text before it (causal; image-grounded decoder).

Text padding columns are hidden from every row.
"""

from __future__ import annotations

import torch
from torch import nn

from contrast.config import QFormerConfig
from contrast.layers import MLP, Attention
from contrast.tokenizer import text_padding_mask

MASK_KINDS = ("itc", "itm", "itg")


def attention_mask(kind: str, num_queries: int, text_mask: torch.Tensor | None) -> torch.Tensor:
    """The (B, Q+T, Q+T) boolean self-attention mask for ``kind`` (itc | itm | itg).

    ``text_mask`` (B, T) is True at real (non-padding) text positions; None means no text (queries only, any kind).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown Q-Former mask '{kind}'; choose one of {', '.join(MASK_KINDS)}")
    Q = num_queries
    if text_mask is None:
        return torch.ones(1, Q, Q, dtype=torch.bool)
    B, T = text_mask.shape
    dev = text_mask.device
    L = Q + T
    is_query = torch.arange(L, device=dev) < Q  # (L,)
    q_row, q_col = is_query[:, None], is_query[None, :]  # (L, 1), (1, L)
    if kind == "itm":
        base = torch.ones(L, L, dtype=torch.bool, device=dev)
    elif kind == "itc":
        base = q_row == q_col  # block-diagonal: each stream sees itself
    else:  # itg
        causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        base = torch.where(q_row, q_col, q_col | causal)  # queries: queries only; text: queries + causal text
    keep = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=dev), text_mask.bool()], dim=1)  # (B, L)
    return base[None] & keep[:, None, :]  # (B, L, L)


class QFormerLayer(nn.Module):
    """Self-attention (+ LN), optional query cross-attention (+ LN), separate query / text feed-forward (+ LN)."""

    def __init__(self, cfg: QFormerConfig, vision_width: int | None):
        super().__init__()
        D, eps = cfg.width, cfg.layer_norm_eps
        hidden = int(D * cfg.mlp_ratio)
        self.attn = Attention(D, cfg.heads)
        self.ln_attn = nn.LayerNorm(D, eps=eps)
        self.xattn = Attention(D, cfg.heads, context_dim=vision_width) if vision_width is not None else None
        self.ln_xattn = nn.LayerNorm(D, eps=eps) if vision_width is not None else None
        self.mlp_query = MLP(D, hidden, act=nn.GELU)  # exact (erf) GELU, as BERT
        self.ln_mlp_query = nn.LayerNorm(D, eps=eps)
        self.mlp_text = MLP(D, hidden, act=nn.GELU)
        self.ln_mlp_text = nn.LayerNorm(D, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        num_queries: int,
        mask: torch.Tensor | None,
        image: torch.Tensor | None,
    ) -> torch.Tensor:
        x = self.ln_attn(x + self.attn(x, mask=mask))  # (B, Q+T, D)
        q, t = x[:, :num_queries], x[:, num_queries:]
        if num_queries > 0:
            if self.xattn is not None:
                if image is None:
                    raise ValueError("the Q-Former's queries need image features (B, N, width) to cross-attend to")
                q = self.ln_xattn(q + self.xattn(q, context=image))
            q = self.ln_mlp_query(q + self.mlp_query(q))
        if t.shape[1] > 0:
            t = self.ln_mlp_text(t + self.mlp_text(t))
        return torch.cat([q, t], dim=1)


class QFormer(nn.Module):
    """Learned queries + text in one transformer; queries cross-attend to image features of width ``vision_width``.

    ``forward(image, input_ids, mask_kind)`` returns the last hidden states (B, Q+T, D): query outputs first.
    With ``input_ids=None`` only the queries run (the visual path); with ``image=None`` and ``use_queries=False``
    only the text runs (the text path of ITC).
    """

    def __init__(self, cfg: QFormerConfig, vision_width: int, vocab_size: int, context_length: int):
        super().__init__()
        self.cfg = cfg
        self.vision_width = vision_width
        self.vocab_size = vocab_size
        self.context_length = context_length
        D = cfg.width
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, D))
        self.word_embeddings = nn.Embedding(vocab_size + 1, D)  # the last row is [DEC]
        self.position_embeddings = nn.Embedding(context_length, D)
        self.ln_embed = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        every = cfg.cross_attention_every
        if every < 1:
            raise ValueError(f"model.qformer.cross_attention_every must be >= 1, got {every}")
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, vision_width if i % every == 0 else None) for i in range(cfg.layers)
        )
        self.grad_checkpointing = False
        self._init()

    def _init(self) -> None:
        std = self.cfg.init_std  # BERT's initializer range by default
        nn.init.normal_(self.query_tokens, std=std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def num_queries(self) -> int:
        return self.cfg.num_queries

    @property
    def dec_token_id(self) -> int:
        """The decoder-start token [DEC] that replaces the first text token for generation (ITG)."""
        return self.vocab_size

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.context_length:
            raise ValueError(
                f"text of {T} tokens exceeds the Q-Former's context length {self.context_length}; "
                "tokenize with model.text.context_length"
            )
        pos = torch.arange(T, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]  # (B, T, D)

    def forward(
        self,
        image: torch.Tensor | None,
        input_ids: torch.Tensor | None = None,
        mask_kind: str = "itc",
        text_mask: torch.Tensor | None = None,
        use_queries: bool = True,
    ) -> torch.Tensor:
        """Hidden states (B, Q+T, D). ``text_mask`` (B, T) defaults to :func:`text_padding_mask` of the ids."""
        parts = []
        if use_queries:
            if image is None:
                raise ValueError("the Q-Former's queries need image features (B, N, width); got none")
            if image.shape[-1] != self.vision_width:
                raise ValueError(
                    f"image features have width {image.shape[-1]} but the Q-Former was built for {self.vision_width}; "
                    "use features from the same image tower"
                )
            parts.append(self.query_tokens.expand(image.shape[0], -1, -1).to(image.dtype))
        Q = self.cfg.num_queries if use_queries else 0
        if input_ids is not None:
            parts.append(self.embed_text(input_ids))
            if text_mask is None:
                text_mask = text_padding_mask(input_ids)
        x = self.ln_embed(torch.cat(parts, dim=1))  # (B, Q+T, D)
        mask = None
        if input_ids is not None:
            mask = attention_mask(mask_kind, Q, text_mask)[:, None]  # (B, 1, L, L), broadcast over heads
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, Q, mask, image, use_reentrant=False)
            else:
                x = layer(x, Q, mask, image)
        return x

    def encode_queries(self, image: torch.Tensor) -> torch.Tensor:
        """Query outputs (B, Q, D) for image features (B, N, width): the visual path."""
        return self(image)

    def encode_text(self, input_ids: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text outputs (B, T, D) with no queries: the text path of ITC."""
        return self(None, input_ids, "itc", text_mask=text_mask, use_queries=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


__all__ = ["QFormer", "QFormerLayer", "attention_mask", "text_padding_mask", "MASK_KINDS"]
