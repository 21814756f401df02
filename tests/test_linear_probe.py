"""Linear probe: the torch logistic regression against scikit-learn's on the digits set, the sweep, the model side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contrast.evaluate.linear_probe import (
    evaluate_linear_probe,
    extract_features,
    fit_logistic,
    label_indices,
    probe_features,
    split_validation,
)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = torch.tensor(x, dtype=torch.float32)[perm], torch.tensor(y)[perm]
    return x[:1000], y[:1000], x[1000:1300], y[1000:1300], x[1300:], y[1300:]


def _sklearn(z_train: np.ndarray, y_train: np.ndarray, l2: float):
    from sklearn.linear_model import LogisticRegression

    # mean CE + l2/2 ||W||^2  ==  (1 / (l2 n)) * (sum CE + 1/(2C)...)  i.e. C = 1 / (l2 n)
    return LogisticRegression(C=1.0 / (l2 * len(y_train)), max_iter=5000, tol=1e-6).fit(z_train, y_train)


@pytest.mark.parametrize("l2", [1e-1, 1e-3])
def test_same_solution_as_sklearn(digits, l2):
    xtr, ytr, _, _, xte, yte = digits
    model = fit_logistic(xtr, ytr, 10, l2)
    z_tr = ((xtr.double() - model.mean) / model.std).numpy()
    z_te = ((xte.double() - model.mean) / model.std).numpy()
    ref = _sklearn(z_tr, ytr.numpy(), l2)
    ours = torch.softmax(model.logits(xte), dim=1).numpy()
    assert np.abs(ours - ref.predict_proba(z_te)).max() < 1e-3
    ours_acc = float((ours.argmax(1) == yte.numpy()).mean())
    assert ours_acc == pytest.approx(ref.score(z_te, yte.numpy()), abs=0.004)  # at most one test image differs


def test_sweep_picks_the_best_validation_strength(digits):
    xtr, ytr, xva, yva, xte, yte = digits
    grid = (1e-2, 1e1, 1e-1)
    r = probe_features(xtr, ytr, xte, yte, xva, yva, l2_grid=grid)
    assert [s["l2"] for s in r.sweep] == [1e1, 1e-1, 1e-2]  # strongest first
    best = max(r.sweep, key=lambda s: s["val_accuracy"])
    assert r.best_l2 == best["l2"] and r.val_accuracy == best["val_accuracy"]
    assert r.sweep[0]["val_accuracy"] < best["val_accuracy"]  # l2 = 10 underfits digits
    # independent reference: sklearn at the chosen strength, same standardisation
    mean, std = xtr.double().mean(0), xtr.double().std(0).clamp_min(1e-6)
    ref = _sklearn(((xtr.double() - mean) / std).numpy(), ytr.numpy(), r.best_l2)
    ref_acc = ref.score(((xte.double() - mean) / std).numpy(), yte.numpy())
    assert r.test_accuracy == pytest.approx(ref_acc, abs=0.01)
    assert r.test_accuracy > 0.93
    assert r.test["top1"] == r.test_accuracy and len(r.test["confusion"]) == 10
    assert (r.num_train, r.num_val, r.num_test, r.feature_dim) == (1000, 300, len(yte), 64)


def test_validation_held_out_of_train_when_absent():
    tr, va = split_validation(10, 0.2, seed=1)
    assert len(va) == 2 and len(tr) == 8 and set(tr.tolist()) | set(va.tolist()) == set(range(10))
    g = torch.Generator().manual_seed(0)
    # linearly separable: two Gaussian blobs far apart
    x = torch.cat([torch.randn(40, 5, generator=g) + 4, torch.randn(40, 5, generator=g) - 4])
    y = torch.cat([torch.zeros(40), torch.ones(40)]).long()
    r = probe_features(x[::2], y[::2], x[1::2], y[1::2], l2_grid=(1e-2,), val_fraction=0.25)
    assert (r.num_train, r.num_val) == (30, 10)
    assert r.test_accuracy == 1.0


def test_label_indices():
    idx, names = label_indices(["b", "a", "b"])
    assert names == ["a", "b"] and idx.tolist() == [1, 0, 1]
    idx, names = label_indices(["b", "a"], ["b", "a"])
    assert idx.tolist() == [0, 1]
    with pytest.raises(ValueError, match="not among the task's class names"):
        label_indices(["c"], ["a", "b"])


# --------------------------------------------------------------------------------------------------- model side


def _colour_data(n_per_class: int, seed: int):
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    imgs, labels = [], []
    for name, rgb in base.items():
        for _ in range(n_per_class):
            c = np.clip(np.array(rgb) + rng.integers(-30, 30, 3), 0, 255).astype(np.uint8)
            imgs.append(Image.fromarray(np.tile(c, (8, 8, 1))))
            labels.append(name)
    return Dataset.from_dict({"image": imgs, "colour": labels})


def _preprocess(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)


def test_probe_of_a_tiny_dual_encoder():
    from contrast.config import ClipModelConfig, ImageTowerConfig, TextTowerConfig
    from contrast.models import build_model

    cfg = ClipModelConfig(
        image=ImageTowerConfig(
            name="vit_tiny_patch16_224", image_size=8,
            kwargs={"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2},
        ),
        text=TextTowerConfig(width=32, layers=1, heads=2, context_length=8),
        embed_dim=16,
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    train, test = _colour_data(8, 0), _colour_data(4, 1)
    feats = extract_features(model, _preprocess, test, features="pooled")
    assert feats.shape == (12, model.image.width)
    emb = extract_features(model, _preprocess, test, features="embed")
    assert emb.shape == (12, 16)
    model.train()
    r = evaluate_linear_probe(model, _preprocess, train, test, label_column="colour", l2_grid=(1e-2, 1e-4),
                              val_fraction=0.25)
    assert model.training  # the mode is restored
    assert r["features"] == "pooled" and r["test"]["classnames"] == ["blue", "green", "red"]
    # even random frozen features separate three far-apart flat colours
    assert r["test_accuracy"] == 1.0
    with pytest.raises(ValueError, match="no label column 'label'"):
        evaluate_linear_probe(model, _preprocess, train, test)
