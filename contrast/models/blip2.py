"""BLIP-2 on any image tower: stage 1 (Q-Former against a frozen tower: ITC, ITM, ITG) and stage 2 (Q-Former
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

The frozen image tower runs under ``no_grad`` in eval mode. A batch may carry ``image_feats`` (B, N, width), the
tower's ``forward_tokens`` output saved by ``contrast features extract``; then the tower is not run at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contrast.config import DecoderConfig, ModelConfig
from contrast.layers import Transformer
from contrast.models.qformer import QFormer, text_padding_mask
from contrast.objectives import hard_negative_indices
from contrast.towers import ImageTower


@dataclass
class Blip2Output:
    image_emb: torch.Tensor  # (B, Q, E) L2-normalised query embeddings
    text_emb: torch.Tensor  # (B, E) L2-normalised first-token ([CLS] / start-of-text) embedding
    logit_scale: torch.Tensor  # scalar multiplier
    itm_logits: torch.Tensor  # (3B, 2): positives, then (image, hard-negative text), then (hard-negative image, text)
    itm_labels: torch.Tensor  # (3B,) 1 for a match
    lm_logits: torch.Tensor  # (P, V+1) ITG logits at the P text positions that have a next token
    lm_targets: torch.Tensor  # (P,) those next tokens
    lm_rows: torch.Tensor  # (P,) the caption each position belongs to

    @property
    def num_captions(self) -> int:
        return self.text_emb.shape[0]


@dataclass
class DecoderOutput:
    lm_logits: torch.Tensor  # (P, V) logits at the P caption positions that have a next token
    lm_targets: torch.Tensor  # (P,) those next tokens
    lm_rows: torch.Tensor  # (P,) the caption each position belongs to
    num_captions: int


def next_token_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) targets for positions 0..T-2: the following token, -100 where it is padding."""
    real = text_padding_mask(input_ids)[:, 1:]
    return input_ids[:, 1:].masked_fill(~real, -100)


def trim_padding(input_ids: torch.Tensor) -> torch.Tensor:
    """Drop the columns after the batch's longest caption: they are padding everywhere and change no output."""
    keep = int(text_padding_mask(input_ids).sum(dim=1).max())
    return input_ids[:, :keep]  # (B, T')


def packed_targets(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(where, targets, rows)``: a (B, T-1) mask of the positions that have a real next token, those tokens (P,)
    and their caption numbers (P,). Logits are computed at those positions only."""
    tgt = next_token_targets(input_ids)  # (B, T-1)
    where = tgt != -100
    return where, tgt[where], where.nonzero()[:, 0]


def caption_nll(out: DecoderOutput | Blip2Output) -> tuple[float, int]:
    """Summed plain (unsmoothed) next-token negative log-likelihood over a batch and the number of tokens."""
    nll = F.cross_entropy(out.lm_logits.float(), out.lm_targets, reduction="sum")
    return float(nll), int(out.lm_targets.numel())


# --------------------------------------------------------------------------------------------------- frozen parts


def _load_run_model(path: str) -> nn.Module:
    from contrast.api import load  # imported here: contrast.api builds models through this package

    return load(path)[0]


def build_frozen_tower(cfg: ModelConfig) -> ImageTower:
    """The frozen image tower: that of the run in ``model.blip2.tower``, or a fresh ``model.image`` tower."""
    if cfg.blip2.tower:
        from contrast.api import load_config_of

        run_cfg, _ = load_config_of(cfg.blip2.tower)
        theirs, ours = run_cfg.model.image, cfg.image
        for name in ("name", "image_size", "mean", "std"):
            if getattr(theirs, name) != getattr(ours, name):
                raise ValueError(
                    f"model.image.{name} is {getattr(ours, name)!r} but the tower of {cfg.blip2.tower} was trained with "
                    f"{getattr(theirs, name)!r}; copy that run's model.image section into this recipe"
                )
        model = _load_run_model(cfg.blip2.tower)
        tower = getattr(model, "image", None) or getattr(model, "tower", None)
        if not isinstance(tower, ImageTower):
            raise ValueError(f"the run {cfg.blip2.tower} has no image tower (model.kind {run_cfg.model.kind})")
    else:
        tower = ImageTower(cfg.image, cfg.embed_dim)
    if cfg.blip2.features:  # the tower the saved features came from, so the model and its features agree
        from contrast.features import TOWER
        from contrast.train.checkpoint import load_model_weights

        if (Path(cfg.blip2.features) / TOWER).is_file():
            load_model_weights(tower, Path(cfg.blip2.features) / TOWER)
    tower.requires_grad_(False)
    return tower.eval()


class SmallDecoder(nn.Module):
    """The project's small causal decoder: pre-LN transformer, learned positions, LM head tied to the embedding."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.max_positions, cfg.width) * 0.01)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def hidden(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        L = inputs_embeds.shape[1]
        if L > self.positional_embedding.shape[0]:
            raise ValueError(f"decoder input of {L} positions exceeds model.blip2.decoder.max_positions "
                             f"{self.positional_embedding.shape[0]}; raise it")
        # right padding under a causal mask never reaches a real position, so attention_mask is not needed here
        x, _ = self.transformer(inputs_embeds + self.positional_embedding[:L], causal=True)
        return self.ln_final(x)  # (B, L, W)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.hidden(inputs_embeds) @ self.token_embedding.weight.t()  # (B, L, V)


class CausalDecoder(nn.Module):
    """Any causal LM that takes input embeddings: ``embed(ids) -> (B, T, W)``, ``forward(embeds, mask) -> logits``."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        if cfg.source == "own":
            self.lm: nn.Module = SmallDecoder(cfg, vocab_size)
            self.width = cfg.width
        elif cfg.source == "hf":
            self.lm = _hf_causal_lm(cfg)
            emb = self.lm.get_input_embeddings()
            self.width = emb.embedding_dim
            if emb.num_embeddings < vocab_size:
                raise ValueError(
                    f"the decoder's vocabulary has {emb.num_embeddings} tokens but the text tokenizer emits ids up to "
                    f"{vocab_size - 1}; set vocab_size >= {vocab_size} in model.blip2.decoder.hf_config"
                )
        else:
            raise ValueError(f"model.blip2.decoder.source must be own or hf, got '{cfg.source}'")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.source == "own":
            return self.lm.token_embedding(input_ids)
        return self.lm.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) at every position."""
        if self.cfg.source == "own":
            return self.lm(inputs_embeds, attention_mask)
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits

    def caption_logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, start: int,
                       where: torch.Tensor) -> torch.Tensor:
        """(P, V) logits at caption positions ``start + t`` for the (B, T-1) selection ``where``."""
        if self.cfg.source == "own":  # the LM head runs on the selected positions only
            h = self.lm.hidden(inputs_embeds)[:, start : start + where.shape[1]][where]  # (P, W)
            return h @ self.lm.token_embedding.weight.t()
        return self(inputs_embeds, attention_mask)[:, start : start + where.shape[1]][where]


def _hf_causal_lm(cfg: DecoderConfig) -> nn.Module:
    try:
        import transformers
    except ImportError as e:
        raise ValueError("model.blip2.decoder.source hf needs the transformers package (pip install transformers)") from e
    if cfg.hf_path:
        return transformers.AutoModelForCausalLM.from_pretrained(cfg.hf_path, local_files_only=True)
    if "model_type" not in cfg.hf_config:
        raise ValueError("model.blip2.decoder.hf_config needs a model_type (e.g. gpt2 or llama), or set hf_path")
    kwargs = dict(cfg.hf_config)
    hf_cfg = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    return transformers.AutoModelForCausalLM.from_config(hf_cfg)


def load_decoder_weights(decoder: CausalDecoder, path: str) -> None:
    """Weights from a ``.safetensors`` file of the decoder, or from a run of kind ``caption_lm``."""
    from contrast.train.checkpoint import load_model_weights

    if Path(path).suffix == ".safetensors":
        load_model_weights(decoder, path)
        return
    model = _load_run_model(path)
    if not isinstance(getattr(model, "decoder", None), CausalDecoder):
        raise ValueError(f"{path} holds no decoder; point model.blip2.decoder.weights at a caption_lm run")
    decoder.load_state_dict(model.decoder.state_dict())


# --------------------------------------------------------------------------------------------------- stage 1


class Blip2Stage1(nn.Module):
    """Q-Former trained against a frozen image tower with ITC, ITM and ITG."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tower = build_frozen_tower(cfg)
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

    def train(self, mode: bool = True) -> Blip2Stage1:
        super().train(mode)
        self.tower.eval()  # frozen: keeps batch-norm statistics and disables dropout
        return self

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def image_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, N, width): the batch's saved features, or the frozen tower's tokens for its pixels."""
        if "image_feats" in batch:
            return batch["image_feats"].float()
        with torch.no_grad():
            return self.tower.forward_tokens(batch["pixels"])

    def encode_image(self, pixels_or_feats: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, Q, E) query embeddings from pixels (B, 3, H, W) or tower features (B, N, width)."""
        feats = self.image_features({"pixels": pixels_or_feats} if pixels_or_feats.ndim == 4
                                    else {"image_feats": pixels_or_feats})
        emb = self.vision_proj(self.qformer.encode_queries(feats))
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, input_ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        emb = self.text_proj(self.qformer.encode_text(input_ids)[:, 0])  # (B, E)
        return F.normalize(emb, dim=-1) if normalize else emb

    @staticmethod
    def similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """(B_img, B_txt) image-text similarity: the best query for each pair."""
        return torch.einsum("iqe,je->ijq", image_emb, text_emb).amax(dim=-1)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_transform(hidden) @ self.qformer.word_embeddings.weight.t() + self.lm_bias  # (..., V+1)

    def itm_logits(self, feats: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, 2) match / no-match logits: the head over each query output, averaged over queries."""
        Q = self.qformer.num_queries
        h = self.qformer(feats, input_ids, "itm")  # (B, Q+T, D)
        return self.itm_head(h[:, :Q]).mean(dim=1)

    @torch.no_grad()
    def itm_score(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) match scores (match minus no-match logit) for re-ranking; pixels or tower features (B, N, width)."""
        feats = self.image_features({"pixels": pixels} if pixels.ndim == 4 else {"image_feats": pixels})
        logits = self.itm_logits(feats, trim_padding(input_ids))
        return logits[:, 1] - logits[:, 0]

    def forward(self, batch: dict[str, torch.Tensor]) -> Blip2Output:
        feats = self.image_features(batch)  # (B, N, width)
        ids = trim_padding(batch["input_ids"])  # (B, T')
        real = text_padding_mask(ids)
        B, Q = ids.shape[0], self.qformer.num_queries

        # ITC: queries and text in one pass, neither seeing the other
        h = self.qformer(feats, ids, "itc", text_mask=real)  # (B, Q+T, D)
        image_emb = F.normalize(self.vision_proj(h[:, :Q]), dim=-1)  # (B, Q, E)
        text_emb = F.normalize(self.text_proj(h[:, Q]), dim=-1)  # (B, E)
        scale = self.scale()

        # ITM with one hard negative text per image and one hard negative image per text
        with torch.no_grad():
            sim = scale * self.similarity(image_emb, text_emb)  # (B, B)
            same = (ids[:, None, :] == ids[None, :, :]).all(dim=-1)  # identical captions are not negatives
            pos = torch.arange(B, device=ids.device)
            neg_txt = hard_negative_indices(sim, pos, exclude=same)
            neg_img = hard_negative_indices(sim.t(), pos, exclude=same)
        itm_feats = torch.cat([feats, feats, feats[neg_img]], dim=0)  # (3B, N, width)
        itm_ids = torch.cat([ids, ids[neg_txt], ids], dim=0)  # (3B, T)
        itm_logits = self.itm_logits(itm_feats, itm_ids)
        itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(ids.device)

        # ITG: [DEC] replaces the first token; text is causal and sees every query
        dec_ids = ids.clone()
        dec_ids[:, 0] = self.qformer.dec_token_id
        g = self.qformer(feats, dec_ids, "itg", text_mask=real)
        where, targets, rows = packed_targets(ids)
        lm_logits = self.lm_logits(g[:, Q:-1][where])  # (P, V+1)
        return Blip2Output(image_emb, text_emb, scale, itm_logits, itm_labels, lm_logits, targets, rows)


# --------------------------------------------------------------------------------------------------- stage 2


class CaptionLM(nn.Module):
    """A decoder trained on captions alone (model kind ``caption_lm``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = CausalDecoder(cfg.blip2.decoder, cfg.text.vocab_size)

    def forward(self, batch: dict[str, torch.Tensor]) -> DecoderOutput:
        ids = trim_padding(batch["input_ids"])
        where, targets, rows = packed_targets(ids)
        logits = self.decoder.caption_logits(self.decoder.embed(ids), text_padding_mask(ids).long(), 0, where)
        return DecoderOutput(logits, targets, rows, ids.shape[0])


class Blip2Stage2(nn.Module):
    """Q-Former queries projected to a frozen decoder's embedding width and prepended as a soft visual prompt."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.blip2.stage1:
            stage1 = _load_run_model(cfg.blip2.stage1)
            if not isinstance(stage1, Blip2Stage1):
                raise ValueError(f"model.blip2.stage1 must be a blip2_stage1 run; {cfg.blip2.stage1} is not")
        else:
            stage1 = Blip2Stage1(cfg)
        self.tower = stage1.tower
        self.qformer = stage1.qformer
        self.decoder = CausalDecoder(cfg.blip2.decoder, cfg.text.vocab_size)
        if cfg.blip2.decoder.weights:
            load_decoder_weights(self.decoder, cfg.blip2.decoder.weights)
        self.decoder.requires_grad_(False)
        self.tower.requires_grad_(False)
        self.proj = nn.Linear(self.qformer.width, self.decoder.width)

    def train(self, mode: bool = True) -> Blip2Stage2:
        super().train(mode)
        self.tower.eval()
        self.decoder.eval()
        return self

    image_features = Blip2Stage1.image_features

    def visual_prompt(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, Q, W) soft prompt from image features (B, N, width)."""
        return self.proj(self.qformer.encode_queries(feats))

    def forward(self, batch: dict[str, torch.Tensor], use_prompt: bool = True) -> DecoderOutput:
        ids = trim_padding(batch["input_ids"])
        real = text_padding_mask(ids)
        x = self.decoder.embed(ids)  # (B, T, W)
        mask = real.long()
        Q = 0
        if use_prompt:
            prompt = self.visual_prompt(self.image_features(batch)).to(x.dtype)  # (B, Q, W)
            Q = prompt.shape[1]
            x = torch.cat([prompt, x], dim=1)  # (B, Q+T, W)
            mask = torch.cat([torch.ones(ids.shape[0], Q, dtype=torch.long, device=ids.device), mask], dim=1)
        where, targets, rows = packed_targets(ids)
        logits = self.decoder.caption_logits(x, mask, Q, where)  # (P, V)
        return DecoderOutput(logits, targets, rows, ids.shape[0])


__all__ = [
    "Blip2Output", "DecoderOutput", "Blip2Stage1", "Blip2Stage2", "CaptionLM", "CausalDecoder", "SmallDecoder",
    "build_frozen_tower", "caption_nll", "next_token_targets", "packed_targets",
]
