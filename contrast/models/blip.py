"""BLIP's multimodal mixture of encoder-decoder: one text transformer used three ways over a timm image tower.

References: Li et al., "BLIP: Bootstrapping Language-Image Pre-training for Unified Vision-Language Understanding
and Generation", 2022 (unimodal encoder for ITC, image-grounded encoder for ITM with hard negatives, image-grounded
decoder for LM; the decoder shares all but its self-attention with the encoder). Momentum distillation: Li et al.,
"Align before Fuse: Vision and Language Representation Learning with Momentum Distillation" (ALBEF), 2021.

The text transformer reads open_clip BPE ids. Their start-of-text token is replaced here by one of three extra
tokens appended to the vocabulary -- [CLS] (unimodal encoder), [ENC] (image-grounded encoder), [DEC] (decoder) --
so the text tower's vocabulary is ``model.text.vocab_size + 3``.

Cross-process pieces come in as every model's ``comm`` (a gather and this rank); the model never touches
``torch.distributed``. With a gather, hard negatives for ITM come from the global batch: every rank builds
the same global similarity matrix, draws from it with an identically seeded generator, and keeps its own rows, so the
draw equals the single-process draw on the concatenated batch.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from contrast.config import BlipModelConfig, TextTowerConfig
from contrast.layers import MLP, Attention
from contrast.models.lm import packed_lm_output, trim_padding
from contrast.models.outputs import ITMOutput, Model, ModelOutput, TeacherFeatures, clamped_scale, unit
from contrast.objectives import hard_negative_indices
from contrast.tokenizer import text_padding_mask
from contrast.towers import ImageTower

N_SPECIAL = 3  # [CLS], [ENC], [DEC]


class BlipTextLayer(nn.Module):
    """Pre-LN layer: self-attention (an encoder one and a decoder one), cross-attention to image tokens, MLP.

    The encoder modes use ``attn``; the decoder uses ``dec_attn`` with its own LayerNorm. Cross-attention and the
    MLP are shared by both, as in BLIP.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, context_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.dec_ln_1 = nn.LayerNorm(dim)
        self.dec_attn = Attention(dim, heads)
        self.ln_x = nn.LayerNorm(dim)
        self.xattn = Attention(dim, heads, context_dim=context_dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, decode: bool, context: torch.Tensor | None
    ) -> torch.Tensor:
        if decode:
            x = x + self.dec_attn(self.dec_ln_1(x), mask=mask)
        else:
            x = x + self.attn(self.ln_1(x), mask=mask)
        if context is not None:
            x = x + self.xattn(self.ln_x(x), context=context)
        return x + self.mlp(self.ln_2(x))


class BlipTextModel(nn.Module):
    """The shared text transformer. ``forward(ids, mode, image_tokens)`` with mode ``cls`` | ``enc`` | ``dec``."""

    MODES = ("cls", "enc", "dec")

    def __init__(self, cfg: TextTowerConfig, context_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(self.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.layers = nn.ModuleList(
            BlipTextLayer(cfg.width, cfg.heads, cfg.mlp_ratio, context_dim) for _ in range(cfg.layers)
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        self.grad_checkpointing = cfg.grad_checkpointing
        self._init()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _init(self) -> None:
        w, L = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (w**-0.5) * ((2 * L) ** -0.5)
        for layer in self.layers:
            for attn in (layer.attn, layer.dec_attn, layer.xattn):
                nn.init.normal_(attn.proj.weight, std=proj_std)
            nn.init.normal_(layer.mlp.fc2.weight, std=proj_std)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size + N_SPECIAL

    @property
    def width(self) -> int:
        return self.cfg.width

    def mode_token(self, mode: str) -> int:
        if mode not in self.MODES:
            raise ValueError(f"text mode must be one of {self.MODES}, got '{mode}'")
        return self.cfg.vocab_size + self.MODES.index(mode)

    def forward(
        self,
        input_ids: torch.Tensor,
        mode: str,
        image_tokens: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, D). ``input_ids`` are tokenizer ids; position 0 becomes the mode's token.

        ``valid`` (B, T) marks real tokens; by default everything up to the end-of-text token.
        """
        B, T = input_ids.shape
        if T > self.cfg.context_length:
            raise ValueError(f"text of {T} tokens exceeds the context length {self.cfg.context_length}")
        if mode != "cls" and image_tokens is None:
            raise ValueError(f"text mode '{mode}' is image-grounded and needs image tokens")
        if valid is None:
            valid = text_padding_mask(input_ids)
        ids = input_ids.clone()
        ids[:, 0] = self.mode_token(mode)
        x = self.token_embedding(ids) + self.positional_embedding[:T]  # (B, T, D)
        decode = mode == "dec"
        mask = valid[:, None, None, :]  # (B, 1, 1, T) keys that may be attended
        if decode:
            causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
            mask = mask & causal[None, None]  # (B, 1, T, T)
        context = image_tokens if mode != "cls" else None
        for layer in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, decode, context, use_reentrant=False)
            else:
                x = layer(x, mask, decode, context)
        return self.ln_final(x)


def _full_length(ids: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) ids: a training batch trimmed to its longest caption padded back with the tokenizer's pad id 0,
    so that every rank gathers the same shape."""
    return F.pad(ids, (0, length - ids.shape[1]))


class BlipModel(Model):
    """Image tower + shared text transformer + ITC projections, ITM head and LM head (tied to the embedding)."""

    capabilities = frozenset({"embed", "itm", "caption"})

    def __init__(self, cfg: BlipModelConfig, image: ImageTower):
        super().__init__()
        self.cfg = cfg
        self.image = image
        self.text = BlipTextModel(cfg.text, context_dim=self.image.width)
        self.text_proj = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.text_proj.weight, std=cfg.text.width**-0.5)
        self.itm_head = nn.Linear(cfg.text.width, 2)
        self.lm_bias = nn.Parameter(torch.zeros(self.text.vocab_size))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # hard-negative draws so far
        if cfg.image.locked:
            self.image.lock(cfg.image.unlocked_groups)
        bc = cfg.blip
        self.teacher: nn.ModuleDict | None = None
        if bc.momentum_distill:
            self.teacher = nn.ModuleDict(
                {"image": copy.deepcopy(self.image), "text": copy.deepcopy(self.text),
                 "text_proj": copy.deepcopy(self.text_proj)}
            )
            self.teacher.requires_grad_(False)
            q = bc.queue_size
            self.register_buffer("image_queue", F.normalize(torch.randn(q, cfg.embed_dim), dim=1))
            self.register_buffer("text_queue", F.normalize(torch.randn(q, cfg.embed_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ unimodal encoders

    @property
    def image_tower(self) -> ImageTower:
        return self.image

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if any(p.requires_grad for p in self.image.parameters()):  # a locked tower keeps nothing for backward
            self.image.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    @property
    def special_token_ids(self) -> list[int]:
        return list(range(self.cfg.text.vocab_size, self.text.vocab_size))

    @property
    def context_length(self) -> int:
        return self.cfg.text.context_length

    def scale(self) -> torch.Tensor:
        return clamped_scale(self.logit_scale, self.cfg.max_logit_scale)

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image.forward_tokens(pixels)  # (B, N, Dv)

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return unit(self.image.embed(pixels), normalize)

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return unit(self.text_proj(self.text(input_ids, "cls")[:, 0]), normalize)

    # ------------------------------------------------------------------ heads

    def itm_logits(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Match / no-match logits (B, 2) from the image-grounded encoder's [ENC] output."""
        return self.itm_head(self.text(input_ids, "enc", image_tokens)[:, 0])

    def itm_score(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Match score (B,) for retrieval re-ranking: the match logit minus the no-match logit."""
        logits = self.itm_logits(input_ids, self.image_tokens(pixels))  # (B, 2)
        return logits[:, 1] - logits[:, 0]

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (..., V) from decoder states (..., D); the output matrix is the token embedding."""
        return F.linear(hidden, self.text.token_embedding.weight, self.lm_bias)

    def lm_logits(
        self, input_ids: torch.Tensor, image_tokens: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits (B, T, V) of the image-grounded decoder; position t predicts token t + 1."""
        return self.lm_head(self.text(input_ids, "dec", image_tokens, valid=valid))

    # ------------------------------------------------------------------ training forward

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.cfg.blip.momentum
        for name in ("image", "text", "text_proj"):
            for pt, ps in zip(self.teacher[name].parameters(), getattr(self, name).parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)

    @torch.no_grad()
    def _teacher_features(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> TeacherFeatures:
        """Teacher features of the global batch followed by the queue, (N + Q, E) each; enqueues while training."""
        t = self.teacher
        if self.training:
            self._momentum_update()
        img_m = F.normalize(t["image"].embed(pixels), dim=-1)
        txt_m = F.normalize(t["text_proj"](t["text"](input_ids, "cls")[:, 0]), dim=-1)
        img_m, txt_m = self.comm.all(img_m).detach(), self.comm.all(txt_m).detach()  # (N, E)
        image_all = torch.cat([img_m, self.image_queue.clone()])
        text_all = torch.cat([txt_m, self.text_queue.clone()])
        if self.training:
            n, q = img_m.shape[0], self.image_queue.shape[0]
            if q % n:
                raise ValueError(
                    f"model.blip.queue_size {q} is not a multiple of the global batch size {n}; pick a multiple"
                )
            ptr = int(self.queue_ptr)
            self.image_queue[ptr : ptr + n] = img_m
            self.text_queue[ptr : ptr + n] = txt_m
            self.queue_ptr.fill_((ptr + n) % q)
        return TeacherFeatures(image_all, text_all)

    def _negatives_generator(self, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.cfg.blip.negatives_seed * 1_000_003 + int(self.draws))
        if self.training:
            self.draws += 1
        return g

    def _hard_negatives(self, image_emb, text_emb, ids, scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each image's hard-negative caption and each caption's hard-negative image, as indices into the global
        batch (same draw on every rank; this rank keeps its rows), and the global ids (N, T)."""
        B = ids.shape[0]
        all_img, all_txt = self.comm.all(image_emb.detach()), self.comm.all(text_emb.detach())  # (N, E)
        all_ids = self.comm.all(_full_length(ids, self.text.cfg.context_length))  # (N, L): ranks trim differently
        N = all_ids.shape[0]
        sim = scale.detach() * all_img @ all_txt.t()  # (N, N) image -> text
        same_text = (all_ids[:, None, :] == all_ids[None, :, :]).all(dim=-1)  # (N, N) identical captions
        gen = self._negatives_generator(sim.device)
        pos = torch.arange(N, device=sim.device)
        neg_txt = hard_negative_indices(sim, pos, exclude=same_text, generator=gen)  # (N,) for each image
        neg_img = hard_negative_indices(sim.t(), pos, exclude=same_text, generator=gen)  # (N,) for each text
        rows = slice(self.comm.rank * B, (self.comm.rank + 1) * B)
        return neg_txt[rows], neg_img[rows], all_ids

    def _itm(self, img_tokens, image_emb, text_emb, ids, scale) -> ITMOutput:
        all_tokens = self.comm.all(img_tokens)  # (N, Ni, Dv), gradients flow back to the owning rank
        with torch.no_grad():
            neg_txt, neg_img, all_ids = self._hard_negatives(image_emb, text_emb, ids, scale)
        full = _full_length(ids, all_ids.shape[1])  # (B, L)
        itm_ids = trim_padding(torch.cat([full, full, all_ids[neg_txt]]))  # (3B, T'): padding is masked, trimmed
        itm_tokens = torch.cat([img_tokens, all_tokens[neg_img], img_tokens])  # (3B, Ni, Dv)
        labels = torch.cat([ids.new_ones(ids.shape[0]), ids.new_zeros(2 * ids.shape[0])])
        return ITMOutput(self.itm_logits(itm_ids, itm_tokens), labels, neg_txt, neg_img)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        pixels, ids = batch["pixels"], batch["input_ids"]
        img_tokens = self.image_tokens(pixels)  # (B, Ni, Dv)
        image_emb = unit(self.image.proj(self.image.pool(img_tokens)))
        valid = text_padding_mask(ids)
        text_emb = unit(self.text_proj(self.text(ids, "cls", valid=valid)[:, 0]))
        scale = self.scale()
        teacher = self._teacher_features(pixels, ids) if self.teacher is not None else None
        itm = self._itm(img_tokens, image_emb, text_emb, ids, scale)
        # captioning: trim padding beyond the batch's longest caption; logits only where a next token exists
        T = int(valid.sum(dim=1).max())
        hidden = self.text(ids[:, :T], "dec", img_tokens, valid=valid[:, :T])  # (B, T, D)
        lm = packed_lm_output(hidden, ids[:, :T], self.lm_head)
        return ModelOutput(image_emb=image_emb, text_emb=text_emb, logit_scale=scale, teacher=teacher, itm=itm, lm=lm)
