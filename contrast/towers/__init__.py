"""Image and text towers. Every tower offers the same small interface:

``forward_tokens(x) -> (B, N, D)``, ``pool(tokens) -> (B, D)``, ``width``, ``lock()``,
``set_grad_checkpointing()``, ``forward_intermediates(x, indices)``; and ``embed(x) -> (B, E)`` through its
projection. The Q-Former and the decoder bridges depend on that interface only.
"""

from contrast.towers.image import ImageTower
from contrast.towers.text import TextTower

__all__ = ["ImageTower", "TextTower"]
