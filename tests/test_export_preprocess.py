"""Every export's preprocessing config, read by its own library, reproduces our eval pixels on non-square images.

timm (resolve_data_config + create_transform) and open_clip (its transform from open_clip_config.json) match exactly.
Hugging Face's image processor floors the centre-crop offset where we (and torchvision) round it half to even: its
crop is ours shifted by one pixel when the resized long side exceeds the size by 4k + 3, and the same pixels
otherwise; its default torchvision backend resizes within 1/255 of PIL. With ``resize: pad`` the image is padded to a
white square first (no library's config expresses that step); the exported preprocessing then gives our pixels.
"""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image

from contrast.config import ClipModelConfig, ImageTowerConfig, TextTowerConfig
from contrast.data.transforms import build_transform, pad_square
from contrast.export import PREPROCESS_NOTE, export_hf, export_open_clip, export_timm
from contrast.models import build_model

S = 32
# (width, height): landscape and portrait, long side resized to S + 13, + 11 (a 4k + 3 excess: HF's crop shifts),
# + 46, + 20, + 1; one square
SIZES = [(45, 32), (32, 45), (50, 37), (100, 41), (37, 61), (33, 32), (200, 64), (64, 64)]
TOWERS = {
    "clip": ("vit_tiny_patch16_224", dict(patch_size=8, embed_dim=32, depth=1, num_heads=2, pre_norm=True)),
    "siglip": ("vit_base_patch16_siglip_224", dict(img_size=S, patch_size=8, embed_dim=32, depth=1, num_heads=2)),
}
EXACT = 1e-5  # normalised units: float rounding only


def _model(kind: str, resize: str):
    name, kwargs = TOWERS[kind]
    torch.manual_seed(0)
    cfg = ClipModelConfig(
        image=ImageTowerConfig(name=name, kwargs=kwargs, image_size=S, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                               resize=resize),
        text=TextTowerConfig(context_length=12, width=32, layers=1, heads=2),
        embed_dim=16,
    )
    return build_model(cfg).eval()


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)  # noise: a one-pixel shift shows everywhere
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def _hf_offsets(w: int, h: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(ours, Hugging Face's) (left, top) crop offsets after the short side is resized to S."""
    new_w, new_h = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)
    ours = (int(round((new_w - S) / 2)), int(round((new_h - S) / 2)))
    return ours, ((new_w - S) // 2, (new_h - S) // 2)


def _floor_crop(img: Image.Image, mean, std) -> torch.Tensor:
    """A hand-made reference of Hugging Face's pixels: short side to S (PIL bicubic), crop at the floored offset."""
    w, h = img.size
    new = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)
    img = img.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - S) // 2, (new[1] - S) // 2
    x = torch.from_numpy(np.asarray(img.crop((left, top, left + S, top + S)), dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _prepare(img: Image.Image, resize: str) -> Image.Image:
    return pad_square(img) if resize == "pad" else img


@pytest.mark.parametrize("resize", ["crop", "pad"])
@pytest.mark.parametrize("kind", list(TOWERS))
def test_timm_export_transform_equals_ours(tmp_path, kind, resize):
    from timm.data import create_transform, resolve_data_config

    m = _model(kind, resize)
    export_timm(m.image, tmp_path)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    theirs = create_transform(**resolve_data_config({}, model=loaded))
    ours = build_transform(m.image.cfg)
    for img in _images():
        assert torch.allclose(theirs(_prepare(img, resize)), ours(img), atol=EXACT), img.size
    note = json.loads((tmp_path / PREPROCESS_NOTE).read_text())
    assert note["resize"] == resize and ("pad" in note["steps"][0]) == (resize == "pad")


@pytest.mark.parametrize("resize", ["crop", "pad"])
def test_open_clip_export_transform_equals_ours(tmp_path, resize):
    m = _model("clip", resize)
    export_open_clip(m, tmp_path)
    _, _, theirs = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    ours = build_transform(m.image.cfg)
    for img in _images():
        assert torch.allclose(theirs(_prepare(img, resize)), ours(img), atol=EXACT), img.size


@pytest.mark.parametrize("resize", ["crop", "pad"])
@pytest.mark.parametrize("kind", list(TOWERS))
def test_hf_export_processor_equals_ours_up_to_its_floored_crop(tmp_path, kind, resize):
    from transformers import AutoImageProcessor

    m = _model(kind, resize)
    export_hf(m.image, tmp_path)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert pre["image_processor_type"] == "CLIPImageProcessor" and pre["do_center_crop"]  # never a squash
    pil = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    default = AutoImageProcessor.from_pretrained(str(tmp_path))
    ours = build_transform(m.image.cfg)
    cfg = m.image.cfg
    shifted = 0
    for img in _images():
        x = _prepare(img, resize)
        got = pil(images=x, return_tensors="pt")["pixel_values"][0]
        want = ours(img)
        (ol, ot), (hl, ht) = _hf_offsets(*x.size)
        assert abs(ol - hl) <= 1 and abs(ot - ht) <= 1
        if (ol, ot) == (hl, ht):
            assert torch.allclose(got, want, atol=EXACT), x.size
        else:  # one pixel off along the long side, and otherwise the same pixels
            shifted += 1
            assert not torch.allclose(got, want, atol=0.1), x.size
            assert torch.allclose(got, _floor_crop(x, cfg.mean, cfg.std), atol=EXACT), x.size
        fast = default(images=x, return_tensors="pt")["pixel_values"][0]
        assert float(((fast - got) * torch.tensor(cfg.std).view(3, 1, 1)).abs().max()) <= 1 / 255 + 1e-6
    assert shifted == (1 if resize == "crop" else 0)  # 50 x 37: resized to 43 x 32, an excess of 11
