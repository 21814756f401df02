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

import torch
from torch import nn

from contrast.bridges import GatedCrossAttention, MultiLayerTaps, UnifiedBridge
from contrast.config import DecoderModelConfig
from contrast.models.lm import CausalLM, packed_lm_output
from contrast.models.outputs import Model, ModelOutput
from contrast.towers import ImageTower

MODES = ("unified", "xattn")


class VisionLanguageDecoder(Model):
    """The project's causal LM plus an image bridge; the tower comes built (fresh, or loaded by contrast.runs)."""

    capabilities = frozenset({"bridge"})

    def __init__(self, cfg: DecoderModelConfig, tower: ImageTower, tower_frozen: bool = False):
        super().__init__()
        b, d = cfg.bridge, cfg.bridge.decoder
        if b.mode not in MODES:
            raise ValueError(f"model.bridge.mode must be one of {', '.join(MODES)}, got '{b.mode}'")
        if d.source != "own":
            raise ValueError("model.bridge.decoder.source must be 'own' (the project's small decoder) for kind decoder")
        self.cfg = cfg
        self.mode, self.use_images = b.mode, b.use_images
        self.image, self.tower_frozen = tower, tower_frozen
        if self.tower_frozen:
            self.image.requires_grad_(False)
        self.lm = CausalLM(d, cfg.text.vocab_size)
        W, tower_w = d.width, self.image.width
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
    def image_tower(self) -> ImageTower:
        return self.image

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not self.tower_frozen:
            self.image.set_grad_checkpointing(enable)
        self.lm.set_grad_checkpointing(enable)

    @property
    def width(self) -> int:
        return self.lm.width

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
        x = self.lm.embed_tokens(input_ids)  # (B, T, W)
        n_vis, hook = 0, None
        if visual is not None and self.mode == "unified":
            n_vis = visual.shape[1]
            x = torch.cat([visual.to(x.dtype), x], dim=1)  # (B, N + T, W)
        elif visual is not None:
            def hook(i: int, h: torch.Tensor) -> torch.Tensor:
                return self.xattn[str(i)](h, visual) if str(i) in self.xattn else h
        return self.lm.hidden(x, hook)[:, n_vis:], n_vis  # (B, T, W)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        ids = batch["input_ids"]
        visual = self.visual_tokens(batch["pixels"]) if self.use_images else None
        h, _ = self.hidden(ids, visual)
        return ModelOutput(lm=packed_lm_output(h, ids, self.lm.logits))

    def bridge_state(self) -> dict[str, torch.Tensor]:
        """The bridge's tensors (projector / taps + gated cross-attention), exported beside the tower."""
        sd = {f"bridge.{k}": v for k, v in self.bridge.state_dict().items()}
        sd.update({f"xattn.{k}": v for k, v in self.xattn.state_dict().items()})
        return sd
