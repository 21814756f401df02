"""COCO / Flickr30k retrieval from Karpathy-split JSON files and local images, on tiny files the tests make."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from contrast.config import ConfigError
from contrast.evaluate.karpathy import load_karpathy
from contrast.evaluate.metrics import image_text_ranks, rank_summary
from contrast.evaluate.tasks import evaluate_task, retrieval_dataset
from contrast.models import Model

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
WORDS = {"red": [1, 0, 0], "green": [0, 1, 0], "blue": [0, 0, 1], "white": [1, 1, 1], "grey": [1, 1, 0.8]}


class ColourModel(Model):
    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return torch.nn.functional.normalize(pixels.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return torch.nn.functional.normalize(ids.float(), dim=-1)


def _tok(texts: list[str]) -> torch.Tensor:
    return torch.tensor([WORDS[t.split()[-1]] for t in texts], dtype=torch.float32)


def _pre(img: Image.Image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


# test split: red (6 captions: the sixth, "a grey", is cut by max_captions=5), green, white; blue is train
ENTRIES = [
    ("red", "test", ["a red", "the red", "so red", "red red", "a white", "a grey"]),
    ("blue", "train", ["a blue"] * 5),
    ("green", "test", ["a green", "the green", "a grey", "so green", "green green"]),
    ("white", "test", ["a white", "the white", "a grey", "so white", "white white"]),
]


def make_coco(root: Path, flickr: bool = False) -> Path:
    images = []
    for i, (colour, split, caps) in enumerate(ENTRIES):
        folder = root / ("flickr30k-images" if flickr else f"{split}2014")
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{i}.jpg" if flickr else f"COCO_{split}2014_{i:012d}.jpg"
        Image.new("RGB", (7, 5), COLOURS[colour]).save(folder / name, quality=100)
        entry = {"filename": name, "imgid": i, "split": split, "sentids": list(range(len(caps))),
                 "sentences": [{"raw": c + " ", "tokens": c.split(), "imgid": i} for c in caps]}
        if not flickr:
            entry.update(filepath=f"{split}2014", cocoid=1000 + i)
        images.append(entry)
    p = root / ("dataset_flickr30k.json" if flickr else "dataset_coco.json")
    p.write_text(json.dumps({"images": images, "dataset": "flickr30k" if flickr else "coco"}))
    return p


def _brute_force(max_captions: int) -> dict:
    test = [e for e in ENTRIES if e[1] == "test"]
    img = torch.nn.functional.normalize(torch.tensor([COLOURS[c] for c, _, _ in test], dtype=torch.float32), dim=-1)
    caps = [(i, c) for i, (_, _, cs) in enumerate(test) for c in cs[:max_captions]]
    txt = torch.nn.functional.normalize(_tok([c for _, c in caps]), dim=-1)
    i2t, t2i = image_text_ranks(img @ txt.T, torch.tensor([i for i, _ in caps]))
    return {"image_to_text": rank_summary(i2t), "text_to_image": rank_summary(t2i), "n": len(caps)}


def test_coco_layout_loads_five_captions_per_image(tmp_path):
    p = make_coco(tmp_path)
    ds = load_karpathy(p, "test")
    assert len(ds) == 3 and ds["image_id"] == ["1000", "1002", "1003"]
    assert ds["caption"][0] == ["a red", "the red", "so red", "red red", "a white"]  # first five, stripped
    assert all(len(c) == 5 for c in ds["caption"])
    assert len(load_karpathy(p, "test", max_captions=0)["caption"][0]) == 6
    assert load_karpathy(p, "train")["image_id"] == ["1001"]


@pytest.mark.parametrize("flickr", [False, True], ids=["coco", "flickr30k"])
def test_karpathy_retrieval_matches_brute_force(tmp_path, flickr):
    p = make_coco(tmp_path, flickr)
    images = tmp_path / "flickr30k-images" if flickr else None
    task = tmp_path / "t.yaml"
    task.write_text(f"kind: retrieval\nname: k\ndata: {p}\n" + (f"images: {images}\n" if images else ""))
    got = evaluate_task(ColourModel(), _pre, _tok, task)
    want = _brute_force(5)
    for d in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert got[f"retrieval/k/{d}/R@{k}"] == pytest.approx(want[d][f"R@{k}"]), (d, k)
    assert 0 < got["retrieval/k/text_to_image/R@1"] < 1  # "a grey" and the red image's "a white" miss
    from contrast.evaluate.retrieval import evaluate_retrieval
    from contrast.evaluate.tasks import load_retrieval_task

    r = evaluate_retrieval(ColourModel(), _pre, _tok, retrieval_dataset(load_retrieval_task(task)))
    assert (r["num_images"], r["num_texts"], r["captions_grouped_by"]) == (3, want["n"], "caption lists")


def test_wrong_image_folder_and_split_are_named(tmp_path):
    p = make_coco(tmp_path)
    with pytest.raises(ConfigError, match=r"coco images not found: .*elsewhere/test2014/COCO_test2014_000000000000"
                                          r"\.jpg does not exist; point --images"):
        load_karpathy(p, "test", images=tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="no 'val' images .*its splits: test, train"):
        load_karpathy(p, "val")
    (tmp_path / "bad.json").write_text('{"annotations": []}')
    with pytest.raises(ConfigError, match="not a Karpathy-split file"):
        load_karpathy(tmp_path / "bad.json")


def test_cli_retrieval_on_a_karpathy_file_and_bad_task_files(trained_run, tmp_path, capsys):
    from contrast.cli import main

    p = make_coco(tmp_path / "coco")
    out = tmp_path / "report"
    assert main(["eval", "retrieval", "--checkpoint", str(trained_run), "--data", str(p), "--split", "test",
                 "--device", "cpu", "--out-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    section = json.dumps(report)
    assert '"num_images": 3' in section and '"num_texts": 15' in section
    assert "dataset_coco.json:test: 3 images, 15 captions" in capsys.readouterr().out
    assert main(["eval", "retrieval", "--checkpoint", str(trained_run)]) == 2
    assert "needs --data SOURCE or --retrieval-task FILE" in capsys.readouterr().err
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\nclassnames: [a]\n".encode("latin-1"))
    assert main(["eval", "zeroshot", "--checkpoint", str(trained_run), "--task", str(latin), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text" in err and "Traceback" not in err
    assert main(["eval", "zeroshot", "--checkpoint", str(trained_run), "--task", "eval/tasks/cifar10.yaml",
                 "--task-data", str(tmp_path / "no_cifar"), "--device", "cpu"]) == 2
    assert "no_cifar not found. Download it with" in capsys.readouterr().err
