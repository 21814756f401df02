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
from test_distributed import PER_RANK, WORLD, _metric_losses, _torchrun, _torchrun_recipe
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


# --------------------------------------------------------------------------------------------------- torchrun


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """A DDP run, an FSDP run and an FSDP run resumed from the FSDP run's step-2 checkpoint (4 steps each)."""
    import yaml

    tmp = tmp_path_factory.mktemp("fsdp_runs")
    recipe = tmp / "clip_fsdp.yaml"
    _torchrun_recipe(recipe, data_cache, steps=4)
    r = yaml.safe_load(recipe.read_text())
    r["model"], r["loss"] = _two_block_model(), {"itc": 1.0}
    recipe.write_text(yaml.safe_dump(r))
    out = {"recipe": recipe, "ddp": tmp / "ddp", "fsdp": tmp / "fsdp", "resumed": tmp / "resumed"}
    _torchrun(recipe, out["ddp"])
    _torchrun(recipe, out["fsdp"], "--set", "train.fsdp=true")
    _torchrun(recipe, out["resumed"], "--set", "train.fsdp=true", "--resume", str(R.step_dir(out["fsdp"], 2)))
    return out


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
