"""AdamW with per-tower parameter groups, a warmup + cosine learning-rate schedule, and the logit-scale clamp
applied after each update."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from contrast.config import ConfigError, TrainConfig

HEADS = ("image.proj.", "text.proj.")  # the towers' projections: new heads, trained at train.lr like the logit scale
GATES = ("gate_attn", "gate_mlp")  # the tanh gates of gated cross-attention blocks: train.gate_lr


def tower_of(name: str) -> str:
    """The learning-rate group of a parameter: ``image`` / ``text`` (the towers' own layers: train.image_lr /
    train.text_lr), ``lm``, or ``head`` (projections, logit scale, bridges: train.lr)."""
    if name.removeprefix("module.").startswith(HEADS):
        return "head"
    if name.startswith(("lora.", "module.lora.")):  # a decoder model's low-rank adapters tune its language model
        return "lm"
    for tower in ("image", "text", "lm"):  # "lm": a decoder model's language model
        if name.startswith(f"{tower}.") or name.startswith(f"module.{tower}."):
            return tower
    return "head"


def decays(p: torch.Tensor) -> bool:
    """Whether AdamW decays ``p``: matrices and larger do; norms' gains, biases, scalars (logit scale / bias) and
    single learned vectors such as a ViT's class token (timm stores it as (1, 1, D)) do not. Singleton axes are not
    counted, so a class token is a vector here as it is in open_clip's (D,) layout."""
    return sum(size > 1 for size in p.shape) >= 2


def layer_scales(model: nn.Module, decay: float | None) -> dict[int, tuple[int, float]]:
    """Layer-wise learning-rate decay (BEiT, Bao et al. 2021; EVA-CLIP): ``id(parameter) -> (depth, lr scale)`` for
    the parameters of the model's image and text towers. A tower's ``layer_groups()`` lists its parameters by depth,
    input side first; of n groups, group i trains at ``decay ** (n - i)`` of its tower's rate (the last block at
    ``decay``); parameters in no group (projections, final norms, the logit scale) keep the full rate. Empty when
    ``decay`` is None or 1."""
    if decay is None or decay == 1.0:
        return {}
    if not 0.0 < decay <= 1.0:
        raise ConfigError(f"train.layer_decay must lie in (0, 1] (e.g. 0.75), got {decay}")
    scales: dict[int, tuple[int, float]] = {}
    for tower in ("image", "text"):
        groups = getattr(getattr(model, tower, None), "layer_groups", None)
        if groups is None:
            continue
        layers = groups()
        for i, params in enumerate(layers):
            for p in params:
                scales[id(p)] = (i, decay ** (len(layers) - i))
    if not scales:
        raise ConfigError(f"train.layer_decay applies to image and text towers; this model ({type(model).__name__}) "
                          "has none with layers to decay: set it to null")
    return scales


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """One group per (tower, decay) pair, and per depth under ``train.layer_decay`` (:func:`layer_scales`); see
    :func:`decays` for which parameters get no weight decay. Cross-attention gates are a group of their own
    (``gate_no_decay``, at ``train.gate_lr``)."""
    lrs = {"image": cfg.image_lr or cfg.lr, "text": cfg.text_lr or cfg.lr, "lm": cfg.lm_lr or cfg.lr, "head": cfg.lr,
           "gate": cfg.gate_lr or cfg.lr}
    scales = layer_scales(model, cfg.layer_decay)
    groups: dict[tuple[str, bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = "gate" if name.rsplit(".", 1)[-1] in GATES else tower_of(name)
        decay = decays(p)
        depth, scale = scales.get(id(p), (-1, 1.0)) if tower != "head" else (-1, 1.0)
        key = (tower, decay, depth)
        if key not in groups:
            groups[key] = {
                "name": f"{tower}{'' if decay else '_no_decay'}",
                "params": [],
                "lr": lrs[tower] * scale,
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
            if depth >= 0:
                groups[key]["layer"] = depth
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters; check the locked settings of the towers")
    if cfg.gate_lr and not any(tower == "gate" for tower, _, _ in groups):
        raise ConfigError("train.gate_lr is set but this model trains no cross-attention gates (a decoder with "
                          "model.bridge.mode: xattn has them); remove train.gate_lr")
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; the fused kernel (one pass over each tensor instead of about ten) when every parameter allows it."""
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at ``cfg.steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


def logit_scale_clamp(model: nn.Module, max_scale: float) -> Callable[[], None]:
    """A function to call after each optimizer update: it clamps the learned log logit scale (every trainable
    parameter named ``logit_scale``) in place to [0, ln ``max_scale``], as CLIP's and open_clip's training steps do.
    Clamping the parameter, not only the multiplier in the forward, keeps the scale's gradient alive at the cap, so
    the scale can come back down; a parameter left above the cap would get no gradient and stay there."""
    params = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "logit_scale" and p.requires_grad]
    top = math.log(max_scale)

    @torch.no_grad()
    def clamp() -> None:
        for p in params:
            p.clamp_(0.0, top)

    return clamp
