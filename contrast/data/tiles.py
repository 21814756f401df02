"""Image tiling for the cross-attention bridge, as Llama 3.2 Vision (Mllama) prepares its images.

An image is resized, keeping its aspect ratio, into the best canvas of whole ``tile_size`` tiles (at most
``max_num_tiles`` of them), padded with zeros on the right and bottom, and cut into tiles in row-major order. A batch
holds ``max_num_tiles`` tiles per image (unused ones zero), the image's aspect-ratio id and a mask of its real tiles.
The rules, ids and tile order are those of Hugging Face's ``MllamaImageProcessor`` (tests compare against it):

- the grids are every ``(rows, cols)`` with ``rows * cols <= max_num_tiles``, in the order of
  :func:`supported_aspect_ratios`; an image's aspect-ratio id is its grid's index there plus one (0 is left for
  padding). Mllama's docstrings call the pair (width, height), but its processor reads the first number as the tile
  rows (a tall image of 2 x 1 tiles gets the id of ``(2, 1)``); this module follows the processor;
- the canvas (:func:`best_canvas`) is the one needing the smallest upscaling when some canvas holds the image without
  shrinking it, else the one shrinking it least; ties go to the smallest area;
- the resized size (:func:`fitted_size`) keeps each side between ``tile_size`` and the canvas, the aspect ratio set
  by the side that shrinks most, never below one pixel.

Pixels stay uint8 (the training device normalises them, :func:`contrast.data.transforms.normalise_batch`); padding
is 0 before normalisation, as in Mllama. :func:`tiled_features` runs any tower over the real tiles of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as tvF

from contrast.config import ConfigError
from contrast.data.sources import DataError

RESAMPLE = {
    "nearest": tvF.InterpolationMode.NEAREST,
    "bilinear": tvF.InterpolationMode.BILINEAR,  # Mllama's (Llama 3.2 Vision's processor config)
    "bicubic": tvF.InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class TiledImage:
    """One image cut into tiles. ``pixels``: uint8 (max_num_tiles, 3, S, S), tiles past ``num_tiles`` all zero;
    ``aspect_ratio``: the grid as ``(rows, cols)`` of tiles (Mllama's pair); ``aspect_ratio_id``: its index in
    :func:`supported_aspect_ratios` plus one; ``num_tiles``: rows * cols."""

    pixels: torch.Tensor
    aspect_ratio_id: int
    num_tiles: int
    aspect_ratio: tuple[int, int]


def _check_sizes(tile_size: int, max_num_tiles: int) -> None:
    if max_num_tiles < 1:
        raise ConfigError(f"max_num_tiles must be 1 or more (tiles per image), got {max_num_tiles}")
    if tile_size < 1:
        raise ConfigError(f"tile_size must be 1 or more pixels (the tower's image size), got {tile_size}")


def supported_aspect_ratios(max_num_tiles: int) -> list[tuple[int, int]]:
    """Every tile grid ``(rows, cols)`` with at most ``max_num_tiles`` tiles, in Mllama's order (first number
    ascending, then the second); aspect-ratio id = index + 1."""
    _check_sizes(1, max_num_tiles)
    n = max_num_tiles
    return [(a, b) for a in range(1, n + 1) for b in range(1, n + 1) if a * b <= n]


def best_canvas(height: int, width: int, tile_size: int, max_num_tiles: int) -> tuple[int, int]:
    """``(canvas_h, canvas_w)`` in pixels for an image of ``height`` x ``width``: the grid whose scale (the smaller of
    canvas/image over the two sides) is the smallest >= 1, or else the largest < 1; ties to the smallest area, then to
    the earlier grid."""
    _check_sizes(tile_size, max_num_tiles)
    _check_image_size(height, width)
    canvases = [(r * tile_size, c * tile_size) for r, c in supported_aspect_ratios(max_num_tiles)]
    scales = [min(ch / height, cw / width) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    candidates = [cv for cv, s in zip(canvases, scales) if s == chosen]
    return min(candidates, key=lambda cv: cv[0] * cv[1])  # min keeps the first of equal areas


def fitted_size(height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int) -> tuple[int, int]:
    """The ``(h, w)`` the image is resized to inside its canvas: each side's target is clipped to
    ``[tile_size, canvas]``; the side that scales less sets the scale, the other side follows (floored, at least 1,
    at most its target)."""
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def _check_image_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise DataError(f"an image of {width} x {height} pixels has nothing to tile; drop it from the data")


def _as_uint8_chw(img: Image.Image | torch.Tensor) -> torch.Tensor:
    """An RGB PIL image or a uint8 (3, H, W) tensor -> uint8 (3, H, W) tensor (a view of the PIL pixels)."""
    if isinstance(img, Image.Image):
        _check_image_size(img.height, img.width)
        if img.mode != "RGB":
            img = img.convert("RGB")
        # (H, W, 3) -> (3, H, W)
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    if not isinstance(img, torch.Tensor) or img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
        what = f"{img.dtype} tensor of shape {tuple(img.shape)}" if isinstance(img, torch.Tensor) else type(img).__name__
        raise DataError(f"tile_image takes a PIL image or a uint8 (3, H, W) tensor, got a {what}; convert it first")
    _check_image_size(img.shape[1], img.shape[2])
    return img


def tile_image(img: Image.Image | torch.Tensor, tile_size: int, max_num_tiles: int,
               resample: str = "bilinear") -> TiledImage:
    """Resize ``img`` into its :func:`best_canvas` (aspect ratio kept, antialiased), pad right and bottom with 0 and
    cut it into row-major tiles; see :class:`TiledImage`."""
    _check_sizes(tile_size, max_num_tiles)
    if resample not in RESAMPLE:
        raise ConfigError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    x = _as_uint8_chw(img)
    h, w = x.shape[1:]
    canvas_h, canvas_w = best_canvas(h, w, tile_size, max_num_tiles)
    new_h, new_w = fitted_size(h, w, canvas_h, canvas_w, tile_size)
    if (new_h, new_w) != (h, w):
        x = tvF.resize(x, [new_h, new_w], interpolation=RESAMPLE[resample], antialias=True)
    rows, cols = canvas_h // tile_size, canvas_w // tile_size
    canvas = x.new_zeros(3, canvas_h, canvas_w)
    canvas[:, :new_h, :new_w] = x
    # (3, rows, S, cols, S) -> (rows, cols, 3, S, S) -> (rows * cols, 3, S, S), row-major
    tiles = canvas.view(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4).reshape(-1, 3, tile_size, tile_size)
    pixels = x.new_zeros(max_num_tiles, 3, tile_size, tile_size)
    pixels[: rows * cols] = tiles
    grid = (rows, cols)
    return TiledImage(pixels=pixels, aspect_ratio_id=supported_aspect_ratios(max_num_tiles).index(grid) + 1,
                      num_tiles=rows * cols, aspect_ratio=grid)


def aspect_ratio_mask(num_tiles: torch.Tensor, max_num_tiles: int) -> torch.Tensor:
    """bool (B, max_num_tiles): True for each image's first ``num_tiles`` tiles (its real ones)."""
    _check_sizes(1, max_num_tiles)
    return torch.arange(max_num_tiles, device=num_tiles.device) < num_tiles[:, None]  # (B, T)


def collate_tiles(images: list[TiledImage]) -> dict[str, torch.Tensor]:
    """A batch of tiled images: ``pixels`` uint8 (B, T, 3, S, S), ``aspect_ratio_ids`` long (B,), ``tile_mask`` bool
    (B, T). All images must share the tile size and ``max_num_tiles``."""
    if not images:
        raise DataError("collate_tiles got no images; a batch needs at least one")
    shapes = {tuple(t.pixels.shape) for t in images}
    if len(shapes) > 1:
        raise DataError(f"tiled images of different tile size or max_num_tiles in one batch: {sorted(shapes)}; "
                        "tile every image of a batch with the same settings")
    num_tiles = torch.tensor([t.num_tiles for t in images], dtype=torch.long)
    return {
        "pixels": torch.stack([t.pixels for t in images]),  # (B, T, 3, S, S)
        "aspect_ratio_ids": torch.tensor([t.aspect_ratio_id for t in images], dtype=torch.long),
        "tile_mask": aspect_ratio_mask(num_tiles, images[0].pixels.shape[0]),
    }


def tiled_features(tower_fn: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                   tile_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``tower_fn`` ((n, 3, S, S) -> (n, N, D)) once over the real tiles of ``pixels`` (B, T, 3, S, S) and return
    ``features`` (B, T * N, D), tile-major, zero for padded tiles, and ``context_mask`` bool (B, T * N), False there.

    Only the tiles where ``tile_mask`` (B, T) is True go through the tower (picking them reads the mask on the host,
    once per batch). A batch with no real tile still runs the tower on one tile, so every rank of a sharded tower
    calls it."""
    b, t = tile_mask.shape
    if pixels.shape[:2] != (b, t):
        raise DataError(f"pixels {tuple(pixels.shape)} and tile_mask {tuple(tile_mask.shape)} disagree on (B, T)")
    flat = pixels.reshape(b * t, *pixels.shape[2:])  # (B*T, 3, S, S)
    real = tile_mask.reshape(b * t).nonzero().squeeze(1)  # (n,) indices of real tiles
    feats = tower_fn(flat[real] if real.numel() else flat[:1])  # (n, N, D)
    n_tok, dim = feats.shape[1:]
    out = feats.new_zeros(b * t, n_tok, dim)
    if real.numel():
        out = out.index_copy(0, real, feats)
    context_mask = tile_mask[:, :, None].expand(b, t, n_tok).reshape(b, t * n_tok)  # (B, T*N)
    return out.reshape(b, t * n_tok, dim), context_mask  # (B, T*N, D)


class TileTransform:
    """The transform of a tiled model: ``pixels(img)`` -> ``{pixels: uint8 (T, 3, S, S), aspect_ratio_ids: (), tile_mask:
    (T,)}`` (the whole image tiled, no random crop: tiling is about keeping its shape), ``tf(img)`` the same with the
    pixels normalised. It stands where :class:`~contrast.data.transforms.ImageTransform` stands in the data path."""

    views = 0
    decode_size = None

    def __init__(self, cfg, max_num_tiles: int):
        _check_sizes(int(cfg.image_size), max_num_tiles)
        self.size, self.max_num_tiles = int(cfg.image_size), int(max_num_tiles)
        self.mean = torch.as_tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)

    def crop_plan(self, rng) -> None:
        return None

    def pixels(self, img, rng=None, plan=None) -> dict[str, torch.Tensor]:
        t = tile_image(img, self.size, self.max_num_tiles)
        mask = aspect_ratio_mask(torch.tensor([t.num_tiles]), self.max_num_tiles)[0]
        return {"pixels": t.pixels, "aspect_ratio_ids": torch.tensor(t.aspect_ratio_id), "tile_mask": mask}

    def __call__(self, img, rng=None) -> dict[str, torch.Tensor]:
        out = self.pixels(img)
        return {**out, "pixels": out["pixels"].float().div_(255).sub_(self.mean).div_(self.std)}
