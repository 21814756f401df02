"""Hugging Face ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` state dicts -> our dual encoder's state dict + config.

References: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", 2021;
Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023; Tschannen et al., "SigLIP 2: Multilingual
Vision-Language Encoders with Improved Semantic Understanding, Localization, and Dense Features", 2025.

Inputs are the model's full config as a dict (``AutoConfig.from_pretrained(DIR).to_dict()``) and its state dict; the
output is ``(state dict, ClipModelConfig)``; no model is built here. The image tower goes into a timm ViT:

- CLIP: class token, pre-LayerNorm, class-token pooling after the final norm (timm's CLIP ViT, eps 1e-5);
- SigLIP: no class token, biased patch embedding, no pre-norm, attention-probe pooling (timm ``global_pool='map'``,
  eps 1e-6); SigLIP has no image projection, so ours is the identity;
- SigLIP 2: SigLIP's tower with the patch embedding as a linear layer over flattened (row, column, channel) patches,
  read at its native square grid (NaFlex's variable resolution and aspect ratio is not represented).

The text tower goes into our :class:`~contrast.towers.text.TextTower`: CLIP's pools the end-of-text position (causal,
``pool: eot`` when the config keeps the legacy ``eos_token_id: 2`` rule of the highest id, else ``pool: eos``);
SigLIP's is bidirectional, pools the last position and projects through a biased head (``pool: last``). The
tokenizer is the folder's own (the caller sets ``model.text.tokenizer``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from contrast.config import ClipModelConfig, ImageTowerConfig, TextTowerConfig
from contrast.towers.convert import ConversionError

HF_KINDS = ("clip", "siglip", "siglip2")
TIMM_HOST = {"clip": "vit_base_patch16_clip_224", "siglip": "vit_base_patch16_siglip_224"}
TIMM_EPS = {"clip": 1e-5, "siglip": 1e-6}  # the LayerNorm eps each timm host builds with
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_LAYER_MAP = {  # HF encoder layer suffix -> (timm ViT block suffix, our text Block suffix)
    "self_attn.out_proj": ("attn.proj", "attn.proj"),
    "layer_norm1": ("norm1", "ln_1"),
    "layer_norm2": ("norm2", "ln_2"),
    "mlp.fc1": ("mlp.fc1", "mlp.fc1"),
    "mlp.fc2": ("mlp.fc2", "mlp.fc2"),
}


def hf_kind(hf_cfg: dict) -> str:
    """``clip`` | ``siglip`` | ``siglip2`` from a config's ``model_type``, or a one-line refusal."""
    kind = str(hf_cfg.get("model_type", ""))
    if kind not in HF_KINDS:
        raise ConversionError(f"Hugging Face model_type '{kind}' is not an image-text dual encoder contrast imports "
                              f"(it reads {', '.join(HF_KINDS)})")
    return kind


def _act(name: str, where: str) -> str:
    if name not in _ACTS:
        raise ConversionError(f"{where}.hidden_act '{name}' has no equivalent here (supported: {', '.join(_ACTS)})")
    return _ACTS[name]


def _layers(sd: dict[str, torch.Tensor], src: str, dst: str, n: int, which: int) -> dict[str, torch.Tensor]:
    """HF encoder layers ``src{i}.*`` -> fused-qkv blocks ``dst{i}.*`` (which: 0 timm ViT names, 1 our text names)."""
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        a, b = f"{src}{i}.", f"{dst}{i}."
        for t in ("weight", "bias"):
            out[f"{b}attn.qkv.{t}"] = torch.cat([sd[f"{a}self_attn.{p}_proj.{t}"] for p in "qkv"])  # (3W, ...)
            for hf_name, ours in _LAYER_MAP.items():
                out[f"{b}{ours[which]}.{t}"] = sd[f"{a}{hf_name}.{t}"]
    return out


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


# --------------------------------------------------------------------------------------------------- image tower


def _vit_kwargs(vc: dict, kind: str, img_size: int) -> dict[str, Any]:
    W = int(vc["hidden_size"])
    host = "siglip" if kind.startswith("siglip") else "clip"
    eps = float(vc.get("layer_norm_eps", TIMM_EPS[host]))
    if abs(eps - TIMM_EPS[host]) > 1e-12:
        raise ConversionError(f"vision_config.layer_norm_eps {eps:g}: the timm ViT that hosts a {kind} tower builds "
                              f"its LayerNorms with eps {TIMM_EPS[host]:g}")
    kwargs: dict[str, Any] = dict(
        img_size=img_size, patch_size=int(vc["patch_size"]), embed_dim=W, depth=int(vc["num_hidden_layers"]),
        num_heads=int(vc["num_attention_heads"]), mlp_ratio=int(vc["intermediate_size"]) / W,
    )
    act = _act(str(vc.get("hidden_act", "quick_gelu")), "vision_config")
    if act != "gelu":  # timm's ViT default is torch's exact GELU
        kwargs["act_layer"] = act
    if host == "clip":
        kwargs.update(class_token=True, global_pool="token")
    else:
        kwargs.update(class_token=False, global_pool="map")
    return kwargs


def _image_config(vc: dict, kind: str) -> ImageTowerConfig:
    if kind == "siglip2":
        grid = math.isqrt(int(vc["num_patches"]))
        if grid * grid != int(vc["num_patches"]):
            raise ConversionError(f"SigLIP 2 vision_config.num_patches {vc['num_patches']} is not a square grid")
        size = grid * int(vc["patch_size"])
    else:
        size = int(vc["image_size"])
    host = TIMM_HOST["clip" if kind == "clip" else "siglip"]
    mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if kind != "clip" else (ImageTowerConfig.mean, ImageTowerConfig.std)
    return ImageTowerConfig(name=host, kwargs=_vit_kwargs(vc, kind, size), image_size=size, pool="default",
                            mean=mean, std=std)


def _clip_vision(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    v, b = "vision_model.", "image.backbone."
    out = {
        b + "cls_token": sd[v + "embeddings.class_embedding"].reshape(1, 1, -1),  # (1, 1, W)
        b + "patch_embed.proj.weight": sd[v + "embeddings.patch_embedding.weight"],
        b + "pos_embed": sd[v + "embeddings.position_embedding.weight"].unsqueeze(0),  # (1, 1 + N, W)
        "image.proj.weight": sd["visual_projection.weight"],
    }
    for hf, ours in (("pre_layrnorm", "norm_pre"), ("post_layernorm", "norm")):
        for t in ("weight", "bias"):
            out[f"{b}{ours}.{t}"] = sd[f"{v}{hf}.{t}"]
    out.update(_layers(sd, v + "encoder.layers.", b + "blocks.", depth, 0))
    return out


def _siglip_vision(sd: dict[str, torch.Tensor], depth: int, kind: str, patch: int) -> dict[str, torch.Tensor]:
    v, b, h = "vision_model.", "image.backbone.", "vision_model.head."
    if h + "probe" not in sd:
        raise ConversionError("this SigLIP vision tower has no attention-pool head (vision_use_head false); "
                              "contrast imports SigLIP towers that pool through their head")
    w = sd[v + "embeddings.patch_embedding.weight"]
    if kind == "siglip2":  # a linear layer over (row, column, channel)-flattened patches -> a conv kernel
        w = w.reshape(w.shape[0], patch, patch, -1).permute(0, 3, 1, 2)  # (W, C, P, P)
    W = w.shape[0]
    qkv_w, qkv_b = sd[h + "attention.in_proj_weight"], sd[h + "attention.in_proj_bias"]  # (3W, W), (3W,)
    out = {
        b + "patch_embed.proj.weight": w.contiguous(),
        b + "patch_embed.proj.bias": sd[v + "embeddings.patch_embedding.bias"],
        b + "pos_embed": sd[v + "embeddings.position_embedding.weight"].unsqueeze(0),  # (1, N, W)
        b + "attn_pool.latent": sd[h + "probe"],
        b + "attn_pool.q.weight": qkv_w[:W], b + "attn_pool.q.bias": qkv_b[:W],
        b + "attn_pool.kv.weight": qkv_w[W:], b + "attn_pool.kv.bias": qkv_b[W:],
        "image.proj.weight": torch.eye(W),  # SigLIP's image embedding is the pooled output itself
    }
    pairs = [("post_layernorm", "norm"), ("head.attention.out_proj", "attn_pool.proj"),
             ("head.layernorm", "attn_pool.norm"), ("head.mlp.fc1", "attn_pool.mlp.fc1"),
             ("head.mlp.fc2", "attn_pool.mlp.fc2")]
    for hf, ours in pairs:
        for t in ("weight", "bias"):
            out[f"{b}{ours}.{t}"] = sd[f"{v}{hf}.{t}"]
    out.update(_layers(sd, v + "encoder.layers.", b + "blocks.", depth, 0))
    return out


# --------------------------------------------------------------------------------------------------- text tower


def _text_config(tc: dict, kind: str) -> TextTowerConfig:
    W = int(tc["hidden_size"])
    eos = tc.get("eos_token_id")
    if kind == "clip":
        pool = "eot" if eos == 2 else "eos"  # transformers keeps the argmax rule for configs saved with eos id 2
        extra = dict(causal=True, pool=pool, eos_token_id=None if pool == "eot" else int(eos), proj_bias=False)
    else:
        extra = dict(causal=False, pool="last", proj_bias=True)
    return TextTowerConfig(
        kind="clip", context_length=int(tc["max_position_embeddings"]), vocab_size=int(tc["vocab_size"]), width=W,
        layers=int(tc["num_hidden_layers"]), heads=int(tc["num_attention_heads"]),
        mlp_ratio=int(tc["intermediate_size"]) / W, act=_act(str(tc.get("hidden_act", "quick_gelu")), "text_config"),
        norm_eps=float(tc.get("layer_norm_eps", 1e-5)), **extra,
    )


def _text(sd: dict[str, torch.Tensor], depth: int, kind: str) -> dict[str, torch.Tensor]:
    t = "text_model."
    out = {
        "text.token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
        "text.positional_embedding": sd[t + "embeddings.position_embedding.weight"],
        "text.ln_final.weight": sd[t + "final_layer_norm.weight"],
        "text.ln_final.bias": sd[t + "final_layer_norm.bias"],
    }
    if kind == "clip":
        out["text.proj.weight"] = sd["text_projection.weight"]
    else:
        out["text.proj.weight"], out["text.proj.bias"] = sd[t + "head.weight"], sd[t + "head.bias"]
    out.update(_layers(sd, t + "encoder.layers.", "text.transformer.blocks.", depth, 1))
    return out


# --------------------------------------------------------------------------------------------------- entry point


def import_hf_dual_encoder(hf_cfg: dict, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], ClipModelConfig]:
    """A Hugging Face CLIP / SigLIP / SigLIP 2 dual encoder as ``(our state dict, the config that builds it)``."""
    kind = hf_kind(hf_cfg)
    vc, tc = hf_cfg["vision_config"], hf_cfg["text_config"]
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    v_depth, t_depth = _count(sd, "vision_model.encoder.layers."), _count(sd, "text_model.encoder.layers.")
    try:
        image_sd = (_clip_vision(sd, v_depth) if kind == "clip"
                    else _siglip_vision(sd, v_depth, kind, int(vc["patch_size"])))
        ours = {**image_sd, **_text(sd, t_depth, kind)}
    except KeyError as e:
        raise ConversionError(f"the {kind} state dict lacks tensor {e} that its config implies") from e
    ours["logit_scale"] = sd["logit_scale"].reshape(())
    if "logit_bias" in sd:
        ours["logit_bias"] = sd["logit_bias"].reshape(())
    image, text = _image_config(vc, kind), _text_config(tc, kind)
    mcfg = ClipModelConfig(kind="clip", image=image, text=text, embed_dim=int(ours["text.proj.weight"].shape[0]),
                           init_logit_scale=float(ours["logit_scale"]),
                           init_logit_bias=float(ours["logit_bias"]) if "logit_bias" in ours else None)
    if kind != "clip" and int(ours["image.proj.weight"].shape[0]) != mcfg.embed_dim:
        raise ConversionError(f"the SigLIP text head gives {mcfg.embed_dim}-d embeddings but the image tower "
                              f"{ours['image.proj.weight'].shape[0]}-d; the two must match")
    return ours, mcfg
