"""Image preprocessing: RGB PIL image -> normalised (3, S, S) float tensor, S = ``model.image.image_size``.

- Evaluation (and training with augmentation off): the short side is resized to S (bicubic, antialiased) and the
  centre S x S cropped -- the same pixels as timm's ``create_transform(is_training=False, crop_pct=1.0,
  interpolation="bicubic")``.
- Training (``data.augment.enabled`` and a ``random.Random`` passed per sample): a random resized crop, its area
  share drawn from ``augment.scale`` and its aspect ratio (log-uniform) from ``augment.ratio``, resized bicubic to
  S x S. The crop is drawn only from the given generator, so a sample's augmentation is a pure function of its
  seed (exact resume, replayed batches). No flips: captions name left and right.
- ``data.augment.views: V`` > 0 limits each image to V crops (a sample draws one of them; see
  :func:`contrast.data.collate.view_rng`), so a locked tower's feature cache hits once all have been seen.
- ``model.image.resize: pad`` first pads the image to a square on white (centred), for art and icons whose edges
  matter; then either of the above.

``decode_size`` is the short side a JPEG may be decoded at (Pillow's draft mode, 1/2 to 1/8 scale) without the
output losing resolution; :func:`contrast.data.decode.load_image` takes it as ``draft``.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

from contrast.config import AugmentConfig, ConfigError, ImageTowerConfig

RESIZE_MODES = ("crop", "pad")
PAD_FILL = (255, 255, 255)


class ImageTransform:
    """``tf(img, rng=None) -> (3, S, S)``; the random resized crop applies when augmenting and ``rng`` is given."""

    def __init__(self, cfg: ImageTowerConfig, augment: AugmentConfig | None = None):
        if cfg.resize not in RESIZE_MODES:
            raise ConfigError(f"model.image.resize must be one of {RESIZE_MODES}, got {cfg.resize!r}")
        self.size = int(cfg.image_size)
        self.pad = cfg.resize == "pad"
        self.mean = torch.as_tensor(cfg.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(cfg.std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment if augment is not None and augment.enabled else None
        if self.augment is not None:
            _check_augment(self.augment)
        self.views = self.augment.views if self.augment is not None else 0  # crops per image (0: unlimited)
        self.decode_size = self._decode_size()

    def _decode_size(self) -> int:
        """Short side needed so that no output pixel is upsampled: S for the centre crop; for a random crop of area
        share ``s`` and aspect ``r``, its narrower side is ``sqrt(s * min(r, 1/r))`` of the short side at worst."""
        if self.augment is None:
            return self.size
        lo, hi = self.augment.ratio
        squeeze = min(1.0, lo, 1.0 / hi)  # worst min(r, 1/r) over the ratio range
        return math.ceil(self.size / math.sqrt(self.augment.scale[0] * squeeze) - 1e-9)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return self.normalise(self.pixels(img, rng).contiguous())

    def pixels(self, img: Image.Image, rng: random.Random | None = None, plan: CropPlan | None = None
               ) -> torch.Tensor:
        """The cropped, resized image as a uint8 (3, S, S) tensor, before normalisation. Training batches travel
        from the decoding workers in this form (a quarter of the bytes of float) and are normalised on the
        training device (:func:`normalise_batch`). ``plan`` (from :meth:`crop_plan`, handed to the decoder as its
        draft) holds the random crop drawn on the full-size image, mapped here onto the decoded one."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        if self.pad:
            img = pad_square(img)
        if plan is not None and not self.pad:
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=plan.box_on(img.size))
        elif self.augment is not None and rng is not None:
            box = random_crop_box(img.size, self.augment.scale, self.augment.ratio, rng)
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        else:
            img = resize_centre_crop(img, self.size)
        # (3, S, S), a view of the (S, S, 3) pixels: stacking a batch makes the one channels-first copy
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)

    def crop_plan(self, rng: random.Random | None) -> CropPlan | None:
        """A training sample's crop, drawn from ``rng`` on the full-size image when the decoder reports its size
        (before decoding, so a JPEG decodes at the smallest scale the crop allows); None when padding to a square
        or not augmenting (the plain transform then applies, with ``decode_size`` as the draft)."""
        if self.pad or self.augment is None or rng is None:
            return None
        return CropPlan(self.size, self.augment, rng)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float: /255, minus mean, over std (the operations of torchvision's ToTensor and
        Normalize, in their order, so the values are bit-identical)."""
        return normalise_batch(x, self.mean, self.std)

    def __repr__(self) -> str:
        how = "random resized crop" if self.augment is not None else "resize + centre crop"
        return f"ImageTransform({self.size}px, {how}{', pad to square' if self.pad else ''})"


class CropPlan:
    """A random resized crop drawn once, on the full-size upright image: called by the decoder with that size, it
    draws the box and returns the smallest size the decoded image may have (each side of the box still at least the
    output size); :meth:`box_on` maps the box onto the image as decoded (the same region, in its pixels)."""

    def __init__(self, size: int, augment: AugmentConfig, rng: random.Random):
        self.size, self.augment, self.rng = size, augment, rng
        self.full: tuple[int, int] | None = None
        self.box: tuple[int, int, int, int] | None = None

    def __call__(self, full: tuple[int, int]) -> tuple[int, int]:
        self.full = full
        self.box = random_crop_box(full, self.augment.scale, self.augment.ratio, self.rng)
        left, top, right, bottom = self.box
        s = min(1.0, max(self.size / (right - left), self.size / (bottom - top)))  # the scale the crop allows
        return math.ceil(full[0] * s), math.ceil(full[1] * s)

    def box_on(self, decoded: tuple[int, int]) -> tuple[float, float, float, float]:
        if self.box is None:  # the decoder did not ask (not a JPEG, or an image given decoded): decoded is full size
            self(decoded)
        fx, fy = decoded[0] / self.full[0], decoded[1] / self.full[1]
        left, top, right, bottom = self.box
        return left * fx, top * fy, right * fx, bottom * fy


def normalise_batch(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> float32 normalised, on ``x``'s device; ``mean`` / ``std`` are (3, 1, 1)."""
    mean, std = mean.to(x.device), std.to(x.device)
    return x.to(torch.float32).div_(255).sub_(mean).div_(std)


def build_transform(cfg: ImageTowerConfig, augment: AugmentConfig | None = None) -> ImageTransform:
    """The transform for images fed to a tower of ``cfg``; training augmentation when ``augment`` is enabled."""
    return ImageTransform(cfg, augment)


def model_transform(model_cfg, augment: AugmentConfig | None = None):
    """The transform a model's images take: a tiled cross-attention decoder's (``model.bridge.max_num_tiles`` > 1:
    :class:`~contrast.data.tiles.TileTransform`), else the tower's."""
    tiles = model_cfg.bridge.max_num_tiles if model_cfg.kind == "decoder" else 1
    if tiles > 1:
        from contrast.data.tiles import TileTransform

        return TileTransform(model_cfg.image, tiles)
    return build_transform(model_cfg.image, augment)


def _check_augment(a: AugmentConfig) -> None:
    lo, hi = a.scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.augment.scale must satisfy 0 < min <= max <= 1 (shares of the image area), got {a.scale}")
    lo, hi = a.ratio
    if not 0 < lo <= hi:
        raise ConfigError(f"data.augment.ratio must satisfy 0 < min <= max (width / height), got {a.ratio}")
    if a.views < 0:
        raise ConfigError(f"data.augment.views must be 0 (a fresh crop per sample) or a number of crops, got {a.views}")


def pad_square(img: Image.Image) -> Image.Image:
    """``img`` centred on a white square whose side is its longer side."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), PAD_FILL)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_centre_crop(img: Image.Image, size: int) -> Image.Image:
    """Short side to ``size`` (bicubic; the long side rounded down), then the centre ``size`` x ``size``."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    if (new_w, new_h) == (size, size):
        return img
    return img.crop((left, top, left + size, top + size))


def random_crop_box(size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float],
                    rng: random.Random, attempts: int = 10) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a crop covering a share of the area drawn uniformly from ``scale``, with
    an aspect ratio (width / height) drawn log-uniformly from ``ratio``; after ``attempts`` draws that do not fit
    the image, the largest centred crop whose ratio lies in ``ratio``."""
    w, h = size
    area = w * h
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            return left, top, left + cw, top + ch
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif aspect > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return left, top, left + cw, top + ch
