import io

import numpy as np
from PIL import Image

from contrast.config import SyntheticConfig
from contrast.data.synthetic import COLOURS, HELD_OUT, Item, describe, generate, render


def test_deterministic_by_seed():
    a = list(generate(SyntheticConfig(train_size=20, seed=3), "train", 32))
    b = list(generate(SyntheticConfig(train_size=20, seed=3), "train", 32))
    c = list(generate(SyntheticConfig(train_size=20, seed=4), "train", 32))
    assert [r["caption"] for r in a] == [r["caption"] for r in b]
    assert [r["image"]["bytes"] for r in a] == [r["image"]["bytes"] for r in b]
    assert [r["caption"] for r in a] != [r["caption"] for r in c]


def pairs_in(caption):
    words = caption.replace(" and ", " ").split()
    return {(words[i], words[i + 1]) for i in range(len(words) - 1)}


def test_held_out_pairs_only_in_test():
    cfg = SyntheticConfig(train_size=1500, val_size=300, test_size=400)
    for split in ("train", "val"):
        for r in generate(cfg, split, 32):
            assert not (pairs_in(r["caption"]) & HELD_OUT), r["caption"]
    test_rows = list(generate(cfg, "test", 32))
    assert sum(bool(pairs_in(r["caption"]) & HELD_OUT) for r in test_rows) > 50


def test_caption_describes_the_pixels():
    items = [Item("square", "red", "small", 0.5, 0.25), Item("circle", "blue", "small", 0.5, 0.75)]
    assert describe(items) == "a small red square above a small blue circle"
    img = np.asarray(render(items, 32)).astype(int)
    top, bottom = img[8, 16], img[24, 16]
    assert np.abs(top - COLOURS["red"]).sum() < 30 and np.abs(bottom - COLOURS["blue"]).sum() < 30


def test_rows_carry_first_shape_attributes():
    for r in generate(SyntheticConfig(train_size=30), "train", 32):
        assert r["caption"].startswith(f"a {r['size']} {r['colour']} {r['shape']}")
        Image.open(io.BytesIO(r["image"]["bytes"])).verify()
