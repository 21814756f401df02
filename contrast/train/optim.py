"""AdamW with per-tower parameter groups and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from contrast.config import TrainConfig


def tower_of(name: str) -> str:
    for tower in ("image", "text", "lm"):  # "lm": a decoder model's language model
        if name.startswith(f"{tower}.") or name.startswith(f"module.{tower}."):
            return tower
    return "head"


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """One group per (tower, decay) pair. Norms, biases, scalars (logit scale / bias) get no weight decay."""
    lrs = {"image": cfg.image_lr or cfg.lr, "text": cfg.text_lr or cfg.lr, "lm": cfg.lm_lr or cfg.lr, "head": cfg.lr}
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = tower_of(name)
        decay = p.ndim >= 2
        key = (tower, decay)
        if key not in groups:
            groups[key] = {
                "name": f"{tower}{'' if decay else '_no_decay'}",
                "params": [],
                "lr": lrs[tower],
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters; check the locked settings of the towers")
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
