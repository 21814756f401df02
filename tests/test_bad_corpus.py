"""A captions folder with every kind of bad sample, read by every command that reads images.

The corpus (built here, in ``tmp_path``) holds 57 rows: 5 good but unusual images (EXIF-rotated JPEG, RGBA, 16-bit
grey, palette with a transparent index, animated GIF), 12 bad samples (one of each kind below), then 40 plain good
images. The folder source splits 90/5/5 by row, so rows 0..52 are the train split and hold every unusual and bad
row. Each command runs through the command line entry and must finish, leaving out exactly the bad rows that
concern it, counted by cause:

- image causes (any command that reads the image): 2 truncated, 1 empty_file, 2 not_an_image, 1 corrupt,
  1 too_large, 1 missing, 1 not_a_file;
- caption causes (commands that use captions): 1 no_caption, 1 empty_caption, 1 caption_fixed (used, repaired);
- labelled evaluation (the caption column as the label): the three bad captions are 3 bad_label.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_model_dict
from PIL import Image, ImageDraw

from contrast.cli import main

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "purple": (140, 40, 170), "orange": (250, 140, 20), "black": (10, 10, 10), "grey": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "cross", "bar")
IMAGE_CAUSES = {"missing": 1, "not_a_file": 1, "empty_file": 1, "not_an_image": 2, "truncated": 2, "corrupt": 1,
                "too_large": 1}
CAPTION_CAUSES = {"no_caption": 1, "empty_caption": 1, "caption_fixed": 1}
N_ROWS, N_TRAIN = 57, 53  # 57 rows: 2 val, 2 test (the last four rows, all good)
N_BAD_IMAGES = sum(IMAGE_CAUSES.values())  # 9


def encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def shape_image(colour: tuple[int, int, int], shape: str) -> Image.Image:
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    d = ImageDraw.Draw(img)
    box = (6, 6, 26, 26)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(16, 4), (28, 28), (4, 28)], fill=colour)
    elif shape == "cross":
        d.rectangle((13, 4, 19, 28), fill=colour)
        d.rectangle((4, 13, 28, 19), fill=colour)
    else:
        d.rectangle((4, 12, 28, 20), fill=colour)
    return img


def noise_png(seed: int) -> bytes:
    return encoded(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)))


def unusual_images() -> list[tuple[str, bytes, str]]:
    """(file, bytes, caption) of good images in unusual encodings."""
    stored = Image.new("RGB", (32, 16), (255, 0, 0))
    stored.paste((0, 0, 255), (16, 0, 32, 16))  # stored landscape: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned a quarter clockwise: portrait, red on top
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 0))  # fully transparent blue ...
    rgba.paste((255, 0, 0, 255), (0, 0, 16, 32))  # ... with an opaque red left half
    grey16 = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))  # 16-bit mid-grey
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 160, 0, 255, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 32, 16))  # top half: index 1, transparent
    frames = [Image.new("RGB", (32, 32), c) for c in ((0, 0, 255), (255, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return [("rotated.jpg", encoded(stored, "JPEG", exif=exif.tobytes(), quality=95), "a rotated flag"),
            ("clear.png", encoded(rgba), "a half transparent card"),
            ("grey16.png", encoded(grey16), "a grey field"),
            ("sticker.png", encoded(pal, transparency=1), "a palette sticker"),
            ("blink.gif", gif.getvalue(), "a blinking light")]


def bad_files() -> list[tuple[str, bytes | None, str | None]]:
    """(file, bytes or None for no file, caption) of the bad samples, in corpus order."""
    png, jpg = noise_png(1), encoded(Image.open(io.BytesIO(noise_png(2))), "JPEG")
    crc = bytearray(png)
    crc[29] ^= 0xFF  # the IHDR chunk's CRC
    bomb = bytearray(encoded(Image.new("RGB", (1, 1))))
    bomb[16:24] = struct.pack(">II", 30000, 30000)  # the header claims 30000 x 30000 ...
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))  # ... with a valid CRC
    return [("cut.png", png[: len(png) // 2], "a cut picture"),
            ("cut.jpg", jpg[: len(jpg) // 2], "a cut photo"),
            ("empty.png", b"", "an empty file"),
            ("page.png", b"<!DOCTYPE html><html><body>Not Found</body></html>", "a web page"),
            ("drawing.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"><rect/></svg>', "a drawing"),
            ("crc.png", bytes(crc), "a damaged picture"),
            ("bomb.png", bytes(bomb), "a huge picture"),
            ("gone.png", None, "a lost picture"),
            ("folder.png", None, "a folder"),
            ("nocap.png", encoded(shape_image((0, 0, 0), "bar")), None),
            ("blank.png", encoded(shape_image((0, 0, 0), "cross")), ""),
            ("kite.png", encoded(shape_image((220, 30, 30), "triangle")), "a red \ud800 kite")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    rows = []
    for name, data, caption in unusual_images() + bad_files():
        if name == "folder.png":
            (root / name).mkdir()
        elif data is not None:
            (root / name).write_bytes(data)
        rows.append({"file": name, "caption": caption})
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            name = f"{colour}_{shape}.png"
            shape_image(rgb, shape).save(root / name)
            rows.append({"file": name, "caption": f"a {colour} {shape}"})
    assert len(rows) == N_ROWS
    # json.dumps writes the lone surrogate as the escape \ud800, as a broken scraper would
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def good_captions(corpus: Path) -> list[str]:
    rows = [json.loads(line) for line in (corpus / "captions.jsonl").read_text().splitlines()]
    bad = {name for name, _, _ in bad_files()}
    return [r["caption"] for r in rows if r["file"] not in bad]


def make_run(path: Path, kind: str, strict: bool = False) -> Path:
    """A run directory holding an untrained tiny model (the commands need a model, not a good one)."""
    import torch

    from contrast.config import from_dict, save_config
    from contrast.runs import WEIGHTS, build, save_model_weights

    cfg = from_dict({"model": tiny_model_dict(kind)})
    cfg.data.strict = strict
    torch.manual_seed(0)
    step = path / "checkpoints" / "step_00000000"
    step.mkdir(parents=True)
    save_model_weights(build(cfg.model), step / WEIGHTS)
    (path / "checkpoints" / "latest").write_text(step.name)
    save_config(cfg, path / "config.yaml")
    return path


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("clip") / "run", "clip")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def task_file(tmp_path: Path, corpus: Path, **extra) -> Path:
    task = {"name": "corpus", "data": str(corpus), "split": "train", "label_column": "caption",
            "classnames": good_captions(corpus), "templates": ["{}"], **extra}
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


def report_result(out_dir: Path) -> dict:
    return json.loads((out_dir / "report.json").read_text())["sections"][0]["result"]


# --------------------------------------------------------------------------------------------------- the corpus


def test_unusual_images_decode_to_the_right_pixels(corpus):
    from contrast.data.decode import load_image

    def px(name: str) -> np.ndarray:
        img = load_image(corpus / name)
        assert img.mode == "RGB"
        return np.asarray(img).astype(int)

    rotated = px("rotated.jpg")
    assert rotated.shape == (32, 16, 3)  # portrait after the EXIF turn
    assert np.abs(rotated[2:14, 2:14] - [255, 0, 0]).max() < 40 and np.abs(rotated[18:30, 2:14] - [0, 0, 255]).max() < 40
    clear = px("clear.png")
    assert (clear[:, :16] == [255, 0, 0]).all() and (clear[:, 16:] == 255).all()  # transparent -> white
    assert (px("grey16.png") == 128).all()  # 32768 / 65535 of full scale
    sticker = px("sticker.png")
    assert (sticker[:16] == 255).all() and (sticker[16:] == [0, 160, 0]).all()
    assert (px("blink.gif") == [0, 0, 255]).all()  # the first frame


# --------------------------------------------------------------------------------------------------- commands


def test_eval_zeroshot(corpus, clip_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", "zeroshot", "--checkpoint", clip_run, "--task", task_file(tmp_path, corpus),
                             "--device", "cpu", "--out-dir", tmp_path / "zs")
    assert code == 0, err
    r = report_result(tmp_path / "zs")
    assert r["skipped"] == {**IMAGE_CAUSES, "bad_label": 3}
    assert r["n"] == N_TRAIN - N_BAD_IMAGES - 3
    assert "corpus: skipped 12 samples: 1 missing, 1 not_a_file" in out


def test_eval_retrieval_drops_the_pairs_of_skipped_images(corpus, clip_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", "retrieval", "--checkpoint", clip_run, "--data", corpus, "--split", "train",
                             "--device", "cpu", "--out-dir", tmp_path / "ret")
    assert code == 0, err
    r = report_result(tmp_path / "ret")
    assert r["skipped"] == {**IMAGE_CAUSES, **CAPTION_CAUSES}
    assert r["captions_of_skipped_images"] == N_BAD_IMAGES and r["images_without_captions"] == 2
    assert r["num_images"] == r["num_texts"] == N_TRAIN - N_BAD_IMAGES - 2
    assert "skipped 11 samples" in out and "repaired 1 caption" in out and "9 captions of skipped images" in out


def test_eval_linear_probe(corpus, clip_run, tmp_path, capsys):
    task = task_file(tmp_path, corpus, train_split="train", val_split=None, split="test")
    code, out, err = run_cli(capsys, "eval", "linear-probe", "--checkpoint", clip_run, "--task", task, "--l2", "1",
                             "--device", "cpu", "--out-dir", tmp_path / "lp")
    assert code == 0, err
    r = report_result(tmp_path / "lp")
    assert r["skipped"] == {**IMAGE_CAUSES, "bad_label": 3}  # all in the train split
    assert r["num_train"] + r["num_val"] == N_TRAIN - N_BAD_IMAGES - 3 and r["num_test"] == 2
    assert "skipped 12 samples" in out


def test_index_build(corpus, clip_run, tmp_path, capsys):
    ix = tmp_path / "ix"
    code, out, err = run_cli(capsys, "index", "build", "--checkpoint", clip_run, "--data", corpus, "--split", "train",
                             "--out", ix, "--device", "cpu", "--no-progress")
    assert code == 0, err
    # an image index uses the image; captions are its metadata (repaired, or kept as they are when missing)
    assert json.loads((ix / "skipped.json").read_text())["skipped"] == {**IMAGE_CAUSES, "caption_fixed": 1}
    assert json.loads((ix / "manifest.json").read_text())["count"] == N_TRAIN - N_BAD_IMAGES
    assert "skipped 9 samples" in out
    code, out, err = run_cli(capsys, "index", "query", ix, "--image", corpus / "red_circle.png", "-k", "1", "--json")
    assert code == 0 and json.loads(out)[0]["path"] == str(corpus / "red_circle.png")
    code, _, err = run_cli(capsys, "index", "query", ix, "--image", corpus / "page.png")
    assert code == 2 and "not_an_image" in err and "Traceback" not in err


def test_index_build_resumes_without_decoding_the_finished_part(corpus, clip_run, tmp_path, monkeypatch):
    from contrast.index import rows
    from contrast.index.model import ModelEncoder, build_from_checkpoint

    decoded = []
    real_load, real_images = rows.load_image, ModelEncoder.pixels  # images arrive decoded, as uint8 pixels
    monkeypatch.setattr(rows, "load_image", lambda v, *a, **k: (decoded.append(v), real_load(v, *a, **k))[1])
    kw = dict(split="train", batch_size=4, shard_size=8, device="cpu", progress=False)
    build_from_checkpoint(clip_run, corpus, tmp_path / "full", **kw)
    assert len(decoded) == N_TRAIN

    def stop_at_fourth_batch(self, images, calls=[]):  # noqa: B006 - counts calls
        calls.append(1)
        if len(calls) == 4:  # 3 batches of 4 done: shard 0 (8 items) written, 4 items of shard 1 lost
            raise RuntimeError("killed")
        return real_images(self, images)

    monkeypatch.setattr(ModelEncoder, "pixels", stop_at_fourth_batch)
    with pytest.raises(RuntimeError, match="killed"):
        build_from_checkpoint(clip_run, corpus, tmp_path / "resumed", **kw)
    monkeypatch.setattr(ModelEncoder, "pixels", real_images)
    decoded.clear()
    build_from_checkpoint(clip_run, corpus, tmp_path / "resumed", **kw)
    lines = [json.loads(x) for x in (tmp_path / "full" / "metadata.jsonl").read_text().splitlines()]
    first_row_of_shard_1 = next(m["row"] for m in lines if m["id"] == 8)
    assert len(decoded) == N_TRAIN - first_row_of_shard_1  # the finished shard's rows are not decoded again
    for name in ("skipped.json", "metadata.jsonl"):
        assert (tmp_path / "full" / name).read_text() == (tmp_path / "resumed" / name).read_text()
    for a in sorted((tmp_path / "full" / "shards").glob("emb_*.npy")):
        np.testing.assert_array_equal(np.load(a), np.load(tmp_path / "resumed" / "shards" / a.name))
    assert not (tmp_path / "resumed" / "skipped.progress.json").exists()


def test_features_extract(corpus, clip_run, tmp_path, capsys):
    out_dir = tmp_path / "feats"
    code, out, err = run_cli(capsys, "features", "extract", "--checkpoint", clip_run, "--data", corpus, "--split",
                             "train", "--out", out_dir, "--batch-size", "16")
    assert code == 0, err
    split = json.loads((out_dir / "meta.json").read_text())["splits"]["train"]
    assert split["skipped"] == {**IMAGE_CAUSES, **CAPTION_CAUSES}
    assert split["rows"] == N_TRAIN - N_BAD_IMAGES - 2
    from contrast.features import FeatureShards

    rows = FeatureShards(out_dir, "train")
    assert len(rows) == split["rows"] and "a red \ufffd kite" in rows.captions


def test_caption(corpus, tmp_path_factory, capsys):
    run = make_run(tmp_path_factory.mktemp("blip") / "run", "blip")
    files = [corpus / r["file"] for r in map(json.loads, (corpus / "captions.jsonl").read_text().splitlines())]
    code, out, err = run_cli(capsys, "caption", "--checkpoint", run, "--max-length", "4", *files)
    assert code == 0, err
    assert len(out.strip().splitlines()) == N_ROWS - N_BAD_IMAGES
    summary = [line for line in err.splitlines() if line.startswith("skipped")]
    assert summary == ["skipped 9 samples: 1 missing, 1 not_a_file, 1 empty_file, 2 not_an_image, 2 truncated, "
                       "1 corrupt, 1 too_large; captioned the other 48"]


def test_strict_stops_at_the_first_bad_sample(corpus, clip_run, tmp_path, capsys):
    strict = tmp_path / "strict"
    shutil.copytree(clip_run, strict)
    cfg = yaml.safe_load((strict / "config.yaml").read_text())
    cfg["data"]["strict"] = True
    (strict / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(capsys, "eval", "zeroshot", "--checkpoint", strict, "--task", task_file(tmp_path, corpus),
                           "--device", "cpu", "--out-dir", tmp_path / "zs")
    assert code == 2 and "Traceback" not in err
    assert f"row 5 ({corpus / 'cut.png'}) is unusable (truncated" in err and "set data.strict false" in err
    code, _, err = run_cli(capsys, "index", "build", "--checkpoint", strict, "--data", corpus, "--split", "train",
                           "--out", tmp_path / "ix", "--device", "cpu", "--no-progress")
    assert code == 2 and "cut.png" in err and "set data.strict false" in err


def test_train(corpus, tmp_path, capsys):
    """Two steps whose global batch is the whole train split: each step is one epoch over its 53 rows, so every bad
    row is met at least twice; a bad row's slot is refilled by a random draw, which may meet bad rows again."""
    recipe = {"model": tiny_model_dict("clip"), "data": {"source": str(corpus), "num_workers": 0},
              "train": {"steps": 2, "batch_size": N_TRAIN, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 0},
              "eval": {"tasks": []}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, out, err = run_cli(capsys, "train", path, "--out", tmp_path / "run", "--no-progress")
    assert code == 0, err
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    skipped = last.get("skipped", last.get("summary", {}).get("skipped"))  # the end-of-run record
    once = {**IMAGE_CAUSES, **CAPTION_CAUSES}
    assert set(skipped) == set(once), skipped
    for cause, n in once.items():
        assert skipped[cause] >= 2 * n, (cause, skipped)
