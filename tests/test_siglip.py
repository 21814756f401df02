"""SigLIP's sigmoid loss and ITC against open_clip's own losses and a hand computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from contrast.config import load_recipe
from contrast.models import build_model
from contrast.objectives import build_objective, info_nce, sigmoid_loss

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def features(n: int = 6, e: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, e, generator=g), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(n, e, generator=g), dim=-1)
    return img, txt


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (3.0, 0.5), (25.0, -4.0)])
def test_sigmoid_loss_matches_open_clip(scale, bias):
    img, txt = features()
    s, b = torch.tensor(scale), torch.tensor(bias)
    ours = sigmoid_loss(img, txt, s, b)
    theirs = SigLipLoss()(img, txt, s, b)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_sigmoid_loss_by_hand():
    # two pairs, 1-d features: logits z_ij = t * x_i * y_j + b; loss = sum_ij softplus(-sign_ij z_ij) / 2
    img = torch.tensor([[1.0], [-1.0]])
    txt = torch.tensor([[1.0], [0.0]])
    t, b = 2.0, -1.0
    z = [[t * 1 + b, b], [-t + b, b]]
    signs = [[1, -1], [-1, 1]]
    expected = sum(math.log1p(math.exp(-signs[i][j] * z[i][j])) for i in range(2) for j in range(2)) / 2
    got = sigmoid_loss(img, txt, torch.tensor(t), torch.tensor(b))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_sigmoid_loss_gradients_match_open_clip():
    img, txt = features(seed=1)
    leaves = []
    for _ in range(2):
        leaves.append([img.clone().requires_grad_(), txt.clone().requires_grad_(),
                       torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)])
    sigmoid_loss(*leaves[0]).backward()
    SigLipLoss()(*leaves[1]).backward()
    for a, b in zip(leaves[0], leaves[1]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_sigmoid_loss_needs_bias():
    img, txt = features()
    with pytest.raises(ValueError, match="init_logit_bias"):
        sigmoid_loss(img, txt, torch.tensor(10.0), None)


@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_itc_matches_open_clip(scale):
    img, txt = features(n=7, seed=2)
    s = torch.tensor(scale)
    torch.testing.assert_close(info_nce(img, txt, s), ClipLoss()(img, txt, s), rtol=1e-6, atol=1e-6)


def test_siglip_recipe_initialisation_and_objective():
    cfg = load_recipe(RECIPES / "siglip_tiny.yaml")
    model = build_model(cfg.model)
    # the paper's initialisation: temperature t' = log 10 (scale 10), bias -10
    assert model.scale().item() == pytest.approx(10.0, rel=1e-6)
    assert model.logit_bias.item() == pytest.approx(-10.0)
    objective = build_objective(cfg.loss)
    assert list(objective.terms) == ["sigmoid"]
    img, txt = features(n=4, e=cfg.model.embed_dim)
    out = type("Out", (), {"image_emb": img, "text_emb": txt, "logit_scale": model.scale(),
                           "logit_bias": model.logit_bias})()
    ref = SigLipLoss()(img, txt, model.scale(), model.logit_bias)
    torch.testing.assert_close(objective(out).total, ref)
