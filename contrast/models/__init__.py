"""Model families, assembled from parts by :func:`build_model`, a plain function over the config.

``model.kind`` picks the family's builder from :data:`BUILDERS`; nothing else branches on it. Parts that a recipe
takes from elsewhere (a trained run's tower, a stage-1 Q-Former, decoder weights) are resolved by
:mod:`contrast.runs` and handed in as :class:`Parts`; parts left out are built fresh from the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from contrast.config import DecoderConfig, ModelConfig, family
from contrast.decoders import BPECodec, CausalLM, Codec, LanguageModel
from contrast.models.blip import BlipModel
from contrast.models.blip2 import Blip2Stage1, Blip2Stage2, CaptionLM
from contrast.models.clip import DualEncoder
from contrast.models.decoder import VisionLanguageDecoder
from contrast.models.outputs import ITMOutput, LMOutput, Model, ModelOutput, TeacherFeatures
from contrast.models.qformer import QFormer
from contrast.tokenizer import ClipTokenizer
from contrast.towers import ImageTower
from contrast.towers.hf_text import build_text_tower


@dataclass
class Parts:
    """Built parts for :func:`build_model`; None means "build it fresh from the config"."""

    image: ImageTower | None = None  # the image tower (BLIP-2: the frozen tower; decoder: the bridged tower)
    tower_frozen: bool = False  # decoder: the given tower stays frozen
    qformer: QFormer | None = None  # BLIP-2 stage 2: the stage-1 Q-Former
    lm: LanguageModel | None = None  # the language model of a decoder model (BLIP-2 stage 2, caption_lm, decoder)
    codec: Codec | None = None  # its tokenizer
    lm_pretrained: bool = False  # the LM's weights were loaded (not freshly initialised)


def _image(cfg: ModelConfig, parts: Parts) -> ImageTower:
    return parts.image if parts.image is not None else ImageTower(cfg.image, cfg.embed_dim)


def own_lm(d: DecoderConfig, cfg: ModelConfig) -> tuple[CausalLM, BPECodec]:
    """A fresh project LM over open_clip BPE ids and its codec."""
    codec = BPECodec(ClipTokenizer(cfg.text.context_length))
    return CausalLM(d, cfg.text.vocab_size, eos_token_ids=(codec.eos_id,)), codec


def _lm(d: DecoderConfig, cfg: ModelConfig, parts: Parts) -> tuple[LanguageModel, Codec]:
    if parts.lm is not None:
        return parts.lm, parts.codec
    if d.source != "own":
        raise ValueError(f"a decoder of source {d.source} is built by contrast.runs (it reads a local folder)")
    return own_lm(d, cfg)


def _stage2(cfg: ModelConfig, parts: Parts) -> Blip2Stage2:
    tower = _image(cfg, parts)
    qformer = parts.qformer or QFormer(cfg.qformer, vision_width=tower.width, vocab_size=cfg.text.vocab_size,
                                       context_length=cfg.text.context_length)
    return Blip2Stage2(cfg, tower, qformer, *_lm(cfg.blip2.decoder, cfg, parts), parts.lm_pretrained)


def _bridged(cfg: ModelConfig, parts: Parts) -> VisionLanguageDecoder:
    lm, codec = _lm(cfg.bridge.decoder, cfg, parts)
    return VisionLanguageDecoder(cfg, _image(cfg, parts), lm, codec, parts.tower_frozen, parts.lm_pretrained)


BUILDERS: dict[str, Callable[[ModelConfig, Parts], Model]] = {
    "clip": lambda cfg, p: DualEncoder(cfg, _image(cfg, p), build_text_tower(cfg.text, cfg.embed_dim)),
    "blip": lambda cfg, p: BlipModel(cfg, _image(cfg, p)),
    "blip2_stage1": lambda cfg, p: Blip2Stage1(cfg, _image(cfg, p)),
    "blip2_stage2": _stage2,
    "caption_lm": lambda cfg, p: CaptionLM(cfg, *_lm(cfg.blip2.decoder, cfg, p)),
    "decoder": _bridged,
}


def build_model(cfg: ModelConfig, parts: Parts | None = None) -> Model:
    """The model of family ``cfg.kind`` from its config and any built parts."""
    fam = family(cfg.kind)  # an unknown kind is an error naming the nearest family
    if not isinstance(cfg, fam.model):
        raise TypeError(f"model.kind {cfg.kind} needs a {fam.model.__name__}, got {type(cfg).__name__}; "
                        "build configs with contrast.config.new_config(kind) or from a recipe")
    return BUILDERS[cfg.kind](cfg, parts or Parts())


__all__ = [
    "build_model", "Parts", "BUILDERS", "Model", "ModelOutput", "LMOutput", "ITMOutput", "TeacherFeatures",
    "DualEncoder", "BlipModel", "Blip2Stage1", "Blip2Stage2", "CaptionLM", "VisionLanguageDecoder", "own_lm",
]
