import json
import subprocess
import sys

import pytest
import torch

import contrast
from contrast.config import ConfigError, load_config
from contrast.evaluate.zeroshot import ZeroShotTask, evaluate_zeroshot, load_task, zeroshot_classifier


class FixedModel(torch.nn.Module):
    """Text embedding = one-hot of the first word's index in a vocabulary; no training involved."""

    vocab = ["cat", "dog", "fish"]

    def encode_text(self, ids):
        return ids

    def encode_image(self, pixels):
        return pixels


def test_classifier_averages_normalised_template_embeddings():
    def tok(texts):
        out = []
        for t in texts:
            v = torch.zeros(3)
            v[FixedModel.vocab.index(t.split()[-1])] = 1.0 if t.startswith("a") else 3.0
            out.append(v)
        return torch.stack(out)

    w = zeroshot_classifier(FixedModel(), tok, ["cat", "dog", "fish"], ["a {}", "the {}"])
    assert torch.allclose(w, torch.eye(3), atol=1e-6)


def test_task_files_validate(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("classnames: [a]\ntemplates: ['no placeholder']\n")
    with pytest.raises(ConfigError, match="must contain"):
        load_task(p)
    p.write_text("classnames: [a]\nlabelcolumn: x\n")
    with pytest.raises(ConfigError, match="did you mean 'label_column'"):
        load_task(p)
    assert load_task("eval/tasks/shapes.yaml").classnames[0] == "circle"


def test_tiny_trained_model_is_far_above_chance(trained_run):
    model, preprocess, tok = contrast.load(trained_run)
    cfg = load_config(trained_run / "config.yaml")
    r = evaluate_zeroshot(model, preprocess, tok, load_task("eval/tasks/colours.yaml"), data_cfg=cfg.data,
                         image_size=cfg.model.image.image_size)
    assert r["n"] > 50
    assert r["top1"] > 0.5, r  # chance is 1/6
    emb = model.encode_text(tok(["a red shape", "a blue shape"]))
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_eval_cli_prints_and_writes_json(trained_run, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "contrast", "eval", "zeroshot", "--checkpoint", str(trained_run),
         "--task", "eval/tasks/colours.yaml", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "colours: top-1" in proc.stdout
    assert json.loads(out.read_text())[0]["n"] > 50


def test_cli_reports_bad_input_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "contrast", "train", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "recipe not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "contrast", "eval", "zeroshot", "--checkpoint",
                           str(tmp_path), "--task", "eval/tasks/shapes.yaml"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "holds no checkpoint" in proc.stderr


def test_zeroshot_task_dataclass_defaults():
    assert ZeroShotTask().templates == ["a photo of a {}."]
