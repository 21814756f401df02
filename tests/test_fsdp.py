"""``train.fsdp`` (FSDP2) == DDP, on two gloo CPU processes: per-step losses, weights, resumed runs, consolidation.

The torchrun runs share one module fixture: a DDP run, an FSDP run (sharded checkpoints at steps 2 and 4, the last
one consolidated at the end) and an FSDP run resumed from the step-2 checkpoint. Smaller spawned workers compare
one FSDP step with one DDP step for a locked (LiT) tower, the sigmoid loss and BLIP's momentum teacher.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model_dict
from test_distributed import PER_RANK, WORLD, _torchrun, _torchrun_recipe
from torch import nn

from contrast import distributed
from contrast import runs as R
from contrast.config import from_dict, load_recipe
from contrast.errors import CheckpointError
from contrast.models import build_model
from contrast.objectives import Comm, build_objective
from contrast.train.fsdp import plan_units, shard_model
from contrast.train.optim import build_optimizer


def _two_block_model(kind: str = "clip") -> dict:
    """The tiny model with two blocks per tower, so FSDP has units besides the root."""
    model = tiny_model_dict(kind, text_layers=2)
    model["image"]["kwargs"] = {**model["image"]["kwargs"], "depth": 2}
    return model


# --------------------------------------------------------------------------------------------------- units


def test_units_are_the_repeated_blocks_then_the_root():
    model = build_model(from_dict({"model": _two_block_model()}).model)
    units = plan_units(model)
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(u)] for u in units] == [
        "image.backbone.blocks.0", "image.backbone.blocks.1", "text.transformer.blocks.0", "text.transformer.blocks.1",
        "",
    ]


def test_units_skip_mixed_stacks_and_tied_blocks():
    blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    head = nn.Linear(4, 4)
    head.weight = blocks[1].weight  # tied: block 1 must stay with the module that also uses its weight
    root = nn.ModuleDict({"blocks": blocks, "mlp": nn.Sequential(nn.Linear(4, 4), nn.GELU()), "head": head})
    assert plan_units(root) == [blocks[0], root]


# --------------------------------------------------------------------------------------------------- one step


SCENARIOS = {
    "lit": {"model": {**_two_block_model(), "image": {**_two_block_model()["image"], "locked": True}},
            "loss": {"itc": 1.0}},
    "siglip": {"model": {**_two_block_model(), "init_logit_scale": 2.302585092994046, "init_logit_bias": -10.0},
               "loss": {"itc": 0.0, "sigmoid": 1.0}},
    "blip_distill": {"model": {**_two_block_model("blip"), "blip": {"momentum_distill": True, "queue_size": 16}},
                     "loss": {"itc": 1.0, "itm": 1.0, "lm": 1.0}},
}


def _batches(rank: int, steps: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [{"pixels": torch.randn(PER_RANK, 3, 16, 16, generator=g),
             "input_ids": torch.randint(1, 400, (PER_RANK, 16), generator=g)} for _ in range(steps)]


def _train_steps(name: str, rank: int, sharded: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Two optimisation steps (clipped AdamW) under FSDP or DDP; the mean loss of each and the final full weights."""
    cfg = from_dict(SCENARIOS[name])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    comm = Comm(distributed.gather_with_grad, rank, WORLD, distributed.ring_shift)
    model.set_comm(comm)
    net = shard_model(model, torch.device("cpu")) if sharded else nn.parallel.DistributedDataParallel(model)
    objective, opt = build_objective(cfg.loss, comm), build_optimizer(model, cfg.train)
    losses = []
    for batch in _batches(rank, 2):
        loss = objective(net(batch)).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        losses.append(float(distributed.all_reduce_mean(loss.detach())))
    state = {k: v.full_tensor() if isinstance(v, torch.distributed.tensor.DTensor) else v.clone()
             for k, v in model.state_dict().items()}
    return losses, state


def _step_worker(rank: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {name: {mode: _train_steps(name, rank, mode == "fsdp") for mode in ("ddp", "fsdp")}
               for name in SCENARIOS}
    if rank == 0:
        torch.save(results, result_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_steps")
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_step_worker, args=(str(tmp / "rendezvous"), str(tmp / "results.pt")), nprocs=WORLD, join=True)
    return torch.load(tmp / "results.pt", weights_only=True)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fsdp_steps_equal_ddp_steps(step_results, name):
    """Frozen parameters in a unit (LiT), 0-d parameters kept whole (logit scale and bias), a momentum teacher."""
    (ddp_losses, ddp_state), (fsdp_losses, fsdp_state) = step_results[name]["ddp"], step_results[name]["fsdp"]
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-5)
    assert set(fsdp_state) == set(ddp_state)
    for k, v in ddp_state.items():
        torch.testing.assert_close(fsdp_state[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{name} {k}: {m}")


def _trimmed_worker(rank: int, init_file: str, result_file: str) -> None:
    """BLIP's loss on each rank's captions padded to the context, and trimmed to the rank's own longest caption (as
    training batches are: the ranks' lengths differ)."""
    from test_distributed import CAPTIONS

    from contrast.tokenizer import ClipTokenizer, TrimmedTokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    cfg = from_dict(SCENARIOS["blip_distill"])
    captions = CAPTIONS[:PER_RANK] if rank == 0 else [c.split(" above")[0].split(" left")[0] for c in CAPTIONS[:PER_RANK]]
    pixels = torch.randn(PER_RANK, 3, 16, 16, generator=torch.Generator().manual_seed(rank))
    losses = {}
    for name, tok in (("full", ClipTokenizer(16)), ("trimmed", TrimmedTokenizer(ClipTokenizer(16)))):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        comm = Comm(distributed.gather_with_grad, rank, WORLD, distributed.ring_shift)
        model.set_comm(comm)
        ids = tok(captions)
        losses[name] = (ids.shape[1], float(distributed.all_reduce_mean(build_objective(cfg.loss, comm)(
            nn.parallel.DistributedDataParallel(model)({"pixels": pixels, "input_ids": ids})).total.detach())))
    torch.save(losses, f"{result_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_blip_hard_negatives_across_ranks_whose_batches_are_trimmed_differently(tmp_path):
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_trimmed_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path / "losses")), nprocs=WORLD, join=True)
    got = [torch.load(tmp_path / f"losses.{r}", weights_only=True) for r in range(WORLD)]
    assert got[0]["trimmed"][0] > got[1]["trimmed"][0]  # the ranks' batches have different lengths
    assert got[0]["trimmed"][1] == pytest.approx(got[0]["full"][1], rel=1e-5)


# --------------------------------------------------------------------------------------------------- evaluation


QFORMER = {"num_queries": 4, "width": 32, "layers": 2, "heads": 2}
EMBEDDERS = {  # every family that embeds, with a ViT and a CNN image tower
    "clip_vit": _two_block_model(),
    "clip_cnn": {**_two_block_model(), "image": {"name": "resnet10t", "image_size": 32}},
    "blip": _two_block_model("blip"),
    "blip2_stage1": {**_two_block_model("blip2_stage1"), "qformer": QFORMER},
}


def _eval_outputs(model, sharded: bool) -> dict[str, torch.Tensor]:
    """What evaluation calls (embeddings of both kinds, ITM scores where the family has them), as full tensors."""
    from contrast.train.fsdp import evaluating

    size = model.image_tower.cfg.image_size
    g = torch.Generator().manual_seed(7)
    pixels, ids = torch.randn(3, 3, size, size, generator=g), torch.randint(1, 400, (3, 16), generator=g)
    sharded_before = [n for n, p in model.named_parameters() if isinstance(p, torch.distributed.tensor.DTensor)]
    assert bool(sharded_before) == sharded
    model.eval()
    with torch.no_grad(), evaluating(model):
        out = {"image": model.encode_image(pixels), "text": model.encode_text(ids)}
        if model.supports("itm"):
            out["itm"] = model.itm_score(pixels, ids)
    params = dict(model.named_parameters())  # after the evaluation, shards again (memory back to a training step's)
    assert all(isinstance(params[n], torch.distributed.tensor.DTensor) for n in sharded_before)
    return out


def _eval_worker(rank: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for name, model_dict in EMBEDDERS.items():
        torch.manual_seed(0)
        model = build_model(from_dict({"model": model_dict}).model)
        plain = _eval_outputs(model, sharded=False)
        shard_model(model, torch.device("cpu"))
        results[name] = (plain, _eval_outputs(model, sharded=True))
        model.train()  # the training forward still works after an evaluation
        batch = {"pixels": torch.randn(2, 3, model.image_tower.cfg.image_size, model.image_tower.cfg.image_size),
                 "input_ids": torch.randint(1, 400, (2, 16))}
        model(batch)
    if rank == 0:
        torch.save(results, result_file)
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_models_evaluate_like_whole_ones(tmp_path):
    """encode_image / encode_text / itm_score called outside forward on an FSDP model (the evaluation path) equal
    the unsharded model's, for a ViT and a CNN tower and every family that embeds."""
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_eval_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path / "results.pt")), nprocs=WORLD, join=True)
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    assert set(results) == set(EMBEDDERS)
    for name, (plain, sharded) in results.items():
        assert set(sharded) == set(plain) and ("itm" in plain) == (name.startswith("blip"))
        for k, v in plain.items():
            torch.testing.assert_close(sharded[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k, name=name: f"{name} {k}: {m}")


# --------------------------------------------------------------------------------------------------- torchrun


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """A DDP run, an FSDP run and an FSDP run resumed from the FSDP run's step-2 checkpoint (4 steps each), each
    evaluating zero-shot and retrieval at steps 2 and 4."""
    import yaml

    tmp = tmp_path_factory.mktemp("fsdp_runs")
    recipe = tmp / "clip_fsdp.yaml"
    _torchrun_recipe(recipe, data_cache, steps=4)
    r = yaml.safe_load(recipe.read_text())
    r["model"], r["loss"] = _two_block_model(), {"itc": 1.0}
    r["data"]["synthetic"].update(val_size=8, test_size=24)
    # zero-shot and retrieval evaluations at steps 2 and 4 (periodic and final), the best one tracked
    r["eval"] = {"tasks": ["eval/tasks/shapes.yaml"], "retrieval_split": "val", "batch_size": 8}
    # layer-wise learning-rate decay on: its parameter groups are built on the sharded model under FSDP
    r["train"].update(eval_every=2, best_metric="retrieval/text_to_image/R@5", layer_decay=0.5)
    recipe.write_text(yaml.safe_dump(r))
    out = {"recipe": recipe, "ddp": tmp / "ddp", "fsdp": tmp / "fsdp", "resumed": tmp / "resumed"}
    _torchrun(recipe, out["ddp"])
    _torchrun(recipe, out["fsdp"], "--set", "train.fsdp=true")
    _torchrun(recipe, out["resumed"], "--set", "train.fsdp=true", "--resume", str(R.step_dir(out["fsdp"], 2)))
    return out


def _records(run_dir) -> list[dict]:
    import json

    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _metric_losses(run_dir) -> dict[int, float]:
    """The loss of every logged step (each written once, by the main process)."""
    steps = [r["step"] for r in _records(run_dir) if "loss" in r]
    assert len(steps) == len(set(steps)), f"metrics written more than once per step (by every rank?): {steps}"
    return {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}


def _evaluations(run_dir) -> dict[int, dict[str, float]]:
    steps = [r["step"] for r in _records(run_dir) if "eval" in r]
    assert len(steps) == len(set(steps)), f"evaluations written more than once per step: {steps}"
    return {r["step"]: r["eval"] for r in _records(run_dir) if "eval" in r}


def test_fsdp_losses_equal_ddp_and_checkpoints_are_sharded(runs):
    ddp, fsdp = _metric_losses(runs["ddp"]), _metric_losses(runs["fsdp"])
    assert sorted(fsdp) == [1, 2, 3, 4]
    for step, loss in ddp.items():
        assert fsdp[step] == pytest.approx(loss, rel=1e-5), f"step {step}: FSDP {fsdp[step]}, DDP {loss}"
    mid, last = R.step_dir(runs["fsdp"], 2), R.step_dir(runs["fsdp"], 4)
    assert sorted(p.name for p in mid.iterdir()) == [R.SHARDED, "state.pt"]  # no weights mid-run
    assert (mid / R.SHARDED / ".metadata").is_file()
    assert sorted(p.name for p in last.iterdir()) == [R.WEIGHTS, R.SHARDED, "state.pt"]  # consolidated at the end
    assert "optimizer" not in torch.load(mid / "state.pt", weights_only=True)


def test_fsdp_runs_evaluate_like_ddp_runs(runs):
    """Periodic and final zero-shot and retrieval evaluations of the sharded run equal the DDP run's; the best
    checkpoint is tracked the same way."""
    ddp, fsdp = _evaluations(runs["ddp"]), _evaluations(runs["fsdp"])
    assert sorted(fsdp) == sorted(ddp) == [2, 4]
    for step, metrics in ddp.items():
        assert set(metrics) >= {"zeroshot/shapes/top1", "retrieval/image_to_text/R@1", "retrieval/text_to_image/R@5"}
        assert fsdp[step] == pytest.approx(metrics, abs=1e-6), f"step {step}"
    resumed = _evaluations(runs["resumed"])
    assert sorted(resumed) == [4] and resumed[4] == pytest.approx(fsdp[4], abs=1e-6)
    best = {name: R.resolve_checkpoint(runs[name] / "checkpoints" / "best").name for name in ("ddp", "fsdp")}
    assert best["fsdp"] == best["ddp"]


def test_commands_run_on_an_fsdp_checkpoint(runs, tmp_path, capsys):
    """The linear probe, feature extraction, export and the index read the consolidated final checkpoint of an FSDP
    run and give what they give on the DDP run's."""
    import numpy as np
    from safetensors.torch import load_file

    from contrast.cli import main

    got = {}
    for name in ("ddp", "fsdp"):
        run, out = runs[name], tmp_path / name
        assert main(["eval", "linear-probe", "--checkpoint", str(run), "--task", "eval/tasks/colours.yaml",
                     "--device", "cpu", "--out-dir", str(out / "probe")]) == 0
        probe = capsys.readouterr().out
        assert main(["features", "extract", "--checkpoint", str(run), "--split", "val", "--out", str(out / "f")]) == 0
        assert main(["export", "--checkpoint", str(run), "--format", "timm", "--out", str(out / "timm")]) == 0
        assert main(["index", "build", "--checkpoint", str(run), "--data", "synthetic", "--split", "val", "--out",
                     str(out / "index"), "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
        capsys.readouterr()
        feats = {k: v for f in sorted((out / "f" / "val").glob("*.safetensors")) for k, v in load_file(f).items()}
        timm_w = {k: v for f in (out / "timm").glob("*.safetensors") for k, v in load_file(f).items()}
        vectors = {f.name: torch.from_numpy(np.load(f)) for f in sorted((out / "index" / "shards").glob("emb_*.npy"))}
        got[name] = (probe.split("linear probe test accuracy")[1].split()[0], feats, timm_w, vectors)
    (p_ddp, *tensors_ddp), (p_fsdp, *tensors_fsdp) = got["ddp"], got["fsdp"]
    assert p_fsdp == p_ddp
    for a, b in zip(tensors_ddp, tensors_fsdp):
        assert a and set(a) == set(b)
        for k, v in a.items():
            torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_resumed_fsdp_run_equals_the_uninterrupted_one(runs):
    resumed, whole = _metric_losses(runs["resumed"]), _metric_losses(runs["fsdp"])
    assert sorted(resumed) == [3, 4]
    for step, loss in resumed.items():
        assert loss == whole[step], f"step {step}: resumed {loss}, uninterrupted {whole[step]}"


def test_consolidated_weights_equal_ddp_weights_and_load(runs):
    ddp = R.read_weights(R.resolve(runs["ddp"]) / R.WEIGHTS)
    fsdp = R.read_weights(R.resolve(runs["fsdp"]) / R.WEIGHTS)
    assert set(fsdp) == set(ddp)
    for k, v in ddp.items():
        torch.testing.assert_close(fsdp[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    model, _, _ = R.load(runs["fsdp"])
    assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())


def test_sharded_checkpoint_without_weights_names_the_fix_and_consolidates(runs, capsys):
    from contrast.cli import main

    mid = R.step_dir(runs["fsdp"], 2)
    with pytest.raises(CheckpointError, match=f"contrast train consolidate {mid}"):
        R.load(mid)
    assert main(["export", "--checkpoint", str(mid), "--format", "timm", "--out", str(mid.parent / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "contrast train consolidate" in err and "Traceback" not in err

    assert main(["train", "consolidate", str(mid)]) == 0  # one process, no torchrun
    weights = R.read_weights(mid / R.WEIGHTS)
    ddp = R.read_weights(R.step_dir(runs["ddp"], 2) / R.WEIGHTS)
    for k, v in ddp.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    R.load(mid)


def test_sharded_checkpoint_resumes_in_one_process(runs, capsys):
    """DCP reshards: the 2-process FSDP checkpoint continues in one unsharded process (same global batch) exactly
    as the DDP checkpoint of the same step does."""
    from contrast.train.loop import train

    longer = [f"train.batch_size={WORLD * PER_RANK}", "train.steps=5", "train.fsdp=true"]
    cfg = load_recipe(runs["recipe"], longer)
    got = {}
    for name in ("fsdp", "ddp"):
        out = runs[name].parent / f"{name}_one_process"
        train(cfg, out, resume=str(R.step_dir(runs[name], 4)), progress=False)
        got[name] = _metric_losses(out)[5]
    assert got["fsdp"] == pytest.approx(got["ddp"], rel=1e-5)
    assert "trains unsharded" in capsys.readouterr().out  # train.fsdp in one process says so, once per run
    assert not (R.step_dir(runs["fsdp"].parent / "fsdp_one_process", 5) / R.SHARDED).exists()


def test_a_failing_evaluation_of_an_fsdp_run_leaves_a_loadable_checkpoint(runs, tmp_path):
    """A zero-shot task whose data holds a label it does not list fails at step 2 on every rank: the run stops
    naming it and the rerun command, and the step-2 checkpoint is consolidated so that the command can load it."""
    import subprocess
    import sys

    task = tmp_path / "short.yaml"
    task.write_text("name: short\ndata: synthetic\nsplit: test\nlabel_column: shape\nwhere: {n_shapes: 1}\n"
                    "classnames: [circle, square]\ntemplates: ['a {}']\n")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(WORLD), "-m", "contrast", "train", str(runs["recipe"]), "--out", str(run),
                           "--no-progress", "--set", "train.fsdp=true", "--set", f"eval.tasks=[{task}]",
                           "--set", "train.best_metric=null"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    ckpt = R.step_dir(run, 2)
    assert f"contrast eval zeroshot --checkpoint {ckpt} --task {task}" in proc.stderr
    assert "label 'triangle'" in proc.stderr or "is not among the task's 2 classnames" in proc.stderr
    assert (ckpt / R.WEIGHTS).is_file() and not R.step_dir(run, 3).exists()
    model, _, _ = R.load(ckpt)
    assert not any(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())


def test_a_moving_average_is_refused_with_fsdp_before_the_first_step(runs, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), "-m",
           "contrast", "train", str(runs["recipe"]), "--out", str(tmp_path / "ema"), "--no-progress",
           "--set", "train.fsdp=true", "--set", "train.ema=0.9"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "train.ema keeps whole copies of the weights" in proc.stderr + proc.stdout
    assert not (tmp_path / "ema" / "checkpoints").exists() or not any((tmp_path / "ema" / "checkpoints").iterdir())
