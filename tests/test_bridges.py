"""Bridges: tapped layers equal the tower's own block outputs, the projector is Linear-GELU-Linear, gates start shut."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from contrast.bridges import GatedCrossAttention, MultiLayerTaps, UnifiedBridge, select_tokens
from contrast.config import ImageTowerConfig
from contrast.towers import ImageTower


@pytest.fixture(scope="module")
def tower() -> ImageTower:
    torch.manual_seed(0)
    cfg = ImageTowerConfig(name="vit_tiny_patch16_224", image_size=32,
                           kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, pre_norm=True))
    return ImageTower(cfg, 16).eval()


def _block_outputs(tower: ImageTower, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output, by running timm's modules by hand (independent of forward_intermediates)."""
    b = tower.backbone
    h = b.norm_pre(b._pos_embed(b.patch_embed(x)))  # (B, 1 + N, D)
    outs = []
    for blk in b.blocks:
        h = blk(h)
        outs.append(h)
    return outs


def test_unified_bridge_taps_penultimate_layer_and_projects(tower):
    x = torch.randn(2, 3, 32, 32)
    ref = _block_outputs(tower, x)
    bridge = UnifiedBridge(tower.width, tower.num_prefix_tokens, 48, layer=-2, tokens="patch")
    with torch.no_grad():
        feats = bridge.features(tower, x)
        assert feats.shape == (2, 16, 32)  # 4x4 patches, class token dropped
        assert torch.allclose(feats, ref[-2][:, 1:], atol=1e-6)
        p = bridge.projector
        manual = F.linear(F.gelu(F.linear(feats, p.fc1.weight, p.fc1.bias)), p.fc2.weight, p.fc2.bias)
        out = bridge(feats)
        assert out.shape == (2, 16, 48) and torch.allclose(out, manual, atol=1e-6)
        both = UnifiedBridge(tower.width, tower.num_prefix_tokens, 48, tokens="cls_patch").features(tower, x)
        assert both.shape == (2, 17, 32) and torch.allclose(both, ref[-2], atol=1e-6)


def test_multi_layer_taps_concatenate_along_features(tower):
    x = torch.randn(2, 3, 32, 32)
    ref = _block_outputs(tower, x)
    taps = MultiLayerTaps(tower.width, 40, [0, -1])
    with torch.no_grad():
        feats = taps.features(tower, x)
        assert feats.shape == (2, 17, 64)
        assert torch.allclose(feats, torch.cat([ref[0], ref[2]], dim=-1), atol=1e-6)
        assert taps(feats).shape == (2, 17, 40)


def test_gated_cross_attention_is_identity_at_init_and_opens():
    torch.manual_seed(0)
    block = GatedCrossAttention(dim=32, heads=4, context_dim=24)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    assert torch.equal(block(x, ctx), x)  # tanh(0) = 0: exactly the input
    with torch.no_grad():
        block.gate_attn.fill_(0.5)
    y = block(x, ctx)
    assert (y - x).abs().max() > 1e-3
    expected = x + torch.tanh(torch.tensor(0.5)) * block.attn(block.ln_attn(x), context=ctx)  # MLP gate still shut
    assert torch.allclose(y, expected, atol=1e-6)
    y.sum().backward()
    assert block.gate_mlp.grad is not None and block.gate_attn.grad.abs() > 0


def test_gated_cross_attention_without_mlp():
    torch.manual_seed(0)
    block = GatedCrossAttention(dim=32, heads=4, context_dim=24, mlp_ratio=0)
    assert block.mlp is None and block.gate_mlp is None
    assert {n.split(".")[0] for n, _ in block.named_parameters()} == {"ln_attn", "attn", "gate_attn"}
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    assert torch.equal(block(x, ctx), x)
    with torch.no_grad():
        block.gate_attn.fill_(2.0)
        y = block(x, ctx)
        assert torch.allclose(y, x + torch.tanh(torch.tensor(2.0)) * block.attn(block.ln_attn(x), context=ctx), atol=1e-6)
    with pytest.raises(ValueError, match="xattn_mlp_ratio must be >= 0"):
        GatedCrossAttention(dim=32, heads=4, mlp_ratio=-1)


def test_select_tokens_refuses_cls_without_class_token():
    with pytest.raises(ValueError, match="class token"):
        select_tokens(torch.zeros(1, 4, 2), 0, "cls_patch")
    with pytest.raises(ValueError, match="patch, cls_patch"):
        select_tokens(torch.zeros(1, 4, 2), 1, "all")
