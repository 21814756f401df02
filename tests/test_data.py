import io

import pytest
import torch
from datasets import Dataset
from PIL import Image

from contrast.config import DataConfig, ImageTowerConfig
from contrast.data import DataError, load_source
from contrast.data.collate import Collator
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
    (tmp_path / "captions.csv").write_text("file,caption\n9.png,nine\n")
    with pytest.raises(DataError, match="9.png, which does not exist"):
        load_source(DataConfig(source=str(tmp_path)), "train")


def test_collator_transforms_and_tokenizes():
    cfg = ImageTowerConfig(image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    collate = Collator(build_transform(cfg), ClipTokenizer(8))
    batch = collate([
        {"image": {"bytes": png((255, 0, 0)), "path": None}, "caption": "red", "__index__": 0},
        {"image": {"bytes": b"broken", "path": None}, "caption": "bad", "__index__": 1},
        {"image": {"bytes": png((0, 0, 255)), "path": None}, "caption": "  ", "__index__": 2},
    ])
    assert batch["pixels"].shape == (1, 3, 16, 16)
    assert torch.allclose(batch["pixels"][0, :, 5, 5], torch.tensor([1.0, 0.0, 0.0]), atol=1e-2)
    assert batch["input_ids"].shape == (1, 8) and batch["index"].tolist() == [0]
    assert collate.skipped_images == 1 and collate.skipped_captions == 1


def test_synthetic_source_splits(data_cache):
    cfg = DataConfig(cache_dir=data_cache)
    cfg.synthetic.train_size, cfg.synthetic.test_size = 50, 20
    ds = load_source(cfg, "test")
    assert len(ds) == 20 and set(ds.column_names) >= {"image", "caption", "shape", "colour", "n_shapes"}
    with pytest.raises(DataError, match="split must be one of"):
        load_source(cfg, "dev")
