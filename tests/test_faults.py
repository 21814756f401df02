"""Runs that meet faults around the step: failed checkpoint writes, hostile or wrong files, a run killed before its
first checkpoint, the end-of-run summary; evaluation during training and its TensorBoard / metrics records."""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import sys

import pytest
import torch
from conftest import tiny_config

from contrast import runs as R
from contrast.config import ConfigError, load_recipe
from contrast.errors import CheckpointError, UserError
from contrast.train import checkpoint as C
from contrast.train.loop import train


def _records(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _losses(run):
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


def _summary(run):
    return [r["summary"] for r in _records(run) if "summary" in r][-1]


# --------------------------------------------------------------------------------------------------- failed writes


def test_a_write_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, data_cache, monkeypatch):
    cfg = tiny_config(data_cache, steps=6, checkpoint_every=2, keep_checkpoints=1)
    run = tmp_path / "run"
    real = C.save_model_weights
    calls = []

    def disk_fills(model, path):  # the second checkpoint's weights: half a file, then ENOSPC
        calls.append(path)
        if len(calls) == 2:
            open(path, "wb").write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(model, path)

    monkeypatch.setattr(C, "save_model_weights", disk_fills)
    with pytest.raises(C.CheckpointWriteError) as e:
        train(cfg, run, progress=False)
    msg = str(e.value)
    assert "No space left on device" in msg and "step_00000002 is intact" in msg and "--resume latest" in msg
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000002"]  # no partial step_4, nothing pruned
    assert R.resolve(run).name == "step_00000002"
    R.load_model(run)  # the standing checkpoint loads
    assert _summary(run)["status"].startswith("stopped: writing the checkpoint")
    monkeypatch.setattr(C, "save_model_weights", real)
    train(cfg, run, resume="latest", progress=False)
    assert R.resolve(run).name == "step_00000006"


def test_a_refused_rename_keeps_the_previous_checkpoint(tmp_path, data_cache, monkeypatch):
    cfg = tiny_config(data_cache, steps=4, checkpoint_every=2, keep_checkpoints=1)
    run = tmp_path / "run"
    real = os.replace

    def refuse_step_4(src, dst):
        if str(dst).endswith("step_00000004"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        real(src, dst)

    monkeypatch.setattr(C.os, "replace", refuse_step_4)
    with pytest.raises(C.CheckpointWriteError, match="Permission denied.*step_00000002 is intact"):
        train(cfg, run, progress=False)
    assert R.resolve(run).name == "step_00000002"
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp" in p.name]
    R.load_model(run)


# --------------------------------------------------------------------------------------------------- hostile files


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def _trained(tmp_path, data_cache, steps=2):
    run = tmp_path / "run"
    train(tiny_config(data_cache, steps=steps), run, progress=False)
    return run, R.resolve(run)


def test_a_pickle_with_code_in_place_of_state_is_refused_unrun(tmp_path, data_cache):
    run, ckpt = _trained(tmp_path, data_cache)
    _Evil.marker = str(tmp_path / "ran")
    for protocol in (2, 4):
        with open(ckpt / C.STATE, "wb") as f:
            pickle.dump({"step": 2, "x": _Evil()}, f, protocol=protocol)
        with pytest.raises(CheckpointError) as e:
            train(tiny_config(data_cache, steps=4), run, resume="latest", progress=False)
        assert str(ckpt / C.STATE) in str(e.value) and "refused unread" in str(e.value)
        assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "ran").exists()
    torch.save({"hello": 1}, ckpt / C.STATE)  # plain values, but not a training state
    with pytest.raises(CheckpointError, match="lacks step, scheduler, rng"):
        C.load_state(ckpt)
    (ckpt / C.STATE).write_bytes(b"\x80\x02}q\x00")  # cut short
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        C.load_state(ckpt)


def test_foreign_and_lying_weight_files_get_one_line_messages(tmp_path, data_cache):
    run, ckpt = _trained(tmp_path, data_cache)
    weights = ckpt / R.WEIGHTS
    good = weights.read_bytes()
    header_len = struct.unpack("<Q", good[:8])[0]
    weights.write_bytes(good[: 8 + header_len] + good[8 + header_len:][:100])  # header claims more than the file holds
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        R.load_model(run)
    _Evil.marker = str(tmp_path / "ran")
    with open(weights, "wb") as f:
        pickle.dump(_Evil(), f)  # a pickle where safetensors belong
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        R.load_model(run)
    assert not (tmp_path / "ran").exists()
    from contrast.towers.adapters import WeightsError, read_state_dict

    evil = tmp_path / "tower.pt"
    with open(evil, "wb") as f:
        pickle.dump({"w": _Evil()}, f, protocol=2)
    with pytest.raises(WeightsError, match="refused unread") as e:
        read_state_dict(evil)
    assert isinstance(e.value, UserError) and not (tmp_path / "ran").exists()


def test_a_checkpoint_of_another_model_family_is_refused_by_name(tmp_path, data_cache):
    run, _ = _trained(tmp_path, data_cache)
    other = tiny_config(data_cache, steps=4)
    other.model.text.width = 48  # a different model: the resume must refuse, naming tensors
    with pytest.raises(CheckpointError, match="made for a different model config"):
        train(other, run, resume="latest", progress=False)


def test_a_pointer_that_leads_outside_the_run_is_refused(tmp_path, data_cache):
    run, _ = _trained(tmp_path, data_cache)
    (run / "checkpoints" / "latest").write_text("../../../etc\n")
    with pytest.raises(CheckpointError, match="should name a step directory"):
        R.resolve(run)


BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x, x]"]
                 + [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]" for i in range(6)])


@pytest.mark.parametrize("text, expected", [
    (BOMB.encode(), "expands to more than 1,000,000 values"),
    (b"model:\n  kind: cl\xffip\n", "not UTF-8 text (byte 0xff on line 2)"),
    (b"a: &a [1, *a]\n", "alias inside the value it names"),
    (b"train: !!python/object/apply:os.system [echo hi]\n", "not valid YAML"),
])
def test_hostile_recipes_get_a_message_naming_the_file(tmp_path, text, expected):
    p = tmp_path / "recipe.yaml"
    p.write_bytes(text)
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert expected in str(e.value) and str(p) in str(e.value)


def test_the_command_line_prints_messages_not_tracebacks(tmp_path, data_cache, capsys):
    from contrast.cli import main

    run, ckpt = _trained(tmp_path, data_cache)
    with open(ckpt / C.STATE, "wb") as f:
        pickle.dump({"step": 2, "x": _Evil()}, f, protocol=2)
    _Evil.marker = str(tmp_path / "ran")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert main(["train", str(bomb), "--out", str(tmp_path / "x")]) == 2
    assert "expands to more than" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump({"model": {"embed_dim": 32}}))
    assert main(["train", str(recipe), "--out", str(run), "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert "refused unread" in err and "Traceback" not in err and not (tmp_path / "ran").exists()


# --------------------------------------------------------------------------------------------------- resume, summary


def test_resume_latest_without_a_checkpoint_starts_from_step_zero(tmp_path, data_cache, capsys):
    cfg = tiny_config(data_cache, steps=4)
    train(cfg, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    part.mkdir()
    (part / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # a run killed mid-line
    capsys.readouterr()
    train(cfg, part, resume="latest", progress=False)
    assert "holds no checkpoint yet" in capsys.readouterr().out
    assert _losses(part) == _losses(tmp_path / "full")
    s = _summary(part)
    assert s["resumes"] == 1 and s["status"] == "completed" and s["steps"] == 4


def test_the_summary_counts_resumes_and_nonfinite_steps(tmp_path, data_cache):
    cfg = tiny_config(data_cache, steps=4, checkpoint_every=2)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    assert _summary(run) == {**_summary(run), "steps": 4, "started_at_step": 0, "resumes": 0, "skipped": {},
                             "nonfinite_steps": 0, "status": "completed"}
    cfg.train.steps = 6
    train(cfg, run, resume="latest", progress=False)
    cfg.train.steps = 8
    train(cfg, run, resume="latest", progress=False)
    s = _summary(run)
    assert (s["steps"], s["started_at_step"], s["resumes"]) == (8, 6, 2)
    assert len([r for r in _records(run) if "summary" in r]) == 1  # a resumed run rewrites what came after


# --------------------------------------------------------------------------------------------------- eval in training


def _eval_config(data_cache, **train_kw):
    cfg = tiny_config(data_cache, **train_kw)
    cfg.eval.tasks = ["eval/tasks/colours.yaml"]
    cfg.eval.retrieval_split = "val"
    return cfg


def test_evaluation_during_training_at_the_right_steps_and_the_best_checkpoint(tmp_path, data_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _eval_config(data_cache, steps=6, eval_every=2, checkpoint_every=0, keep_checkpoints=1,
                       best_metric="retrieval/text_to_image/R@10")
    run = tmp_path / "run"
    result = train(cfg, run, progress=False)
    evals = [r for r in _records(run) if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    for r in evals:
        assert set(r["eval"]) >= {"zeroshot/colours/top1", "retrieval/image_to_text/R@1", "retrieval/text_to_image/R@10"}
    values = [r["eval"]["retrieval/text_to_image/R@10"] for r in evals]
    best_step = [2, 4, 6][values.index(max(values))]  # the first of equal values is kept
    assert result.best == {"metric": "retrieval/text_to_image/R@10", "value": max(values), "step": best_step}
    assert R.resolve_checkpoint(run / "checkpoints" / "best").name == f"step_{best_step:08d}"
    assert result.metrics == evals[-1]["eval"]
    # the independent reference: the saved best checkpoint evaluated afresh gives the logged value
    from contrast.train.evals import Evaluator

    model = R.load_model(run / "checkpoints" / "best")
    again = Evaluator(cfg, model, torch.device("cpu"))(model)
    assert again["retrieval/text_to_image/R@10"] == pytest.approx(max(values), abs=1e-6)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "logit_scale", "images_per_s", "grad_norm", "eval/zeroshot/colours/top1",
            "data/skipped_samples"} <= tags
    assert [e.step for e in acc.Scalars("eval/zeroshot/colours/top1")] == [2, 4, 6]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([v for _, v in sorted(_losses(run).items())])


def test_eval_settings_that_cannot_work_stop_before_training(tmp_path, data_cache):
    cfg = tiny_config(data_cache, steps=2, eval_every=1)
    with pytest.raises(ConfigError, match="eval_every needs something to evaluate"):
        train(cfg, tmp_path / "a", progress=False)
    cfg = _eval_config(data_cache, steps=2, eval_every=1, best_metric="zeroshot/colors/top1")
    with pytest.raises(ConfigError, match="not among the eval metrics.*zeroshot/colours/top1"):
        train(cfg, tmp_path / "b", progress=False)


def test_weights_and_biases_logging_when_asked(tmp_path, data_cache, monkeypatch):
    import types

    logged, inits = [], []
    fake = types.SimpleNamespace(util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    fake.init = lambda **kw: inits.append(kw) or types.SimpleNamespace(
        log=lambda values, step: logged.append((step, values)), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_config(data_cache, steps=2, wandb="proj")
    train(cfg, tmp_path / "run", progress=False)
    assert inits[0]["project"] == "proj" and inits[0]["id"] == "abc123" and inits[0]["resume"] == "allow"
    assert [s for s, v in logged if "loss" in v] == [1, 2]
    assert (tmp_path / "run" / "wandb_id").read_text().strip() == "abc123"
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match="pip install wandb"):
        train(cfg, tmp_path / "run2", progress=False)


@pytest.mark.slow
def test_a_training_run_killed_at_random_moments_ends_as_if_never_killed(tmp_path):
    """eval/bench/kill_resume.py with three kills: per-step losses equal the uninterrupted run's exactly."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "eval" / "bench" / "kill_resume.py"
    spec = importlib.util.spec_from_file_location("kill_resume", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--jobs", "train,features", "--kills", "3", "--work", str(tmp_path)]) == 0


def test_a_resumed_run_keeps_its_best_evaluation(tmp_path, data_cache):
    cfg = _eval_config(data_cache, steps=4, eval_every=2, checkpoint_every=2, best_metric="zeroshot/colours/top1")
    full = train(cfg, tmp_path / "full", progress=False)
    cfg.train.steps = 2
    train(cfg, tmp_path / "part", progress=False)
    cfg.train.steps = 4
    part = train(cfg, tmp_path / "part", resume="latest", progress=False)
    assert part.best == full.best  # the step-2 evaluation, made before the resume, still counts
    assert (tmp_path / "part" / "checkpoints" / "best").read_text() == (
        tmp_path / "full" / "checkpoints" / "best").read_text()
