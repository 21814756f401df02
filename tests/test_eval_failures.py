"""No lost work: what evaluation needs is checked before the first step, the final checkpoint is written before the
final evaluation, and an evaluation that fails ends the run naming it and the command that reruns it on the saved
checkpoint (which is then run here, and works)."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from conftest import tiny_config

from contrast import runs as R
from contrast.cli import main
from contrast.config import ConfigError
from contrast.train import checkpoint as C
from contrast.train import evals as E
from contrast.train.evals import EvaluationError
from contrast.train.loop import train

SMALL_DATA = ["data.synthetic.train_size=128", "data.synthetic.val_size=24", "data.synthetic.test_size=48"]


def _records(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _summary(run):
    return [r["summary"] for r in _records(run) if "summary" in r][-1]


def _eval_config(data_cache, **train_kw):
    cfg = tiny_config(data_cache, **train_kw)
    cfg.eval.tasks = ["eval/tasks/colours.yaml"]
    cfg.eval.retrieval_split = "val"
    return cfg


def _rerun_command(message: str) -> list[str]:
    """The ``contrast eval ...`` command a failure message gives, as arguments for :func:`contrast.cli.main`."""
    command = message.split("rerun it with: ")[1].split(")")[0]
    args = shlex.split(command)
    assert args[:2] == ["contrast", "eval"]
    return args[1:]


# --------------------------------------------------------------------------------------------------- before step 1


def test_a_best_metric_no_evaluation_gives_stops_before_the_first_step(tmp_path, data_cache, capsys):
    """The shipped recipe without its zero-shot tasks tracks a zero-shot metric: the names the configured
    evaluations will give (retrieval only) are known without running a model, and the run stops before step 1."""
    run = tmp_path / "run"
    sets = ["eval.tasks=[]", "train.steps=30", f"data.cache_dir={data_cache}", *SMALL_DATA]
    assert main(["train", "recipes/clip_tiny.yaml", "--out", str(run), "--no-progress",
                 *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "train.best_metric 'zeroshot/shapes/top1'" in err
    for d in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            assert f"retrieval/{d}/R@{k}" in err
    assert not (run / "checkpoints").exists()
    assert not (run / "metrics.jsonl").exists() or not [r for r in _records(run) if "loss" in r]


def test_the_metric_names_are_those_evaluation_gives(data_cache):
    from contrast.models import build_model

    cfg = _eval_config(data_cache)
    model = build_model(cfg.model)
    ev = E.Evaluator(cfg, model, torch.device("cpu"))
    names = ev.metric_names()
    assert names == ["zeroshot/colours/top1", "zeroshot/colours/top5", "zeroshot/colours/mean_per_class_recall",
                     *[f"retrieval/{d}/R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]]
    assert sorted(ev(model)) == sorted(names)


def test_task_data_is_opened_and_checked_before_the_first_step(tmp_path, data_cache):
    task = tmp_path / "sizes.yaml"
    task.write_text("name: sizes\ndata: synthetic\nsplit: test\nlabel_column: sizes\nclassnames: [small, large]\n"
                    "templates: ['a {} shape']\n")
    cfg = _eval_config(data_cache, steps=2)
    cfg.eval.tasks = [str(task)]
    with pytest.raises(ConfigError, match="label column 'sizes' is not in"):
        train(cfg, tmp_path / "a", progress=False)
    task.write_text(task.read_text().replace("label_column: sizes", "label_column: size\nwhere: {n_shapes: 99}"))
    with pytest.raises(ConfigError, match=r"no rows of synthetic \(split test where \{'n_shapes': 99\}\)"):
        train(cfg, tmp_path / "b", progress=False)
    for run in (tmp_path / "a", tmp_path / "b"):
        assert not (run / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------- failures


def _fail(monkeypatch, part: type, at_call: int = 1) -> None:
    """Make every evaluation of ``part`` from its ``at_call``-th on raise."""
    calls = {"n": 0}
    original = part.__call__

    def failing(self, model):
        calls["n"] += 1
        if calls["n"] >= at_call:
            raise RuntimeError("the evaluation broke")
        return original(self, model)

    monkeypatch.setattr(part, "__call__", failing)


def test_a_failing_final_evaluation_keeps_the_final_checkpoint_and_names_the_rerun(tmp_path, data_cache, capsys,
                                                                                   monkeypatch):
    cfg = _eval_config(data_cache, steps=4, best_metric="retrieval/image_to_text/R@1")
    run = tmp_path / "run"
    _fail(monkeypatch, E.ZeroShotPart)
    with pytest.raises(EvaluationError) as info:
        train(cfg, run, progress=False)
    message = str(info.value)
    last = R.step_dir(run, 4)
    assert "\n" not in message
    assert "evaluation at step 4 failed: zero-shot task 'colours' (eval/tasks/colours.yaml) failed: RuntimeError: " \
           "the evaluation broke" in message
    assert f"contrast eval zeroshot --checkpoint {last} --task eval/tasks/colours.yaml" in message
    assert "training is complete" in message
    assert (last / R.WEIGHTS).is_file() and R.resolve_checkpoint(run) == last  # written before the evaluation
    summary = _summary(run)
    assert summary["status"].startswith("stopped: evaluation at step 4 failed: zero-shot task 'colours'")
    assert summary["steps"] == 4
    evals = [r for r in _records(run) if "eval" in r]  # the retrieval evaluation that did run is logged
    assert [r["step"] for r in evals] == [4] and "retrieval/image_to_text/R@1" in evals[0]["eval"]
    monkeypatch.undo()
    capsys.readouterr()
    assert main(_rerun_command(message) + ["--device", "cpu", "--out-dir", str(tmp_path / "rerun")]) == 0
    assert "colours: top-1" in capsys.readouterr().out


def test_a_failing_periodic_evaluation_checkpoints_its_step_and_the_run_resumes_exactly(tmp_path, data_cache,
                                                                                       monkeypatch, capsys):
    cfg = _eval_config(data_cache, steps=6, eval_every=2, checkpoint_every=0)
    whole = tmp_path / "whole"
    train(cfg, whole, progress=False)
    run = tmp_path / "run"
    _fail(monkeypatch, E.RetrievalPart, at_call=2)  # the evaluation at step 4
    with pytest.raises(EvaluationError) as info:
        train(cfg, run, progress=False)
    message = str(info.value)
    ckpt = R.step_dir(run, 4)
    assert message.startswith("evaluation at step 4 failed: retrieval on the 'val' split of synthetic failed")
    assert _summary(run)["steps"] == 4 and _summary(run)["status"] == f"stopped: {message}"
    assert "continue training with --resume latest" in message
    assert R.resolve_checkpoint(run) == ckpt and (ckpt / R.WEIGHTS).is_file()
    monkeypatch.undo()
    args = _rerun_command(message)
    assert args[:4] == ["eval", "retrieval", "--checkpoint", str(ckpt)] and "--limit" in args
    capsys.readouterr()
    assert main(args + ["--device", "cpu", "--out-dir", str(tmp_path / "rerun")]) == 0
    out = capsys.readouterr().out
    logged = [r["eval"] for r in _records(whole) if r.get("step") == 4 and "eval" in r][0]
    r1 = float(out.split("image_to_text: R@1 ")[1].split()[0])
    assert r1 == pytest.approx(logged["retrieval/image_to_text/R@1"], abs=1e-3)  # what the run would have logged
    train(cfg, run, resume="latest", progress=False)
    losses = {r["step"]: r["loss"] for r in _records(run) if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in _records(whole) if "loss" in r}
    assert _summary(run)["status"] == "completed"


def test_the_final_checkpoint_becomes_best_after_its_evaluation(tmp_path, data_cache, monkeypatch):
    """The final checkpoint is written before its evaluation; when that evaluation wins, ``best`` names it and its
    state records the new best (so a resumed, longer run compares against it)."""
    values = iter([0.1, 0.2, 0.3])

    def rising(self, model):
        return dict.fromkeys(self.metric_names(), next(values))

    monkeypatch.setattr(E.RetrievalPart, "__call__", rising)
    cfg = tiny_config(data_cache, steps=4, eval_every=2, checkpoint_every=0, best_metric="retrieval/text_to_image/R@5")
    cfg.eval.retrieval_split = "val"
    run = tmp_path / "run"
    result = train(cfg, run, progress=False)
    assert result.best == {"metric": "retrieval/text_to_image/R@5", "value": 0.2, "step": 4}
    assert R.resolve_checkpoint(run / "checkpoints" / "best") == R.step_dir(run, 4)
    assert C.load_state(R.step_dir(run, 4))["best"] == result.best
    assert C.load_state(R.step_dir(run, 2))["best"] == {"metric": "retrieval/text_to_image/R@5", "value": 0.1, "step": 2}
    cfg.train.steps = 6
    result = train(cfg, run, resume="latest", progress=False)  # 0.3 at step 6 beats the 0.2 the state carried
    assert result.best == {"metric": "retrieval/text_to_image/R@5", "value": 0.3, "step": 6}
