"""The emoji source: conversion of the npm package's layout into a split DatasetDict, fetching, the CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contrast.config import DataConfig
from contrast.data import load_source
from contrast.data.emoji import (
    IMAGE_DIR,
    PACKAGE,
    EmojiError,
    base_caption,
    build_dataset,
    fetch_emoji,
    load_emoji,
    split_of,
)

# Entries in the real emoji.json format (fields trimmed to the ones a reader may touch, plus a few others).
ENTRIES = [
    {
        "name": "GRINNING FACE WITH SMILING EYES", "unified": "1F601", "image": "1f601.png",
        "short_name": "grin", "short_names": ["grin"], "category": "Smileys & Emotion",
        "subcategory": "face-smiling", "sort_order": 2, "has_img_google": True,
    },
    {
        "name": "FATHER CHRISTMAS", "unified": "1F385", "image": "1f385.png", "short_name": "santa",
        "short_names": ["santa"], "category": "People & Body", "subcategory": "person-fantasy", "sort_order": 372,
        "has_img_google": True,
        "skin_variations": {
            "1F3FB": {"unified": "1F385-1F3FB", "image": "1f385-1f3fb.png", "has_img_google": True},
            "1F3FD": {"unified": "1F385-1F3FD", "image": "1f385-1f3fd.png", "has_img_google": True},
        },
    },
    {
        "name": "PEOPLE HOLDING HANDS", "unified": "1F9D1-200D-1F91D-200D-1F9D1", "image": "1f9d1-200d-1f91d-200d-1f9d1.png",
        "short_names": ["people_holding_hands"], "category": "People & Body", "subcategory": "family",
        "sort_order": 500, "has_img_google": True,
        "skin_variations": {
            "1F3FB-1F3FF": {"unified": "1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FF", "image": "hands-lt-dk.png",
                            "has_img_google": True},
        },
    },
    {
        "name": "Andorra Flag", "unified": "1F1E6-1F1E9", "image": "1f1e6-1f1e9.png", "short_names": ["flag-ad"],
        "category": "Flags", "subcategory": "country-flag", "sort_order": 1600, "has_img_google": True,
    },
    {
        "name": "", "unified": "1FAE8", "image": "1fae8.png", "short_name": "shaking_face",
        "short_names": ["shaking_face"], "category": "Smileys & Emotion", "subcategory": "face-neutral-skeptical",
        "sort_order": 50, "has_img_google": True,
    },
    {  # no Google image: left out
        "name": "MISSING ONE", "unified": "1FFFF", "image": "1ffff.png", "short_names": ["missing"],
        "category": "Symbols", "subcategory": "other", "sort_order": 9999, "has_img_google": False,
    },
] + [  # plain objects, so that every split gets some emoji (E003, E007 -> test; E009, E011 -> val)
    {"name": f"TEST OBJECT {i}", "unified": f"E{i:03d}", "image": f"e{i:03d}.png", "short_names": [f"object_{i}"],
     "category": "Objects", "subcategory": "tool", "sort_order": 2000 + i, "has_img_google": True}
    for i in range(12)
]


def make_package(root: Path, size: int = 8) -> Path:
    """A fake unpacked emoji-datasource-google folder: emoji.json plus RGBA PNGs (top-left pixel transparent)."""
    pkg = root / "package"
    (pkg / IMAGE_DIR).mkdir(parents=True)
    (pkg / "emoji.json").write_text(json.dumps(ENTRIES))
    files = [e["image"] for e in ENTRIES if e["has_img_google"]]
    files += [v["image"] for e in ENTRIES for v in (e.get("skin_variations") or {}).values()]
    for n, name in enumerate(files):
        arr = np.zeros((size, size, 4), np.uint8)
        arr[..., 0], arr[..., 1], arr[..., 2], arr[..., 3] = 200, 10 * n, 50, 255
        arr[0, 0] = (0, 0, 0, 0)  # fully transparent black: must come out white
        Image.fromarray(arr, "RGBA").save(pkg / IMAGE_DIR / name)
    return pkg


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return make_package(tmp_path_factory.mktemp("emoji"))


def all_rows(ds) -> list[dict]:
    return [dict(r, split=s) for s in ds for r in ds[s]]


def test_captions_follow_the_unicode_names(package):
    rows = {r["unified"]: r for r in all_rows(build_dataset(package))}
    assert rows["1F601"]["caption"] == "grinning face with smiling eyes"
    assert rows["1F385"]["caption"] == "father christmas"
    assert rows["1F385-1F3FB"]["caption"] == "father christmas, light skin tone"
    assert rows["1F385-1F3FD"]["caption"] == "father christmas, medium skin tone"
    assert rows["1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FF"]["caption"] == "people holding hands, light skin tone, dark skin tone"
    assert rows["1F1E6-1F1E9"]["caption"] == "flag of andorra"
    assert rows["1FAE8"]["caption"] == "shaking face"  # no name: the short name
    assert "1FFFF" not in rows  # no Google image
    assert rows["E003"]["caption"] == "test object 3"
    assert len(rows) == 20
    assert rows["1F385-1F3FB"]["emoji_id"] == "1F385" and rows["1F385-1F3FB"]["category"] == "People & Body"
    assert base_caption({"name": "", "short_names": ["flag-ad"], "category": "Flags"}) == "flag ad"


def test_splits_go_by_emoji_and_keep_variants_with_their_base(package):
    ds = build_dataset(package)
    assert set(ds) == {"train", "val", "test"}
    for r in all_rows(ds):
        assert r["split"] == split_of(r["emoji_id"])  # a variant's split is its base emoji's
    # the split is a pure function of the id: stable across calls, and near the requested fractions
    ids = [f"{i:05X}" for i in range(4000)]
    counts = {s: sum(split_of(i) == s for i in ids) / len(ids) for s in ("train", "val", "test")}
    assert abs(counts["train"] - 0.8) < 0.03 and abs(counts["val"] - 0.1) < 0.02 and abs(counts["test"] - 0.1) < 0.02
    assert [split_of(i) for i in ids[:50]] == [split_of(i) for i in ids[:50]]
    assert split_of("1F385", (0.0, 0.0, 1.0)) == "test" and split_of("1F385", (1.0, 0.0, 0.0)) == "train"


def test_skin_tones_can_be_dropped(package):
    rows = all_rows(build_dataset(package, skin_tones="drop"))
    bases = ["1F601", "1F385", "1F9D1-200D-1F91D-200D-1F9D1", "1F1E6-1F1E9", "1FAE8"] + [f"E{i:03d}" for i in range(12)]
    assert sorted(r["unified"] for r in rows) == sorted(bases)
    with pytest.raises(ValueError, match="keep or drop"):
        build_dataset(package, skin_tones="some")


def test_images_are_rgb_on_white(package):
    row = next(r for r in all_rows(build_dataset(package)) if r["unified"] == "1F601")
    img = row["image"]
    assert img.mode == "RGB" and img.size == (8, 8)
    arr = np.asarray(img)
    assert tuple(arr[0, 0]) == (255, 255, 255)  # transparent -> white
    assert tuple(arr[3, 3]) == (200, 0, 50)  # opaque pixels unchanged (first image: green = 0)


def test_fetch_uses_the_cached_package_and_load_source_reads_the_result(tmp_path, package):
    cache = tmp_path / "cache"
    shutil.copytree(package, cache / PACKAGE / "package")
    out = fetch_emoji(cache, npm="no-such-npm-here")  # the package is cached: npm is not needed
    assert out == cache / "emoji"
    total = 0
    for split in ("train", "val", "test"):
        ds = load_source(DataConfig(source=str(out)), split)
        assert {"image", "caption", "category", "emoji_id"} <= set(ds.column_names)
        assert len(ds) == len(load_emoji(out, split))
        total += len(ds)
    assert total == 20 and len(load_emoji(out, "test")) == 2 and len(load_emoji(out, "val")) == 2
    (cache / PACKAGE).rename(cache / "moved")  # a second fetch reuses the saved dataset
    assert fetch_emoji(cache, npm="no-such-npm-here") == out


def test_missing_npm_is_a_clear_error(tmp_path):
    with pytest.raises(EmojiError, match=r"'no-such-npm-here' was not found.*[Ii]nstall"):
        fetch_emoji(tmp_path, npm="no-such-npm-here")
    with pytest.raises(EmojiError, match="contrast data fetch emoji"):
        load_emoji(tmp_path, "train")


def test_cli_fetch(tmp_path, package, capsys):
    from contrast.cli import main

    shutil.copytree(package, tmp_path / PACKAGE / "package")
    assert main(["data", "fetch", "emoji", "--cache", str(tmp_path), "--skin-tones", "drop"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "emoji-no-skin-tones") in out and "train" in out
    assert main(["data", "fetch", "emoji", "--cache", str(tmp_path / "empty"), "--npm", "no-such-npm-here"]) == 2
    assert "was not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
@pytest.mark.skipif(os.environ.get("CONTRAST_NETWORK_TESTS") != "1", reason="set CONTRAST_NETWORK_TESTS=1 to fetch from npm")
def test_real_fetch_from_npm(tmp_path):
    try:
        out = fetch_emoji(tmp_path)
    except EmojiError as e:  # registry unreachable
        pytest.skip(f"npm registry unavailable: {e}")
    sizes = {s: len(load_emoji(out, s)) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 3786
    test = load_emoji(out, "test")
    assert not set(test["emoji_id"]) & set(load_emoji(out, "train")["emoji_id"])
    assert test[0]["image"].size == (64, 64)
