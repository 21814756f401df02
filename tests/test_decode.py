"""The one decode path (contrast.data.decode) and the transforms (contrast.data.transforms).

Expected pixels come from the formats' definitions (EXIF orientation 6 turns the stored image a quarter clockwise;
alpha over white is ``a * c + (1 - a) * 255``; 16-bit grey v is ``v * 255 / 65535``; Pillow's CMYK is ``255 - c``),
and the evaluation transform is compared with timm's ``create_transform``, which it replaces.
"""

from __future__ import annotations

import io
import math
import random
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from contrast.config import AugmentConfig, ConfigError, ImageTowerConfig
from contrast.data.decode import (
    CAUSES,
    BadSample,
    SampleReader,
    Skips,
    StrictDataError,
    clean_caption,
    clean_label,
    load_image,
)
from contrast.data.transforms import build_transform, random_crop_box

# --------------------------------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR says ``width`` x ``height`` (the CRC recomputed, so only the size lies)."""
    data = bytearray(encode(Image.new("RGB", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def bad_crc(data: bytes) -> bytes:
    out = bytearray(data)
    out[29] ^= 0xFF  # the IHDR chunk's CRC
    return bytes(out)


def rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


# --------------------------------------------------------------------------------------------------- inputs


def test_every_kind_of_cell_gives_the_same_rgb_image(tmp_path):
    src = noise(12, 7)
    data = encode(src)
    (tmp_path / "a.png").write_bytes(data)
    cells = [src, data, bytearray(data), {"bytes": data, "path": None}, {"bytes": None, "path": str(tmp_path / "a.png")},
             str(tmp_path / "a.png"), tmp_path / "a.png"]
    for cell in cells:
        img = load_image(cell)
        assert img.size == (12, 7) and np.array_equal(rgb(img), np.asarray(src)), type(cell)


BAD = {
    "truncated PNG": (lambda: encode(noise(64, 64))[:400], "truncated"),
    "PNG cut inside its header": (lambda: encode(noise(64, 64))[:30], "truncated"),
    "truncated JPEG": (lambda: encode(noise(64, 64), "JPEG")[:600], "truncated"),
    "zero bytes": (lambda: b"", "empty_file"),
    "HTML": (lambda: b"<!DOCTYPE html><html><body>404 not found</body></html>", "not_an_image"),
    "SVG": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', "not_an_image"),
    "text": (lambda: b"just some text\n", "not_an_image"),
    "bad IHDR CRC": (lambda: bad_crc(encode(noise(16, 16))), "corrupt"),
    "damaged pixel data": (lambda: (lambda d: d[:80] + b"\x00" * 60 + d[140:])(encode(noise(64, 64))), "corrupt"),
    "decompression bomb": (lambda: png_claiming(30000, 30000), "too_large"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_bytes_are_classified_without_warnings_or_leaked_settings(name):
    make, cause = BAD[name]
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning (or any other) fails the test
        with pytest.raises(BadSample) as err:
            load_image(make())
    assert err.value.cause == cause, err.value
    assert cause in CAUSES
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_paths_that_are_not_images(tmp_path):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "empty.png").write_bytes(b"")
    expected = {"gone.png": "missing", "folder.png": "not_a_file", "empty.png": "empty_file"}
    for name, cause in expected.items():
        with pytest.raises(BadSample) as err:
            load_image(tmp_path / name)
        assert err.value.cause == cause and name in err.value.detail
    for cell, cause in ((None, "missing"), ({"bytes": None, "path": None}, "missing"), (3, "not_an_image")):
        with pytest.raises(BadSample) as err:
            load_image(cell)
        assert err.value.cause == cause


def test_size_is_checked_before_decoding_and_pillow_limit_is_restored():
    img = noise(100, 50)
    with pytest.raises(BadSample, match="100x50 pixels") as err:
        load_image(encode(img), max_pixels=4999)
    assert err.value.cause == "too_large"
    assert load_image(encode(img), max_pixels=5000).size == (100, 50)
    # a limit above Pillow's own: Pillow's check is lifted for the call only; 30000 x 30000 then passes the size
    # check and its (absent) pixel data makes it a truncated file
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadSample) as err:
        load_image(png_claiming(3000, 3000), max_pixels=10**7)
    assert err.value.cause == "truncated" and Image.MAX_IMAGE_PIXELS == before


# --------------------------------------------------------------------------------------------------- conversion


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (32, 16), (255, 0, 0))
    stored.paste((0, 0, 255), (16, 0, 32, 16))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left edge becomes the top
    img = load_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert img.size == (16, 32)
    a = rgb(img)
    assert np.abs(a[2:14, 2:14] - [255, 0, 0]).max() < 40  # top: red
    assert np.abs(a[18:30, 2:14] - [0, 0, 255]).max() < 40  # bottom: blue


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 255), (0, 0, 255, 0), (0, 0, 0, 128)])
    out = rgb(load_image(encode(img)))[0]
    assert out[0].tolist() == [255, 0, 0] and out[1].tolist() == [255, 255, 255]
    assert np.abs(out[2] - 255 * (1 - 128 / 255)).max() <= 1  # black at half alpha over white
    la = Image.new("LA", (1, 1), (0, 0))
    assert rgb(load_image(encode(la)))[0, 0].tolist() == [255, 255, 255]


def test_palette_with_a_transparent_index():
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putdata([0, 1])
    out = rgb(load_image(encode(img, transparency=1)))[0]
    assert out.tolist() == [[255, 0, 0], [255, 255, 255]]  # index 1 (green) is transparent
    assert rgb(load_image(encode(img)))[0].tolist() == [[255, 0, 0], [0, 255, 0]]


def test_16_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored as 16-bit
    out = rgb(load_image(data))[0, :, 0]
    assert out.tolist() == [round(v * 255 / 65535) for v in (0, 1000, 32768, 65535)] == [0, 4, 128, 255]


def test_float_and_32_bit_grey_cmyk_and_animation():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert rgb(load_image(f))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-100, 0, 300]], dtype=np.int32))  # outside 0..65535: its own range
    assert rgb(load_image(wide))[0, :, 0].tolist() == [0, round(100 * 255 / 400), 255]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert rgb(load_image(cmyk))[0, 0].tolist() == [255, 0, 0]
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    assert rgb(load_image(buf.getvalue()))[0, 0].tolist() == [255, 0, 0]


def test_jpeg_draft_decodes_smaller_but_never_below_the_requested_side():
    data = encode(noise(256, 192), "JPEG", quality=90)
    assert load_image(data).size == (256, 192)
    for draft in (20, 48, 49, 96, 97, 192, 500):
        w, h = load_image(data, draft=draft).size
        short = min(w, h)
        assert short >= min(draft, 192), draft
        assert short == 192 or short // 2 < draft or short * 8 == 192, (draft, short)  # the largest scale-down
    assert load_image(encode(noise(256, 192)), draft=20).size == (256, 192)  # PNG: no draft mode


# --------------------------------------------------------------------------------------------------- captions


def test_clean_caption():
    assert clean_caption("  a red circle \n") == ("a red circle", None)
    assert clean_caption("a \ud800 circle") == ("a \ufffd circle", "caption_fixed")  # lone surrogate
    assert clean_caption("\ud83d\ude00 face") == ("\U0001F600 face", "caption_fixed")  # a pair made whole
    assert clean_caption("a\x00b\x1bc") == ("a b c", "caption_fixed")
    assert clean_caption("already \ufffd replaced") == ("already \ufffd replaced", "caption_fixed")
    clean_caption("a \ud800").__getitem__(0).encode("utf-8")  # the result can always be written as UTF-8
    for value, cause in ((None, "no_caption"), (float("nan"), "no_caption"), (7, "no_caption"), ("", "empty_caption"),
                         (" \t\n", "empty_caption"), ("\x00", "empty_caption")):
        with pytest.raises(BadSample) as err:
            clean_caption(value)
        assert err.value.cause == cause, value


def test_clean_label():
    assert clean_label(3) == 3 and clean_label(" cat ") == "cat"
    for value in (None, "", "c\ud800t", True):
        with pytest.raises(BadSample) as err:
            clean_label(value)
        assert err.value.cause == "bad_label"


def test_skips_counts_merges_and_summarises():
    s = Skips()
    for cause in ("truncated", "missing", "truncated", "caption_fixed"):
        s.add(cause, where=f"row of {cause}")
    assert s.as_dict() == {"missing": 1, "truncated": 2, "caption_fixed": 1}  # in the order of CAUSES
    assert s.total == 3 and s.summary() == "skipped 3 samples: 1 missing, 2 truncated; repaired 1 caption (caption_fixed)"
    s.merge({"missing": 2, "corrupt": 0}).merge(Skips({"too_large": 1}))
    assert s.as_dict() == {"missing": 3, "truncated": 2, "too_large": 1, "caption_fixed": 1} and s.total == 6
    assert Skips().summary() == "skipped 0 samples" and not Skips()
    with pytest.raises(ValueError, match="unknown skip cause"):
        s.add("gremlins")


def test_reader_counts_or_stops_when_strict(tmp_path):
    reader = SampleReader()
    assert reader.image(b"", "row 3") is None and reader.caption(None, "row 4") is None
    assert reader.caption("ok\ud800", "row 5") == "ok\ufffd"
    assert reader.skips.as_dict() == {"empty_file": 1, "no_caption": 1, "caption_fixed": 1}
    assert reader.first_error[0] == "row 3"
    strict = SampleReader(strict=True)
    with pytest.raises(StrictDataError, match=r"row 7 \(x.png\) is unusable \(missing.*set data.strict false"):
        strict.image(tmp_path / "x.png", "row 7 (x.png)")
    with pytest.raises(StrictDataError, match="caption_fixed"):
        strict.caption("bad \ud800", "row 8")


# --------------------------------------------------------------------------------------------------- transforms


def tower(size: int = 24, resize: str = "crop") -> ImageTowerConfig:
    return ImageTowerConfig(image_size=size, resize=resize)


@pytest.mark.parametrize("size", [16, 24])
def test_eval_transform_equals_timm(size):
    from timm.data import create_transform

    cfg = tower(size)
    ref = create_transform(input_size=(3, size, size), is_training=False, mean=cfg.mean, std=cfg.std, crop_pct=1.0,
                           interpolation="bicubic")
    tf = build_transform(cfg)
    assert tf.decode_size == size
    for w, h in ((37, 23), (23, 37), (size, size), (size + 1, size), (5, 9), (size, 3 * size), (301, 211)):
        img = noise(w, h, seed=w * h)
        assert torch.equal(tf(img), ref(img)), (w, h)
        assert torch.equal(tf(img, random.Random(0)), ref(img))  # no augmentation configured: the rng is unused


def test_pad_to_square_on_white():
    from timm.data import create_transform

    cfg = tower(16, "pad")
    img = noise(20, 10, seed=1)
    square = np.full((20, 20, 3), 255, np.uint8)
    square[5:15] = np.asarray(img)  # centred vertically by hand
    ref = create_transform(input_size=(3, 16, 16), is_training=False, mean=cfg.mean, std=cfg.std, crop_pct=1.0,
                           interpolation="bicubic")
    assert torch.equal(build_transform(cfg)(img), ref(Image.fromarray(square)))
    with pytest.raises(ConfigError, match="resize must be one of"):
        build_transform(tower(16, "stretch"))


def test_random_resized_crop_is_a_function_of_the_rng_only():
    cfg, aug = tower(16), AugmentConfig(enabled=True, scale=(0.3, 0.6), ratio=(0.75, 4 / 3))
    tf = build_transform(cfg, aug)
    img = noise(40, 30)
    random.seed(1)
    torch.manual_seed(1)
    np.random.seed(1)
    a = tf(img, random.Random(7))
    random.seed(2)
    torch.manual_seed(2)
    np.random.seed(2)
    assert torch.equal(a, tf(img, random.Random(7)))  # global generators play no part
    assert not torch.equal(a, tf(img, random.Random(8)))
    assert a.shape == (3, 16, 16)
    assert torch.equal(tf(img), build_transform(cfg)(img))  # without an rng: the eval transform
    off = build_transform(cfg, AugmentConfig(enabled=False))
    assert torch.equal(off(img, random.Random(7)), build_transform(cfg)(img)) and off.decode_size == 16
    # the short side a decode may shrink to: no crop's narrower side is upsampled (scale 0.3, ratio 3/4)
    assert tf.decode_size == math.ceil(16 / math.sqrt(0.3 * 0.75))


def test_full_crop_of_a_square_equals_the_eval_transform():
    cfg = tower(16)
    tf = build_transform(cfg, AugmentConfig(enabled=True, scale=(1.0, 1.0), ratio=(1.0, 1.0)))
    img = noise(40, 40, seed=3)
    assert torch.equal(tf(img, random.Random(0)), build_transform(cfg)(img))


def test_crop_boxes_respect_scale_and_ratio():
    rng = random.Random(0)
    areas, ratios = [], []
    for _ in range(500):
        left, top, right, bottom = random_crop_box((200, 120), (0.2, 0.5), (0.75, 4 / 3), rng)
        w, h = right - left, bottom - top
        assert 0 <= left and right <= 200 and 0 <= top and bottom <= 120
        areas.append(w * h / (200 * 120))
        ratios.append(w / h)
    assert 0.19 < min(areas) < 0.23 and 0.46 < max(areas) < 0.51  # rounding to whole pixels: a little slack
    assert 0.73 < min(ratios) < 0.8 and 1.28 < max(ratios) < 1.36
    # a range no crop fits (scale 1, a 3:1 ratio on a square): the largest centred crop of an allowed ratio
    assert random_crop_box((90, 90), (1.0, 1.0), (3.0, 3.0), random.Random(0)) == (0, 30, 90, 60)
    with pytest.raises(ConfigError, match="data.augment.scale"):
        build_transform(tower(), AugmentConfig(enabled=True, scale=(0.0, 1.0)))
