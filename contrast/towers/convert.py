"""Converters between our module layout and foreign CLIP layouts (key maps, shape transposes, config inference).

Inbound: open_clip / OpenAI CLIP state dicts (``visual.conv1``, ``visual.transformer.resblocks.i.attn.in_proj_weight``,
``text_projection``, ...) become the state dict of our dual encoder (plus the config that builds it), with the image
tower held by a timm ViT (pre-norm, class token, token pooling, LayerNorm eps 1e-5, optionally QuickGELU). This module
produces state dicts and configs only and never builds a model: the caller builds one from the config and loads it.

Outbound: a timm ViT image tower becomes open_clip's native ``VisionTransformer`` layout or Hugging Face
``CLIPVisionModelWithProjection`` keys, where the architecture fits; :func:`clip_layout_problems` says why it does not.

Differences handled here: open_clip stores projections as (width, embed) matrices applied as ``x @ P`` (ours are
``nn.Linear`` weights, i.e. ``P.T``); the class embedding is a (width,) vector (timm: (1, 1, width)); the positional
embedding has no batch axis; attention uses a fused ``in_proj_weight`` in q, k, v order (same as timm's ``qkv``);
MLP layers are ``c_fc`` / ``c_proj``. timm's patch embedding carries a bias when ``pre_norm`` is off; open_clip has
none, so the bias is folded into the patch positions of the positional embedding (exact: both are added once).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contrast.config import ClipModelConfig, ImageTowerConfig, TextTowerConfig
from contrast.layers import QuickGELU
from contrast.towers.adapters import WeightsError, read_state_dict

# The timm architecture that hosts imported CLIP image towers: its defaults already are pre-norm + LayerNorm(eps=1e-5);
# the size kwargs inferred from the checkpoint override the rest.
CLIP_TIMM_ARCH = "vit_base_patch16_clip_224"


class ConversionError(ValueError):
    """A checkpoint or tower that does not fit the requested layout."""


# --------------------------------------------------------------------------------------------------- inbound


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one wrapped as ``{"state_dict": ...}`` (training checkpoints), strip ``module.``."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError("the checkpoint is not a state dict of tensors (nor {'state_dict': ...})")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_foreign_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a .safetensors file, a torch state dict (weights only) or an OpenAI TorchScript archive."""
    try:
        return unwrap_state_dict(read_state_dict(Path(path)))
    except WeightsError as e:
        if "TorchScript" not in str(e) and "constants.pkl" not in str(e):
            raise ConversionError(str(e)) from e
    return unwrap_state_dict(torch.jit.load(str(path), map_location="cpu").state_dict())  # OpenAI's .pt archives


def is_openai_layout(sd: dict[str, torch.Tensor]) -> bool:
    return "visual.conv1.weight" in sd and "token_embedding.weight" in sd and "text_projection" in sd


def _count_blocks(sd: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


_UNSUPPORTED_OPEN_CLIP = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "timm_model_name": None,
    "hf_model_name": None,
    "embed_cls": False,
    "proj_bias": False,
    "no_causal_mask": False,
    "act_kwargs": None,
    "norm_kwargs": None,
}


def _eps_only(norm_kwargs: Any, any_eps: bool) -> bool:
    """``norm_kwargs`` that only name the LayerNorm eps (what ``contrast export`` writes): any value for the text
    tower, CLIP's 1e-5 (the eps of the timm ViT an import builds) for the image tower."""
    if not isinstance(norm_kwargs, dict) or set(norm_kwargs) != {"eps"}:
        return norm_kwargs is None
    return any_eps or float(norm_kwargs["eps"]) == 1e-5


def _check_open_clip_cfg(model_cfg: dict) -> None:
    text_pool = model_cfg.get("text_cfg", {}).get("pool_type", "argmax")
    problems = [f"text_cfg.pool_type={text_pool!r}"] if text_pool != "argmax" else []
    for section in ("vision_cfg", "text_cfg"):
        for key, ok in _UNSUPPORTED_OPEN_CLIP.items():
            value = model_cfg.get(section, {}).get(key, ok)
            if key == "norm_kwargs" and _eps_only(value, any_eps=section == "text_cfg"):
                continue  # LayerNorm eps: the image tower's is CLIP's 1e-5; the text tower takes any (norm_eps)
            if value != ok and not (section == "text_cfg" and key == "pool_type"):
                problems.append(f"{section}.{key}={value!r}")
    if model_cfg.get("custom_text") and model_cfg.get("text_cfg", {}).get("hf_model_name"):
        problems.append("a Hugging Face text tower")
    if problems:
        raise ConversionError(
            "this open_clip model uses options our dual encoder does not reproduce: " + ", ".join(problems)
            + ". Supported: ViT image towers with class-token pooling and CLIP text towers with argmax (EOT) pooling."
        )


def infer_clip_config(
    sd: dict[str, torch.Tensor],
    *,
    quick_gelu: bool,
    open_clip_cfg: dict | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> ClipModelConfig:
    """The dual encoder's :class:`ClipModelConfig` that reproduces an open_clip / OpenAI CLIP state dict.

    Head counts come from ``open_clip_cfg`` (open_clip's ``model_cfg``) when given, otherwise OpenAI's rule
    (width / 64). ``quick_gelu`` is not recorded in a state dict: OpenAI's models use it, most open_clip ones do not.
    """
    if not is_openai_layout(sd):
        raise ConversionError(
            "not an open_clip / OpenAI CLIP state dict (expected keys visual.conv1.weight, token_embedding.weight, "
            "text_projection); ResNet image towers (visual.layer1...) and timm/HF-tower open_clip models are not supported"
        )
    oc = open_clip_cfg or {}
    if oc:
        _check_open_clip_cfg(oc)
    width = sd["visual.conv1.weight"].shape[0]
    t_width = sd["token_embedding.weight"].shape[1]
    v_heads = width // int(oc.get("vision_cfg", {}).get("head_width", 64))
    t_heads = int(oc.get("text_cfg", {}).get("heads", t_width // 64))
    if v_heads < 1 or width % v_heads or t_heads < 1 or t_width % t_heads:
        raise ConversionError(
            f"cannot infer head counts for widths {width} (image) / {t_width} (text) with OpenAI's 64-wide heads; "
            "pass the model's open_clip config (--open-clip-config) naming vision_cfg.head_width and text_cfg.heads"
        )
    bias = float(sd["logit_bias"]) if "logit_bias" in sd else None
    text = _clip_text_config(sd, t_heads, quick_gelu)
    text.norm_eps = float((oc.get("text_cfg", {}).get("norm_kwargs") or {}).get("eps", text.norm_eps))
    return ClipModelConfig(
        kind="clip",
        image=_clip_image_config(sd, v_heads, quick_gelu, mean, std),
        text=text,
        embed_dim=sd["text_projection"].shape[1],
        init_logit_scale=float(sd["logit_scale"]) if "logit_scale" in sd else ClipModelConfig.init_logit_scale,
        init_logit_bias=bias,
    )


def _clip_image_config(sd: dict[str, torch.Tensor], heads: int, quick_gelu: bool,
                       mean: tuple[float, float, float] | None,
                       std: tuple[float, float, float] | None) -> ImageTowerConfig:
    """The timm ViT that holds CLIP's ``visual.*`` tensors, sized from the state dict."""
    width, _, patch, _ = sd["visual.conv1.weight"].shape  # (W, 3, P, P)
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    kwargs: dict[str, Any] = dict(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=width,
        depth=_count_blocks(sd, "visual.transformer.resblocks."),
        num_heads=heads,
        mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        class_token=True,
        global_pool="token",
    )
    if quick_gelu:
        kwargs["act_layer"] = "quick_gelu"
    image = ImageTowerConfig(name=CLIP_TIMM_ARCH, kwargs=kwargs, image_size=grid * patch, pool="default")
    if mean is not None:
        image.mean = tuple(mean)
    if std is not None:
        image.std = tuple(std)
    return image


def _clip_text_config(sd: dict[str, torch.Tensor], heads: int, quick_gelu: bool) -> TextTowerConfig:
    """Our text tower sized from CLIP's text tensors."""
    width = sd["token_embedding.weight"].shape[1]
    return TextTowerConfig(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=width,
        layers=_count_blocks(sd, "transformer.resblocks."),
        heads=heads,
        mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        act="quick_gelu" if quick_gelu else "gelu",
    )


_BLOCK_MAP_VISION = {  # open_clip resblock suffix -> timm ViT block suffix
    "ln_1": "norm1",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_BLOCK_MAP_TEXT = {  # open_clip resblock suffix -> our text Block suffix
    "ln_1": "ln_1",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj",
    "ln_2": "ln_2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _map_block_key(rest: str, table: dict[str, str]) -> str:
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src) :]
    raise ConversionError(f"unexpected transformer block tensor '{rest}' (layer scale / custom blocks are not supported)")


def openai_to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip / OpenAI CLIP keys -> our dual encoder's keys (``image.backbone.*``, ``image.proj``, ``text.*``)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in ("input_resolution", "context_length", "vocab_size"):  # scalars stored in OpenAI's archives
            continue
        if k.startswith("visual.transformer.resblocks."):
            i, rest = k[len("visual.transformer.resblocks.") :].split(".", 1)
            out[f"image.backbone.blocks.{i}.{_map_block_key(rest, _BLOCK_MAP_VISION)}"] = v
        elif k.startswith("transformer.resblocks."):
            i, rest = k[len("transformer.resblocks.") :].split(".", 1)
            out[f"text.transformer.blocks.{i}.{_map_block_key(rest, _BLOCK_MAP_TEXT)}"] = v
        elif k == "visual.conv1.weight":
            out["image.backbone.patch_embed.proj.weight"] = v
        elif k == "visual.class_embedding":
            out["image.backbone.cls_token"] = v.reshape(1, 1, -1)  # (1, 1, W)
        elif k == "visual.positional_embedding":
            out["image.backbone.pos_embed"] = v.unsqueeze(0)  # (1, 1 + N, W)
        elif k.startswith("visual.ln_pre."):
            out["image.backbone.norm_pre." + k.split(".")[-1]] = v
        elif k.startswith("visual.ln_post."):
            out["image.backbone.norm." + k.split(".")[-1]] = v
        elif k == "visual.proj":
            out["image.proj.weight"] = v.t().contiguous()  # (W, E) applied as x @ P -> Linear weight (E, W)
        elif k == "token_embedding.weight":
            out["text.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["text.positional_embedding"] = v
        elif k.startswith("ln_final."):
            out[f"text.{k}"] = v
        elif k == "text_projection":
            out["text.proj.weight"] = v.t().contiguous()  # (W, E) -> (E, W)
        elif k in ("logit_scale", "logit_bias"):
            out[k] = v.reshape(())
        elif k == "attn_mask":  # older open_clip checkpoints persist the causal mask buffer
            continue
        else:
            raise ConversionError(f"unexpected tensor '{k}' in the CLIP state dict; this layout variant is not supported")
    return out


def import_clip(
    sd: dict[str, torch.Tensor],
    *,
    quick_gelu: bool,
    open_clip_cfg: dict | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> tuple[dict[str, torch.Tensor], ClipModelConfig]:
    """An open_clip / OpenAI CLIP state dict as ``(our dual encoder's state dict, the model config that builds it)``.

    No model is built here: build one from the config and load the state dict strictly (every key must match).
    """
    cfg = infer_clip_config(sd, quick_gelu=quick_gelu, open_clip_cfg=open_clip_cfg, mean=mean, std=std)
    return openai_to_ours(sd), cfg


# --------------------------------------------------------------------------------------------------- outbound


@dataclass
class ClipVitLayout:
    """What a timm ViT looks like in CLIP terms (only meaningful when :func:`clip_layout_problems` is empty)."""

    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    act: str  # gelu | quick_gelu
    eps: float
    pre_norm: bool
    patch_bias: bool
    global_pool: str  # token | avg


def _act_name(m: nn.Module) -> str | None:
    if isinstance(m, nn.GELU):
        return "gelu" if m.approximate == "none" else "gelu_pytorch_tanh"
    if isinstance(m, QuickGELU) or type(m).__name__ == "QuickGELU":
        return "quick_gelu"
    if type(m).__name__ == "GELUTanh":  # timm's act_layer "gelu_tanh" (SigLIP)
        return "gelu_pytorch_tanh"
    return None


def clip_layout_problems(backbone: nn.Module) -> list[str]:
    """Why a timm backbone cannot be written in CLIP's ViT layout (empty list: it can)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        return [f"{type(backbone).__name__} is not a timm VisionTransformer"]
    p: list[str] = []
    if backbone.cls_token is None or backbone.num_prefix_tokens != 1:
        p.append("CLIP's layout needs exactly one class token (no register tokens)")
    if backbone.pos_embed is None or getattr(backbone, "no_embed_class", False):
        p.append("CLIP's layout needs a learned positional embedding covering the class token")
    if getattr(backbone, "dynamic_img_size", False):
        p.append("dynamic image size is not representable")
    if backbone.global_pool not in ("token", "avg") or backbone.attn_pool is not None:
        p.append(f"global_pool '{backbone.global_pool}' (only token or avg)")
    if not isinstance(backbone.patch_embed.norm, nn.Identity):
        p.append("a norm inside the patch embedding")
    norms = [m for m in backbone.modules() if isinstance(m, nn.LayerNorm)]
    if len({m.eps for m in norms}) > 1:
        p.append("LayerNorms with different eps")
    p += _block_problems(backbone)
    return p


def _block_problems(backbone: nn.Module) -> list[str]:
    p: list[str] = []
    for i, blk in enumerate(backbone.blocks):
        if type(blk).__name__ != "Block":
            p.append(f"block {i} is a {type(blk).__name__}, not a plain pre-LN block")
            break
        extra = [n for n, _ in blk.named_parameters() if n not in _CLIP_BLOCK_PARAMS]
        if extra:
            p.append(f"block {i} has tensors CLIP lacks: {', '.join(extra)} (layer scale, q/k norm, ...)")
            break
        if not isinstance(blk.norm1, nn.LayerNorm) or not isinstance(blk.norm2, nn.LayerNorm):
            p.append(f"block {i} normalises with {type(blk.norm1).__name__}, not LayerNorm")
            break
        if _act_name(blk.mlp.act) is None:
            p.append(f"activation {blk.mlp.act!r} (only exact GELU or QuickGELU)")
            break
        if not hasattr(blk.attn, "qkv") or blk.attn.qkv.bias is None:
            p.append("attention without a fused, biased qkv projection")
            break
    return p


_CLIP_BLOCK_PARAMS = {
    f"{m}.{t}"
    for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for t in ("weight", "bias")
}


def clip_layout(backbone: nn.Module) -> ClipVitLayout:
    problems = clip_layout_problems(backbone)
    if problems:
        raise ConversionError("the image tower does not fit CLIP's ViT layout: " + "; ".join(problems))
    blk = backbone.blocks[0]
    width = backbone.embed_dim
    return ClipVitLayout(
        image_size=int(backbone.patch_embed.img_size[0]),
        patch_size=int(backbone.patch_embed.patch_size[0]),
        width=width,
        layers=len(backbone.blocks),
        heads=blk.attn.num_heads,
        mlp_ratio=blk.mlp.fc1.out_features / width,
        act=_act_name(blk.mlp.act) or "gelu",
        eps=float(blk.norm1.eps),
        pre_norm=isinstance(backbone.norm_pre, nn.LayerNorm),
        patch_bias=backbone.patch_embed.proj.bias is not None,
        global_pool=backbone.global_pool,
    )


def _fold_patch_bias(backbone: nn.Module) -> torch.Tensor:
    """Positional embedding (1 + N, W) with timm's patch-embedding bias added to the patch rows."""
    pos = backbone.pos_embed.detach()[0].clone()  # (1 + N, W)
    if backbone.patch_embed.proj.bias is not None:
        pos[1:] += backbone.patch_embed.proj.bias.detach()
    return pos


def vit_to_open_clip_visual(backbone: nn.Module, proj: torch.Tensor, pool: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """timm ViT + our (E, W) projection -> (open_clip ``vision_cfg``, ``visual.*`` state dict).

    ``pool`` is our tower's pooling (default | token | avg).
    """
    lay = clip_layout(backbone)
    final_after_pool = False
    if lay.global_pool == "avg" and pool in ("default", "avg"):  # timm: no final norm, fc_norm after pooling
        pool_type, final_after_pool, ln_post = "avg", True, backbone.fc_norm
    elif lay.global_pool == "token" and pool in ("default", "token"):
        pool_type, ln_post = "tok", backbone.norm
    elif lay.global_pool == "token" and pool == "avg":
        pool_type, ln_post = "avg", backbone.norm
    else:
        raise ConversionError(f"tower pooling '{pool}' over a timm ViT with global_pool '{lay.global_pool}' has no open_clip form")
    if lay.width % lay.heads:
        raise ConversionError("width not divisible by heads")
    vision_cfg = dict(
        image_size=lay.image_size,
        patch_size=lay.patch_size,
        width=lay.width,
        layers=lay.layers,
        head_width=lay.width // lay.heads,
        mlp_ratio=lay.mlp_ratio,
        no_ln_pre=not lay.pre_norm,
        pool_type=pool_type,
        final_ln_after_pool=final_after_pool,
        norm_kwargs={"eps": lay.eps},
    )
    sd: dict[str, torch.Tensor] = {
        "visual.conv1.weight": backbone.patch_embed.proj.weight,
        "visual.class_embedding": backbone.cls_token.reshape(-1),  # (W,)
        "visual.positional_embedding": _fold_patch_bias(backbone),  # (1 + N, W)
        "visual.ln_post.weight": ln_post.weight,
        "visual.ln_post.bias": ln_post.bias,
        "visual.proj": proj.t(),  # (E, W) -> (W, E)
    }
    if lay.pre_norm:
        sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = backbone.norm_pre.weight, backbone.norm_pre.bias
    inverse = {v: k for k, v in _BLOCK_MAP_VISION.items()}
    for i, blk in enumerate(backbone.blocks):
        for name, t in blk.state_dict().items():
            src = next(s for s in inverse if name.startswith(s))
            sd[f"visual.transformer.resblocks.{i}.{inverse[src]}{name[len(src):]}"] = t
    return vision_cfg, {k: v.detach().contiguous().clone() for k, v in sd.items()}


def text_to_open_clip(text: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our :class:`TextTower` -> (open_clip ``text_cfg``, text state dict)."""
    cfg = text.cfg
    text_cfg = dict(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        heads=cfg.heads,
        layers=cfg.layers,
        mlp_ratio=cfg.mlp_ratio,
        no_causal_mask=not cfg.causal,
    )
    sd: dict[str, torch.Tensor] = {
        "token_embedding.weight": text.token_embedding.weight,
        "positional_embedding": text.positional_embedding,
        "ln_final.weight": text.ln_final.weight,
        "ln_final.bias": text.ln_final.bias,
        "text_projection": text.proj.weight.t(),  # (E, W) -> (W, E)
    }
    inverse = {v: k for k, v in _BLOCK_MAP_TEXT.items()}
    for i, blk in enumerate(text.transformer.blocks):
        for name, t in blk.state_dict().items():
            src = next((s for s in inverse if name.startswith(s)), None)
            if src is None:
                raise ConversionError(f"text block tensor '{name}' has no open_clip equivalent (cross-attention?)")
            sd[f"transformer.resblocks.{i}.{inverse[src]}{name[len(src):]}"] = t
    return text_cfg, {k: v.detach().contiguous().clone() for k, v in sd.items()}


def hf_clip_problems(backbone: nn.Module, pool: str) -> list[str]:
    """Why a timm backbone cannot become a Hugging Face ``CLIPVisionModel`` (empty: it can)."""
    p = clip_layout_problems(backbone)
    if p:
        return p
    lay = clip_layout(backbone)
    if not lay.pre_norm:
        p.append("CLIPVisionModel always applies a pre-LayerNorm (timm kwarg pre_norm=True); this tower has none")
    if lay.global_pool != "token" or pool not in ("default", "token"):
        p.append("CLIPVisionModel pools the class token; this tower pools by average")
    return p


def vit_to_hf_clip(backbone: nn.Module, proj: torch.Tensor, pool: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """timm ViT + (E, W) projection -> (``CLIPVisionConfig`` kwargs, ``CLIPVisionModelWithProjection`` state dict)."""
    problems = hf_clip_problems(backbone, pool)
    if problems:
        raise ConversionError("the image tower does not fit Hugging Face CLIPVisionModel: " + "; ".join(problems))
    lay = clip_layout(backbone)
    W = lay.width
    config = dict(
        hidden_size=W,
        intermediate_size=int(round(W * lay.mlp_ratio)),
        projection_dim=int(proj.shape[0]),
        num_hidden_layers=lay.layers,
        num_attention_heads=lay.heads,
        num_channels=3,
        image_size=lay.image_size,
        patch_size=lay.patch_size,
        hidden_act=lay.act,
        layer_norm_eps=lay.eps,
    )
    pre = "vision_model."
    sd: dict[str, torch.Tensor] = {
        pre + "embeddings.class_embedding": backbone.cls_token.reshape(-1),  # (W,)
        pre + "embeddings.patch_embedding.weight": backbone.patch_embed.proj.weight,
        pre + "embeddings.position_embedding.weight": backbone.pos_embed[0],  # (1 + N, W)
        pre + "pre_layrnorm.weight": backbone.norm_pre.weight,
        pre + "pre_layrnorm.bias": backbone.norm_pre.bias,
        pre + "post_layernorm.weight": backbone.norm.weight,
        pre + "post_layernorm.bias": backbone.norm.bias,
        "visual_projection.weight": proj,  # (E, W), bias-free in both
    }
    sd.update(_hf_encoder_layers(backbone, pre))
    return config, {k: v.detach().contiguous().clone() for k, v in sd.items()}


def _hf_encoder_layers(backbone: nn.Module, pre: str) -> dict[str, torch.Tensor]:
    """timm ViT blocks -> Hugging Face CLIP / SigLIP encoder layers (split q/k/v, layer_norm1/2, mlp.fc1/2)."""
    W = backbone.embed_dim
    sd: dict[str, torch.Tensor] = {}
    for i, blk in enumerate(backbone.blocks):
        b = f"{pre}encoder.layers.{i}."
        qw = blk.attn.qkv.weight.reshape(3, W, W)  # (q|k|v, out, in)
        qb = blk.attn.qkv.bias.reshape(3, W)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[b + f"self_attn.{name}.weight"], sd[b + f"self_attn.{name}.bias"] = qw[j], qb[j]
        sd[b + "self_attn.out_proj.weight"], sd[b + "self_attn.out_proj.bias"] = blk.attn.proj.weight, blk.attn.proj.bias
        sd[b + "layer_norm1.weight"], sd[b + "layer_norm1.bias"] = blk.norm1.weight, blk.norm1.bias
        sd[b + "layer_norm2.weight"], sd[b + "layer_norm2.bias"] = blk.norm2.weight, blk.norm2.bias
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = blk.mlp.fc1.weight, blk.mlp.fc1.bias
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = blk.mlp.fc2.weight, blk.mlp.fc2.bias
    return sd


def siglip_problems(backbone: nn.Module, pool: str) -> list[str]:
    """Why a timm backbone cannot become a Hugging Face ``SiglipVisionModel`` (empty: it can)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        return [f"{type(backbone).__name__} is not a timm VisionTransformer"]
    p = []
    if backbone.num_prefix_tokens != 0 or backbone.pos_embed is None:
        p.append("SigLIP towers have no class token and a learned positional embedding")
    if backbone.attn_pool is None or backbone.global_pool != "map" or pool != "default":
        p.append("SigLIP pools with an attention-probe head (timm global_pool='map')")
    elif [n for n, _ in backbone.attn_pool.named_parameters() if n not in _SIGLIP_POOL_PARAMS]:
        p.append("the attention-pool head has tensors SigLIP lacks (q/k norm?)")
    if not isinstance(backbone.norm_pre, nn.Identity) or not isinstance(backbone.norm, nn.LayerNorm):
        p.append("SigLIP has no pre-norm and one final LayerNorm")
    if not isinstance(backbone.patch_embed.norm, nn.Identity) or getattr(backbone, "dynamic_img_size", False):
        p.append("a norm inside the patch embedding or a dynamic image size")
    return p + _block_problems(backbone)


_SIGLIP_POOL_PARAMS = {"latent"} | {
    f"{m}.{t}" for m in ("q", "kv", "proj", "norm", "mlp.fc1", "mlp.fc2") for t in ("weight", "bias")
}


def vit_to_hf_siglip(backbone: nn.Module, pool: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """timm SigLIP-style ViT -> (``SiglipVisionConfig`` kwargs, ``SiglipVisionModel`` state dict)."""
    problems = siglip_problems(backbone, pool)
    if problems:
        raise ConversionError("the image tower does not fit Hugging Face SiglipVisionModel: " + "; ".join(problems))
    blk, ap = backbone.blocks[0], backbone.attn_pool
    W = backbone.embed_dim
    if ap.num_heads != blk.attn.num_heads or ap.mlp.fc1.out_features != blk.mlp.fc1.out_features:
        raise ConversionError("SiglipVisionModel's pooling head shares heads and MLP width with the blocks; this one differs")
    config = dict(
        hidden_size=W,
        intermediate_size=blk.mlp.fc1.out_features,
        num_hidden_layers=len(backbone.blocks),
        num_attention_heads=blk.attn.num_heads,
        num_channels=3,
        image_size=int(backbone.patch_embed.img_size[0]),
        patch_size=int(backbone.patch_embed.patch_size[0]),
        hidden_act=_act_name(blk.mlp.act),
        layer_norm_eps=float(blk.norm1.eps),
        vision_use_head=True,
    )
    sd: dict[str, torch.Tensor] = {
        "embeddings.patch_embedding.weight": backbone.patch_embed.proj.weight,
        "embeddings.patch_embedding.bias": backbone.patch_embed.proj.bias,
        "embeddings.position_embedding.weight": backbone.pos_embed[0],  # (N, W)
        "post_layernorm.weight": backbone.norm.weight,
        "post_layernorm.bias": backbone.norm.bias,
        "head.probe": ap.latent,
        "head.attention.in_proj_weight": torch.cat([ap.q.weight, ap.kv.weight]),  # (3W, W): q, then k, v
        "head.attention.in_proj_bias": torch.cat([ap.q.bias, ap.kv.bias]),
        "head.attention.out_proj.weight": ap.proj.weight,
        "head.attention.out_proj.bias": ap.proj.bias,
        "head.layernorm.weight": ap.norm.weight,
        "head.layernorm.bias": ap.norm.bias,
        "head.mlp.fc1.weight": ap.mlp.fc1.weight,
        "head.mlp.fc1.bias": ap.mlp.fc1.bias,
        "head.mlp.fc2.weight": ap.mlp.fc2.weight,
        "head.mlp.fc2.bias": ap.mlp.fc2.bias,
    }
    sd.update(_hf_encoder_layers(backbone, ""))
    return config, {k: v.detach().contiguous().clone() for k, v in sd.items()}


def open_clip_model_cfg(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """A :class:`DualEncoder` -> (open_clip ``model_cfg``, open_clip state dict) for a native open_clip ``CLIP``."""
    image, text = model.image, model.text
    vision_cfg, vsd = vit_to_open_clip_visual(image.backbone, image.proj.weight, image.cfg.pool)
    text_cfg, tsd = text_to_open_clip(text)
    v_act = clip_layout(image.backbone).act
    if v_act != text.cfg.act:
        raise ConversionError(
            f"open_clip uses one activation for both towers; image uses {v_act}, text uses {text.cfg.act}"
        )
    text_cfg["norm_kwargs"] = {"eps": float(text.ln_final.eps)}
    model_cfg = dict(embed_dim=int(image.embed_dim), quick_gelu=v_act == "quick_gelu", vision_cfg=vision_cfg, text_cfg=text_cfg)
    sd = {**vsd, **tsd, "logit_scale": model.logit_scale.detach().clone()}
    if getattr(model, "logit_bias", None) is not None:
        model_cfg["init_logit_bias"] = float(model.logit_bias)
        sd["logit_bias"] = model.logit_bias.detach().clone()
    return copy.deepcopy(model_cfg), sd
