"""An exponential moving average of the trainable weights (``train.ema``), kept beside the run and evaluated.

After every optimizer step each trainable tensor's average moves towards its new value:
``avg <- d * avg + (1 - d) * w`` with ``d = min(ema, (1 + n) / (10 + n))`` at the n-th update, so the first updates
follow the weights closely instead of averaging in the starting point for thousands of steps (the warm-up of
TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, also timm's ``ModelEmaV2`` option). A step the non-finite
guard refuses leaves the average as it is, with no host synchronisation (the decay becomes 1 on the device).

Everything else of the model (frozen weights, batch-norm statistics) is the live model's when the average is used:
:meth:`Ema.swapped` puts the averages in place for an evaluation (or for writing the run ``RUN/ema``) and back
afterwards. A checkpoint keeps the averages in ``ema.safetensors`` and their update count in its state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from contrast.config import ConfigError
from contrast.runs import unwrap

EMA_WEIGHTS = "ema.safetensors"


class Ema:
    """The averages of ``model``'s trainable parameters (fp32 copies) and the number of updates made."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema is the average's decay per step, between 0 and 1 (e.g. 0.999), or 0 for off; "
                              f"got {decay}")
        self.decay = decay
        self.names = [n for n, p in unwrap(model).named_parameters() if p.requires_grad]
        self.params = [p for p in unwrap(model).parameters() if p.requires_grad]
        self.avg = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    def rate(self) -> float:
        """The decay of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, skip: torch.Tensor | None = None) -> None:
        """Move the averages towards the weights; ``skip`` (a bool tensor) true leaves them unchanged."""
        if not self.avg:
            return
        d = torch.tensor(self.rate(), device=self.avg[0].device)
        if skip is not None:
            d = torch.where(skip.to(d.device), torch.ones_like(d), d)
        live = [p.detach().float() for p in self.params]
        torch._foreach_mul_(self.avg, d)
        torch._foreach_add_(self.avg, torch._foreach_mul(live, 1 - d))
        self.updates += 1

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[None]:
        """Within the block the model's trainable parameters hold the averages; afterwards their own values."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.avg):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (fp32): what a checkpoint's ``ema.safetensors`` holds."""
        return dict(zip(self.names, self.avg))

    def load(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        """Averages saved by :meth:`tensors` (a checkpoint's ``ema.safetensors``) and their update count."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ConfigError(f"the checkpoint's {EMA_WEIGHTS} lacks {len(missing)} averaged tensors (e.g. "
                              f"{missing[0]}): it was written for other trainable weights")
        for a, n in zip(self.avg, self.names):
            a.copy_(tensors[n].float())
        self.updates = updates
