"""The CUDA paths, checked against their fp32 / eager / unsharded / dense references on one GPU (marker ``cuda``;
skipped without a CUDA device): bf16 and fp16 training steps, a compiled step, the fused AdamW, NCCL collectives in
a one-process group, gradient caching and FSDP2 on one GPU, and the tiled ITC and sigmoid losses.
``eval/bench/gpu_check.sh`` runs them first."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model_dict

from contrast.config import from_dict
from contrast.models import build_model
from contrast.objectives import build_objective, info_nce, sigmoid_loss
from contrast.train.optim import build_optimizer, build_scheduler
from contrast.train.step import Stepper, autocast, cached_step, whole_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
CUDA = torch.device("cuda")
SIGLIP = {**tiny_model_dict(), "init_logit_scale": 2.302585092994046, "init_logit_bias": -10.0}


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 references in true fp32 (TF32 matmuls would round them to 10 mantissa bits)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _batch(n: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 400, (n, 16), generator=g)
    ids[:, 10], ids[:, 11:] = 49407, 0  # end-of-text, then padding
    return {"pixels": torch.randn(n, 3, 16, 16, generator=g).to(CUDA), "input_ids": ids.to(CUDA)}


def _run(precision: str = "fp32", compile: bool = False, model: dict | None = None, loss: dict | None = None):
    """A training run's parts on the GPU, as the loop builds them, with ``train.precision`` / ``train.compile``."""
    cfg = from_dict({"model": model or tiny_model_dict(), "loss": loss or {"itc": 1.0},
                     "train": {"precision": precision, "compile": compile, "lr": 1e-3, "warmup_steps": 1,
                               "batch_size": 16}})
    torch.manual_seed(0)
    m = build_model(cfg.model).to(CUDA)
    m.train()
    optimizer = build_optimizer(m, cfg.train)
    return SimpleNamespace(cfg=cfg, model=m, train_model=torch.compile(m) if compile else m,
                           objective=build_objective(cfg.loss), optimizer=optimizer,
                           scheduler=build_scheduler(optimizer, cfg.train), autocast=autocast(CUDA, precision),
                           device=CUDA)


def _losses(run, steps: int = 3, init_scale: float | None = None) -> list[float]:
    stepper = Stepper(run, "whole", None)
    if init_scale is not None:  # fp16: a gradient scaler that starts lower than the default 2^16
        stepper.scaler = torch.amp.GradScaler("cuda", init_scale=init_scale)
    run.stepper = stepper
    return [float(stepper(_batch(seed=s))[0].total.detach()) for s in range(steps)]


def _weights(run) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in run.model.parameters() if p.requires_grad])


def test_fused_adamw_is_used_and_steps_like_the_plain_adamw():
    run = _run()
    assert run.optimizer.defaults["fused"] is True
    groups = [{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")}
              | {"params": [p.detach().clone() for p in g["params"]]} for g in run.optimizer.param_groups]
    plain = torch.optim.AdamW(groups, fused=False, foreach=False)  # the reference: torch's per-tensor loop
    start = [p.detach().clone() for g in groups for p in g["params"]]
    for _ in range(3):
        grads = [torch.randn_like(p) for g in run.optimizer.param_groups for p in g["params"]]
        for opt in (run.optimizer, plain):
            for p, gr in zip([p for g in opt.param_groups for p in g["params"]], grads):
                p.grad = gr.clone()
            opt.step()
    fused_params = [p for g in run.optimizer.param_groups for p in g["params"]]
    plain_params = [p for g in plain.param_groups for p in g["params"]]
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(a, b) for a, b in zip(plain_params, start))  # every tensor was updated


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_steps_track_the_fp32_steps(precision):
    fp32 = _run("fp32")
    start = _weights(fp32)
    ref = _losses(fp32, steps=4)
    run = _run(precision)
    # fp16 with a scaler starting at 2^8, so that no step overflows and each is applied as in fp32
    got = _losses(run, steps=4, init_scale=2.0**8 if precision == "fp16" else None)
    assert got == pytest.approx(ref, rel=2e-2), (precision, got, ref)
    assert got[0] != ref[0]  # autocast did run in low precision
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # weights stay fp32 under autocast
    moved, want = _weights(run) - start, _weights(fp32) - start
    assert float(torch.nn.functional.cosine_similarity(moved, want, dim=0)) > 0.9  # AdamW updates go fp32's way
    if precision == "fp16":
        assert run.stepper.scaler.get_scale() >= 2.0**8  # no step overflowed
        default = _run("fp16")  # the default scaler (2^16) skips the steps that overflow, backs off, then applies
        _losses(default, steps=8)
        assert default.stepper.scaler.get_scale() < 2.0**16 and float((_weights(default) - start).abs().max()) > 0


def test_compiled_step_equals_the_eager_step():
    eager = _losses(_run())
    compiled = _losses(_run(compile=True))
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("model, loss", [(tiny_model_dict(), {"itc": 1.0}), (SIGLIP, {"itc": 0.0, "sigmoid": 1.0})],
                         ids=["itc", "siglip"])
def test_gradient_caching_on_the_gpu_equals_the_whole_batch(model, loss):
    grads = {}
    for name, fn in (("whole", whole_step), ("cache", cached_step)):
        run = _run(model=model, loss=loss)
        torch.manual_seed(5)
        fn(run, _batch(), 4, lambda t: t.backward())
        grads[name] = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    assert grads["whole"].keys() == grads["cache"].keys() and grads["whole"]
    for n, g in grads["whole"].items():
        torch.testing.assert_close(grads["cache"][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("loss", ["itc", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_losses_equal_the_dense_loss_on_the_gpu(loss, dtype):
    g = torch.Generator(device=CUDA).manual_seed(0)
    n, d = 1000, 64  # 1000 rows in tiles of 128: the last tile is partial
    img = torch.nn.functional.normalize(torch.randn(n, d, device=CUDA, generator=g), dim=-1).to(dtype)
    txt = torch.nn.functional.normalize(img.float() + torch.randn(n, d, device=CUDA, generator=g), dim=-1).to(dtype)
    scale = torch.tensor(10.0 if loss == "sigmoid" else 1 / 0.07, device=CUDA)
    extra = [torch.tensor(-10.0, device=CUDA)] if loss == "sigmoid" else []
    fn = sigmoid_loss if loss == "sigmoid" else info_nce
    out = {}
    for tile in (0, 128):
        leaves = [t.detach().clone().requires_grad_() for t in (img, txt, scale, *extra)]
        value = fn(*leaves, tile_size=tile)
        value.backward()
        out[tile] = (value.detach().float(), [t.grad.float() for t in leaves])
    rel = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the tiles round their partial sums differently
    for a, b in zip([out[128][0], *out[128][1]], [out[0][0], *out[0][1]]):
        assert float((a - b).abs().max()) <= rel * float(b.abs().max()) + 1e-7


# --------------------------------------------------------------------------------------------------- NCCL, FSDP


@pytest.fixture(scope="module")
def nccl_group(tmp_path_factory):
    """A one-process NCCL group on this GPU, left at the end of the module."""
    import torch.distributed as dist

    init = tmp_path_factory.mktemp("nccl") / "rendezvous"
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    yield dist
    dist.destroy_process_group()


def test_nccl_collectives_in_a_one_process_group(nccl_group):
    from contrast.distributed import _GatherWithGrad, all_reduce_sum

    dist = nccl_group
    assert dist.get_backend() == "nccl"
    x = torch.arange(6.0, device=CUDA).reshape(3, 2)
    y = x.clone()
    dist.all_reduce(y)
    torch.testing.assert_close(y, x)
    assert all_reduce_sum(x.clone()).equal(x)
    leaf = x.clone().requires_grad_()
    out = _GatherWithGrad.apply(leaf)  # the collective gather_with_grad runs across ranks, forced at world size 1
    (out * 3).sum().backward()
    torch.testing.assert_close(out, x)
    torch.testing.assert_close(leaf.grad, torch.full_like(x, 3.0))
    flag = torch.tensor(True, device=CUDA).to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    assert bool(flag)


def test_fsdp_on_one_gpu_equals_the_plain_model(nccl_group):
    from contrast.train.fsdp import is_sharded, shard_model

    plain = _run()
    sharded = _run()  # same seed: the same initial weights
    shard_model(sharded.model, CUDA)
    assert is_sharded(sharded.model)
    sharded.optimizer = build_optimizer(sharded.model, sharded.cfg.train)  # over the sharded (DTensor) parameters
    sharded.scheduler = build_scheduler(sharded.optimizer, sharded.cfg.train)
    want = _losses(plain)
    got = _losses(sharded)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sharded.model.state_dict().items()}
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=1e-5, atol=1e-6, msg=k)
