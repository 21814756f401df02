"""Task files: the shipped standard tasks (ImageNet-1k, CIFAR-10/100) against the lists open_clip and clip_benchmark
ship; safe loading (UTF-8 only, no Python tags, no alias bombs); CLIP_benchmark-style webdataset folders; split: all;
a missing data folder named with the way to get it."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contrast.config import ConfigError
from contrast.errors import UserError
from contrast.evaluate.taskfile import TaskFileError, read_yaml
from contrast.evaluate.tasks import RetrievalTask, evaluate_task, load_any_task
from contrast.evaluate.zeroshot import evaluate_zeroshot, load_task, task_dataset
from contrast.models import Model

TASKS = Path(__file__).resolve().parent.parent / "eval" / "tasks"


def _clip_benchmark_json(name: str) -> dict:
    import clip_benchmark.datasets as cb

    return json.loads((Path(cb.__file__).parent / name).read_text())


# --------------------------------------------------------------------------------------------------- shipped tasks


def test_imagenet_task_files_match_open_clip_and_clip_benchmark():
    from open_clip import zero_shot_metadata as meta

    full, simple = load_task(TASKS / "imagenet1k.yaml"), load_task(TASKS / "imagenet1k_simple.yaml")
    assert len(full.classnames) == 1000 and full.classnames == list(meta.IMAGENET_CLASSNAMES)
    assert (len(full.templates), len(simple.templates)) == (80, 7)
    cb_templates = [t.replace("{c}", "{}") for t in _clip_benchmark_json("en_zeroshot_classification_templates.json")["imagenet1k"]]
    assert full.templates == cb_templates  # the same 80 prompts, by an independent package
    assert _clip_benchmark_json("en_classnames.json")["imagenet1k"] == full.classnames
    assert set(simple.templates) < set(full.templates)
    assert full.templates[0].format("tench") == "a bad photo of a tench."


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_task_files(name, classes):
    task = load_task(TASKS / f"{name}.yaml")
    assert len(task.classnames) == len(set(task.classnames)) == classes
    cb = _clip_benchmark_json("en_zeroshot_classification_templates.json")[name]
    assert task.templates == [t.replace("{c}", "{}") for t in cb] and len(task.templates) == 18
    assert task.split == "test"


def test_every_shipped_task_file_loads():
    for f in sorted(TASKS.glob("*.yaml")):
        task = load_any_task(f)
        assert task.name, f
        if isinstance(task, RetrievalTask):
            assert task.data.endswith(".json") and task.max_captions == 5


def test_missing_data_folder_names_it_and_how_to_get_it(tmp_path):
    task = load_task(TASKS / "cifar10.yaml", data=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"data folder .*nowhere not found\. Download it with `huggingface-cli "
                       r"download clip-benchmark/wds_cifar10.*--task-data PATH"):
        task_dataset(task)


# --------------------------------------------------------------------------------------------------- safe loading


def test_non_utf8_task_file_is_one_line_naming_file_and_fix(tmp_path):
    p = tmp_path / "latin.yaml"
    p.write_bytes("name: caf\xe9\nclassnames: [a]\n".encode("latin-1"))
    with pytest.raises(TaskFileError) as e:
        load_task(p)
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert str(p) in msg and "not UTF-8" in msg and "line 1" in msg and "iconv" in msg
    p.write_bytes("\ufeffname: caf\xe9\nclassnames: [a]\n".encode())  # UTF-8 with a byte-order mark is fine
    assert load_task(p).name == "caf\xe9"


def test_python_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    p = tmp_path / "evil.yaml"
    p.write_text(f"classnames: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(TaskFileError, match="not valid YAML"):
        load_task(p)
    assert not marker.exists()


def test_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):  # 10 ** 9 strings once expanded
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\nclassnames: *i\n")
    t0 = time.perf_counter()
    with pytest.raises(TaskFileError, match="anchors/aliases"):
        load_task(p)
    assert time.perf_counter() - t0 < 5
    p.write_text("classnames: &c [a, &d [*c]]\n")  # recursive
    with pytest.raises(TaskFileError, match="alias inside the value it names"):
        read_yaml(p)
    p.write_text("base: &t ['a {}', 'the {}']\ntemplates: *t\n")  # a modest alias is fine
    assert read_yaml(p)["templates"] == ["a {}", "the {}"]


def test_unknown_references_are_named(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("classnames: open_clip:cifar10\n")
    with pytest.raises(TaskFileError, match="open_clip ships no classnames named 'cifar10'; choose one of: imagenet"):
        load_task(p)
    p.write_text("classnames: [a]\ntemplates: nonsense\n")
    with pytest.raises(TaskFileError, match="must be a list or a reference"):
        load_task(p)
    p.write_text("kind: retrieval\ndata: x.json\n")
    with pytest.raises(ConfigError, match="is a retrieval task"):
        load_task(p)


# --------------------------------------------------------------------------------------------------- data layouts

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class MeanColour(Model):
    """Image embedding = the normalised mean colour; a text embedding = the colour its token ids name."""

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return torch.nn.functional.normalize(pixels.mean(dim=(2, 3)), dim=-1)

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return torch.nn.functional.normalize(ids.float(), dim=-1)


def _tok(texts: list[str]) -> torch.Tensor:
    return torch.tensor([next(RGB[w] for w in RGB if w in t) for t in texts])


def _pre(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_wds_folder(root: Path, splits: dict[str, list[tuple[str, int | None]]], per_shard: int = 3) -> Path:
    """A CLIP_benchmark-style folder: SPLIT/N.tar shards of KEY.<ext> + KEY.cls, classnames.txt, templates."""
    names = list(RGB)
    for split, samples in splits.items():
        (root / split).mkdir(parents=True)
        shards = [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]
        for n, shard in enumerate(shards):
            with tarfile.open(root / split / f"{n}.tar", "w") as tar:
                for j, (ext, label) in enumerate(shard):
                    buf = io.BytesIO()
                    colour = RGB[names[label]] if label is not None else (9, 9, 9)
                    Image.new("RGB", (5, 3), colour).save(buf, format={"jpg": "JPEG"}.get(ext, ext.upper()))
                    key = f"s{n:03d}{j:03d}"
                    _member(tar, f"{key}.{ext}", buf.getvalue())
                    if label is not None:
                        _member(tar, f"{key}.cls", str(label).encode())
        (root / split / "nshards.txt").write_text(str(len(shards)))
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of {c}.\n{c}\n")
    return root


def test_clip_benchmark_wds_folder_task(tmp_path, data_cache):
    test = [("webp", 0), ("png", 1), ("jpg", 2), ("png", 0), ("webp", 2), ("png", 1), ("png", None)]
    root = make_wds_folder(tmp_path / "wds", {"test": test, "train": [("png", 1), ("png", 2)]})
    p = tmp_path / "t.yaml"
    p.write_text(f"name: w\ndata: {root}\n")  # class names and templates come from the folder
    task = load_task(p)
    assert task.classnames == ["red", "green", "blue"] and task.templates == ["a photo of {}.", "{}"]
    from contrast.config import DataConfig

    cfg = DataConfig(cache_dir=data_cache)
    ds = task_dataset(task, cfg)
    assert len(ds) == 7 and ds["label"] == [0, 1, 2, 0, 2, 1, None]
    r = evaluate_zeroshot(MeanColour(), _pre, _tok, task, data_cfg=cfg)
    assert r["n"] == 6 and r["top1"] == 1.0 and r["skipped"] == {"bad_label": 1}  # the sample without .cls
    task.split = "all"
    assert len(task_dataset(task, cfg)) == 9
    task.split = "val"
    with pytest.raises(ConfigError, match="no .tar shards for split 'val'.*test, train"):
        task_dataset(task, cfg)
    p.write_text(f"name: w\ndata: {root}\nclassnames: [red, green]\n")
    with pytest.raises(ConfigError, match="3 class names in classnames.txt but the task lists 2"):
        task_dataset(load_task(p), cfg)


def test_split_all_evaluates_a_whole_class_folder(tmp_path):
    root = tmp_path / "folder"
    for name, c in RGB.items():
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (6, 4), c).save(root / name / f"{i}.png")
    p = tmp_path / "t.yaml"
    p.write_text(f"name: f\ndata: {root}\nsplit: all\nclassnames: [blue, green, red]\ntemplates: ['{{}}']\n")
    r = evaluate_zeroshot(MeanColour(), _pre, _tok, load_task(p))
    assert r["n"] == 30 and r["top1"] == 1.0 and r["split"] == "all: every image"
    metrics = evaluate_task(MeanColour(), _pre, _tok, p)
    assert metrics == {"zeroshot/f/top1": 1.0, "zeroshot/f/top5": 1.0, "zeroshot/f/mean_per_class_recall": 1.0}
    test = evaluate_zeroshot(MeanColour(), _pre, _tok, dataclasses.replace(load_task(p), split="test"))
    assert test["n"] == 6 and "seeded 20% of each class" in test["split"] and "split: all" in test["split"]


@pytest.mark.parametrize("name", ["captions.jsonl", "captions.csv"])
def test_non_utf8_captions_file_is_one_line_naming_file_and_fix(tmp_path, name):
    from contrast.config import DataConfig
    from contrast.data import load_source

    Image.new("RGB", (4, 4)).save(tmp_path / "0.png")
    text = '{"file": "0.png", "caption": "caf\xe9"}\n' if name.endswith("jsonl") else "file,caption\n0.png,caf\xe9\n"
    (tmp_path / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(UserError) as e:
        load_source(DataConfig(source=str(tmp_path)), "train")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / name) in msg and "not UTF-8" in msg and "iconv" in msg
    (tmp_path / name).write_bytes(text.encode("utf-8"))
    assert load_source(DataConfig(source=str(tmp_path)), "train")["caption"] == ["caf\xe9"]
