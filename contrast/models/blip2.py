"""BLIP-2 on any image tower: stage 1 (Q-Former against a frozen image tower: ITC, ITM, ITG) and stage 2 (Q-Former
outputs as soft visual prompts to a frozen causal language model).

Reference: Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large
Language Models", ICML 2023.

* Stage 1 (:class:`Blip2Stage1`): one Q-Former pass per objective, each under its own mask (see
  :mod:`contrast.models.qformer`). ITC scores an (image, text) pair by the best-matching query; ITM classifies
  positives and BLIP-style hard negatives (drawn from the ITC similarities) with a linear head averaged over the
  query outputs; ITG predicts the caption with [DEC] in place of the first text token.
* Stage 2 (:class:`Blip2Stage2`): queries -> linear projection to the decoder's embedding width -> prepended to the
  caption's input embeddings of a frozen decoder; only the Q-Former and the projection train, on the LM loss.
* :class:`CaptionLM` trains a decoder on captions alone: the "no visual prompt" reference of stage 2, and a way to
  make a small frozen decoder for it.

Constructors take built parts: the frozen image tower, the Q-Former, the decoder. Where they come from (a fresh
config, a trained run, saved features, a Hugging Face model folder) is decided in :mod:`contrast.runs`.
The frozen image tower runs under ``no_grad`` in eval mode. A batch may carry ``image_feats`` (B, N, width), the
tower's ``forward_tokens`` output saved by ``contrast features extract``; then the tower is not run at all.
"""

from __future__ import annotations

import torch
from torch import nn

from contrast.config import Blip2ModelConfig, ModelConfig
from contrast.decoders import Codec, LanguageModel, PromptTokenizer
from contrast.models.decoding import DecoderModel, check_trainable, null_prompt
from contrast.models.lm import packed_targets, trim_padding
from contrast.models.outputs import ITMOutput, LMOutput, Model, ModelOutput, clamped_scale, unit
from contrast.models.qformer import QFormer
from contrast.objectives import hard_negative_indices, similarity
from contrast.tokenizer import text_padding_mask
from contrast.towers import ImageTower


def freeze(tower: ImageTower) -> ImageTower:
    tower.requires_grad_(False)
    return tower.eval()


# --------------------------------------------------------------------------------------------------- stage 1


class Blip2Stage1(Model):
    """Q-Former trained against a frozen image tower with ITC, ITM and ITG."""

    capabilities = frozenset({"embed", "itm"})

    def __init__(self, cfg: Blip2ModelConfig, tower: ImageTower):
        super().__init__()
        self.cfg = cfg
        self.tower = freeze(tower)
        q = cfg.qformer
        self.qformer = QFormer(q, vision_width=self.tower.width, vocab_size=cfg.text.vocab_size,
                               context_length=cfg.text.context_length)
        if q.grad_checkpointing:
            self.qformer.set_grad_checkpointing(True)
        self.vision_proj = nn.Linear(q.width, cfg.embed_dim)
        self.text_proj = nn.Linear(q.width, cfg.embed_dim)
        self.itm_head = nn.Linear(q.width, 2)
        # ITG head as BERT's: transform (dense, GELU, LayerNorm), then the word embedding (tied) plus a bias
        self.lm_transform = nn.Sequential(nn.Linear(q.width, q.width), nn.GELU(),
                                          nn.LayerNorm(q.width, eps=q.layer_norm_eps))
        self.lm_bias = nn.Parameter(torch.zeros(cfg.text.vocab_size + 1))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    @property
    def image_tower(self) -> ImageTower:
        return self.tower

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.qformer.set_grad_checkpointing(enable)  # the image tower is frozen: nothing of it is kept for backward

    def train(self, mode: bool = True) -> Blip2Stage1:
        super().train(mode)
        self.tower.eval()  # frozen: keeps batch-norm statistics and disables dropout
        return self

    def scale(self) -> torch.Tensor:
        return clamped_scale(self.logit_scale, self.cfg.max_logit_scale)

    def image_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, N, width): the batch's saved features, or the frozen tower's tokens for its pixels."""
        return _image_features(self.tower, batch)

    def encode_image(self, pixels_or_feats: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, Q, E) query embeddings from pixels (B, 3, H, W) or tower features (B, N, width)."""
        feats = self.image_features(_as_batch(pixels_or_feats))
        return unit(self.vision_proj(self.qformer.encode_queries(feats)), normalize)

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return unit(self.text_proj(self.qformer.encode_text(input_ids)[:, 0]), normalize)  # (B, E)

    def similarity(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """(B_img, B_txt) image-text similarity: the best query for each pair."""
        return similarity(image_emb, text_emb)

    def lm_logits_of(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_transform(hidden) @ self.qformer.word_embeddings.weight.t() + self.lm_bias  # (..., V+1)

    def itm_logits(self, feats: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 2) match / no-match logits: the head over each query output, averaged over queries."""
        Q = self.qformer.num_queries
        h = self.qformer(feats, input_ids, "itm")  # (B, Q+T, D)
        return self.itm_head(h[:, :Q]).mean(dim=1)

    @torch.no_grad()
    def itm_score(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) match scores (match minus no-match logit) for re-ranking; pixels or tower features (B, N, width)."""
        logits = self.itm_logits(self.image_features(_as_batch(pixels)), trim_padding(input_ids))
        return logits[:, 1] - logits[:, 0]

    def _itm(self, feats, ids, image_emb, text_emb, scale) -> ITMOutput:
        """ITM with one hard negative text per image and one hard negative image per text."""
        B = ids.shape[0]
        with torch.no_grad():
            sim = scale * similarity(image_emb, text_emb)  # (B, B)
            same = (ids[:, None, :] == ids[None, :, :]).all(dim=-1)  # identical captions are not negatives
            pos = torch.arange(B, device=ids.device)
            neg_txt = hard_negative_indices(sim, pos, exclude=same)
            neg_img = hard_negative_indices(sim.t(), pos, exclude=same)
        itm_feats = torch.cat([feats, feats, feats[neg_img]], dim=0)  # (3B, N, width)
        itm_ids = torch.cat([ids, ids[neg_txt], ids], dim=0)  # (3B, T)
        labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(ids.device)
        return ITMOutput(self.itm_logits(itm_feats, itm_ids), labels, neg_txt, neg_img)

    def _itg(self, feats, ids, real) -> LMOutput:
        """ITG: [DEC] replaces the first token; text is causal and sees every query."""
        Q = self.qformer.num_queries
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.qformer.dec_token_id
        g = self.qformer(feats, dec_ids, "itg", text_mask=real)
        where, targets, rows = packed_targets(ids)
        return LMOutput(self.lm_logits_of(g[:, Q:-1][where]), targets, rows, ids.shape[0])  # (P, V+1)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        feats = self.image_features(batch)  # (B, N, width)
        ids = trim_padding(batch["input_ids"])  # (B, T')
        real = text_padding_mask(ids)
        Q = self.qformer.num_queries
        h = self.qformer(feats, ids, "itc", text_mask=real)  # (B, Q+T, D): queries and text, neither sees the other
        image_emb = unit(self.vision_proj(h[:, :Q]))  # (B, Q, E)
        text_emb = unit(self.text_proj(h[:, Q]))  # (B, E)
        scale = self.scale()
        itm = self._itm(feats, ids, image_emb, text_emb, scale)
        return ModelOutput(image_emb=image_emb, text_emb=text_emb, logit_scale=scale, itm=itm,
                           lm=self._itg(feats, ids, real))


def _as_batch(pixels_or_feats: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pixels": pixels_or_feats} if pixels_or_feats.ndim == 4 else {"image_feats": pixels_or_feats}


def _image_features(tower: ImageTower, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "image_feats" in batch:
        return batch["image_feats"].float()
    with torch.no_grad():
        return tower.forward_tokens(batch["pixels"])


# --------------------------------------------------------------------------------------------------- stage 2


class CaptionLM(DecoderModel):
    """A language model trained on captions alone (model kind ``caption_lm``): a way to make a small frozen decoder
    for stage 2."""

    capabilities = frozenset({"decoder"})

    def __init__(self, cfg: ModelConfig, lm: LanguageModel, codec: Codec):
        super().__init__()
        self.cfg, self.lm, self.codec = cfg, lm, codec

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.lm.set_grad_checkpointing(enable)

    def text_tokenizer(self) -> PromptTokenizer:
        d = self.cfg.blip2.decoder
        return PromptTokenizer(self.codec, d.instruction, d.chat, 0, "none", d.max_length)


class Blip2Stage2(DecoderModel):
    """Q-Former queries projected to the LM's embedding width: a soft visual prompt before the templated text; the
    Q-Former and the projection train (stage ``align``), the LM too under ``finetune``."""

    capabilities = frozenset({"decoder"})

    def __init__(self, cfg: Blip2ModelConfig, tower: ImageTower, qformer: QFormer, lm: LanguageModel, codec: Codec,
                 lm_pretrained: bool = False):
        super().__init__()
        self.cfg = cfg
        self.tower = freeze(tower)
        self.qformer = qformer
        self.lm, self.codec = lm, codec
        self.proj = nn.Linear(self.qformer.width, lm.width)
        self.use_images = cfg.blip2.use_images
        if not self.use_images:
            std = float(lm.embed(torch.arange(min(lm.vocab_size, 512))).detach().float().std())
            self.null = null_prompt(self.qformer.num_queries, lm.width, std)
        self.lm_frozen = self.set_stage(cfg.blip2.decoder, fresh_lm=False)  # BLIP-2 keeps its LM frozen by default
        if not self.use_images:  # the reference reads no image: the Q-Former and projection get no gradient
            self.qformer.requires_grad_(False)
            self.proj.requires_grad_(False)
        self.rebuilt_prefixes = tuple(p for p, rebuilt in (
            ("lm.", lm_pretrained and self.lm_frozen),
            ("tower.", bool(cfg.blip2.stage1 or cfg.blip2.tower))) if rebuilt)
        check_trainable(self, f"model.blip2.decoder.stage {self.stage}")

    @property
    def image_tower(self) -> ImageTower:
        return self.tower

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.qformer.set_grad_checkpointing(enable)
        self.lm.set_grad_checkpointing(enable)  # frozen or not, the gradient of the prompt passes through it

    def train(self, mode: bool = True) -> Blip2Stage2:
        super().train(mode)
        self.tower.eval()
        if self.lm_frozen:
            self.lm.eval()
        return self

    def text_tokenizer(self) -> PromptTokenizer:
        d = self.cfg.blip2.decoder
        return PromptTokenizer(self.codec, d.instruction, d.chat, self.qformer.num_queries, "prefix", d.max_length)

    def image_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _image_features(self.tower, batch)

    def visual_prompt(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, Q, W) soft prompt from image features (B, N, width)."""
        return self.proj(self.qformer.encode_queries(feats))

    def visual_input(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.use_images:
            return self.visual_prompt(self.image_features(batch))
        return self.null[None].expand(batch["input_ids"].shape[0], -1, -1)


__all__ = ["Blip2Stage1", "Blip2Stage2", "CaptionLM", "freeze"]
