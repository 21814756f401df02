"""Memoised features of a fully locked tower (LiT): the same input always gives the same pooled feature.

A locked tower with frozen normalisation statistics and no dropout is a fixed function, so its pooled output for
an input row can be kept and reused: after the first epoch a LiT step runs only the trainable parts. Rows are keyed
by a hash of their exact bytes (pixels, or the non-padding token ids), so the cache needs no dataset indices and
stays correct under any shuffling, resumption or augmentation (an augmented view is simply a new key). It is
cleared whenever the tower's weights are loaded, and refuses to run while any of the tower's parameters is trainable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn


class FeatureCache:
    """Up to ``capacity`` rows of ``fn(x)`` keyed by the bytes of each row of ``x`` (and of ``extra`` keys)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.store: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.store.clear()

    @staticmethod
    def key(row: torch.Tensor) -> bytes:
        data = row.detach().contiguous().cpu()
        h = hashlib.blake2b(digest_size=16)
        h.update(str((data.dtype, tuple(data.shape))).encode())
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        return h.digest()

    def __call__(self, rows: list[torch.Tensor], fn: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """Features (B, D) for ``rows``; ``fn(missing_positions)`` computes those not cached, in that order."""
        keys = [self.key(r) for r in rows]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = fn(missing).detach() if missing else None
        out: list[torch.Tensor] = []
        j = 0
        for i, k in enumerate(keys):
            if fresh is not None and j < len(missing) and missing[j] == i:
                feat = fresh[j]
                j += 1
                if len(self.store) < self.capacity:
                    self.store[k] = feat
            else:
                feat = self.store[k]
            out.append(feat)
        return torch.stack(out)  # (B, D)


def attach_cache(tower: nn.Module, capacity: int, params: Callable[[], list[nn.Parameter]]) -> FeatureCache | None:
    """A cache for ``tower`` (None when ``capacity`` is 0), cleared whenever the tower's weights are loaded.

    ``params()`` lists the parameters that must stay frozen for cached features to be valid.
    """
    if capacity <= 0:
        return None
    cache = FeatureCache(capacity)
    tower.register_load_state_dict_post_hook(lambda module, incompatible: cache.clear())
    cache.frozen_params = params  # type: ignore[attr-defined]
    return cache


def check_frozen(cache: FeatureCache, what: str) -> None:
    if any(p.requires_grad for p in cache.frozen_params()):  # type: ignore[attr-defined]
        raise ValueError(
            f"{what}.feature_cache is set but the tower has trainable parameters; cached features are only valid for "
            f"a fully locked tower: set {what}.locked: true with nothing unlocked, or feature_cache: 0"
        )
