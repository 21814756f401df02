"""Two gloo processes over halves of a batch == one process over the whole batch (loss and every gradient).

The workers are real torch.distributed processes (spawned here, rendezvous through a file) training under DDP with
``distributed.gather_with_grad`` injected into the objective (and into BLIP for its hard negatives); the reference
is the same model and objective in this process, without any gather.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model_dict

from contrast import distributed
from contrast import runs as R
from contrast.config import from_dict
from contrast.models import build_model
from contrast.objectives import Comm, build_objective

WORLD = 2
PER_RANK = 4

TINY_MODEL = tiny_model_dict()
CAPTIONS = [
    "a small red circle", "a large blue square", "a small green triangle above a small white star",
    "a large yellow diamond", "a small purple cross left of a small red square", "a large white circle",
    "a small blue star", "a small green square below a small yellow circle",
]
SCENARIOS = {
    "itc": {"model": {**TINY_MODEL}, "loss": {"itc": 1.0}},
    "siglip": {
        "model": {**TINY_MODEL, "init_logit_scale": 2.302585092994046, "init_logit_bias": -10.0},
        "loss": {"itc": 0.0, "sigmoid": 1.0},
    },
    "blip": {"model": {**TINY_MODEL, "kind": "blip"}, "loss": {"itc": 1.0, "itm": 1.0, "lm": 1.0}},
    "blip_distill": {
        "model": {**TINY_MODEL, "kind": "blip", "blip": {"momentum_distill": True, "queue_size": 16}},
        "loss": {"itc": 1.0, "itm": 1.0, "lm": 1.0},
    },
}


def make_batch() -> dict[str, torch.Tensor]:
    from contrast.tokenizer import ClipTokenizer

    g = torch.Generator().manual_seed(0)
    return {
        "pixels": torch.randn(WORLD * PER_RANK, 3, 16, 16, generator=g),
        "input_ids": ClipTokenizer(16)(CAPTIONS),
    }


def run_step(name: str, batch: dict[str, torch.Tensor], rank: int, gather) -> tuple[torch.Tensor, dict, object, object]:
    """One forward/backward of a scenario; under a process group the model is wrapped in DDP."""
    cfg = from_dict(SCENARIOS[name])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    comm = Comm(gather, rank)
    model.set_comm(comm)  # every model gets the context the loss gets (BLIP draws its hard negatives with it)
    net = torch.nn.parallel.DistributedDataParallel(model) if gather is not None else model
    objective = build_objective(cfg.loss, comm)
    out = net(batch)
    loss = objective(out).total
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, out, model


def _worker(rank: int, init_file: str, batch: dict[str, torch.Tensor], result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from open_clip.loss import ClipLoss, SigLipLoss

    local = {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in batch.items()}
    results = {}
    for name in SCENARIOS:
        loss, grads, out, _ = run_step(name, local, rank, distributed.gather_with_grad)
        results[name] = {"loss": distributed.all_reduce_mean(loss), "grads": grads}
        with torch.no_grad():  # the foreign implementation's distributed forms on the same per-rank features
            if name == "itc":
                ref = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
                results[name]["open_clip"] = (loss, ref(out.image_emb, out.text_emb, out.logit_scale))
            if name == "siglip":
                ref = SigLipLoss(rank=rank, world_size=WORLD)
                results[name]["open_clip"] = (loss, ref(out.image_emb, out.text_emb, out.logit_scale, out.logit_bias))
    if rank == 0:
        torch.save(results, result_file)
    else:
        torch.save({k: v.get("open_clip") for k, v in results.items()}, result_file + ".rank1")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    batch = make_batch()
    result_file = str(tmp / "results.pt")
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_worker, args=(str(tmp / "rendezvous"), batch, result_file), nprocs=WORLD, join=True)
    results = torch.load(result_file, weights_only=True)
    rank1 = torch.load(result_file + ".rank1", weights_only=True)
    return batch, results, rank1


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    # float32, 1e-5 relative; the absolute floor is relative to the tensor's own magnitude
    atol = 1e-5 * max(float(b.abs().max()), 1e-12) * 0.1
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_equal_one_process(two_process_results, name):
    batch, results, _ = two_process_results
    loss, grads, _, model = run_step(name, batch, 0, None)
    got = results[name]
    _assert_close(got["loss"], loss, f"{name} loss")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable, f"parameters without gradient: {trainable - set(grads)}"
    assert set(got["grads"]) == set(grads)
    for n, g in grads.items():
        _assert_close(got["grads"][n], g, f"{name} grad of {n}")


@pytest.mark.parametrize("name", ["itc", "siglip"])
def test_distributed_forms_match_open_clip(two_process_results, name):
    _, results, rank1 = two_process_results
    for ours, theirs in (results[name]["open_clip"], rank1[name]):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------- torchrun


def _torchrun_recipe(path, cache: str, steps: int, kind: str = "blip") -> None:
    import yaml

    recipe = {
        "model": {**TINY_MODEL, "kind": kind},
        "data": {"source": "synthetic", "cache_dir": cache,
                 "synthetic": {"image_size": 16, "train_size": 64, "val_size": 8, "test_size": 8}},
        "loss": {"itc": 1.0, "itm": 1.0, "lm": 1.0} if kind == "blip" else {"itc": 1.0},
        # constant learning rate after one warm-up step, so a run extended on resume follows the same schedule
        "train": {"steps": steps, "batch_size": PER_RANK, "lr": 1e-3, "warmup_steps": 1, "min_lr_ratio": 1.0,
                  "checkpoint_every": 2, "log_every": 1, "threads": 1, "device": "cpu"},
    }
    path.write_text(yaml.safe_dump(recipe))


def _torchrun(recipe, run_dir, *extra: str) -> None:
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "contrast", "train", str(recipe), "--out", str(run_dir), "--no-progress", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def _metric_losses(run_dir) -> dict[int, float]:
    import json

    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "summary" not in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"metrics written more than once per step (by every rank?): {steps}"
    return {r["step"]: r["loss"] for r in rows}


def test_torchrun_two_processes_train_resume_and_match_one_process(tmp_path, data_cache):
    """``torchrun --nproc_per_node 2 -m contrast train`` on CPU (gloo): BLIP with cross-rank hard negatives.

    Rank 0 alone writes the run; resuming with the same world size continues it; the per-step losses equal those
    of one process training on the global batch; a checkpoint of 2 processes resumes in 1 and continues exactly.
    """
    from contrast.config import load_recipe
    from contrast.train.loop import train

    recipe = tmp_path / "blip_ddp.yaml"
    _torchrun_recipe(recipe, data_cache, steps=3)
    run = tmp_path / "ddp"
    _torchrun(recipe, run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_00000002", "step_00000003"]
    _torchrun(recipe, run, "--resume", "latest", "--set", "train.steps=4")
    ddp = _metric_losses(run)
    assert sorted(ddp) == [1, 2, 3, 4]
    assert R.resolve(run).name == "step_00000004"

    cfg = load_recipe(recipe, [f"train.batch_size={WORLD * PER_RANK}", "train.steps=4"])
    single = tmp_path / "single"
    train(cfg, single, progress=False)
    one = _metric_losses(single)
    for step in ddp:
        assert ddp[step] == pytest.approx(one[step], rel=1e-4), f"step {step}: 2 processes {ddp[step]}, 1 {one[step]}"

    # resumed by one process with the same global batch, the 2-process run goes on exactly as the 1-process run does:
    # a map source's order depends on the global batch alone, and the checkpoint's data cursors are rebased
    longer = [f"train.batch_size={WORLD * PER_RANK}", "train.steps=5"]
    train(load_recipe(recipe, longer), run, resume="latest", progress=False)
    train(load_recipe(recipe, longer), single, resume="latest", progress=False)
    assert _metric_losses(run)[5] == pytest.approx(_metric_losses(single)[5], rel=1e-4)


def test_gradient_caching_on_two_processes_equals_one_process_on_the_whole_batch(tmp_path, data_cache):
    """Two ranks of 4 pairs, each computed in micro-batches of 2 (DDP reducing only after the last one), train as one
    process does on the 8-pair batch at once: the same per-step losses and final weights."""
    from contrast.config import load_recipe
    from contrast.train.loop import train

    recipe = tmp_path / "clip_cache.yaml"
    _torchrun_recipe(recipe, data_cache, steps=3, kind="clip")
    _torchrun(recipe, tmp_path / "cached", "--set", "train.micro_batch_size=2")
    single = tmp_path / "single"
    train(load_recipe(recipe, [f"train.batch_size={WORLD * PER_RANK}"]), single, progress=False)
    cached, one = _metric_losses(tmp_path / "cached"), _metric_losses(single)
    assert sorted(cached) == [1, 2, 3]
    for step in cached:
        assert cached[step] == pytest.approx(one[step], rel=1e-4), f"step {step}: cached {cached[step]}, 1 {one[step]}"
    a = R.read_weights(R.resolve(tmp_path / "cached") / R.WEIGHTS)
    b = R.read_weights(R.resolve(single) / R.WEIGHTS)
    for k in a:  # Adam turns float noise in near-zero gradients into ~1e-6 steps; a wrong gradient moves ~lr = 1e-3
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fine_tuning_levers_on_two_processes_equal_one_process(tmp_path, data_cache):
    """train.init_from + train.layer_decay + train.ema with micro-batches under torchrun (2 gloo processes) train as
    one process does on the whole batch: the same weights and the same moving average."""
    from contrast.config import load_recipe
    from contrast.train.loop import train

    recipe = tmp_path / "clip_ft.yaml"
    _torchrun_recipe(recipe, data_cache, steps=1, kind="clip")
    train(load_recipe(recipe, [f"train.batch_size={WORLD * PER_RANK}"]), tmp_path / "start", progress=False)
    levers = [f"train.init_from={tmp_path / 'start'}", "train.layer_decay=0.5", "train.ema=0.9", "train.steps=3"]
    _torchrun(recipe, tmp_path / "ddp", *[x for s in levers + ["train.micro_batch_size=2"] for x in ("--set", s)])
    single = tmp_path / "single"
    train(load_recipe(recipe, [*levers, f"train.batch_size={WORLD * PER_RANK}"]), single, progress=False)
    for name in (R.WEIGHTS, "ema.safetensors"):
        a = R.read_weights(R.resolve(tmp_path / "ddp") / name)
        b = R.read_weights(R.resolve(single) / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
    assert (tmp_path / "ddp" / "ema" / "checkpoints" / "latest").is_file()
