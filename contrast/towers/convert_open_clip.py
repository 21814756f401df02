"""open_clip models of every tower kind -> our dual encoder's state dict + config, and back (no model of ours is built).

Reference: Cherti et al., "Reproducible scaling laws for contrastive language-image learning", 2023 (open_clip).

Image towers, by open_clip's ``vision_cfg``:

- a native ViT (``layers`` an int): timm's CLIP ViT, as :func:`contrast.towers.convert.import_clip` maps it;
- a timm trunk (``timm_model_name``: ConvNeXt, EVA, SigLIP's ViT, ...): the same timm model, its weights as they are;
  open_clip's head becomes our projection: ``timm_proj: linear`` (bias per ``timm_proj_bias``), the trunk's own
  classifier when ``timm_proj`` is empty (EVA: a biased linear), the identity for ``none`` (SigLIP). Pooling is the
  trunk's own head (``model.image.pool: head``: ConvNeXt's norm after the average);
- the ModifiedResNet (``layers`` a list): timm's ``resnet50_clip`` (same stem, anti-aliased bottlenecks and attention
  pool), whose attention pool's output projection becomes our biased projection. Only RN50's depths have a timm host.

Text towers, by ``text_cfg``: open_clip's own transformer with its options (``pool_type`` argmax / eos / last,
``no_causal_mask``, ``proj_bias``, LayerNorm eps, tanh GELU: SigLIP's), or a Hugging Face encoder (``hf_model_name``,
mean pooling, linear projection) whose weights and config the caller saves as a folder beside the run.

Refused, each in one line naming the part: attention-pool heads on timm trunks (``abs_attn`` / ``rot_attn``), MLP
projections, layer scale, CoCa's class embedding, q/k norm and the other block variants, other text pooling.

Outbound (:func:`dual_encoder_to_open_clip`), for the export: an image tower that is no CLIP-layout ViT goes to a
``TimmModel`` trunk (timm's default build of the same model, our pooling as the trunk's own head or a ViT's token / avg
pooling, our projection as ``timm_proj: linear``); a Hugging Face text tower goes to an ``HFTextEncoder`` (mean pooler,
bias-free linear projection) whose config and tokenizer the caller writes into the folder ``hf_model_name`` names.
open_clip's encoder has no pooler layer; ours (unused by the mean pooling) is handed back as extra tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from contrast.config import ClipModelConfig, ImageTowerConfig, TextTowerConfig
from contrast.towers.convert import (
    _UNSUPPORTED_OPEN_CLIP,
    ConversionError,
    _clip_image_config,
    _clip_text_config,
    _eps_only,
    clip_layout,
    clip_layout_problems,
    openai_to_ours,
    text_to_open_clip,
    vit_to_open_clip_visual,
)
from contrast.towers.hf_text import HFTextTower
from contrast.towers.image import ImageTower
from contrast.towers.text import TextTower

RESNET_HOST = "resnet50_clip"  # timm's ModifiedResNet: RN50's depths only
RN50_LAYERS = [3, 4, 6, 3]
_TEXT_POOLS = {"argmax": "eot", "eos": "eos", "last": "last"}
_TEXT_OPTIONS_OK = {  # text_cfg options our TextTower reproduces, beyond the CLIP defaults
    "pool_type", "no_causal_mask", "proj_bias", "norm_kwargs", "act_kwargs", "eos_id", "pad_id",
    "hf_tokenizer_name", "tokenizer_kwargs",
}


@dataclass
class OpenClipImport:
    """A converted open_clip model: our state dict and config, plus what the caller must fetch or save beside it."""

    state: dict[str, torch.Tensor]
    config: ClipModelConfig
    tokenizer_name: str | None = None  # a Hugging Face tokenizer the text tower needs (SigLIP's, an HF encoder's)
    text_encoder: dict[str, torch.Tensor] | None = None  # an HF text encoder's own state dict (hf_model_name's model)
    text_encoder_name: str | None = None  # hf_model_name: the folder whose config builds that encoder


def is_native_vit_clip(oc_cfg: dict) -> bool:
    """True for the layouts :func:`contrast.towers.convert.import_clip` reads: a native ViT and CLIP's text tower."""
    vc, tc = oc_cfg.get("vision_cfg", {}), oc_cfg.get("text_cfg", {})
    custom_text = any(tc.get(k) not in (None, False) for k in _TEXT_OPTIONS_OK - {"pool_type"}) or tc.get(
        "pool_type", "argmax") != "argmax" or tc.get("hf_model_name")
    return not vc.get("timm_model_name") and not isinstance(vc.get("layers", 12), list | tuple) and not custom_text


def _split(sd: dict[str, torch.Tensor], custom_text: bool) -> tuple[dict, dict, dict]:
    """(visual.* tensors, text tensors without any ``text.`` prefix, logit scale / bias)."""
    vis = {k: v for k, v in sd.items() if k.startswith("visual.")}
    logits = {k: v.reshape(()) for k, v in sd.items() if k in ("logit_scale", "logit_bias")}
    rest = {k: v for k, v in sd.items() if k not in vis and k not in logits and k != "attn_mask"}
    if custom_text:
        rest = {k.removeprefix("text."): v for k, v in rest.items() if k.startswith("text.")}
    return vis, rest, logits


def _refuse(section: str, cfg: dict, keys: dict[str, Any]) -> None:
    bad = [f"{section}.{k}={cfg[k]!r}" for k, ok in keys.items() if k in cfg and cfg[k] != ok and cfg[k] is not None]
    if bad:
        raise ConversionError("this open_clip model uses options contrast does not reproduce: " + ", ".join(bad))


# --------------------------------------------------------------------------------------------------- image towers


def _native_vit(vis: dict, vc: dict, quick_gelu: bool) -> tuple[ImageTowerConfig, dict]:
    if _eps_only(vc.get("norm_kwargs"), any_eps=False):  # CLIP's eps, as contrast export writes it
        vc = {k: v for k, v in vc.items() if k != "norm_kwargs"}
    _refuse("vision_cfg", vc, {k: v for k, v in _UNSUPPORTED_OPEN_CLIP.items() if k not in ("timm_model_name",
                                                                                         "hf_model_name")})
    width = vis["visual.conv1.weight"].shape[0]
    heads = width // int(vc.get("head_width", 64))
    return _clip_image_config(vis, heads, quick_gelu, None, None), openai_to_ours(vis)


def _timm_trunk(vis: dict, vc: dict, embed_dim: int) -> tuple[ImageTowerConfig, dict]:
    import timm

    name, pool = vc["timm_model_name"], vc.get("timm_pool", "avg")
    proj = vc.get("timm_proj", "linear")
    if pool in ("abs_attn", "rot_attn"):
        raise ConversionError(f"vision_cfg.timm_pool={pool!r}: open_clip's attention-pool head on a timm trunk has "
                              "no timm equivalent here")
    if proj == "mlp":
        raise ConversionError("vision_cfg.timm_proj='mlp': an MLP projection head; contrast projects linearly")
    trunk = {k.removeprefix("visual.trunk."): v for k, v in vis.items() if k.startswith("visual.trunk.")}
    kwargs: dict[str, Any] = {}
    if vc.get("timm_drop_path") is not None:
        kwargs["drop_path_rate"] = float(vc["timm_drop_path"])
    if vc.get("patch_dropout"):
        kwargs["patch_drop_rate"] = float(vc["patch_dropout"])
    out: dict[str, torch.Tensor] = {}
    if proj == "linear":  # trunk with its classifier removed, then open_clip's own linear head
        if pool:
            kwargs["global_pool"] = pool
        out["image.proj.weight"] = vis["visual.head.proj.weight"]
        if "visual.head.proj.bias" in vis:
            out["image.proj.bias"] = vis["visual.head.proj.bias"]
    else:  # the trunk's classifier is the projection (empty timm_proj) or there is none ('none')
        kwargs["global_pool"] = pool
        classifier = timm.models.get_pretrained_cfg(name).classifier if timm.is_model(name) else "head"
        weight = trunk.pop(f"{classifier}.weight", None)
        bias = trunk.pop(f"{classifier}.bias", None)
        if weight is None:
            out["image.proj.weight"] = torch.eye(embed_dim)  # 'none': the pooled trunk output is the embedding
        else:
            out["image.proj.weight"] = weight
            if bias is not None:
                out["image.proj.bias"] = bias
    out.update({f"image.backbone.{k}": v for k, v in trunk.items()})
    image = ImageTowerConfig(name=name, kwargs=kwargs, image_size=int(vc.get("image_size", 224)), pool="head",
                             proj_bias="image.proj.bias" in out)
    return image, out


def _resnet_key(k: str) -> str:
    """open_clip ModifiedResNet key (without ``visual.``) -> timm ``resnet50_clip`` key."""
    parts = k.split(".")
    if parts[0] in ("conv1", "conv2", "conv3", "bn1", "bn2", "bn3"):  # the three-conv stem
        i, kind = parts[0][-1], ("conv" if parts[0].startswith("conv") else "bn")
        return f"stem.conv{i}.{kind}." + ".".join(parts[1:])
    if parts[0].startswith("layer"):
        stage, block = int(parts[0][5:]) - 1, parts[1]
        mod, rest = parts[2], ".".join(parts[3:])
        if mod == "downsample":  # (avgpool '-1', conv '0', bn '1')
            sub, rest = rest.split(".", 1)
            return f"stages.{stage}.{block}.shortcut.conv.{'conv' if sub == '0' else 'bn'}.{rest}"
        names = {"1": "conv1_1x1", "2": "conv2_kxk", "3": "conv3_1x1"}
        return f"stages.{stage}.{block}.{names[mod[-1]]}.{'conv' if mod.startswith('conv') else 'bn'}.{rest}"
    raise ConversionError(f"unexpected ModifiedResNet tensor 'visual.{k}'")


def _modified_resnet(vis: dict, vc: dict) -> tuple[ImageTowerConfig, dict]:
    if list(vc["layers"]) != RN50_LAYERS or int(vc.get("width", 64)) != 64 or int(vc.get("head_width", 64)) != 64:
        raise ConversionError(f"ModifiedResNet with layers {vc['layers']} and width {vc.get('width', 64)}: timm hosts "
                              f"only RN50's ({RN50_LAYERS}, width 64) as {RESNET_HOST}")
    out: dict[str, torch.Tensor] = {}
    for k, v in vis.items():
        k = k.removeprefix("visual.")
        if k.startswith("attnpool."):
            name = k.removeprefix("attnpool.")
            if name == "positional_embedding":
                out["image.backbone.head.pos_embed"] = v  # (1 + H*W, C): the mean token first
            elif name.startswith("c_proj."):
                out["image.proj." + name.removeprefix("c_proj.")] = v
            else:  # q_proj / k_proj / v_proj
                out[f"image.backbone.head.{name[0]}.{name.split('.')[-1]}"] = v
        else:
            out["image.backbone." + _resnet_key(k)] = v
    size = int(vc.get("image_size", 224))
    return ImageTowerConfig(name=RESNET_HOST, kwargs={}, image_size=size, pool="head", proj_bias=True), out


# --------------------------------------------------------------------------------------------------- text towers


def _native_text(txt: dict, tc: dict, quick_gelu: bool) -> tuple[TextTowerConfig, dict]:
    unsupported = {k: v for k, v in _UNSUPPORTED_OPEN_CLIP.items() if k not in _TEXT_OPTIONS_OK}
    unsupported.update(use_pad_mask=False, proj_type="linear", block_type=None)
    _refuse("text_cfg", tc, unsupported)
    pool = str(tc.get("pool_type", "argmax"))
    if pool not in _TEXT_POOLS:
        raise ConversionError(f"text_cfg.pool_type={pool!r}: contrast's text tower pools argmax, eos or last")
    act = "quick_gelu" if quick_gelu else "gelu"
    if (tc.get("act_kwargs") or {}).get("approximate") == "tanh":
        act = "gelu_tanh"
    elif tc.get("act_kwargs"):
        raise ConversionError(f"text_cfg.act_kwargs={tc['act_kwargs']!r}: only the tanh GELU is reproduced")
    width = txt["token_embedding.weight"].shape[1]
    cfg = _clip_text_config(txt, int(tc.get("heads", width // 64)), quick_gelu)
    cfg.act, cfg.pool, cfg.causal = act, _TEXT_POOLS[pool], not tc.get("no_causal_mask", False)
    cfg.eos_token_id = int(tc.get("eos_id", 2)) if pool == "eos" else None
    cfg.norm_eps = float((tc.get("norm_kwargs") or {}).get("eps", 1e-5))
    proj = {}
    if "text_projection.weight" in txt:  # proj_bias: an nn.Linear, (E, W) already
        proj = {"text.proj.weight": txt.pop("text_projection.weight"), "text.proj.bias": txt.pop("text_projection.bias")}
        cfg.proj_bias = True
    return cfg, {**openai_to_ours(txt), **proj}


def _hf_text(txt: dict, tc: dict) -> tuple[TextTowerConfig, dict, dict]:
    pooler, proj = tc.get("hf_pooler_type", "mean_pooler"), tc.get("hf_proj_type", "mlp")
    if pooler != "mean_pooler":
        raise ConversionError(f"text_cfg.hf_pooler_type={pooler!r}: contrast's Hugging Face text tower mean-pools")
    if "proj.weight" not in txt:
        raise ConversionError(f"text_cfg.hf_proj_type={proj!r}: contrast's Hugging Face text tower projects with one "
                              "bias-free linear layer (hf_proj_type linear)")
    encoder = {k.removeprefix("transformer."): v for k, v in txt.items() if k.startswith("transformer.")}
    cfg = TextTowerConfig(kind="hf", context_length=int(tc.get("context_length", 77)))
    return cfg, {"text.proj.weight": txt["proj.weight"]}, encoder


# --------------------------------------------------------------------------------------------------- entry point


def import_open_clip_model(sd: dict[str, torch.Tensor], oc_cfg: dict, *, quick_gelu: bool,
                           mean: Any = None, std: Any = None) -> OpenClipImport:
    """An open_clip model's state dict and ``model_cfg`` -> :class:`OpenClipImport` (state dict, config, extras)."""
    vc, tc = oc_cfg.get("vision_cfg", {}), oc_cfg.get("text_cfg", {})
    embed_dim = int(oc_cfg["embed_dim"])
    custom_text = bool(oc_cfg.get("custom_text")) or bool(tc.get("hf_model_name"))
    vis, txt, logits = _split(sd, custom_text)
    try:
        if vc.get("timm_model_name"):
            image, image_sd = _timm_trunk(vis, vc, embed_dim)
        elif isinstance(vc.get("layers"), list | tuple):
            image, image_sd = _modified_resnet(vis, vc)
        else:
            image, image_sd = _native_vit(vis, vc, quick_gelu)
        encoder = None
        if tc.get("hf_model_name"):
            text, text_sd, encoder = _hf_text(txt, tc)
        else:
            text, text_sd = _native_text(dict(txt), tc, quick_gelu)
    except KeyError as e:
        raise ConversionError(f"the open_clip state dict lacks tensor {e} that its config implies") from e
    if mean is not None:
        image.mean = tuple(mean)
    if std is not None:
        image.std = tuple(std)
    scale = float(logits.get("logit_scale", torch.tensor(math.log(1 / 0.07))))
    bias = float(logits["logit_bias"]) if "logit_bias" in logits else None
    mcfg = ClipModelConfig(kind="clip", image=image, text=text, embed_dim=embed_dim, init_logit_scale=scale,
                           init_logit_bias=bias)
    state = {**image_sd, **text_sd, **logits}
    tok = tc.get("hf_tokenizer_name") or None
    return OpenClipImport(state, mcfg, tokenizer_name=tok if encoder is None else None, text_encoder=encoder,
                          text_encoder_name=tc.get("hf_model_name"))


# --------------------------------------------------------------------------------------------------- ours -> open_clip

_TIMM_KWARGS_TO_CFG = {"drop_path_rate": "timm_drop_path", "patch_drop_rate": "patch_dropout"}  # training only
_TIMM_KWARGS_OK = {"img_size", "global_pool", *_TIMM_KWARGS_TO_CFG}  # img_size: only timm's default (checked)
_NATIVE_ACTS = ("gelu", "quick_gelu")  # what open_clip's quick_gelu flag chooses between


def fits_native_vit(backbone: nn.Module) -> bool:
    """True when the image tower goes to open_clip's own ViT: CLIP's layout with exact GELU or QuickGELU."""
    return not clip_layout_problems(backbone) and clip_layout(backbone).act in _NATIVE_ACTS


def _default_trunk(tower: ImageTower, pool: str) -> nn.Module:
    """The trunk open_clip's TimmModel builds for ``tower``: timm's defaults, classifier removed (no weights: meta)."""
    import timm

    kwargs = {k: v for k, v in tower.timm_kwargs.items() if k in _TIMM_KWARGS_TO_CFG}
    with torch.device("meta"):
        trunk = timm.create_model(tower.cfg.name, pretrained=False, **kwargs)
        trunk.reset_classifier(0, **({"global_pool": pool} if pool else {}))
    return trunk


def _differing_tensors(tower: ImageTower, pool: str) -> list[str]:
    """Tensor names whose presence or shape differ between our backbone and open_clip's default trunk."""
    ours = {k: tuple(v.shape) for k, v in tower.backbone.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in _default_trunk(tower, pool).state_dict().items()}
    return sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))


@torch.no_grad()
def _pool_is_head(tower: ImageTower, pixels: torch.Tensor) -> bool:
    """True when our pooling gives the features of the trunk's own head (``forward_head``) on ``pixels``."""
    feats = tower.backbone.forward_features(pixels)
    head = tower.backbone.forward_head(feats, pre_logits=True)
    ours = tower.pool(tower.forward_tokens(pixels))
    return head.shape == ours.shape and torch.allclose(head, ours, rtol=1e-4, atol=1e-5)


def trunk_pool(tower: ImageTower, pixels: torch.Tensor) -> str | None:
    """open_clip's ``timm_pool`` for our pooling: the trunk's head as built ('' or the ``global_pool`` it was built
    with) when ours equals it; a ViT's token / avg pooling set on timm's head otherwise; None: no form for it."""
    if _pool_is_head(tower, pixels):
        return str(tower.timm_kwargs.get("global_pool", ""))
    if tower.is_sequence and tower.cfg.pool in ("avg", "token"):
        return tower.cfg.pool
    return None


def timm_trunk_problems(tower: ImageTower, pixels: torch.Tensor) -> list[str]:
    """Why open_clip's TimmModel (``timm_model_name``, ``timm_proj: linear``) cannot hold our image tower (empty: it
    can). ``pixels``: a probe batch on which our pooling is compared with the trunk's own head (tower in eval mode)."""
    return _trunk_fit(tower, pixels)[1]


def _trunk_fit(tower: ImageTower, pixels: torch.Tensor) -> tuple[str, list[str]]:
    """(open_clip's ``timm_pool`` for the tower, why TimmModel cannot hold it)."""
    name = tower.cfg.name
    extra = sorted(k for k in tower.timm_kwargs if k not in _TIMM_KWARGS_OK)
    if extra:
        return "", [f"timm kwargs {', '.join(extra)} (TimmModel builds '{name}' with timm's defaults)"]
    pool = trunk_pool(tower, pixels)
    if pool is None:
        return "", [f"model.image.pool '{tower.cfg.pool}' gives other features than the own head of '{name}', the "
                    "only pooling TimmModel runs on it (model.image.pool head fits)"]
    differ = _differing_tensors(tower, pool)
    if differ:
        size = f" at image_size {tower.cfg.image_size}" if "img_size" in tower.timm_kwargs else ""
        return pool, [f"'{name}'{size} differs from timm's default build, the only one TimmModel makes "
                      f"({len(differ)} tensors, e.g. {differ[0]})"]
    return pool, []


def timm_trunk_to_open_clip(tower: ImageTower, pixels: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our image tower -> (``vision_cfg`` of a TimmModel trunk, ``visual.*`` state dict): the trunk's weights as they
    are, our projection as ``visual.head.proj``."""
    pool, problems = _trunk_fit(tower, pixels)
    if problems:
        raise ConversionError("the image tower does not fit open_clip's TimmModel: " + "; ".join(problems))
    vision_cfg: dict[str, Any] = dict(
        timm_model_name=tower.cfg.name, timm_model_pretrained=False, timm_pool=pool,
        timm_proj="linear", timm_proj_bias=tower.proj.bias is not None, image_size=int(tower.cfg.image_size))
    for key, name in _TIMM_KWARGS_TO_CFG.items():
        if key in tower.timm_kwargs:
            vision_cfg[name] = float(tower.timm_kwargs[key])
    sd = {f"visual.trunk.{k}": v for k, v in tower.backbone.state_dict().items()}
    sd["visual.head.proj.weight"] = tower.proj.weight
    if tower.proj.bias is not None:
        sd["visual.head.proj.bias"] = tower.proj.bias
    return vision_cfg, _plain(sd)


def hf_text_problems(text: HFTextTower) -> list[str]:
    """Why open_clip's HFTextEncoder cannot hold our Hugging Face text tower (empty: it can). Ours always mean-pools
    and projects with a bias-free linear layer, which open_clip's ``mean_pooler`` and ``hf_proj_type: linear`` are."""
    from open_clip.hf_configs import arch_dict

    kind = text.encoder.config.model_type
    if kind not in arch_dict:
        return [f"a '{kind}' encoder (open_clip's HFTextEncoder knows {', '.join(sorted(arch_dict))})"]
    return []


def hf_text_to_open_clip(text: HFTextTower, folder: str) -> tuple[dict, dict, dict]:
    """Our HF text tower -> (``text_cfg`` whose encoder config and tokenizer are in ``folder``, ``text.*`` state dict,
    the encoder tensors open_clip's model has no place for: its pooler layer, under our names)."""
    problems = hf_text_problems(text)
    if problems:
        raise ConversionError("the text tower does not fit open_clip's HFTextEncoder: " + "; ".join(problems))
    text_cfg = dict(hf_model_name=folder, hf_tokenizer_name=folder, hf_model_pretrained=False,
                    hf_pooler_type="mean_pooler", hf_proj_type="linear", context_length=int(text.cfg.context_length))
    sd: dict[str, torch.Tensor] = {"text.proj.weight": text.proj.weight}
    extra: dict[str, torch.Tensor] = {}
    for k, v in text.encoder.state_dict().items():  # open_clip builds the encoder with add_pooling_layer=False
        if k.startswith("pooler."):
            extra[f"text.encoder.{k}"] = v
        else:
            sd[f"text.transformer.{k}"] = v
    return text_cfg, _plain(sd), _plain(extra)


def clip_text_problems(text: TextTower) -> list[str]:
    """Options of our CLIP text tower that the export beside a timm trunk does not write (empty: none)."""
    cfg = text.cfg
    p = [f"model.text.act {cfg.act}"] if cfg.act not in _NATIVE_ACTS else []
    p += [f"model.text.pool {cfg.pool}"] if cfg.pool != "eot" else []
    p += ["model.text.proj_bias"] if text.proj.bias is not None else []
    p += [f"model.text.tokenizer {cfg.tokenizer}"] if cfg.tokenizer else []
    return p


def _clip_text(text: TextTower) -> tuple[dict, dict[str, torch.Tensor]]:
    problems = clip_text_problems(text)
    if problems:
        raise ConversionError("the text tower has options this open_clip export does not write: " + ", ".join(problems))
    text_cfg, sd = text_to_open_clip(text)
    text_cfg["norm_kwargs"] = {"eps": float(text.ln_final.eps)}
    return text_cfg, sd


def _plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def dual_encoder_to_open_clip(image: ImageTower, text: nn.Module, logits: dict[str, torch.Tensor], text_folder: str,
                              pixels: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our towers and ``logits`` (``logit_scale``, optionally ``logit_bias``) -> (open_clip ``model_cfg``, state
    dict, extra tensors open_clip has no place for), for an image tower open_clip holds as its ViT or as a timm trunk
    and a text tower it holds as its own transformer or as a Hugging Face encoder whose files go to ``text_folder``."""
    acts = []  # the activations open_clip's one quick_gelu flag must serve (timm trunks keep their own)
    if fits_native_vit(image.backbone):
        vision_cfg, vsd = vit_to_open_clip_visual(image.backbone, image.proj.weight, image.cfg.pool)
        acts.append(clip_layout(image.backbone).act)
    else:
        vision_cfg, vsd = timm_trunk_to_open_clip(image, pixels)
    extra: dict[str, torch.Tensor] = {}
    if isinstance(text, HFTextTower):
        text_cfg, tsd, extra = hf_text_to_open_clip(text, text_folder)
    else:
        text_cfg, tsd = _clip_text(text)
        acts.append(text.cfg.act)
    if len(set(acts)) > 1:
        raise ConversionError(f"open_clip uses one activation for both towers; image uses {acts[0]}, text {acts[1]}")
    quick_gelu = bool(acts) and acts[0] == "quick_gelu"
    model_cfg = dict(embed_dim=int(image.embed_dim), quick_gelu=quick_gelu, vision_cfg=vision_cfg, text_cfg=text_cfg)
    if "logit_bias" in logits:
        model_cfg["init_logit_bias"] = float(logits["logit_bias"].detach())
    return model_cfg, {**vsd, **tsd, **_plain(logits)}, extra
