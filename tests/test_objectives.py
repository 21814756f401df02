import math

import torch
import torch.nn.functional as F

from contrast.objectives import hard_negative_indices, info_nce


def reference_info_nce(img, txt, scale):
    """InfoNCE written out with explicit sums over the batch, in float64."""
    img, txt = img.double().tolist(), txt.double().tolist()
    n = len(img)

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    total = 0.0
    for i in range(n):
        row = [scale * dot(img[i], txt[j]) for j in range(n)]
        col = [scale * dot(txt[i], img[j]) for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    return total / (2 * n)


def test_info_nce_matches_hand_computed_reference():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    for scale in (1.0, 14.3, 100.0):
        got = info_nce(img, txt, torch.tensor(scale))
        assert abs(got.item() - reference_info_nce(img, txt, scale)) < 1e-5


def test_info_nce_two_by_two_closed_form():
    # orthonormal pairs: every logit is 0 or s, so the loss is log(1 + e^-s)
    e = torch.eye(2)
    s = 3.0
    assert abs(info_nce(e, e, torch.tensor(s)).item() - math.log(1 + math.exp(-s))) < 1e-6


def test_hard_negatives_never_pick_the_positive_and_follow_softmax():
    sim = torch.tensor([[5.0, 1.0, 1.0], [0.0, 5.0, 3.0], [2.0, 2.0, 9.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([hard_negative_indices(sim, torch.arange(3), generator=g) for _ in range(4000)])
    assert (draws != torch.arange(3)).all()
    # row 1: weights proportional to e^0 and e^3 for columns 0 and 2
    p2 = math.exp(3) / (math.exp(0) + math.exp(3))
    assert abs((draws[:, 1] == 2).float().mean().item() - p2) < 0.03
    # row 0: columns 1 and 2 tie
    assert abs((draws[:, 0] == 1).float().mean().item() - 0.5) < 0.04
