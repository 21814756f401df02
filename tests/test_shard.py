"""``contrast data shard``: webdataset shards from any source, read back with independent readers (the webdataset
package, tarfile, open_clip's sizes.json reader) and compared with the source files byte for byte."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from contrast.config import DataConfig
from contrast.data.decode import CAUSES, BadSample, load_image
from contrast.data.shard import sniff_extension, write_shards
from contrast.data.sources import DataError

FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def encode(fmt: str, seed: int, size: tuple[int, int] = (24, 17)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if fmt == "GIF":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_sniffed_extension_matches_pillows_format():
    for fmt, ext in FORMATS.items():
        data = encode(fmt, 0)
        assert Image.open(io.BytesIO(data)).format == fmt  # the reference
        assert sniff_extension(data) == ext
    assert sniff_extension(b"<html><body>not an image</body></html>") is None
    assert sniff_extension(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None  # RIFF, but not WEBP


@pytest.fixture()
def folder(tmp_path) -> tuple[Path, list[dict]]:
    """A captions folder: 14 good images in six formats, a truncated JPEG, HTML named .png, an empty caption."""
    root = tmp_path / "src"
    root.mkdir()
    rows = []
    fmts = list(FORMATS)
    for i in range(14):
        fmt = fmts[i % len(fmts)]
        name = f"img{i:02d}.{FORMATS[fmt]}"
        (root / name).write_bytes(encode(fmt, i, (20 + i, 15 + i)))
        rows.append({"file": name, "caption": f"  picture number {i} \u00e9\u00e8 \U0001f600 "})
    (root / "broken.jpg").write_bytes(encode("JPEG", 99)[:200])
    (root / "page.png").write_bytes(b"<html><body>not found</body></html>")
    rows.insert(3, {"file": "broken.jpg", "caption": "a truncated photo"})
    rows.insert(8, {"file": "page.png", "caption": "an html page"})
    rows.insert(11, {"file": "img00.jpg", "caption": "   "})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, rows


def read_back(out: Path, split: str = "train") -> list[dict]:
    """Every sample in the folder's shards, through the webdataset package (shard order, then key order)."""
    urls = [str(p) for p in sorted(out.glob(f"{split}-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_shards_round_trip_the_original_bytes(tmp_path, folder):
    root, rows = folder
    report = write_shards(DataConfig(source=str(root)), tmp_path / "out", shard_size=4)
    out = tmp_path / "out"
    good = [(n, r) for n, r in enumerate(rows) if r["caption"].strip() and r["file"] not in ("broken.jpg", "page.png")]
    samples = read_back(out)
    assert len(samples) == len(good) == 14 == report.samples
    sizes = json.loads((out / "sizes.json").read_text())
    assert sorted(sizes) == [f"train-{i:05d}.tar" for i in range(4)]  # 14 samples, 4 a shard
    assert list(sizes.values()) == [4, 4, 4, 2]
    for name, count in sizes.items():  # each shard's count, read independently of the writer
        assert len(list(wds.WebDataset(str(out / name), shardshuffle=False))) == count
    for n, (sample, (index, row)) in enumerate(zip(samples, good)):
        original = (root / row["file"]).read_bytes()
        ext = FORMATS[Image.open(io.BytesIO(original)).format]
        assert sample["__key__"] == f"{n:09d}"
        assert sample[ext] == original  # the file's own bytes, under its real format's extension
        assert sample["txt"].decode("utf-8") == row["caption"].strip()
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"] and meta["source_index"] == index


def test_bad_samples_are_skipped_and_counted_by_cause(tmp_path, folder):
    root, _ = folder
    report = write_shards(DataConfig(source=str(root)), tmp_path / "out", shard_size=4)
    expected = Counter({"empty_caption": 1})
    for name in ("broken.jpg", "page.png"):  # the causes the project's decode check gives these files
        with pytest.raises(BadSample) as e:
            load_image(str(root / name))
        expected[e.value.cause] += 1
    info = json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["skipped"] == dict(expected) and info["skipped_total"] == 3
    assert set(info["skipped"]) <= set(CAUSES)
    assert info["samples"] == 14 and info["shards"] == 4 and info["split"] == "train" and info["source"] == str(root)
    assert "skipped 3" in report.summary() and "14 train samples in 4 shards" in report.summary()
    with pytest.raises(DataError, match=r"row 3 .*data.strict"):
        write_shards(DataConfig(source=str(root), strict=True), tmp_path / "strict", shard_size=2)


def test_the_same_input_gives_byte_identical_shards(tmp_path, folder):
    root, _ = folder
    cfg = DataConfig(source=str(root))
    write_shards(cfg, tmp_path / "a", shard_size=5)
    write_shards(cfg, tmp_path / "b", shard_size=5)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names == ["info.json", "sizes.json", "train-00000.tar", "train-00001.tar", "train-00002.tar"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with tarfile.open(tmp_path / "a" / "train-00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000000.jpg", "000000000.txt", "000000000.json"]
    assert [m.name.split(".")[0] for m in members] == sorted(m.name.split(".")[0] for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def test_open_clip_reads_the_sizes(tmp_path, folder):
    from open_clip_train.data import get_dataset_size

    root, _ = folder
    write_shards(DataConfig(source=str(root)), tmp_path / "out", shard_size=3)
    total, n_shards = get_dataset_size(str(tmp_path / "out" / "train-{00000..00004}.tar"))
    assert (total, n_shards) == (14, 5)


def test_datasets_folders_keep_bytes_and_other_columns(tmp_path):
    """A save_to_disk source with image bytes (and a PIL-only image) and extra columns; the val split."""
    images = [encode("JPEG", i) for i in range(3)] + [encode("PNG", 3)]
    feats = Features({"image": ImageFeature(), "text": Value("string"), "label": Value("int32")})
    val = Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images],
                             "text": ["a", "b", "c", "d"], "label": [5, 6, 7, 8]}, features=feats)
    DatasetDict({"train": val.select([0]), "val": val}).save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(source=str(tmp_path / "ds"), caption_column="text")
    write_shards(cfg, tmp_path / "out", split="val", shard_size=10)
    samples = read_back(tmp_path / "out", "val")
    assert [s.get("jpg", s.get("png")) for s in samples] == images
    assert [json.loads(s["json"]) for s in samples] == [
        {"label": 5 + i, "key": f"{i:09d}", "source_index": i} for i in range(4)]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"val-00000.tar": 4}


def test_a_killed_or_failed_write_leaves_no_half_shard(tmp_path, folder):
    root, _ = folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00001.tar.tmp").write_bytes(b"half a shard from a killed run")
    with pytest.raises(DataError, match="data.strict"):  # fails at row 3, inside the second 2-sample shard
        write_shards(DataConfig(source=str(root), strict=True), out, shard_size=2)
    left = sorted(p.name for p in out.iterdir())
    assert left == ["train-00000.tar"]  # the finished shard only: no temporary file, no sizes.json or info.json
    assert len(read_back(out)) == 2
    with pytest.raises(DataError, match="--overwrite"):
        write_shards(DataConfig(source=str(root)), out, shard_size=2)
    write_shards(DataConfig(source=str(root)), out, shard_size=2, overwrite=True)
    assert len(list(out.glob("train-*.tar"))) == 7 and (out / "info.json").is_file()
    with pytest.raises(DataError, match="its own folder"):
        write_shards(DataConfig(source=str(root)), out, split="val")


def test_cli_shard_and_its_errors(tmp_path, folder, capsys):
    from contrast.cli import main

    root, _ = folder
    out = tmp_path / "shards"
    assert main(["data", "shard", str(root), "--out", str(out), "--shard-size", "8"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [f"wrote 14 train samples in 2 shards to {out} (skipped 3: "
                       + ", ".join(f"{c} {n}" for c, n in json.loads((out / "info.json").read_text())["skipped"].items())
                       + ")"]
    assert main(["data", "shard", "synthetic", "--out", str(tmp_path / "syn"), "--split", "val",
                 "--set", "data.synthetic.val_size=6", "--set", "model.image.image_size=16"]) == 0
    assert json.loads((tmp_path / "syn" / "sizes.json").read_text()) == {"val-00000.tar": 6}
    assert len(read_back(tmp_path / "syn", "val")) == 6
    capsys.readouterr()
    assert main(["data", "shard", str(tmp_path / "no-such-source"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    assert main(["data", "shard", str(root), "--out", str(out), "--shard-size", "0", "--overwrite"]) == 2
    assert "at least 1" in capsys.readouterr().err
