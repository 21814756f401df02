"""Exported towers reload in timm, Hugging Face and open_clip with our features (1e-5), refusals name the fitting formats."""

from __future__ import annotations

import json

import open_clip
import pytest
import timm
import torch
from safetensors.torch import load_file

from contrast.cli import main
from contrast.config import ClipModelConfig, ImageTowerConfig, TextTowerConfig
from contrast.export import (
    ExportError,
    ExportReport,
    _check,
    export_hf,
    export_open_clip,
    export_timm,
    import_checkpoint,
)
from contrast.models import build_model
from contrast.models.clip import DualEncoder
from contrast.runs import load_exported_tower

SIZES = {  # two random-init towers: CLIP-style pre-norm ViTs, GELU and QuickGELU; the first states its input size
    # only in image_size (the tower passes it to timm), the second also as timm's img_size
    "w64_d2_gelu": dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, pre_norm=True),
    "w32_d1_quickgelu": dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, pre_norm=True,
                             act_layer="quick_gelu", mlp_ratio=2.0),
}
ATOL = 1e-5


def _model(kwargs: dict, name: str = "vit_tiny_patch16_224", act: str = "gelu") -> DualEncoder:
    torch.manual_seed(0)
    cfg = ClipModelConfig(
        image=ImageTowerConfig(name=name, kwargs=kwargs, image_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)),
        text=TextTowerConfig(context_length=12, width=32, layers=1, heads=2, act=act),
        embed_dim=24,
    )
    m = build_model(cfg).eval()
    with torch.no_grad():  # timm zero-inits biases / class token; perturb so every tensor is exercised
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def _pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("size", SIZES, ids=list(SIZES))
def test_timm_export_loads_with_pretrained_cfg_overlay(tmp_path, size):
    m = _model(SIZES[size])
    export_timm(m.image, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    pc = cfg["pretrained_cfg"]
    assert pc["mean"] == pytest.approx([0.5, 0.4, 0.3]) and pc["input_size"] == [3, 32, 32]
    loaded = timm.create_model(
        cfg["architecture"], pretrained=True,
        pretrained_cfg_overlay=dict(pc, file=str(tmp_path / "model.safetensors")), **cfg["model_args"],
    ).eval()
    assert loaded.pretrained_cfg["file"].endswith("model.safetensors")
    x = _pixels()
    with torch.no_grad():
        assert torch.allclose(loaded.forward_features(x), m.image.forward_tokens(x), atol=ATOL)
        pooled = loaded(x)  # no classifier: timm's pooled features
        w = load_file(str(tmp_path / "projection.safetensors"))["weight"]
        assert torch.allclose(pooled @ w.t(), m.image.embed(x), atol=ATOL)
        tower = load_exported_tower(tmp_path)
        assert torch.allclose(tower.embed(x), m.image.embed(x), atol=ATOL)
    assert timm.data.resolve_data_config({}, model=loaded)["mean"] == pytest.approx((0.5, 0.4, 0.3))
    by_dir = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()  # config.json carries everything
    assert timm.data.resolve_data_config({}, model=by_dir)["std"] == pytest.approx((0.2, 0.25, 0.3))
    with torch.no_grad():
        assert torch.allclose(by_dir.forward_features(x), m.image.forward_tokens(x), atol=ATOL)


@pytest.mark.parametrize("size", SIZES, ids=list(SIZES))
def test_hf_clip_export_matches_ours(tmp_path, size):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    m = _model(SIZES[size])
    report = export_hf(m.image, tmp_path)
    assert set(report.checks) == {"last_hidden_state", "pooler_output", "image_embeds"}
    x = _pixels()
    with torch.no_grad():
        hf = CLIPVisionModel.from_pretrained(str(tmp_path)).eval()  # what LLaVA loads as its vision tower
        o = hf(pixel_values=x, output_hidden_states=True)
        depth = SIZES[size]["depth"]
        ours_hidden = m.image.forward_intermediates(x, list(range(depth)))
        for i in range(depth):  # hidden_states[0] is the embedding output; i + 1 is block i
            assert torch.allclose(o.hidden_states[i + 1], ours_hidden[i], atol=ATOL)
        post_ln = getattr(hf, "vision_model", hf).post_layernorm
        assert torch.allclose(post_ln(o.last_hidden_state), m.image.forward_tokens(x), atol=ATOL)
        emb = CLIPVisionModelWithProjection.from_pretrained(str(tmp_path)).eval()(pixel_values=x).image_embeds
        assert torch.allclose(emb, m.image.embed(x), atol=ATOL)
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert pre["image_mean"] == pytest.approx([0.5, 0.4, 0.3]) and pre["crop_size"] == {"height": 32, "width": 32}


@pytest.mark.parametrize("size", SIZES, ids=list(SIZES))
def test_open_clip_export_matches_ours(tmp_path, size):
    kwargs = SIZES[size]
    m = _model(kwargs, act="quick_gelu" if kwargs.get("act_layer") == "quick_gelu" else "gelu")
    export_open_clip(m, tmp_path)
    oc = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    x = _pixels()
    ids = torch.randint(1, 49000, (2, 12), generator=torch.Generator().manual_seed(2))
    ids[:, 7], ids[:, 8:] = 49407, 0
    with torch.no_grad():
        assert torch.allclose(oc.encode_image(x, normalize=True), m.encode_image(x), atol=ATOL)
        assert torch.allclose(oc.encode_text(ids, normalize=True), m.encode_text(ids), atol=ATOL)


def test_plain_timm_vit_folds_patch_bias_for_open_clip_and_is_refused_by_hf(tmp_path):
    m = _model(dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))  # no pre-norm, patch bias
    assert m.image.backbone.patch_embed.proj.bias is not None
    export_open_clip(m, tmp_path / "oc")
    oc = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    x = _pixels()
    with torch.no_grad():
        assert torch.allclose(oc.encode_image(x, normalize=True), m.encode_image(x), atol=ATOL)
    with pytest.raises(ExportError, match="pre-LayerNorm.*Formats that fit this tower: timm, open_clip"):
        export_hf(m.image, tmp_path / "hf")


def test_cnn_tower_fits_only_timm(tmp_path):
    # ConvNeXt averaged without its head's norm (pool default): no Hugging Face model, and open_clip's TimmModel
    # always runs the head (a CNN whose head is the average goes to open_clip: tests/test_export_open_clip_towers.py)
    m = _model({}, name="test_convnext")
    with pytest.raises(ExportError, match="no Hugging Face equivalent.*Formats that fit this tower: timm$"):
        export_hf(m.image, tmp_path / "hf")
    with pytest.raises(ExportError, match="Formats that fit: timm"):
        export_open_clip(m, tmp_path / "oc")
    export_timm(m.image, tmp_path / "timm")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = _pixels()
    with torch.no_grad():
        w = load_file(str(tmp_path / "timm" / "projection.safetensors"))["weight"]
        feats = loaded.forward_features(x).flatten(2).transpose(1, 2)  # (B, H*W, C): pooled our way, not by its head
        assert torch.allclose(m.image.pool(feats) @ w.t(), m.image.embed(x), atol=ATOL)


def test_siglip_style_tower_exports_to_siglip_vision_model(tmp_path):
    from transformers import SiglipVisionModel

    m = _model(dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
               name="vit_base_patch16_siglip_224")
    export_hf(m.image, tmp_path)
    x = _pixels()
    with torch.no_grad():
        o = SiglipVisionModel.from_pretrained(str(tmp_path)).eval()(pixel_values=x)
        assert torch.allclose(o.last_hidden_state, m.image.forward_tokens(x), atol=ATOL)
        w = load_file(str(tmp_path / "projection.safetensors"))["weight"]
        assert torch.allclose(o.pooler_output @ w.t(), m.image.embed(x), atol=ATOL)


def test_verification_rejects_a_mismatch(tmp_path):
    report = ExportReport("timm", tmp_path)
    _check(report, "same", torch.ones(2, 3), torch.ones(2, 3) + 1e-7)
    with pytest.raises(ExportError, match="max abs diff"):
        _check(report, "off", torch.ones(2, 3), torch.ones(2, 3) + 1e-3)


def test_export_cli_on_a_run_directory(tmp_path, capsys):
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(0)
    oc = CLIP(embed_dim=16, vision_cfg=dict(layers=1, width=64, head_width=64, patch_size=16, image_size=32),
              text_cfg=dict(context_length=8, vocab_size=49408, width=64, heads=1, layers=1), quick_gelu=True).eval()
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert main(["import", "--weights", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "run"),
                 "--quick-gelu", "yes"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "image_embeds" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_act"] == "quick_gelu"
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert import_checkpoint  # the import entry point is public API too
