"""Mllama-style tiling (contrast.data.tiles) against Hugging Face's MllamaImageProcessor: canvas choice, aspect-ratio
ids, tile counts, masks and pixels; tiled_features against a per-image loop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from contrast.config import ConfigError
from contrast.data.sources import DataError
from contrast.data.tiles import (
    TiledImage,
    aspect_ratio_mask,
    best_canvas,
    collate_tiles,
    fitted_size,
    supported_aspect_ratios,
    tile_image,
    tiled_features,
)
from contrast.data.transforms import normalise_batch

mllama = pytest.importorskip("transformers.models.mllama.image_processing_mllama")

S = 28
# (height, width): tall, wide, tiny, huge, square, 1 x N, N x 1, sizes needing no resize, odd ones
SIZES = [(300, 40), (40, 300), (1, 1), (3, 5), (2000, 1500), (1500, 2000), (28, 28), (100, 100), (1, 500),
         (500, 1), (28, 42), (56, 28), (84, 28), (28, 112), (57, 29), (29, 57), (83, 85)]
MEAN = torch.full((3, 1, 1), 0.5)  # Mllama's processor defaults (IMAGENET_STANDARD_MEAN / STD)
STD = torch.full((3, 1, 1), 0.5)


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + h * 7919 + w)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _reference(img: Image.Image, max_tiles: int, tile: int = S):
    proc = mllama.MllamaImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=max_tiles)
    return proc(images=[[img]], return_tensors="pt")


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 9])
def test_supported_aspect_ratios_are_mllamas(n):
    assert supported_aspect_ratios(n) == mllama.get_all_supported_aspect_ratios(n)


def test_best_canvas_and_fitted_size_match_mllama_on_many_sizes():
    rng = random.Random(0)
    sizes = SIZES + [(rng.randint(1, 400), rng.randint(1, 400)) for _ in range(300)]
    for n in (1, 2, 4, 6):
        for tile in (14, 28):
            for h, w in sizes:
                ref = tuple(int(v) for v in mllama.get_optimal_tiled_canvas(h, w, n, tile))
                assert best_canvas(h, w, tile, n) == ref, (h, w, n, tile)
                ref_fit = mllama.get_image_size_fit_to_canvas(h, w, ref[0], ref[1], tile)
                assert fitted_size(h, w, *ref, tile) == tuple(int(v) for v in ref_fit), (h, w, n, tile)


def test_best_canvas_hand_computed():
    # 2S x S (tall) with 4 tiles: the 2 x 1 grid holds it unscaled
    assert best_canvas(56, 28, 28, 4) == (56, 28)
    # a large square shrinks least into 2 x 2
    assert best_canvas(1000, 1000, 28, 4) == (56, 56)
    # a tiny image: every grid upscales it; the smallest upscaling (scale 28 on both 1x1 and wider grids) -> least area
    assert best_canvas(1, 1, 28, 4) == (28, 28)


@pytest.mark.parametrize("max_tiles", [1, 2, 4])
def test_tiles_match_mllama_processor(max_tiles):
    for h, w in SIZES:
        img = _image(h, w)
        ref = _reference(img, max_tiles)
        ours = tile_image(img, S, max_tiles)
        assert ours.pixels.dtype == torch.uint8 and ours.pixels.shape == (max_tiles, 3, S, S)
        assert [[ours.num_tiles]] == ref["num_tiles"], (h, w)
        assert ours.aspect_ratio_id == int(ref["aspect_ratio_ids"][0, 0]), (h, w)
        ratios = supported_aspect_ratios(max_tiles)
        assert ratios[ours.aspect_ratio_id - 1] == ours.aspect_ratio
        rows, cols = ours.aspect_ratio
        assert best_canvas(h, w, S, max_tiles) == (rows * S, cols * S)
        mask = aspect_ratio_mask(torch.tensor([ours.num_tiles]), max_tiles)
        assert mask.shape == ref["aspect_ratio_mask"][:, 0].shape
        assert torch.equal(mask.long(), ref["aspect_ratio_mask"][:, 0]), (h, w)
        n = ours.num_tiles
        got = normalise_batch(ours.pixels[:n], MEAN, STD)
        want = ref["pixel_values"][0, 0, :n]
        # the same resize kernel (torchvision's antialiased uint8 resize) as Mllama: equal up to float rounding
        assert torch.allclose(got, want, atol=1e-6, rtol=0), (h, w, (got - want).abs().max())
        assert not ours.pixels[n:].any()


@pytest.mark.parametrize("h,w,max_tiles", [(28, 42, 4), (56, 28, 4), (28, 112, 4), (28, 28, 1), (56, 56, 4),
                                           (28, 50, 2)])
def test_unresized_images_match_mllama_exactly(h, w, max_tiles):
    img = _image(h, w, seed=3)
    canvas = best_canvas(h, w, S, max_tiles)
    assert fitted_size(h, w, *canvas, S) == (h, w)  # these sizes need no resize: pixels compare exactly
    ref = _reference(img, max_tiles)
    ours = tile_image(img, S, max_tiles)
    n = ours.num_tiles
    assert torch.allclose(normalise_batch(ours.pixels[:n], MEAN, STD), ref["pixel_values"][0, 0, :n], atol=1e-6,
                          rtol=0)
    # row-major tiles: the second tile of a one-row grid is the next S columns of the image
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    rows, cols = ours.aspect_ratio
    if cols > 1:
        width = min(w - S, S)
        assert torch.equal(ours.pixels[1][:, :min(h, S), :width], x[:, :min(h, S), S:S + width])
    if rows > 1:
        assert torch.equal(ours.pixels[cols][:, :min(h - S, S), :min(w, S)], x[:, S:2 * S, :min(w, S)])


def test_tensor_input_equals_pil_input_and_grey_is_converted():
    img = _image(70, 130)
    from_pil = tile_image(img, S, 4)
    from_tensor = tile_image(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(), S, 4)
    assert torch.equal(from_pil.pixels, from_tensor.pixels)
    assert (from_pil.aspect_ratio_id, from_pil.num_tiles) == (from_tensor.aspect_ratio_id, from_tensor.num_tiles)
    grey = img.convert("L")
    assert torch.equal(tile_image(grey, S, 4).pixels, tile_image(grey.convert("RGB"), S, 4).pixels)


def test_bicubic_resample_matches_mllama_bicubic():
    img = _image(150, 90)
    proc = mllama.MllamaImageProcessor(size={"height": S, "width": S}, max_image_tiles=4, resample=3)  # BICUBIC
    ref = proc(images=[[img]], return_tensors="pt")
    ours = tile_image(img, S, 4, resample="bicubic")
    n = ours.num_tiles
    assert torch.allclose(normalise_batch(ours.pixels[:n], MEAN, STD), ref["pixel_values"][0, 0, :n],
                          atol=1e-6, rtol=0)
    assert not torch.equal(ours.pixels, tile_image(img, S, 4).pixels)  # the filter choice reaches the pixels


def test_collate_matches_mllama_batch():
    imgs = [_image(300, 40), _image(40, 300), _image(5, 5), _image(900, 900)]
    tiled = [tile_image(im, S, 4) for im in imgs]
    batch = collate_tiles(tiled)
    proc = mllama.MllamaImageProcessor(size={"height": S, "width": S}, max_image_tiles=4)
    ref = proc(images=[[im] for im in imgs], return_tensors="pt")
    assert batch["pixels"].shape == (4, 4, 3, S, S) and batch["pixels"].dtype == torch.uint8
    assert torch.equal(batch["aspect_ratio_ids"], ref["aspect_ratio_ids"][:, 0])
    assert batch["tile_mask"].dtype == torch.bool
    assert torch.equal(batch["tile_mask"].long(), ref["aspect_ratio_mask"][:, 0])
    for i, t in enumerate(tiled):
        assert torch.equal(batch["pixels"][i], t.pixels)


def test_aspect_ratio_mask_hand_computed():
    got = aspect_ratio_mask(torch.tensor([1, 3, 4]), 4)
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(got, want)


def _tiny_tower(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, S, S) -> (n, 4, 3): the means of the four quadrants, per channel, times a learnable-looking weight."""
    n, c, s, _ = x.shape
    q = x.float().reshape(n, c, 2, s // 2, 2, s // 2).mean(dim=(3, 5))  # (n, 3, 2, 2)
    return q.flatten(2).transpose(1, 2) * torch.tensor([1.0, 2.0, 3.0])  # (n, 4, 3)


def test_tiled_features_equals_per_image_loop_and_skips_padded_tiles():
    tiled = [tile_image(_image(h, w), S, 4) for h, w in [(300, 40), (20, 20), (900, 900), (40, 90)]]
    batch = collate_tiles(tiled)
    calls = []

    def tower(x):
        calls.append(x.shape[0])
        return _tiny_tower(x)

    feats, ctx = tiled_features(tower, batch["pixels"], batch["tile_mask"])
    assert calls == [sum(t.num_tiles for t in tiled)]  # one call, real tiles only
    assert feats.shape == (4, 4 * 4, 3) and ctx.shape == (4, 16) and ctx.dtype == torch.bool
    for i, t in enumerate(tiled):
        want = torch.zeros(4, 4, 3)
        want[: t.num_tiles] = _tiny_tower(t.pixels[: t.num_tiles])
        assert torch.allclose(feats[i], want.reshape(16, 3))  # tile-major: tile j's tokens at j*N .. j*N+N-1
        assert ctx[i].tolist() == [j < t.num_tiles for j in range(4) for _ in range(4)]


def test_tiled_features_gradients_reach_only_real_tiles():
    batch = collate_tiles([tile_image(_image(300, 40), S, 4), tile_image(_image(9, 9), S, 4)])
    w = torch.ones(3, requires_grad=True)
    feats, ctx = tiled_features(lambda x: _tiny_tower(x) * w, batch["pixels"], batch["tile_mask"])
    feats.sum().backward()
    real = batch["pixels"][batch["tile_mask"]]
    assert torch.allclose(w.grad, _tiny_tower(real).sum(dim=(0, 1)))


def test_tiled_features_with_no_real_tile_still_calls_the_tower():
    calls = []
    pixels = torch.zeros(2, 3, 3, S, S, dtype=torch.uint8)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    feats, ctx = tiled_features(lambda x: calls.append(x.shape[0]) or _tiny_tower(x), pixels, mask)
    assert calls == [1] and feats.shape == (2, 12, 3) and not feats.any() and not ctx.any()


def test_bad_input_raises_one_line_errors():
    img = _image(10, 10)
    cases = [
        (ConfigError, lambda: tile_image(img, S, 0), "max_num_tiles"),
        (ConfigError, lambda: tile_image(img, 0, 4), "tile_size"),
        (ConfigError, lambda: supported_aspect_ratios(0), "max_num_tiles"),
        (ConfigError, lambda: tile_image(img, S, 4, resample="lanczos"), "resample"),
        (DataError, lambda: tile_image(Image.new("RGB", (0, 5)), S, 4), "0 x 5"),
        (DataError, lambda: tile_image(torch.zeros(3, 4, 0, dtype=torch.uint8), S, 4), "0 x 4"),
        (DataError, lambda: tile_image(torch.zeros(3, 4, 4), S, 4), "uint8"),
        (DataError, lambda: best_canvas(0, 3, S, 4), "nothing to tile"),
        (DataError, lambda: collate_tiles([]), "no images"),
        (DataError, lambda: collate_tiles([tile_image(img, S, 4), tile_image(img, S, 2)]), "same settings"),
    ]
    for kind, call, word in cases:
        with pytest.raises(kind, match=word) as e:
            call()
        assert "\n" not in str(e.value)


def test_tiled_image_is_the_documented_dataclass():
    t = tile_image(_image(56, 28), S, 4)
    assert isinstance(t, TiledImage)
    assert (t.aspect_ratio, t.num_tiles, t.aspect_ratio_id) == ((2, 1), 2, supported_aspect_ratios(4).index((2, 1)) + 1)
