"""contrast: contrastive image-text pretraining (CLIP, SigLIP, BLIP, BLIP-2) on any image tower.

Importing the package has no side effects; ``contrast.load`` imports the library on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, device="cpu"):
    """``model, preprocess, tokenizer = contrast.load(RUN_DIR)``; see :func:`contrast.runs.load`."""
    from contrast.runs import load as _load

    return _load(path, device=device)


__all__ = ["load", "__version__"]
