"""The hand-written ITC and sigmoid losses: whole, tiled and across ranks, against autograd and open_clip.

References: open_clip's ClipLoss / SigLipLoss and the plain autograd forms written out below (two logit matrices for
ITC, a sign matrix for the sigmoid loss, every text all-gathered). Across ranks the workers are two gloo processes
(spawned here, rendezvous through a file) with different loss weights per rank, so the gradient bookkeeping between
ranks is checked as well as the values.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tiny_model_dict
from open_clip.loss import ClipLoss, SigLipLoss

import contrast.objectives as O
from contrast import distributed
from contrast.config import ClipLossConfig, LossConfig, from_dict
from contrast.models import build_model
from contrast.objectives import Comm, build_objective, info_nce, sigmoid_loss

WORLD = 2
PER_RANK = 5
WIDTH = 8
WEIGHTS = (1.0, 2.5)  # each rank back-propagates its own loss times its weight


def features(n: int, e: int = WIDTH, seed: int = 0, dtype=torch.float32, norm: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1)
    return (norm * img).to(dtype), (norm * txt).to(dtype)


def leaves(*tensors):
    return [torch.as_tensor(t).detach().clone().requires_grad_() for t in tensors]


def value_and_grads(fn, inputs, weight: float = 1.0):
    xs = leaves(*inputs)
    value = fn(*xs)
    (weight * value).backward()
    return value.detach(), [x.grad for x in xs]


def assert_same(got, want, rtol, atol, what=""):
    (v1, g1), (v2, g2) = got, want
    torch.testing.assert_close(v1, v2, rtol=rtol, atol=atol, msg=lambda m: f"{what} value: {m}")
    for k, (a, b) in enumerate(zip(g1, g2)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, k=k: f"{what} grad {k}: {m}")


# --------------------------------------------------------------------------------------------------- one process

SIZES_AND_TILES = [(1, 0), (1, 3), (5, 0), (5, 2), (5, 3), (12, 5), (12, 64), (33, 4), (33, 7)]


@pytest.mark.parametrize("n,tile", SIZES_AND_TILES)
def test_itc_equals_open_clip(n, tile):
    # float64 and features of norm 3 at scale 100 (logits up to 900): exact up to rounding, and numerically stable
    img, txt = features(n, dtype=torch.float64, norm=3.0)
    inputs = (img, txt, torch.tensor(100.0, dtype=torch.float64))
    ours = value_and_grads(lambda i, t, s: info_nce(i, t, s, tile_size=tile), inputs, weight=2.5)
    theirs = value_and_grads(lambda i, t, s: ClipLoss()(i, t, s), inputs, weight=2.5)
    assert_same(ours, theirs, rtol=1e-10, atol=1e-10)
    # float32, normalised features at CLIP's initial scale
    img, txt = features(n, seed=1)
    inputs = (img, txt, torch.tensor(1 / 0.07))
    ours = value_and_grads(lambda i, t, s: info_nce(i, t, s, tile_size=tile), inputs)
    theirs = value_and_grads(lambda i, t, s: ClipLoss()(i, t, s), inputs)
    assert_same(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,tile", SIZES_AND_TILES)
def test_sigmoid_equals_open_clip(n, tile):
    img, txt = features(n, dtype=torch.float64, norm=2.0)
    inputs = (img, txt, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64))
    ours = value_and_grads(lambda *a: sigmoid_loss(*a, tile_size=tile), inputs, weight=2.5)
    theirs = value_and_grads(lambda *a: SigLipLoss()(*a), inputs, weight=2.5)
    assert_same(ours, theirs, rtol=1e-10, atol=1e-10)
    img, txt = features(n, seed=1)
    inputs = (img, txt, torch.tensor(10.0), torch.tensor(-10.0))
    ours = value_and_grads(lambda *a: sigmoid_loss(*a, tile_size=tile), inputs)
    theirs = value_and_grads(lambda *a: SigLipLoss()(*a), inputs)
    assert_same(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tile", [0, 3])
def test_gradcheck(tile):
    """The hand-written backward against finite differences. gradcheck runs a backward more than once per output:
    the kept blocks are consumed by the first and recomputed for the next, which rounds differently."""
    img, txt = features(4, e=3, dtype=torch.float64)
    s, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    check = {"nondet_tol": 1e-12}
    assert torch.autograd.gradcheck(lambda i, t, s: info_nce(i, t, s, tile_size=tile), leaves(img, txt, s), **check)
    assert torch.autograd.gradcheck(lambda *a: sigmoid_loss(*a, tile_size=tile), leaves(img, txt, s, b), **check)


@pytest.mark.parametrize("loss", ["itc", "sigmoid"])
def test_tiled_equals_untiled_in_float32(loss):
    img, txt = features(37, e=16, seed=3)
    inputs = (img, txt, torch.tensor(20.0)) + ((torch.tensor(-5.0),) if loss == "sigmoid" else ())
    fn = info_nce if loss == "itc" else sigmoid_loss
    whole = value_and_grads(lambda *a: fn(*a, tile_size=0), inputs)
    for tile in (1, 6, 8, 36):
        assert_same(value_and_grads(lambda *a, tile=tile: fn(*a, tile_size=tile), inputs), whole, rtol=1e-5, atol=1e-6,
                    what=f"tile {tile}")


@pytest.mark.parametrize("loss", ["itc", "sigmoid"])
def test_tiles_bound_every_logit_block(monkeypatch, loss):
    """Tiled, no logit block exceeds tile_size ** 2 entries; whole, one block per row strip holds all columns."""
    shapes = []
    real_mm = O._mm
    monkeypatch.setattr(O, "_mm", lambda a, b, out=None: shapes.append((a.shape[0], b.shape[0])) or real_mm(a, b, out))
    real_addmm = torch.addmm
    monkeypatch.setattr(O.torch, "addmm", lambda c, a, b, **kw: shapes.append((a.shape[0], b.shape[1]))
                        or real_addmm(c, a, b, **kw))
    img, txt = features(64, seed=4)
    extra = (torch.tensor(-5.0),) if loss == "sigmoid" else ()
    fn = info_nce if loss == "itc" else sigmoid_loss
    value_and_grads(lambda *a: fn(*a, tile_size=8), (img, txt, torch.tensor(10.0)) + extra)
    assert shapes and max(r * c for r, c in shapes) <= 64
    shapes.clear()
    value_and_grads(lambda *a: fn(*a, tile_size=0), (img, txt, torch.tensor(10.0)) + extra)
    assert shapes == [(64, 64)]


def test_no_grad_retain_graph_and_plain_numbers():
    img, txt = features(9, seed=5)
    for tile in (0, 4):
        want = ClipLoss()(img, txt, torch.tensor(10.0))
        with torch.no_grad():
            torch.testing.assert_close(info_nce(img, txt, 10.0, tile_size=tile), want)
            torch.testing.assert_close(sigmoid_loss(img, txt, 10.0, -3.0, tile_size=tile),
                                       SigLipLoss()(img, txt, torch.tensor(10.0), torch.tensor(-3.0)))
        i, t = leaves(img, txt)
        loss = info_nce(i, t, torch.tensor(10.0), tile_size=tile)
        first = torch.autograd.grad(loss, [i, t], retain_graph=True)
        second = torch.autograd.grad(loss, [i, t])
        for a, b in zip(first, second):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss", ["itc", "sigmoid"])
def test_under_bf16_autocast(loss):
    """Under autocast the matmuls run in bfloat16, the rest in float32; gradients come back in the inputs' dtypes."""
    img, txt = features(24, e=32, seed=6)
    extra = (torch.tensor(-10.0),) if loss == "sigmoid" else ()
    fn = info_nce if loss == "itc" else sigmoid_loss
    inputs = (img, txt, torch.tensor(10.0)) + extra
    want = value_and_grads(lambda *a: fn(*a, tile_size=0), inputs)
    for tile in (0, 5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = value_and_grads(lambda *a, tile=tile: fn(*a, tile_size=tile), inputs)
        assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1])
        assert_same(got, want, rtol=0.05, atol=0.02, what=f"autocast tile {tile}")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bfloat16 features, as a bfloat16 projection would give
        got = value_and_grads(lambda *a: fn(*a, tile_size=5), (img.bfloat16(), txt.bfloat16()) + inputs[2:])
    assert [g.dtype for g in got[1][:2]] == [torch.bfloat16, torch.bfloat16]
    assert_same((got[0], [g.float() for g in got[1]]), want, rtol=0.05, atol=0.02, what="bfloat16 inputs")


def test_config_tile_size_reaches_the_terms():
    assert LossConfig().tile_size == ClipLossConfig().tile_size > 0
    img, txt = features(10, seed=7)
    out = types.SimpleNamespace(image_emb=img, text_emb=txt, logit_scale=torch.tensor(10.0),
                                logit_bias=torch.tensor(-4.0), teacher=None)
    for cfg in (LossConfig(itc=1.0, sigmoid=0.5, tile_size=3), LossConfig(itc=1.0, sigmoid=0.5, tile_size=0)):
        objective = build_objective(cfg)
        assert [fn.keywords["tile_size"] for _, fn in objective.terms.values()] == [cfg.tile_size] * 2
        want = ClipLoss()(img, txt, out.logit_scale) + 0.5 * SigLipLoss()(img, txt, out.logit_scale, out.logit_bias)
        torch.testing.assert_close(objective(out).total, want)
    with pytest.raises(ValueError, match="tile_size"):
        build_objective(LossConfig(itc=1.0, tile_size=-1))


# --------------------------------------------------------------------------------------------------- two processes


def reference_itc(img, txt, scale, gather, rank):
    """The local-loss form by autograd: this rank's rows of both logit matrices, every feature gathered."""
    B = img.shape[0]
    labels = torch.arange(B) + rank * B
    return 0.5 * (F.cross_entropy(scale * img @ gather(txt).t(), labels)
                  + F.cross_entropy(scale * txt @ gather(img).t(), labels))


def reference_sigmoid(img, txt, scale, bias, gather, rank):
    """The all-gather form by autograd: this rank's images against every text, a +-1 sign per pair."""
    B = img.shape[0]
    logits = scale * img @ gather(txt).t() + bias
    signs = -torch.ones_like(logits)
    signs[torch.arange(B), torch.arange(B) + rank * B] = 1.0
    return -F.logsigmoid(signs * logits).sum() / B


def _cases(rank: int):
    gather, shift = distributed.gather_with_grad, distributed.ring_shift
    itc = lambda tile: lambda i, t, s: info_nce(i, t, s, gather=gather, rank=rank, tile_size=tile)  # noqa: E731
    ring = lambda tile: lambda i, t, s, b: sigmoid_loss(i, t, s, b, tile_size=tile, shift=shift, world=WORLD)  # noqa
    gathered = lambda tile: lambda i, t, s, b: sigmoid_loss(i, t, s, b, gather=gather, rank=rank, tile_size=tile)  # noqa
    objective = build_objective(LossConfig(sigmoid=1.0, tile_size=3), Comm(gather, rank, WORLD, shift))

    def term(i, t, s, b):
        return objective(types.SimpleNamespace(image_emb=i, text_emb=t, logit_scale=s, logit_bias=b)).total

    ref_itc = lambda i, t, s: reference_itc(i, t, s, gather, rank)  # noqa: E731
    ref_sig = lambda i, t, s, b: reference_sigmoid(i, t, s, b, gather, rank)  # noqa: E731
    return {
        "itc whole": (itc(0), ref_itc), "itc tiled 3": (itc(3), ref_itc), "itc tiled 4": (itc(4), ref_itc),
        "sigmoid ring": (ring(0), ref_sig), "sigmoid ring tiled 3": (ring(3), ref_sig),
        "sigmoid gathered tiled 2": (gathered(2), ref_sig), "sigmoid objective (ring, tiled)": (term, ref_sig),
    }


# the training loop's set-up: a model under DDP, ITC (tiled) plus the sigmoid loss in a ring (tiled)
DDP_SCENARIO = {
    "model": {**tiny_model_dict(), "init_logit_scale": 2.302585092994046, "init_logit_bias": -10.0},
    "loss": {"itc": 0.5, "sigmoid": 1.0, "tile_size": 3},
}


def ddp_batch() -> dict[str, torch.Tensor]:
    from contrast.tokenizer import ClipTokenizer

    g = torch.Generator().manual_seed(0)
    colours = ("red", "blue", "green", "white", "black")
    captions = [f"a {size} {colour} shape" for size in ("small", "large") for colour in colours]
    return {"pixels": torch.randn(WORLD * PER_RANK, 3, 16, 16, generator=g), "input_ids": ClipTokenizer(16)(captions)}


def ddp_step(batch: dict[str, torch.Tensor], comm: Comm, ddp: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    cfg = from_dict(DDP_SCENARIO)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.set_comm(comm)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    loss = build_objective(cfg.loss, comm)(net(batch)).total
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    img, txt = features(WORLD * PER_RANK, seed=11)
    local = (img[rank * PER_RANK : (rank + 1) * PER_RANK], txt[rank * PER_RANK : (rank + 1) * PER_RANK])
    scale, bias = torch.tensor(12.0), torch.tensor(-3.0)
    results = {}
    for name, (ours, reference) in _cases(rank).items():
        inputs = local + ((scale,) if name.startswith("itc") else (scale, bias))
        pair = [value_and_grads(fn, inputs, weight=WEIGHTS[rank]) for fn in (ours, reference)]
        for _, grads in pair:  # the logit scale and bias are replicated: their gradients add up over ranks
            for g in grads[2:]:
                dist.all_reduce(g)
        results[name] = pair
    local_batch = {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in ddp_batch().items()}
    comm = Comm(distributed.gather_with_grad, rank, WORLD, distributed.ring_shift)
    loss, grads = ddp_step(local_batch, comm, ddp=True)
    results["ddp"] = (distributed.all_reduce_mean(loss), grads)
    torch.save(results, f"{result_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fast_losses")
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_worker, args=(str(tmp / "rendezvous"), str(tmp / "results")), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"results.{r}", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(_cases(0)))
def test_two_processes_equal_the_all_gather_form(two_process_results, name):
    for rank, results in enumerate(two_process_results):
        ours, reference = results[name]
        assert_same(ours, reference, rtol=1e-5, atol=1e-6, what=f"{name}, rank {rank}")


def test_two_processes_equal_one_process(two_process_results):
    """With equal weights the ranks' losses average to the loss of one process on the whole batch (checked on the
    values here: the weighted gradients are checked against the all-gather form above)."""
    img, txt = features(WORLD * PER_RANK, seed=11)
    scale, bias = torch.tensor(12.0), torch.tensor(-3.0)
    wanted = {"itc whole": ClipLoss()(img, txt, scale), "sigmoid ring": SigLipLoss()(img, txt, scale, bias)}
    for name, want in wanted.items():
        mean = sum(results[name][0][0] for results in two_process_results) / WORLD
        torch.testing.assert_close(mean, want, rtol=1e-5, atol=1e-6)


def test_ddp_with_ring_and_tiles_equals_one_process(two_process_results):
    """A model under DDP on two processes, ITC tiled and the sigmoid loss in a ring, with the Comm the training loop
    builds: the loss and every parameter gradient equal one process training on the whole batch."""
    loss, grads = two_process_results[0]["ddp"]
    want_loss, want = ddp_step(ddp_batch(), Comm(), ddp=False)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(want)
    for n, g in want.items():
        atol = 1e-6 * float(g.abs().max())  # float32, relative to the tensor's own magnitude
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=atol, msg=lambda m, n=n: f"{n}: {m}")
