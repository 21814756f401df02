"""Interoperability: a trained model exported to the open_clip format and evaluated by the clip_benchmark package on a
small local CLIP_benchmark-style folder gets the same zero-shot top-1 as `contrast eval zeroshot` on that folder."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

pytest.importorskip("clip_benchmark")


def _offline_requests() -> None:
    """clip_benchmark's dataset builder imports ``requests`` (for downloading ImageNetV2) at module level; where it is
    not installed, a stand-in that refuses every use lets the builder import, and proves nothing is downloaded."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("requests") is None and "requests" not in sys.modules:
        stub = types.ModuleType("requests")

        def refuse(name: str):
            raise RuntimeError(f"network use (requests.{name}) in an offline test")

        stub.__getattr__ = refuse  # type: ignore[attr-defined]
        sys.modules["requests"] = stub


def _write_wds(root, ds, classnames: list[str], templates: list[str], per_shard: int = 40) -> int:
    """The single-shape test images as CLIP_benchmark shards: KEY.png + KEY.cls (the colour's class index)."""
    from datasets import Image as ImageFeature

    ds = ds.cast_column("image", ImageFeature(decode=False))
    (root / "test").mkdir(parents=True)
    n = 0
    for start in range(0, len(ds), per_shard):
        with tarfile.open(root / "test" / f"{start // per_shard}.tar", "w") as tar:
            for i, row in enumerate(ds.select(range(start, min(start + per_shard, len(ds))))):
                for ext, data in (("png", row["image"]["bytes"]), ("cls", str(classnames.index(row["colour"])).encode())):
                    info = tarfile.TarInfo(f"{start + i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1
    (root / "test" / "nshards.txt").write_text(str(-(-len(ds) // per_shard)))
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in templates))
    return n


def _topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """clip_benchmark's top-k accuracy, the same count, taken with .item(): its own converts a one-element array with
    float(), which NumPy 2 refuses."""
    pred = output.topk(max(topk), 1, True, True)[1].t()  # (k, N)
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_clip_benchmark_agrees_with_contrast_eval_zeroshot(trained_run, tmp_path, data_cache, monkeypatch):
    import open_clip

    _offline_requests()
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification

    from contrast.cli import main
    from contrast.config import load_config
    from contrast.data import load_source
    from contrast.evaluate.zeroshot import load_task
    from contrast.export import export_checkpoint

    colours = load_task("eval/tasks/colours.yaml")
    cfg = load_config(trained_run / "config.yaml")
    test = load_source(cfg.data, "test", cfg.model.image.image_size).filter(lambda n: n == 1, input_columns="n_shapes")
    n = _write_wds(tmp_path / "wds_colours", test, colours.classnames, colours.templates)
    assert n >= 50

    export_checkpoint(trained_run, "open_clip", tmp_path / "oc")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    ds = build_dataset("wds/colours", root=str(tmp_path / "wds_colours"), transform=preprocess, split="test")
    loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=0)
    monkeypatch.setattr(zeroshot_classification, "accuracy", _topk_accuracy)
    theirs = zeroshot_classification.evaluate(model, loader, tokenizer, ds.classes, ds.templates, device="cpu",
                                              amp=False)

    task = tmp_path / "colours_wds.yaml"
    task.write_text(f"name: colours_wds\ndata: {tmp_path / 'wds_colours'}\nsplit: test\n")  # names, templates: folder
    out = tmp_path / "r.json"
    assert main(["eval", "zeroshot", "--checkpoint", str(trained_run), "--task", str(task), "--device", "cpu",
                 "--out", str(out), "--out-dir", str(tmp_path / "report")]) == 0
    ours = json.loads(out.read_text())[0]
    assert ours["n"] == n
    assert ours["top1"] > 0.5  # chance is 1/6: agreement on a model that has learnt something
    # the same number of images right (torchmetrics reports in float32)
    assert round(ours["top1"] * n) == round(theirs["acc1"] * n)
    assert round(ours["top5"] * n) == round(theirs["acc5"] * n)
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-6)
