"""Evaluation reports: files written, figures round-tripped, tables and plots; the eval commands end to end."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from contrast.evaluate.report import Section, plot_confusion, read_report, to_markdown, write_report


def _sections() -> list[Section]:
    zs = {"task": "shapes", "n": 6, "classes": 3, "top1": 4 / 6, "top5": 1.0, "chance_top1": 1 / 3,
          "mean_per_class_recall": (2 / 3 + 1 / 2 + 1) / 3, "per_class_recall": [2 / 3, 0.5, 1.0],
          "confusion": [[2, 1, 0], [1, 1, 0], [0, 0, 1]], "classnames": ["circle", "square", "star"]}
    summary = {"R@1": 0.5, "R@5": 0.75, "R@10": 1.0, "mean_rank": 2.5, "median_rank": 2.0}
    rt = {"num_images": 4, "num_texts": 8, "captions_grouped_by": "column 'image_id'", "definition": "DEF",
          "image_to_text": summary, "text_to_image": dict(summary, **{"R@1": 0.25}),
          "itm_reranked": {"shortlist": 3, "image_to_text": dict(summary, **{"R@1": 0.75}), "text_to_image": summary}}
    lp = {"best_l2": 1e-3, "val_accuracy": 0.9, "test_accuracy": 0.875, "features": "pooled", "num_train": 80,
          "num_val": 20, "num_test": 8, "feature_dim": 32,
          "sweep": [{"l2": 1.0, "val_accuracy": 0.5}, {"l2": 1e-3, "val_accuracy": 0.9}],
          "test": {"top1": 0.875, "mean_per_class_recall": 0.8, "confusion": [[4, 0], [1, 3]], "classnames": ["a", "b"]}}
    return [Section("zeroshot", "shapes", zs), Section("retrieval", "coco:test", rt), Section("linear_probe", "shapes", lp)]


def test_report_files_and_round_trip(tmp_path):
    sections = _sections()
    paths = write_report(tmp_path / "rep", sections, checkpoint="runs/x")
    out = tmp_path / "rep"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        "report.json", "report.md", "zeroshot_shapes_confusion.png", "retrieval_coco_test_recall.png",
        "linear_probe_shapes_confusion.png", "linear_probe_shapes_sweep.png",
    ])
    assert paths["json"] == out / "report.json"
    doc = json.loads((out / "report.json").read_text())
    assert doc["checkpoint"] == "runs/x" and len(doc["sections"]) == 3
    back = read_report(out)
    assert [(s.kind, s.name) for s in back] == [(s.kind, s.name) for s in sections]
    assert back[0].result["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert back[1].result["itm_reranked"]["image_to_text"]["R@1"] == 0.75
    assert back[2].plots == ["linear_probe_shapes_confusion.png", "linear_probe_shapes_sweep.png"]
    for p in out.glob("*.png"):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 200


def test_markdown_tables():
    md = to_markdown(_sections(), meta={"checkpoint": "runs/x"})
    lines = md.splitlines()
    assert "- checkpoint: runs/x" in lines
    assert "| shapes | 6 | 3 | 0.6667 | 1 | 0.7222 | 0.3333 |" in lines
    assert "| image → text | 0.5 | 0.75 | 1 | 2.5 | 2 |" in lines
    assert "| text → image | 0.25 | 0.75 | 1 | 2.5 | 2 |" in lines
    assert "| image → text, ITM re-ranked (top 3) | 0.75 | 0.75 | 1 | 2.5 | 2 |" in lines
    assert "| shapes | pooled | 80 / 20 / 8 | 0.001 | 0.9 | 0.875 | 0.8 |" in lines
    assert "_DEF_" in lines
    # sections appear in a fixed order whatever order they were added in
    assert md.index("## Zero-shot") < md.index("## Retrieval") < md.index("## Linear probe")


def test_confusion_plot_shades_by_row_fraction(tmp_path):
    import numpy as np

    # class 0: all 5 right (dark diagonal cell); class 1: all 4 predicted as class 0 (dark off-diagonal cell)
    p = plot_confusion([[5, 0], [4, 0]], ["a", "b"], tmp_path / "c.png")
    rgb = np.asarray(Image.open(p).convert("RGB"), dtype=float)
    blue_rows = np.where((rgb[..., 2] - rgb[..., 0] > 100).any(axis=1))[0]  # rows with a dark blue cell
    assert len(blue_rows) > 0  # dark cells were drawn


def test_unknown_section_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        Section("caption", "x", {})


# --------------------------------------------------------------------------------------------------- commands


def test_eval_commands_write_reports(trained_run, tmp_path):
    import contrast
    from contrast.cli import main
    from contrast.config import load_config
    from contrast.data import load_source
    from contrast.evaluate.retrieval import evaluate_retrieval

    out = tmp_path / "ret"
    assert main(["eval", "retrieval", "--checkpoint", str(trained_run), "--data", "synthetic", "--limit", "40",
                 "--device", "cpu", "--out-dir", str(out)]) == 0
    (sec,) = read_report(out)
    assert sec.kind == "retrieval" and sec.result["num_texts"] == 40
    # the command's figures equal a direct call on the same rows
    model, preprocess, tok = contrast.load(trained_run)
    run_cfg = load_config(trained_run / "config.yaml")
    ds = load_source(run_cfg.data, "test", run_cfg.model.image.image_size).select(range(40))
    direct = evaluate_retrieval(model, preprocess, tok, ds)
    assert sec.result["image_to_text"] == direct["image_to_text"]
    assert sec.result["text_to_image"] == direct["text_to_image"]

    assert main(["eval", "retrieval", "--checkpoint", str(trained_run), "--data", "synthetic", "--rerank-itm", "5",
                 "--limit", "8", "--out-dir", str(tmp_path / "x")]) == 2  # a CLIP has no ITM head: a user error

    out = tmp_path / "all"
    assert main(["eval", "all", "--checkpoint", str(trained_run), "--task", "eval/tasks/colours.yaml",
                 "--l2", "1e-3", "--max-train", "120", "--limit", "40", "--out-dir", str(out)]) == 0
    secs = read_report(out)
    assert [s.kind for s in secs] == ["zeroshot", "linear_probe", "retrieval"]
    zs, lp, _ = secs
    assert sum(map(sum, zs.result["confusion"])) == zs.result["n"]
    assert zs.result["top1"] == pytest.approx(
        sum(zs.result["confusion"][i][i] for i in range(6)) / zs.result["n"])
    assert lp.result["num_train"] == 120  # --max-train caps the training split
    assert lp.result["test_accuracy"] > 0.5  # colours are linearly readable from a trained tower (chance 1/6)
    md = (out / "report.md").read_text()
    assert "## Zero-shot classification" in md and "## Linear probe" in md and "## Retrieval" in md
    assert (out / "zeroshot_colours_confusion.png").is_file()


def test_class_folder_task(tmp_path):
    from contrast.evaluate.labelled import is_class_folder, load_class_folder
    from contrast.evaluate.zeroshot import evaluate_zeroshot, load_task

    root = tmp_path / "colours"
    rgb = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}
    for name, c in rgb.items():
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (4, 4), c).save(root / name / f"{i}.png")
    assert is_class_folder(root)
    parts = {s: load_class_folder(root, s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [21, 3, 6]  # 7 / 1 / 2 per class
    from datasets import Image as ImageFeature

    files = [{c["path"] for c in parts[s].cast_column("image", ImageFeature(decode=False))["image"]} for s in parts]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
    assert parts["test"].features["label"].names == ["blue", "green", "red"]

    task = tmp_path / "t.yaml"
    task.write_text(f"name: c\ndata: {root}\nclassnames: [blue, green, red]\ntemplates: ['{{}}']\n")
    vec = {"blue": [0.0, 0.0, 1.0], "green": [0.0, 1.0, 0.0], "red": [0.0, 1.0, 0.0]}  # red's prompt looks green

    from contrast.models import Model as ModelProtocol

    class Model(ModelProtocol):
        def encode_text(self, ids):
            return ids

        def encode_image(self, pixels):
            return pixels.mean(dim=(2, 3))

    def tok(texts):
        return torch.tensor([vec[t] for t in texts])

    def pre(img):
        import numpy as np

        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)

    r = evaluate_zeroshot(Model(), pre, tok, load_task(task))
    # blue right; green images tie green and red (argmax takes the first: green, right); red images score 0 on
    # every class -> predicted blue
    assert r["confusion"] == [[2, 0, 0], [0, 2, 0], [2, 0, 0]]
    assert r["per_class_recall"] == [1.0, 1.0, 0.0]
    assert r["mean_per_class_recall"] == pytest.approx(2 / 3)
    task.write_text(f"name: c\ndata: {root}\nclassnames: [blue, green]\ntemplates: ['{{}}']\n")
    from contrast.config import ConfigError

    with pytest.raises(ConfigError, match="3 class folders"):
        evaluate_zeroshot(Model(), pre, tok, load_task(task))
