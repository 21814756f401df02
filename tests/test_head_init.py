"""train.head_init: cca -- projections from the ridge-regularised CCA of the towers' pooled features.

References: scipy's generalised symmetric eigensolver for the canonical correlations, numpy for the CCA of features
recomputed from the run's own first batches, and a gloo process group for the cross-rank sums.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import StoppedAfterCheckpoint, stop_after_first_checkpoint, tiny_config
from safetensors.torch import load_file

from contrast import distributed as D
from contrast import runs as R
from contrast.config import ConfigError, new_config
from contrast.models import build_model
from contrast.tokenizer import build_tokenizer
from contrast.train.data import build_loader, to_device
from contrast.train.heads import CrossMoments, cca_weights, check_head_init, init_heads
from contrast.train.loop import train


def _paired(n: int = 3000, dx: int = 12, dy: int = 8, shared: int = 3, seed: int = 0):
    """Features of two views sharing ``shared`` latent factors, plus independent noise."""
    g = np.random.default_rng(seed)
    z = g.standard_normal((n, shared))
    x = z @ g.standard_normal((shared, dx)) + 0.5 * g.standard_normal((n, dx))
    y = z @ g.standard_normal((shared, dy)) + 0.5 * g.standard_normal((n, dy))
    return x, y


def _moments(x: np.ndarray, y: np.ndarray) -> CrossMoments:
    m = CrossMoments(x.shape[1], y.shape[1])
    for i in range(0, len(x), 1000):  # summed in pieces, as over batches
        m.add(torch.from_numpy(x[i : i + 1000]), torch.from_numpy(y[i : i + 1000]))
    return m


@pytest.mark.parametrize("ridge", [0.0, 1.0])
def test_canonical_correlations_equal_the_generalised_eigenproblem(ridge):
    x, y = _paired()
    n, k = len(x), 6
    cxx, cyy, cxy = x.T @ x / n, y.T @ y / n, x.T @ y / n
    rxx = cxx + ridge * np.trace(cxx) / len(cxx) * np.eye(len(cxx))
    ryy = cyy + ridge * np.trace(cyy) / len(cyy) * np.eye(len(cyy))
    # rho^2 are the eigenvalues of Cxy Ryy^-1 Cyx a = rho^2 Rxx a
    rho2 = scipy.linalg.eigh(cxy @ np.linalg.solve(ryy, cxy.T), rxx, eigvals_only=True)[::-1][:k]
    a, b, corr = cca_weights(_moments(x, y), k, ridge)
    np.testing.assert_allclose(corr.numpy() ** 2, rho2, rtol=1e-7, atol=1e-12)
    a, b = a.numpy(), b.numpy()
    # each canonical variate has variance = its correlation (under the ridge), pairs correlate by corr^2
    np.testing.assert_allclose(a.T @ rxx @ a, np.diag(corr), atol=1e-9)
    np.testing.assert_allclose(b.T @ ryy @ b, np.diag(corr), atol=1e-9)
    np.testing.assert_allclose(a.T @ cxy @ b, np.diag(corr.numpy() ** 2), atol=1e-9)
    if ridge == 0:
        assert corr[:3].min() > 0.8 and corr[3:].max() < 0.15  # three shared factors, the rest noise


def test_moments_sum_across_ranks(tmp_path):
    x, y = _paired(n=600, seed=1)
    whole = _moments(x, y)
    mp.spawn(_moment_worker, args=(str(tmp_path / "rendezvous"), x, y, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"m{rank}.pt")
        for name in ("xx", "yy", "xy", "n"):
            torch.testing.assert_close(got[name], getattr(whole, name), rtol=1e-12, atol=1e-9)


def _moment_worker(rank: int, init_file: str, x, y, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = slice(0, 250) if rank == 0 else slice(250, None)  # unequal shares
        m = _moments(x[half], y[half]).all_reduce()
        torch.save({"xx": m.xx, "yy": m.yy, "xy": m.xy, "n": m.n}, f"{out}/m{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference_scores(cfg, model) -> np.ndarray:
    """A (Dx, Dy) score matrix A B^T of numpy's ridge CCA on features recomputed from the run's first batches."""
    loader = build_loader(cfg, build_tokenizer(cfg.model.text), cfg.data.train_split)
    feats = []
    with torch.no_grad():
        for _, batch in zip(range(cfg.train.head_init_batches), loader):
            b = to_device(batch, torch.device("cpu"), cfg.model.image)
            feats.append((model.image.pooled(b["pixels"]), model.text.pooled(b["input_ids"])))
    x = torch.cat([f[0] for f in feats]).double().numpy()
    y = torch.cat([f[1] for f in feats]).double().numpy()
    n, r = len(x), cfg.train.head_init_ridge

    def inv_sqrt(c):
        e, v = np.linalg.eigh(c + r * np.trace(c) / len(c) * np.eye(len(c)))
        return v @ np.diag(e**-0.5) @ v.T

    wx, wy = inv_sqrt(x.T @ x / n), inv_sqrt(y.T @ y / n)
    u, s, vt = np.linalg.svd(wx @ (x.T @ y / n) @ wy)
    k = cfg.model.embed_dim
    return (wx @ u[:, :k]) @ np.diag(s[:k]) @ (wy @ vt[:k].T).T  # sign- and rotation-free


def _cca_config(data_cache, **train):
    cfg = tiny_config(data_cache, **train)
    cfg.model.embed_dim = 16
    cfg.train.head_init, cfg.train.head_init_batches = "cca", 4
    return cfg


def test_steps_zero_run_holds_the_cca_projections(tmp_path, data_cache, capsys):
    cfg = _cca_config(data_cache, steps=0)
    result = train(cfg, tmp_path / "run", progress=False)
    assert "train.head_init cca: projections from 64 training pairs" in capsys.readouterr().out
    weights = load_file(str(R.resolve(result.run_dir) / R.WEIGHTS))
    model, _, _ = R.load(result.run_dir)
    got = (weights["image.proj.weight"].T.double() @ weights["text.proj.weight"].double()).numpy()
    ref = _reference_scores(cfg, model)
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 1 - 1e-6, cos  # the same score matrix up to the norm-preserving rescale
    # the norms of the random start are kept
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    start = build_model(cfg.model)
    for name in ("image.proj.weight", "text.proj.weight"):
        torch.testing.assert_close(weights[name].norm(), start.state_dict()[name].norm(), rtol=1e-5, atol=0)


def test_init_leaves_the_generators_and_a_resumed_run_keeps_its_heads(tmp_path, data_cache, monkeypatch):
    """The init draws nothing from the global generators (the run's batches and dropout are those of a run without
    it); a resumed run takes its heads from the checkpoint and ends where the uninterrupted one does."""
    cfg = _cca_config(data_cache)
    model = build_model(cfg.model)
    random.seed(5)
    torch.manual_seed(5)
    states = random.getstate(), torch.random.get_rng_state()
    init_heads(cfg, model, build_tokenizer(cfg.model.text), torch.device("cpu"), D.DistInfo())
    assert random.getstate() == states[0] and torch.equal(torch.random.get_rng_state(), states[1])

    whole = train(_cca_config(data_cache, steps=4), tmp_path / "whole", progress=False)
    cfg = _cca_config(data_cache, steps=4, checkpoint_every=2)
    with monkeypatch.context() as m:
        stop_after_first_checkpoint(m)
        with pytest.raises(StoppedAfterCheckpoint):
            train(cfg, tmp_path / "cut", progress=False)
    resumed = train(cfg, tmp_path / "cut", resume="latest", progress=False)
    assert resumed.last_loss == pytest.approx(whole.last_loss, rel=1e-5)
    a = load_file(str(R.resolve(whole.run_dir) / R.WEIGHTS))
    b = load_file(str(R.resolve(resumed.run_dir) / R.WEIGHTS))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_head_init_config_errors(data_cache):
    cfg = _cca_config(data_cache)
    model = build_model(cfg.model)
    for key, value, msg in (("head_init", "pca", "train.head_init must be one of none, cca"),
                            ("head_init_batches", 0, "head_init_batches must be at least 1"),
                            ("head_init_ridge", 0.0, "head_init_ridge must be a positive number")):
        bad = _cca_config(data_cache)
        setattr(bad.train, key, value)
        with pytest.raises(ConfigError, match=msg):
            check_head_init(bad, model)
    wide = _cca_config(data_cache)
    wide.model.embed_dim = 64
    with pytest.raises(ConfigError, match=r"at most 32 canonical pairs .* model.embed_dim is 64"):
        check_head_init(wide, build_model(wide.model))
    blip = new_config("blip")
    blip.train.head_init = "cca"
    with pytest.raises(ConfigError, match="model.kind blip has other heads"):
        check_head_init(blip, torch.nn.Linear(1, 1))


def test_command_line_closed_form_run_and_a_bad_key(tmp_path, data_cache, capsys):
    from contrast.cli import main
    from contrast.config import save_config

    recipe = tmp_path / "lit.yaml"
    save_config(_cca_config(data_cache), recipe)
    closed = ["--set", "train.steps=0", "--set", "train.head_init_batches=2"]
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress", *closed]) == 0
    out = capsys.readouterr().out
    assert "projections from 32 training pairs" in out and "no training step taken" in out and "nan" not in out
    bad = ["--set", "train.head_init=pca"]
    assert main(["train", str(recipe), "--out", str(tmp_path / "bad"), "--no-progress", *bad]) == 2
    err = capsys.readouterr().err
    assert "train.head_init must be one of none, cca" in err and "Traceback" not in err
