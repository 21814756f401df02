"""The training step: gradient caching == the whole batch (one process here, two in test_distributed), averaged
micro-batches, activation checkpointing == plain, fp16 with a gradient scaler, and the non-finite guard (stop and
skip, with exact resume)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config, tiny_model_dict

from contrast import objectives
from contrast import runs as R
from contrast.config import FAMILIES, ConfigError, from_dict
from contrast.models import build_model
from contrast.objectives import build_objective
from contrast.tokenizer import ClipTokenizer
from contrast.train.loop import NonFiniteLossError, train
from contrast.train.step import cached_step, mean_step, whole_step

CAPTIONS = [f"a {s} {c} {k}" for s in ("small", "large") for c in ("red", "blue") for k in ("circle", "star")] * 2


def _batch(n: int = 16, model=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    text = model.text_tokenizer()(CAPTIONS[:n]) if model is not None and model.supports("decoder") else {
        "input_ids": ClipTokenizer(16)(CAPTIONS[:n])}
    return {"pixels": torch.randn(n, 3, 16, 16, generator=g), **text}


def _run(model_section: dict, loss: dict):
    cfg = from_dict({"model": model_section, "loss": loss})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    return SimpleNamespace(model=model, train_model=model, objective=build_objective(cfg.loss),
                           autocast=nullcontext(), device=torch.device("cpu"))


def _grads(run, fn, size: int, seed: int = 5) -> tuple[float, dict[str, torch.Tensor]]:
    run.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    losses, _ = fn(run, _batch(model=run.model), size, lambda t: t.backward())
    return float(losses.total.detach()), {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}


def _assert_same(a: dict, b: dict, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


SIGLIP = {**tiny_model_dict(), "init_logit_scale": 2.302585092994046, "init_logit_bias": -10.0}
LIT = {**tiny_model_dict(), "image": {**tiny_model_dict()["image"], "locked": True, "unlocked_groups": 1}}


@pytest.mark.parametrize("model, loss", [(tiny_model_dict(), {"itc": 1.0}), (SIGLIP, {"itc": 0.0, "sigmoid": 1.0}),
                                         (LIT, {"itc": 1.0})], ids=["itc", "siglip", "lit"])
@pytest.mark.parametrize("micro", [4, 5])
def test_gradient_caching_equals_the_whole_batch(model, loss, micro):
    run = _run(model, loss)
    whole_loss, whole = _grads(run, whole_step, 16)
    cached_loss, cached = _grads(run, cached_step, micro)
    assert cached_loss == pytest.approx(whole_loss, rel=1e-6)
    assert "logit_scale" in cached
    _assert_same(cached, whole)


def test_gradient_caching_replays_dropout_drop_path_and_patch_dropout():
    """With randomness in the towers the second pass must draw the same masks as the first: the reference runs the
    micro-batches with gradients, in the same order from the same seed, and back-propagates the whole loss."""
    section = tiny_model_dict()
    section["image"]["kwargs"] = {**section["image"]["kwargs"], "drop_path_rate": 0.5, "proj_drop_rate": 0.3,
                                  "patch_drop_rate": 0.25}
    run = _run(section, {"itc": 1.0})
    _, cached = _grads(run, cached_step, 4)

    def reference(run, batch, size, backward):
        outs = [run.model(c) for c in (dict(pixels=batch["pixels"][i:i + size], input_ids=batch["input_ids"][i:i + size])
                                       for i in range(0, 16, size))]
        out = outs[0]
        out.image_emb = torch.cat([o.image_emb for o in outs])
        out.text_emb = torch.cat([o.text_emb for o in outs])
        losses = run.objective(out)
        backward(losses.total)
        return losses, out

    _, ref = _grads(run, reference, 4)
    _assert_same(cached, ref)
    _, other_seed = _grads(run, cached_step, 4, seed=6)  # the masks matter: another seed gives other gradients
    assert not torch.allclose(other_seed["image.backbone.blocks.0.mlp.fc1.weight"],
                              cached["image.backbone.blocks.0.mlp.fc1.weight"])


def test_averaged_micro_batches_are_exact_for_a_per_caption_loss():
    section = {**tiny_model_dict("caption_lm"), "blip2": {"decoder": {"width": 32, "layers": 1, "heads": 2}}}
    run = _run(section, {"lm": 1.0})
    whole_loss, whole = _grads(run, whole_step, 16)
    mean_loss, mean = _grads(run, mean_step, 4)
    assert mean_loss == pytest.approx(whole_loss, rel=1e-5)
    _assert_same(mean, whole)


def test_micro_batches_that_cannot_be_exact_are_refused(tmp_path, data_cache):
    cfg = tiny_config(data_cache, steps=1, micro_batch_size=4)
    cfg.model = from_dict({"model": tiny_model_dict("blip")}).model
    cfg.loss = from_dict({"model": {"kind": "blip"}}).loss
    with pytest.raises(ConfigError, match="train.accumulate: mean"):
        train(cfg, tmp_path / "blip", progress=False)
    cfg.train.micro_batch_size = 5
    cfg.model, cfg.loss = tiny_config().model, tiny_config().loss
    with pytest.raises(ConfigError, match="must divide"):
        train(cfg, tmp_path / "clip", progress=False)
    cfg.train.micro_batch_size, cfg.train.accumulate = 4, "always"
    with pytest.raises(ConfigError, match="train.accumulate must be one of"):
        train(cfg, tmp_path / "clip2", progress=False)


def test_blip_with_averaged_micro_batches_trains(tmp_path, data_cache):
    cfg = tiny_config(data_cache, steps=2, micro_batch_size=8, accumulate="mean")
    cfg.model = from_dict({"model": tiny_model_dict("blip")}).model
    cfg.loss = from_dict({"model": {"kind": "blip"}}).loss
    result = train(cfg, tmp_path / "blip", progress=False)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)


def _losses(run_dir) -> list[float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_training_with_gradient_caching_follows_the_whole_batch_run(tmp_path, data_cache):
    whole = train(tiny_config(data_cache, steps=4), tmp_path / "whole", progress=False)
    cached = train(tiny_config(data_cache, steps=4, micro_batch_size=4), tmp_path / "cached", progress=False)
    assert _losses(tmp_path / "cached") == pytest.approx(_losses(tmp_path / "whole"), rel=1e-4)
    a, b = R.read_weights(whole.checkpoint / R.WEIGHTS), R.read_weights(cached.checkpoint / R.WEIGHTS)
    _assert_same(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_activation_checkpointing_gives_the_plain_gradients(kind):
    from test_models import EXTRA
    from test_models import _batch as family_batch

    cfg = from_dict({"model": {**tiny_model_dict(kind), **EXTRA[kind]}})
    grads, kept = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        model.train()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        kept.append(0)

        def pack(t, kept=kept):
            kept[-1] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = build_objective(cfg.loss)(model(family_batch(model))).total
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    _assert_same(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    assert kept[1] < kept[0], f"checkpointing kept {kept[1]} bytes for backward, plain {kept[0]}"


def test_grad_checkpointing_is_on_in_every_trained_transformer(tmp_path, data_cache):
    from contrast.train.loop import setup

    cfg = tiny_config(data_cache, grad_checkpointing=True)
    run = setup(cfg, tmp_path / "run")
    assert run.model.image.backbone.grad_checkpointing and run.model.text.transformer.grad_checkpointing


def test_fp16_with_a_gradient_scaler_trains_and_resumes_exactly(tmp_path, data_cache):
    full = train(tiny_config(data_cache, steps=4, precision="fp16", checkpoint_every=2), tmp_path / "full",
                 progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for _, v in full.losses)
    state = torch.load(full.checkpoint / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0
    cfg = tiny_config(data_cache, steps=4, precision="fp16", checkpoint_every=2)
    train(cfg, tmp_path / "part", resume=str(R.step_dir(tmp_path / "full", 2)), progress=False)
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")[2:]


def _nan_on(monkeypatch, calls: set[int]) -> None:
    """ITC returns NaN on the given calls (1-based), as a bad batch would."""
    real, count = objectives.itc_term, [0]

    def term(out, comm, **kw):
        count[0] += 1
        value = real(out, comm, **kw)
        return value * float("nan") if count[0] in calls else value

    monkeypatch.setattr(objectives, "itc_term", term)


def test_a_non_finite_step_is_skipped_and_counted(tmp_path, data_cache, monkeypatch):
    _nan_on(monkeypatch, {2})
    cfg = tiny_config(data_cache, steps=4, nonfinite="skip", checkpoint_every=1, keep_checkpoints=4)
    result = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite_steps") for r in rows if "step" in r] == [0, 1, 1, 1]
    assert result.step == 4 and torch.isfinite(torch.tensor(result.last_loss))
    w = [R.read_weights(R.step_dir(tmp_path / "run", s) / R.WEIGHTS) for s in (1, 2, 3)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])  # step 2 was not applied
    assert any(not torch.equal(w[1][k], w[2][k]) for k in w[0])  # step 3 was
    opt = [torch.load(R.step_dir(tmp_path / "run", s) / "state.pt", weights_only=True)["optimizer"] for s in (1, 2)]
    assert all(torch.equal(opt[0]["state"][i]["exp_avg"], opt[1]["state"][i]["exp_avg"]) for i in opt[0]["state"])


def test_skip_resume_keeps_the_count(tmp_path, data_cache, monkeypatch):
    _nan_on(monkeypatch, {2})
    cfg = tiny_config(data_cache, steps=4, nonfinite="skip", checkpoint_every=3)
    train(cfg, tmp_path / "full", progress=False)
    _nan_on(monkeypatch, set())
    train(cfg, tmp_path / "resumed", resume=str(R.step_dir(tmp_path / "full", 3)), progress=False)
    rows = [json.loads(ln) for ln in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite_steps") for r in rows if "step" in r] == [1]
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "full")[3:]


def test_skipped_steps_in_a_row_stop_the_run_with_diagnostics(tmp_path, data_cache):
    cfg = tiny_config(data_cache, steps=6, nonfinite="skip", max_nonfinite=3)
    cfg.model.init_logit_scale = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"3 steps in a row \(steps 1-3\).*terms \{'itc': nan\}.*head"):
        train(cfg, tmp_path / "run", progress=False)
    saved = R.read_weights(R.resolve(tmp_path / "run") / R.WEIGHTS)
    torch.manual_seed(0)
    fresh = build_model(cfg.model).state_dict()
    for k, v in saved.items():  # no update was applied
        torch.testing.assert_close(v, fresh[k], equal_nan=True)


def test_training_batches_end_at_their_longest_caption():
    """Training batches drop the padding columns every caption has; the causal text tower's embeddings are unchanged."""
    from contrast.tokenizer import TrimmedTokenizer

    tok = ClipTokenizer(16)
    ids, short = tok(CAPTIONS[:4]), TrimmedTokenizer(tok)(CAPTIONS[:4])
    assert short.shape[1] == int((ids == ids.max()).nonzero()[:, 1].max()) + 1 < ids.shape[1]
    assert torch.equal(ids[:, : short.shape[1]], short) and not ids[:, short.shape[1]:].any()
    model = _run(tiny_model_dict(), {"itc": 1.0}).model.eval()
    torch.testing.assert_close(model.encode_text(short), model.encode_text(ids), rtol=1e-5, atol=1e-6)


def test_cpu_training_keeps_freed_host_memory_for_the_next_step():
    """After keep_freed_memory, steps that allocate and free the same large blocks reuse their pages; by default
    glibc unmaps each block on free and every step faults in fresh zeroed pages. Six steady steps of 4 x 64 MiB:
    65,536 faults per step by default; with the setting at most a block's worth once in a while (measured 0-82k in
    all, against 393k)."""
    import subprocess
    import sys

    code = """
import resource, sys, torch
from contrast.train.host import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    blocks = [torch.ones(16 * 2**20) for _ in range(4)]  # 4 x 64 MiB alive at once, touched
    del blocks
for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    counts = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                       check=True).stdout.split()[-1]) for mode in ("keep", "default")}
    assert counts["default"] > 300_000, counts
    assert counts["keep"] < 0.5 * counts["default"], counts
