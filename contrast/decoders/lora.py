"""Low-rank adapters on a language model's linear layers (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", 2021): ``y = W x + (alpha / r) * B A x`` with ``B`` zero at the start, so the adapted model starts as the
bare one; only ``A`` and ``B`` train.

The adapters are attached by forward hooks and held in their own module, so the language model's modules and state
dict keep their own names (a frozen LM is still read from its folder, an export writes it unchanged);
:func:`merged_weight` folds an adapter into its layer's weight for export.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRA(nn.Module):
    """One adapter: ``A`` (r, in) Kaiming-uniform, ``B`` (out, r) zeros."""

    def __init__(self, layer: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, layer.in_features))
        self.B = nn.Parameter(torch.zeros(layer.out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.A.dtype) @ self.A.t() @ self.B.t()) * self.scale  # (..., out)


def attach_lora(lm: nn.Module, rank: int, alpha: float, targets: list[str]) -> nn.ModuleDict:
    """Adapters on every ``nn.Linear`` of ``lm`` whose own name is in ``targets`` (e.g. q_proj, v_proj); returns them
    keyed by the layer's path (dots as ``__``). None found is an error naming the linear layers there are."""
    if rank < 1:
        raise ValueError(f"the decoder's lora_rank must be >= 1 to attach adapters, got {rank}")
    adapters = nn.ModuleDict()
    for name, module in lm.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            adapter = LoRA(module, rank, alpha)
            adapters[name.replace(".", "__")] = adapter
            module.register_forward_hook(lambda m, args, out, a=adapter: out + a.delta(args[0]).to(out.dtype))
    if not len(adapters):
        names = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no linear layer of the language model is named {targets}; its linear layers are named "
                         f"{names[:12]} (set the decoder's lora_targets to some of those)")
    return adapters


def merged_weight(layer: nn.Linear, adapter: LoRA) -> torch.Tensor:
    """``W + (alpha / r) B A``: the layer's weight with its adapter folded in."""
    return layer.weight + (adapter.B @ adapter.A * adapter.scale).to(layer.weight.dtype)
