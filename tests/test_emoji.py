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
    PACKAGE,
    STYLES,
    EmojiError,
    base_caption,
    build_dataset,
    fetch_emoji,
    load_emoji,
    parse_styles,
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


def make_package(root: Path, size: int = 8, style: str = "google", entries: list[dict] = ENTRIES) -> Path:
    """A fake unpacked emoji-datasource-<style> folder: emoji.json plus RGBA PNGs (top-left pixel transparent); each
    style's drawings differ in their blue channel."""
    pkg = root / "package"
    (pkg / STYLES[style].image_dir).mkdir(parents=True)
    (pkg / "emoji.json").write_text(json.dumps(entries))
    (pkg / "package.json").write_text(json.dumps({"name": STYLES[style].package, "version": "16.0.0"}))
    files = [e["image"] for e in entries if e["has_img_google"]]
    files += [v["image"] for e in entries for v in (e.get("skin_variations") or {}).values()]
    for n, name in enumerate(files):
        arr = np.zeros((size, size, 4), np.uint8)
        arr[..., 0], arr[..., 1], arr[..., 2], arr[..., 3] = 200, 10 * n, 50 + 100 * list(STYLES).index(style), 255
        arr[0, 0] = (0, 0, 0, 0)  # fully transparent black: must come out white
        Image.fromarray(arr, "RGBA").save(pkg / STYLES[style].image_dir / name)
    return pkg


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return make_package(tmp_path_factory.mktemp("emoji"))


# the Twemoji package marks one emoji that has a file as having no Twemoji image: it must be left out
TWITTER_ENTRIES = [dict(e, has_img_twitter=e["unified"] != "E005") for e in ENTRIES]


@pytest.fixture(scope="module")
def twitter_package(tmp_path_factory) -> Path:
    return make_package(tmp_path_factory.mktemp("emoji-twitter"), style="twitter", entries=TWITTER_ENTRIES)


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


def test_several_captions_per_image_from_keywords_and_groups(package):
    rows = {r["unified"]: r for r in all_rows(build_dataset(package))}
    assert rows["1F385"]["captions"] == [
        "father christmas", "an emoji of father christmas", "santa", "father christmas (person fantasy)",
        "father christmas, a people & body emoji"]
    assert rows["1F385-1F3FD"]["captions"][:3] == [
        "father christmas, medium skin tone", "an emoji of father christmas, medium skin tone",
        "santa, medium skin tone"]
    # a short name equal to the name adds nothing; every image's first caption is its caption
    assert "people holding hands" not in rows["1F9D1-200D-1F91D-200D-1F9D1"]["captions"][1:]
    assert all(r["captions"][0] == r["caption"] and len(set(r["captions"])) == len(r["captions"])
               for r in rows.values())


def test_a_dataset_written_before_the_captions_column_is_rebuilt(tmp_path, package):
    cache = tmp_path / "cache"
    shutil.copytree(package, cache / PACKAGE / "package")
    out = fetch_emoji(cache, npm="no-such-npm-here")
    info = out / "train" / "dataset_info.json"
    meta = json.loads(info.read_text())
    del meta["features"]["captions"]  # as an earlier version wrote it
    info.write_text(json.dumps(meta))
    assert fetch_emoji(cache, npm="no-such-npm-here") == out
    assert "captions" in load_emoji(out, "train").column_names


def test_training_draws_one_of_several_captions_per_sample():
    import random

    from contrast.data.collate import pick_caption

    many = ["a", "b", "c"]
    drawn = {pick_caption(many, random.Random(seed)) for seed in range(40)}
    assert drawn == set(many)  # every caption is drawn
    assert pick_caption(many, None) == "a" and pick_caption("plain", random.Random(0)) == "plain"
    assert pick_caption(many, random.Random(7)) == pick_caption(many, random.Random(7))  # a pure function of the seed
    assert pick_caption([], random.Random(0)) is None


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


def test_styles_offered_are_the_freely_licensed_ones():
    assert parse_styles("google") == ("google",)
    assert parse_styles("all") == ("google", "twitter")
    assert parse_styles("twitter, google,twitter") == ("twitter", "google")
    assert parse_styles(["twitter"]) == ("twitter",)
    assert {s: STYLES[s].licence for s in STYLES} == {"google": "Apache-2.0", "twitter": "CC-BY-4.0"}
    assert STYLES["twitter"].package == "emoji-datasource-twitter" and "Twemoji" in STYLES["twitter"].attribution
    with pytest.raises(EmojiError, match=r"'apple' is not offered: .*not licensed for commercial use"):
        parse_styles("google,apple")
    with pytest.raises(EmojiError, match="'facebook' is not offered: .*no clear licence"):
        parse_styles("facebook")
    with pytest.raises(EmojiError, match="'emojione' is not offered"):
        parse_styles("emojione")
    with pytest.raises(EmojiError, match="unknown emoji style 'noto'.*google, twitter"):
        parse_styles("noto")


def test_several_styles_share_captions_and_splits(package, twitter_package):
    ds = build_dataset({"google": package, "twitter": twitter_package})
    rows = all_rows(ds)
    by_style = {st: {r["unified"]: r for r in rows if r["style"] == st} for st in ("google", "twitter")}
    assert len(by_style["google"]) == 20 and len(by_style["twitter"]) == 19 and len(rows) == 39
    assert set(by_style["google"]) - set(by_style["twitter"]) == {"E005"}  # has_img_twitter false
    for unified, t in by_style["twitter"].items():
        g = by_style["google"][unified]
        assert t["caption"] == g["caption"] and t["split"] == g["split"] == split_of(t["emoji_id"])
        assert np.asarray(g["image"])[3, 3, 2] == 50 and np.asarray(t["image"])[3, 3, 2] == 150  # each style's art
    assert ds["train"].info.license == "Apache-2.0 AND CC-BY-4.0"
    single = build_dataset({"twitter": twitter_package})
    assert {r["style"] for r in all_rows(single)} == {"twitter"} and single["test"].info.license == "CC-BY-4.0"


def test_fetch_all_styles_writes_one_folder_with_a_card(tmp_path, package, twitter_package):
    cache = tmp_path / "cache"
    shutil.copytree(package, cache / PACKAGE / "package")
    shutil.copytree(twitter_package, cache / "emoji-datasource-twitter" / "package")
    out = fetch_emoji(cache, style="all", npm="no-such-npm-here")
    assert out == cache / "emoji-google-twitter"
    counts = {s: len(load_emoji(out, s)) for s in ("train", "val", "test")}
    assert sum(counts.values()) == 39
    ds = load_source(DataConfig(source=str(out)), "train")
    assert set(ds["style"]) == {"google", "twitter"} and len(ds) == counts["train"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: [apache-2.0, cc-by-4.0]\n")
    assert "| google | emoji-datasource-google | 16.0.0 | 20 | [Apache-2.0](" in card
    assert "| twitter | emoji-datasource-twitter | 16.0.0 | 19 | [CC-BY-4.0](" in card
    assert STYLES["twitter"].attribution in card and STYLES["google"].attribution in card
    assert f"| train | {counts['train']} |" in card
    assert fetch_emoji(cache, style="twitter", npm="no-such-npm-here") == cache / "emoji-twitter"
    assert "license: cc-by-4.0\n" in (cache / "emoji-twitter" / "README.md").read_text()


def test_a_style_npm_cannot_fetch_is_a_one_line_error(tmp_path):
    npm = tmp_path / "fake-npm"
    npm.write_text("#!/bin/sh\necho 'npm error code E404' >&2\necho 'npm error 404 Not Found - GET x' >&2\n"
                   "echo '' >&2\necho 'npm error A complete log of this run can be found in: /x.log' >&2\nexit 1\n")
    npm.chmod(0o755)
    with pytest.raises(EmojiError) as e:
        fetch_emoji(tmp_path / "cache", style="twitter", npm=str(npm))
    msg = str(e.value)
    assert "\n" not in msg and "cannot fetch emoji-datasource-twitter" in msg and "E404" in msg


def test_cli_fetch_styles(tmp_path, package, twitter_package, capsys):
    from contrast.cli import main

    shutil.copytree(twitter_package, tmp_path / "emoji-datasource-twitter" / "package")
    assert main(["data", "fetch", "emoji", "--cache", str(tmp_path), "--style", "twitter"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "emoji-twitter") in out and "README.md" in out
    assert main(["data", "fetch", "emoji", "--cache", str(tmp_path), "--style", "apple"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not licensed for commercial use" in err


def test_emoji_shards_stream_with_their_style(tmp_path, package, twitter_package):
    """The multi-style set written as shards: the style travels in each sample's json."""
    import webdataset as wds

    from contrast.data.shard import write_shards

    cache = tmp_path / "cache"
    shutil.copytree(package, cache / PACKAGE / "package")
    shutil.copytree(twitter_package, cache / "emoji-datasource-twitter" / "package")
    out = fetch_emoji(cache, style="all", npm="no-such-npm-here")
    report = write_shards(DataConfig(source=str(out)), tmp_path / "shards", shard_size=10)
    samples = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")), shardshuffle=False))
    assert len(samples) == report.samples == len(load_emoji(out, "train"))
    styles = [json.loads(s["json"])["style"] for s in samples]
    assert set(styles) == {"google", "twitter"}
    assert all("png" in s for s in samples)


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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
@pytest.mark.skipif(os.environ.get("CONTRAST_NETWORK_TESTS") != "1", reason="set CONTRAST_NETWORK_TESTS=1 to fetch from npm")
def test_real_fetch_of_all_styles_from_npm(tmp_path):
    try:
        out = fetch_emoji(tmp_path, style="all", skin_tones="drop")
    except EmojiError as e:  # registry unreachable
        pytest.skip(f"npm registry unavailable: {e}")
    train = load_emoji(out, "train")
    styles = train["style"]
    assert set(styles) == {"google", "twitter"}
    assert abs(sum(s == "google" for s in styles) - sum(s == "twitter" for s in styles)) < 20
    assert "CC-BY-4.0" in (out / "README.md").read_text()
