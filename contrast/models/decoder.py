"""A causal language model that consumes an (exported) vision tower through either bridge (model kind ``decoder``).

- ``unified``: visual tokens from :class:`~contrast.bridges.UnifiedBridge` are written at the image's placeholder
  positions of the prompt and the LM runs causally over both (LLaVA: Liu et al., "Visual Instruction Tuning", 2023).
- ``xattn``: the text alone runs through the LM; gated cross-attention blocks
  (:class:`~contrast.bridges.GatedCrossAttention`, tanh gates from zero as in Flamingo, Alayrac et al., 2022) read
  multi-layer tower features before chosen LM layers, at the text positions from the image on (Llama Team, "The Llama
  3 Herd of Models", 2024).

The LM is any :class:`~contrast.decoders.base.LanguageModel` (the project's small one or a Hugging Face causal LM);
nothing here asks which. With ``use_images: false`` a learned prompt without image content replaces the image: the
reference the visual bridges must beat. The loss is the ``lm`` term on the answer's tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from contrast.bridges import GatedCrossAttention, MultiLayerTaps, UnifiedBridge, UnifiedProjector
from contrast.config import DecoderModelConfig
from contrast.data.tiles import supported_aspect_ratios, tiled_features
from contrast.decoders import Codec, LanguageModel, LayerHook, PromptTokenizer
from contrast.models.decoding import DecoderModel, check_trainable, null_prompt
from contrast.towers import ImageTower

MODES = ("unified", "xattn")


def xattn_layers(layers: list[int], every: int, num_layers: int) -> list[int]:
    """The LM layers that get a gated cross-attention block before them: ``layers`` (negative from the end), or every
    ``every``-th from layer 0."""
    if layers:
        picked = sorted({i % num_layers if -num_layers <= i < num_layers else -1 for i in layers})
        if picked and picked[0] < 0:
            raise ValueError(f"model.bridge.xattn_layers {layers} names a layer outside the LM's {num_layers}")
        return picked
    if every < 1:
        raise ValueError(f"model.bridge.xattn_every must be >= 1, got {every}")
    return list(range(0, num_layers, every))


class VisionLanguageDecoder(DecoderModel):
    """Tower + bridge + LM; the tower and the LM come built (fresh, or loaded by contrast.runs)."""

    capabilities = frozenset({"bridge", "decoder"})

    def __init__(self, cfg: DecoderModelConfig, tower: ImageTower, lm: LanguageModel, codec: Codec,
                 tower_frozen: bool = False, lm_pretrained: bool = False):
        super().__init__()
        b, d = cfg.bridge, cfg.bridge.decoder
        if b.mode not in MODES:
            raise ValueError(f"model.bridge.mode must be one of {', '.join(MODES)}, got '{b.mode}'")
        self.cfg, self.mode, self.use_images, self.splices = cfg, b.mode, b.use_images, b.mode == "unified"
        self.image, self.lm, self.codec = tower, lm, codec
        self.tower_frozen = tower_frozen
        W = lm.width
        if b.mode == "unified":
            width = self._widths([b.layer])[0]
            self.bridge = UnifiedBridge(width, tower.num_prefix_tokens, W, b.layer, b.tokens, b.projector,
                                        b.pixel_shuffle, tower.num_register_tokens)
            self.xattn = nn.ModuleDict()
        else:
            self.bridge = MultiLayerTaps(self._widths(list(b.taps)), W, b.taps)
            at = xattn_layers(list(b.xattn_layers), b.xattn_every, lm.num_layers)
            self.xattn = nn.ModuleDict({str(i): GatedCrossAttention(W, lm.num_heads, W, b.xattn_mlp_ratio) for i in at})
        # the tower's image embedding as one more token (the vector its image-text training aligned to text)
        self.embedding_projector = UnifiedProjector(tower.embed_dim, W) if b.embedding_token else None
        self.num_visual_tokens = self._count_visual_tokens()  # per image, or per tile of a tiled one
        if b.max_num_tiles < 1:
            raise ValueError(f"model.bridge.max_num_tiles must be >= 1, got {b.max_num_tiles}")
        self.tiles = b.max_num_tiles > 1
        if self.tiles:
            if self.splices:
                raise ValueError("model.bridge.max_num_tiles is for the cross-attention bridge (mode xattn); the unified "
                                 "bridge reads one image per sample")
            if b.embedding_token:
                raise ValueError("model.bridge.embedding_token reads one embedding per image; tiled images "
                                 "(max_num_tiles > 1) have one per tile: set one of them off")
            self.tile_embed = nn.Embedding((len(supported_aspect_ratios(b.max_num_tiles)) + 1) * b.max_num_tiles, W)
            nn.init.zeros_(self.tile_embed.weight)
        if not self.use_images:
            std = float(lm.embed(torch.arange(min(lm.vocab_size, 512))).detach().float().std())
            self.null = null_prompt(self.num_visual_tokens, W, std)
        self.lm_frozen = self.set_stage(d, fresh_lm=not lm_pretrained)
        self._freeze(cfg)
        self.rebuilt_prefixes = tuple(p for p, rebuilt in (
            ("lm.", lm_pretrained and self.lm_frozen),
            ("image.", tower_frozen and not cfg.image.unlocked_groups)) if rebuilt)
        check_trainable(self, f"model.bridge.decoder.stage {self.stage}")

    def _widths(self, layers: list[int]) -> list[int]:
        """The feature width of each tower block in ``layers`` (a ViT's are its width, a CNN's stages differ)."""
        if not layers:
            return []
        S = self.image.cfg.image_size
        was = self.image.training
        self.image.eval()
        with torch.no_grad():
            widths = [int(t.shape[-1]) for t in self.image.forward_intermediates(torch.zeros(1, 3, S, S), layers)]
        self.image.train(was)
        return widths

    def _count_visual_tokens(self) -> int:
        S = self.image.cfg.image_size
        was = self.image.training
        self.image.eval()
        with torch.no_grad():
            n = self.bridge(self.bridge.features(self.image, torch.zeros(1, 3, S, S))).shape[1]
        self.image.train(was)
        return int(n) + (self.embedding_projector is not None)

    def _freeze(self, cfg: DecoderModelConfig) -> None:
        if not self.use_images:  # the reference reads no image: nothing on the image side gets a gradient (which
            # DDP takes for an error): only the learned prompt, the cross-attention blocks and the stage's LM train
            for m in (self.image, self.bridge, self.embedding_projector, getattr(self, "tile_embed", None)):
                if m is not None:
                    m.requires_grad_(False)
            return
        if self.tower_frozen:
            self.image.requires_grad_(False)
            if cfg.image.unlocked_groups:
                self.image.lock(cfg.image.unlocked_groups)
        self._freeze_unread_tower_parts()

    def _freeze_unread_tower_parts(self) -> None:
        """Tower parameters the bridge never reads (blocks after the tapped ones, final norm, head, projection unless
        the embedding token reads them) are frozen: they would get no gradient, which DDP takes for an error and AdamW
        would still decay. What is read is found by a gradient through :meth:`visual_tokens`, the path steps take."""
        trainable = [p for p in self.image.parameters() if p.requires_grad]
        if not trainable:
            return
        S = self.image.cfg.image_size
        was = self.image.training
        self.image.eval()
        with torch.enable_grad():  # a model may be built under no_grad
            read = self.visual_tokens(torch.zeros(1, 3, S, S)).sum()
            grads = torch.autograd.grad(read, trainable, allow_unused=True)
        self.image.train(was)
        for p, g in zip(trainable, grads):
            if g is None:
                p.requires_grad_(False)

    @property
    def image_tower(self) -> ImageTower:
        return self.image

    @property
    def width(self) -> int:
        return self.lm.width

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not self.tower_frozen:
            self.image.set_grad_checkpointing(enable)
        self.lm.set_grad_checkpointing(enable)  # frozen or not, the answer's gradient passes through it

    def train(self, mode: bool = True) -> VisionLanguageDecoder:
        super().train(mode)
        if self.tower_frozen and not self.cfg.image.unlocked_groups:
            self.image.eval()
        if self.lm_frozen:
            self.lm.eval()  # frozen (align, or adapters only): no dropout
        return self

    def text_tokenizer(self) -> PromptTokenizer:
        d = self.cfg.bridge.decoder
        templated = self.codec.has_template and d.chat != "never"
        at = "none" if not self.splices else ("prompt" if d.instruction or templated else "prefix")  # no prompt text:
        # the visual tokens go first, then the caption
        return PromptTokenizer(self.codec, d.instruction, d.chat, self.num_visual_tokens, at, d.max_length)

    def _tower_grad(self) -> bool:
        """Whether the tower's forward records gradients: not for a frozen tower, nor under no_grad."""
        return torch.is_grad_enabled() and not (self.tower_frozen and not self.cfg.image.unlocked_groups)

    def visual_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The bridge's input: tower features (B, N, D_tower) or (B, N, k * D_tower); no gradient into a frozen tower."""
        with torch.set_grad_enabled(self._tower_grad()):
            return self.bridge.features(self.image, pixels)

    def visual_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, N, D_decoder): the bridge's output (unified: visual tokens; xattn: cross-attention context), after the
        projected image embedding when ``embedding_token`` is on (one tower pass gives the taps and the embedding)."""
        if self.embedding_projector is None:
            return self.bridge(self.visual_features(pixels))
        with torch.set_grad_enabled(self._tower_grad()):
            taps, final = self.image.forward_intermediates(pixels, self.bridge.layers, final=True)
            emb = self.image.proj(self.image.pool(final))  # (B, E): the tower's image embedding
        tokens = self.bridge(self.bridge.from_taps(taps))
        return torch.cat([self.embedding_projector(emb.to(tokens.dtype))[:, None], tokens], dim=1)

    def visual_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.use_images and self.tiles:
            return self.tiled_context(batch)
        if self.use_images:
            return self.visual_tokens(batch["pixels"])
        B = batch["input_ids"].shape[0]
        return self.null[None].expand(B, -1, -1)

    def context_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not (self.tiles and self.use_images):
            return None
        return batch["tile_mask"].repeat_interleave(self.num_visual_tokens, dim=1)  # (B, T * N)

    def cross_hook(self, context: torch.Tensor, context_mask: torch.Tensor | None, rows: torch.Tensor) -> LayerHook:
        keys = context_mask[:, None, None, :] if context_mask is not None else None  # (B, 1, 1, N): real positions

        def hook(i: int, h: torch.Tensor) -> torch.Tensor:
            blk = self.xattn[str(i)] if str(i) in self.xattn else None
            return h if blk is None else blk(h, context.to(h.dtype), keys, rows[:, -h.shape[1]:])
        return hook

    def tiled_context(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T * N, W): every real tile's context tokens (the tower runs on those only), plus a learned embedding of
        the tile's place in its grid (zero at initialisation), as Mllama conditions tiles on the aspect ratio."""
        mask = batch["tile_mask"]  # (B, T)
        feats, _ = tiled_features(self.visual_features, batch["pixels"], mask)  # (B, T * N, D)
        B, T = mask.shape
        place = batch["aspect_ratio_ids"][:, None] * T + torch.arange(T, device=mask.device)  # (B, T)
        return self.bridge(feats) + self.tile_embed(place).repeat_interleave(self.num_visual_tokens, dim=1)

    def bridge_state(self) -> dict[str, torch.Tensor]:
        """The bridge's tensors (projector / taps + gated cross-attention), exported beside the tower."""
        sd = {f"bridge.{k}": v for k, v in self.bridge.state_dict().items()}
        sd.update({f"xattn.{k}": v for k, v in self.xattn.state_dict().items()})
        if self.embedding_projector is not None:
            sd.update({f"embedding_projector.{k}": v for k, v in self.embedding_projector.state_dict().items()})
        return sd
