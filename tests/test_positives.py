"""Pairs that share a caption or a group id as positives (``loss.positives``): multi-positive InfoNCE and the sigmoid
loss with label +1, whole, tiled, across two gloo processes (gathered and ring) and under gradient caching, against
brute-force references written out below; without duplicate ids both equal the plain losses."""

from __future__ import annotations

import os
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tiny_model_dict

from contrast import distributed
from contrast.config import ConfigError, LossConfig, from_dict
from contrast.data.collate import Collator, ImageSamples, id_hash, pair_id_keys
from contrast.models import ModelOutput, build_model
from contrast.objectives import build_objective, info_nce, sigmoid_loss
from contrast.tokenizer import ClipTokenizer
from contrast.train.step import cached_step, whole_step

WORLD, PER_RANK, WIDTH = 2, 6, 8
WEIGHTS = (1.0, 2.5)  # each rank back-propagates its own loss times its weight


def features(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, WIDTH, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + torch.randn(n, WIDTH, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def duplicate_ids(n: int) -> torch.Tensor:
    """(n, 2) ids: a caption column with repeats (rows 0, 3, 7 alike; 1, 2 alike) and a group column joining rows
    in threes, so the positives are not an equivalence of one column (rows 3 and 5 match through the group only)."""
    caption = torch.arange(n)
    caption[[3, 7 % n]] = 0
    caption[2] = 1
    group = torch.arange(n) // 3 + 1000
    return torch.stack([caption, group], dim=1)


def positive_mask(ids: torch.Tensor) -> torch.Tensor:
    """(N, N) float: 1 where two pairs agree in some id column, by a double loop."""
    n = ids.shape[0]
    return torch.tensor([[float(any(ids[i, k] == ids[j, k] for k in range(ids.shape[1]))) for j in range(n)]
                         for i in range(n)], dtype=torch.float64)


def reference_itc(img, txt, scale, all_img, all_txt, ids, all_ids, rank):
    """This rank's rows of both logit matrices, each row's target uniform over its positives (soft cross-entropy)."""
    B = img.shape[0]
    m = positive_mask(all_ids)[rank * B : (rank + 1) * B]  # (B, N)
    targets = m / m.sum(dim=1, keepdim=True)
    i2t = -(targets * F.log_softmax(scale * img @ all_txt.t(), dim=1)).sum(dim=1).mean()
    t2i = -(targets * F.log_softmax(scale * txt @ all_img.t(), dim=1)).sum(dim=1).mean()
    return 0.5 * (i2t + t2i)


def reference_sigmoid(img, txt, scale, bias, all_txt, ids, all_ids, rank):
    B = img.shape[0]
    signs = 2 * positive_mask(all_ids)[rank * B : (rank + 1) * B] - 1
    return -F.logsigmoid(signs * (scale * img @ all_txt.t() + bias)).sum() / B


def value_and_grads(fn, inputs, weight: float = 1.0):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    value = fn(*xs)
    (weight * value).backward()
    return value.detach(), [x.grad for x in xs]


def assert_same(got, want, what=""):
    torch.testing.assert_close(got[0], want[0], rtol=1e-7, atol=1e-9, msg=lambda m: f"{what} value: {m}")
    for k, (a, b) in enumerate(zip(got[1], want[1])):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m, k=k: f"{what} grad {k}: {m}")


# --------------------------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("n,tile", [(8, 0), (8, 3), (9, 2), (13, 5)])
def test_itc_with_positives_equals_the_brute_force_loss(n, tile):
    img, txt = features(n, seed=n)
    ids = duplicate_ids(n)
    scale = torch.tensor(7.0, dtype=torch.float64)
    ours = value_and_grads(lambda i, t, s: info_nce(i, t, s, tile_size=tile, pair_ids=ids), (img, txt, scale))
    want = value_and_grads(lambda i, t, s: reference_itc(i, t, s, i, t, ids, ids, 0), (img, txt, scale))
    assert_same(ours, want, "itc")
    plain = info_nce(img, txt, scale, tile_size=tile)
    assert abs(float(ours[0]) - float(plain)) > 1e-3  # the duplicates change the loss


@pytest.mark.parametrize("n,tile", [(8, 0), (9, 2), (13, 5)])
def test_sigmoid_with_positives_equals_the_brute_force_loss(n, tile):
    img, txt = features(n, seed=n)
    ids = duplicate_ids(n)
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    ours = value_and_grads(lambda i, t, s, b: sigmoid_loss(i, t, s, b, tile_size=tile, pair_ids=ids),
                           (img, txt, scale, bias))
    want = value_and_grads(lambda i, t, s, b: reference_sigmoid(i, t, s, b, t, ids, ids, 0), (img, txt, scale, bias))
    assert_same(ours, want, "sigmoid")


@pytest.mark.parametrize("loss", ["itc", "sigmoid"])
def test_unique_ids_give_the_plain_loss(loss):
    img, txt = features(10, seed=3)
    ids = torch.arange(10)[:, None] * 7 + 1  # one column, no repeats
    scale, bias = torch.tensor(5.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    if loss == "itc":
        fn = lambda i, t, s, b, ids=None: info_nce(i, t, s, tile_size=3, pair_ids=ids)  # noqa: E731
    else:
        fn = lambda i, t, s, b, ids=None: sigmoid_loss(i, t, s, b, tile_size=3, pair_ids=ids)  # noqa: E731
    with_ids = value_and_grads(lambda *x: fn(*x, ids=ids), (img, txt, scale, bias))
    plain = value_and_grads(fn, (img, txt, scale, bias))
    assert_same(with_ids, plain, loss)


def test_config_and_missing_ids_are_explained():
    with pytest.raises(ValueError, match="loss.positives may hold caption and group"):
        build_objective(LossConfig(itc=1.0, positives=["emoji"]))
    objective = build_objective(LossConfig(itc=1.0, positives=["caption"]))
    img, txt = features(4)
    out = ModelOutput(image_emb=img, text_emb=txt, logit_scale=torch.tensor(2.0))  # no pair_ids
    with pytest.raises(ValueError, match="carries no pair ids"):
        objective(out)
    cfg = from_dict({"loss": {"positives": ["caption", "group"]}})
    with pytest.raises(ConfigError, match="data.group_column is not set"):
        pair_id_keys(cfg)
    cfg.data.group_column = "emoji_id"
    assert pair_id_keys(cfg) == ("caption", "emoji_id")


def test_collator_hashes_captions_and_groups_into_pair_ids():
    from PIL import Image

    from contrast.config import ImageTowerConfig
    from contrast.data.transforms import build_transform

    prepare = ImageSamples(build_transform(ImageTowerConfig(image_size=8)), 10**6, keep=("caption", "emoji_id"))
    img = Image.new("RGB", (8, 8), (200, 10, 10))
    rows = [{"image": img, "caption": c, "emoji_id": g} for c, g in
            [("santa", "1F385"), ("santa, dark skin tone", "1F385"), ("santa", "X"), ("tea", "2615")]]
    batch = Collator(ClipTokenizer(8), ("caption", "emoji_id"))([prepare(r) for r in rows])
    ids = batch["pair_ids"]
    assert ids.shape == (4, 2) and ids.dtype == torch.long
    assert ids[0, 0] == ids[2, 0] == id_hash("santa") and ids[0, 0] != ids[1, 0]
    assert ids[0, 1] == ids[1, 1] == id_hash("1F385") and ids[3, 1] != ids[0, 1]
    with pytest.raises(ConfigError, match="data.group_column 'style' is not a column"):
        ImageSamples(build_transform(ImageTowerConfig(image_size=8)), 10**6, keep=("style",))(rows[0])


@pytest.mark.parametrize("loss", [{"itc": 1.0}, {"itc": 0.0, "sigmoid": 1.0}], ids=["itc", "siglip"])
def test_gradient_caching_with_positives_equals_the_whole_batch(loss):
    model_section = {**tiny_model_dict(), "init_logit_scale": 2.3, "init_logit_bias": -3.0}
    cfg = from_dict({"model": model_section, "loss": {**loss, "positives": ["caption", "group"]}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    run = SimpleNamespace(model=model, train_model=model, objective=build_objective(cfg.loss),
                          autocast=nullcontext(), device=torch.device("cpu"))
    captions = ["a red star", "a blue star", "a red star", "tea", "a cup", "tea", "a dog", "a cat"] * 2
    batch = {"pixels": torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
             "input_ids": ClipTokenizer(16)(captions), "pair_ids": duplicate_ids(16)}
    results = []
    for fn, size in ((whole_step, 16), (cached_step, 4)):
        model.zero_grad(set_to_none=True)
        losses, _ = fn(run, dict(batch), size, lambda t: t.backward())
        results.append((float(losses.total.detach()), {n: p.grad.clone() for n, p in model.named_parameters()
                                               if p.grad is not None}))
    (whole_loss, whole), (cached_loss, cached) = results
    assert cached_loss == pytest.approx(whole_loss, rel=1e-6)
    plain = build_objective(from_dict({"loss": loss}).loss)
    with torch.no_grad():
        assert abs(float(plain(model(batch)).total) - whole_loss) > 1e-4  # the positives were used
    assert whole.keys() == cached.keys()
    for n in whole:
        torch.testing.assert_close(cached[n], whole[n], rtol=1e-4, atol=1e-6, msg=n)


# --------------------------------------------------------------------------------------------------- two processes


def _cases(rank: int, ids_local: torch.Tensor) -> dict:
    gather, shift = distributed.gather_with_grad, distributed.ring_shift
    return {
        "itc whole": lambda i, t, s: info_nce(i, t, s, gather=gather, rank=rank, pair_ids=ids_local),
        "itc tiled 4": lambda i, t, s: info_nce(i, t, s, gather=gather, rank=rank, tile_size=4, pair_ids=ids_local),
        "sigmoid gathered": lambda i, t, s, b: sigmoid_loss(i, t, s, b, gather=gather, rank=rank, tile_size=4,
                                                            pair_ids=ids_local),
        "sigmoid ring": lambda i, t, s, b: sigmoid_loss(i, t, s, b, shift=shift, world=WORLD, tile_size=4,
                                                        pair_ids=ids_local),
    }


def _worker(rank: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    img, txt = features(WORLD * PER_RANK, seed=11)
    ids = duplicate_ids(WORLD * PER_RANK)  # rows 0, 3, 7 share a caption: positives across the two ranks
    own = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    scale, bias = torch.tensor(9.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    results = {}
    for name, fn in _cases(rank, ids[own]).items():
        inputs = (img[own], txt[own], scale) + (() if name.startswith("itc") else (bias,))
        ours = value_and_grads(fn, inputs, weight=WEIGHTS[rank])
        for g in ours[1][2:]:  # the logit scale and bias are replicated: their gradients add up over ranks
            dist.all_reduce(g)
        results[name] = ours
    torch.save(results, f"{result_file}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("positives")
    os.environ.pop("WORLD_SIZE", None)
    mp.spawn(_worker, args=(str(tmp / "rendezvous"), str(tmp / "results")), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"results.{r}", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(_cases(0, torch.zeros(1, 1, dtype=torch.long))))
def test_two_processes_equal_the_brute_force_local_losses(two_process_results, name):
    """Each rank's loss is its rows of the brute-force loss on the whole batch; its gradients are its share of the
    gradient of the ranks' weighted sum (the gathered ids line up with the gathered features)."""
    img, txt = features(WORLD * PER_RANK, seed=11)
    ids = duplicate_ids(WORLD * PER_RANK)
    scale, bias = torch.tensor(9.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    x = [t.clone().requires_grad_() for t in (img, txt, scale, bias)]
    total, values = 0.0, []
    for rank in range(WORLD):
        own = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        if name.startswith("itc"):
            v = reference_itc(x[0][own], x[1][own], x[2], x[0], x[1], ids[own], ids, rank)
        else:
            v = reference_sigmoid(x[0][own], x[1][own], x[2], x[3], x[1], ids[own], ids, rank)
        values.append(v.detach())
        total = total + WEIGHTS[rank] * v
    total.backward()
    for rank, results in enumerate(two_process_results):
        value, grads = results[name]
        own = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(value, values[rank], rtol=1e-7, atol=1e-9, msg=f"{name} rank {rank} value")
        want = [x[0].grad[own], x[1].grad[own], x[2].grad] + ([] if name.startswith("itc") else [x[3].grad])
        for k, (a, b) in enumerate(zip(grads, want)):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=f"{name} rank {rank} grad {k}")


# --------------------------------------------------------------------------------------------------- the training loop


def _first_loss(run_dir) -> float:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if r.get("step") == 1)


def test_training_with_positives_reads_the_group_column(tmp_path, data_cache):
    """Through `contrast train`'s loop: the built-in set's colour column groups pairs; the first step's loss (same
    seed, batch and weights) differs from the plain loss only through the positives; a missing column is named."""
    from conftest import tiny_config

    from contrast.data.sources import DataError
    from contrast.train.loop import train

    def run(name: str, **data) -> float:
        cfg = tiny_config(data_cache, steps=1, batch_size=32, warmup_steps=0)
        cfg.loss.positives = ["caption", "group"] if data else []
        for k, v in data.items():
            setattr(cfg.data, k, v)
        train(cfg, tmp_path / name, progress=False)
        return _first_loss(tmp_path / name)

    plain, grouped = run("plain"), run("grouped", group_column="colour")
    assert abs(plain - grouped) > 1e-3  # same seed, batch and weights: only the positives differ
    with pytest.raises((DataError, ConfigError), match="data.group_column 'hue' is not a column"):
        run("bad", group_column="hue")
