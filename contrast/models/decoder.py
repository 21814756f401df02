"""A small causal decoder that consumes an (exported) vision tower through either bridge (model kind ``decoder``).

- ``unified``: visual tokens from :class:`~contrast.bridges.UnifiedBridge` are prepended to the caption's token
  embeddings and the decoder runs causally over both (LLaVA: Liu et al., "Visual Instruction Tuning", 2023).
- ``xattn``: the caption alone runs through the decoder; gated cross-attention blocks
  (:class:`~contrast.bridges.GatedCrossAttention`, tanh gates from zero as in Flamingo, Alayrac et al., 2022) read
  multi-layer tower features before every ``xattn_every``-th layer (Llama Team, "The Llama 3 Herd of Models", 2024).

With ``use_images: false`` the image path is switched off and the same decoder is trained on captions alone: the
reference the visual bridges must beat. The loss is the ``lm`` term (next-token cross-entropy on caption tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from contrast.bridges import GatedCrossAttention, MultiLayerTaps, UnifiedBridge
from contrast.config import ImageTowerConfig, ModelConfig
from contrast.layers import Block
from contrast.models.qformer import text_padding_mask
from contrast.towers import ImageTower

MODES = ("unified", "xattn")


@dataclass
class DecoderLMOutput:
    """Packed caption positions: only positions that have a next caption token get logits."""

    lm_logits: torch.Tensor  # (P, V) logits at the caption positions whose next token is real
    lm_targets: torch.Tensor  # (P,) that next token
    lm_rows: torch.Tensor  # (P,) the caption each position belongs to
    num_captions: int  # B
    num_visual_tokens: int  # visual tokens in the decoder's sequence (unified mode; 0 otherwise)


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1): the token after each position, -100 where that token is padding."""
    real = text_padding_mask(input_ids)[:, 1:]  # (B, T-1)
    return input_ids[:, 1:].masked_fill(~real, -100)


def _plain(v: object) -> object:
    return tuple(float(x) for x in v) if isinstance(v, list | tuple) else v


def build_tower(cfg: ModelConfig) -> tuple[ImageTower, bool]:
    """The tower named by ``model.bridge.tower`` (run dir or timm export), else a fresh ``model.image``.

    Returns ``(tower, frozen)``. A loaded tower must preprocess like ``model.image`` (the data pipeline uses it).
    """
    if not cfg.bridge.tower:
        return ImageTower(cfg.image, cfg.embed_dim), False
    from contrast.export import load_exported_tower

    tower = load_exported_tower(cfg.bridge.tower)
    mine: ImageTowerConfig = cfg.image
    for name in ("image_size", "mean", "std"):
        theirs, ours = _plain(getattr(tower.cfg, name)), _plain(getattr(mine, name))
        if theirs != ours:
            raise ValueError(
                f"model.image.{name} is {ours!r} but the tower in {cfg.bridge.tower} expects {theirs!r}; "
                "set model.image to the tower's preprocessing so the data pipeline feeds it what it was trained on"
            )
    return tower, cfg.bridge.tower_locked


class VisionLanguageDecoder(nn.Module):
    """Pre-LN causal decoder (learned positions, LM head tied to the token embedding) plus an image bridge."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        b, d = cfg.bridge, cfg.bridge.decoder
        if b.mode not in MODES:
            raise ValueError(f"model.bridge.mode must be one of {', '.join(MODES)}, got '{b.mode}'")
        if d.source != "own":
            raise ValueError("model.bridge.decoder.source must be 'own' (the project's small decoder) for kind decoder")
        self.cfg = cfg
        self.mode, self.use_images = b.mode, b.use_images
        self.image, self.tower_frozen = build_tower(cfg)
        if self.tower_frozen:
            self.image.requires_grad_(False)
        W = d.width
        self.token_embedding = nn.Embedding(cfg.text.vocab_size, W)
        self.positional_embedding = nn.Parameter(torch.randn(d.max_positions, W) * 0.01)
        self.blocks = nn.ModuleList(Block(W, d.heads, d.mlp_ratio) for _ in range(d.layers))
        self.ln_final = nn.LayerNorm(W)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        tower_w = self.image.width
        if b.mode == "unified":
            self.bridge = UnifiedBridge(tower_w, self.image.num_prefix_tokens, W, layer=b.layer, tokens=b.tokens)
            self.xattn = nn.ModuleDict()
        else:
            if b.xattn_every < 1:
                raise ValueError(f"model.bridge.xattn_every must be >= 1, got {b.xattn_every}")
            self.bridge = MultiLayerTaps(tower_w, W, b.taps)
            self.xattn = nn.ModuleDict(
                {str(i): GatedCrossAttention(W, d.heads, W, d.mlp_ratio) for i in range(0, d.layers, b.xattn_every)}
            )

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    def train(self, mode: bool = True) -> VisionLanguageDecoder:
        super().train(mode)
        if self.tower_frozen:
            self.image.eval()
        return self

    def visual_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The bridge's input: tower features (B, N, D_tower) or (B, N, k * D_tower); no gradient into a frozen tower."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.tower_frozen):
            return self.bridge.features(self.image, pixels)

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, D_decoder): the bridge's output (unified: prepended tokens; xattn: cross-attention context)."""
        return self.bridge(self.visual_features(pixels))

    def hidden(self, input_ids: torch.Tensor, visual: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """Final hidden states (B, T, W) at the caption positions (after any visual tokens), and the visual-token count."""
        x = self.token_embedding(input_ids)  # (B, T, W)
        n_vis = 0
        if visual is not None and self.mode == "unified":
            n_vis = visual.shape[1]
            x = torch.cat([visual.to(x.dtype), x], dim=1)  # (B, N + T, W)
        L = x.shape[1]
        if L > self.positional_embedding.shape[0]:
            raise ValueError(
                f"decoder sequence of {L} positions ({n_vis} visual + {L - n_vis} text) exceeds "
                f"model.bridge.decoder.max_positions {self.positional_embedding.shape[0]}; raise it"
            )
        x = x + self.positional_embedding[:L]
        for i, blk in enumerate(self.blocks):
            if visual is not None and str(i) in self.xattn:
                x = self.xattn[str(i)](x, visual)
            # right padding under a causal mask never reaches a real position, so no padding mask is needed
            x = blk(x, causal=True)
        return self.ln_final(x[:, n_vis:]), n_vis  # (B, T, W)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.token_embedding.weight.t()  # (..., V), head tied to the token embedding

    def forward(self, batch: dict[str, torch.Tensor]) -> DecoderLMOutput:
        ids = batch["input_ids"]
        visual = self.visual_tokens(batch["pixels"]) if self.use_images else None
        h, n_vis = self.hidden(ids, visual)
        targets = next_token_targets(ids)  # (B, T-1)
        keep = targets != -100
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(targets)[keep]  # (P,)
        return DecoderLMOutput(
            lm_logits=self.logits(h[:, :-1][keep]),  # (P, V): only positions with a real next token
            lm_targets=targets[keep],
            lm_rows=rows,
            num_captions=ids.shape[0],
            num_visual_tokens=n_vis,
        )

    @torch.no_grad()
    def caption_loss(self, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        """Summed next-token negative log-likelihood (no smoothing) over caption tokens, and the token count."""
        out = self(batch)
        nll = F.cross_entropy(out.lm_logits.float(), out.lm_targets, reduction="sum")
        return float(nll), int(out.lm_targets.numel())

    def bridge_state(self) -> dict[str, torch.Tensor]:
        """The bridge's tensors (projector / taps + gated cross-attention), exported beside the tower."""
        sd = {f"bridge.{k}": v for k, v in self.bridge.state_dict().items()}
        sd.update({f"xattn.{k}": v for k, v in self.xattn.state_dict().items()})
        return sd
