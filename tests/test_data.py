import io

import pytest
import torch
from datasets import Dataset
from PIL import Image

from contrast.config import DataConfig, ImageTowerConfig
from contrast.data import DataError, load_source
from contrast.data.collate import Collator, ImageSamples, Rows
from contrast.data.decode import BadSample
from contrast.data.transforms import build_transform
from contrast.tokenizer import ClipTokenizer


def png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_source_with_own_column_names(tmp_path):
    rows = [{"img": {"bytes": png((i, 0, 0)), "path": None}, "text": f"caption {i}"} for i in range(40)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    cfg = DataConfig(source=str(tmp_path / "d.parquet"), image_column="img", caption_column="text")
    train, val, test = (load_source(cfg, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (36, 2, 2)
    assert test[0]["caption"] == "caption 38"
    assert test[0]["image"].getpixel((0, 0)) == (38, 0, 0)
    with pytest.raises(DataError, match="set data.image_column"):
        load_source(DataConfig(source=str(tmp_path / "d.parquet")), "train")


def test_csv_captions_folder_and_missing_file(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "captions.csv").write_text("file,caption\n0.png,zero\n1.png,one\n2.png,two\n")
    ds = load_source(DataConfig(source=str(tmp_path)), "train")
    assert ds["caption"] == ["zero", "one", "two"]
    # a row naming a missing file does not refuse the dataset: reading that row skips it as missing
    (tmp_path / "captions.csv").write_text("file,caption\n0.png,zero\n9.png,nine\n")
    rows = Rows(load_source(DataConfig(source=str(tmp_path)), "train"))
    samples = ImageSamples(build_transform(ImageTowerConfig(image_size=8)), max_pixels=10**6)
    assert samples(rows[0])["caption"] == "zero"
    with pytest.raises(BadSample) as e:
        samples(rows[1])
    assert e.value.cause == "missing"


def test_lone_surrogate_caption_is_repaired(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    (tmp_path / "captions.jsonl").write_text('{"file": "0.png", "caption": "caf\\ud800e"}\n')
    ds = load_source(DataConfig(source=str(tmp_path)), "train")
    assert ds["caption"] == ["caf\ufffde"]


def test_samples_transform_and_collator_tokenizes():
    cfg = ImageTowerConfig(image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    samples = ImageSamples(build_transform(cfg), max_pixels=10**6)
    good = samples({"image": {"bytes": png((255, 0, 0)), "path": None}, "caption": " red ", "__index__": 0})
    assert good["caption"] == "red" and good["index"] == 0
    assert good["pixels"].dtype == torch.uint8 and good["pixels"][:, 5, 5].tolist() == [255, 0, 0]
    with pytest.raises(BadSample) as e:
        samples({"image": {"bytes": b"broken", "path": None}, "caption": "bad", "__index__": 1})
    assert e.value.cause == "not_an_image"
    with pytest.raises(BadSample) as e:
        samples({"image": {"bytes": png((0, 0, 255)), "path": None}, "caption": "  ", "__index__": 2})
    assert e.value.cause == "empty_caption"
    batch = Collator(ClipTokenizer(8))([good, good])
    assert batch["pixels"].shape == (2, 3, 16, 16)
    assert batch["input_ids"].shape == (2, 8) and batch["index"].tolist() == [0, 0]


def test_synthetic_source_splits(data_cache):
    cfg = DataConfig(cache_dir=data_cache)
    cfg.synthetic.train_size, cfg.synthetic.test_size = 50, 20
    ds = load_source(cfg, "test")
    assert len(ds) == 20 and set(ds.column_names) >= {"image", "caption", "shape", "colour", "n_shapes"}
    with pytest.raises(DataError, match="split must be one of"):
        load_source(cfg, "dev")


def test_training_crop_decodes_jpegs_at_reduced_scale_with_the_same_crop():
    """A random resized crop planned on the full-size image lets a large JPEG decode at 1/2 or 1/4 scale: the same
    region comes out (the box is drawn from the same generator draws), within JPEG scaling error of the full decode."""
    import random

    import numpy as np

    from contrast.config import AugmentConfig
    from contrast.data.decode import load_image

    yy, xx = np.mgrid[0:900, 0:1200]
    arr = np.stack([xx * 255 // 1199, yy * 255 // 899, (xx + yy) * 255 // 2098], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    tf = build_transform(ImageTowerConfig(image_size=64), AugmentConfig(scale=(0.5, 1.0)))
    for seed in range(5):
        plan = tf.crop_plan(random.Random(seed))
        small = load_image(data, draft=plan)
        fast = tf.pixels(small, None, plan).float()
        full = tf.pixels(load_image(data), random.Random(seed)).float()  # no plan: the box drawn on the full image
        assert small.size[0] <= 600  # decoded at half scale or less
        assert (fast - full).abs().mean() < 2.0, seed  # out of 255


def test_a_saved_dataset_dict_with_split_folders_is_not_taken_for_shards(tmp_path):
    """A save_to_disk folder has train/val/test subfolders too; only split folders of .tar shards are shard sources."""
    import datasets
    from PIL import Image

    from contrast.config import DataConfig
    from contrast.data.sources import DataError, open_rows

    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(6)],
                                     "caption": [f"red {i}" for i in range(6)]})
    datasets.DatasetDict({"train": ds, "val": ds.select(range(2)), "test": ds.select(range(2))}).save_to_disk(
        str(tmp_path / "saved"))
    rows = open_rows(DataConfig(source=str(tmp_path / "saved")), "train", 8).rows
    assert len(rows) == 6
    (tmp_path / "shards" / "train").mkdir(parents=True)
    (tmp_path / "shards" / "train" / "a.tar").write_bytes(b"")
    with pytest.raises(DataError, match="split folders of .tar shards but none named 'val'"):
        open_rows(DataConfig(source=str(tmp_path / "shards")), "val", 8)
