"""open_clip / OpenAI-layout CLIP checkpoints imported into our dual encoder give open_clip's own embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from open_clip.model import CLIP
from safetensors.torch import save_file

from contrast.export import import_checkpoint
from contrast.models import build_model
from contrast.runs import load
from contrast.towers.convert import ConversionError, import_clip

CONFIGS = [  # two sizes, QuickGELU (OpenAI-style) and GELU
    dict(embed_dim=32, quick_gelu=True,
         vision_cfg=dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32),
         text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2)),
    dict(embed_dim=24, quick_gelu=False,
         vision_cfg=dict(layers=1, width=48, head_width=24, patch_size=16, image_size=32, mlp_ratio=2.0),
         text_cfg=dict(context_length=12, vocab_size=49408, width=48, heads=4, layers=1)),
]


def _open_clip(cfg: dict) -> CLIP:
    torch.manual_seed(0)
    m = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"], quick_gelu=cfg["quick_gelu"])
    with torch.no_grad():  # open_clip zero-inits some biases; make every tensor matter
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.eval()


def _inputs(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    s, T = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    ids = torch.randint(1, 49000, (3, T), generator=g)
    for i, end in enumerate((3, T // 2, T - 1)):  # end-of-text at different positions, zero padding after
        ids[i, end] = 49407
        ids[i, end + 1 :] = 0
    return torch.randn(3, 3, s, s, generator=g), ids


@pytest.mark.parametrize("cfg", CONFIGS, ids=["quickgelu_w64", "gelu_w48"])
def test_imported_open_clip_matches_open_clip(tmp_path, cfg):
    oc = _open_clip(cfg)
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(weights))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    run = import_checkpoint(weights, tmp_path / "run", open_clip_config=tmp_path / "open_clip_config.json")
    ours, _, _ = load(run)
    x, ids = _inputs(cfg)
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(x), oc.encode_image(x, normalize=True), atol=1e-5)
        assert torch.allclose(ours.encode_text(ids), oc.encode_text(ids, normalize=True), atol=1e-5)
        assert torch.allclose(ours.encode_image(x, normalize=False), oc.encode_image(x), atol=1e-5)
        assert float(ours.logit_scale) == pytest.approx(float(oc.logit_scale))


def test_openai_layout_without_config_uses_quickgelu_and_64_wide_heads(tmp_path):
    cfg = dict(embed_dim=32, quick_gelu=True,
               vision_cfg=dict(layers=1, width=128, head_width=64, patch_size=16, image_size=32),
               text_cfg=dict(context_length=8, vocab_size=49408, width=64, heads=1, layers=1))
    oc = _open_clip(cfg)
    torch.save(oc.state_dict(), tmp_path / "openai.pt")  # a plain state dict, as OpenAI's layout
    ours, _, _ = load(import_checkpoint(tmp_path / "openai.pt", tmp_path / "run"))
    x, ids = _inputs(cfg)
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(x), oc.encode_image(x, normalize=True), atol=1e-5)
        assert torch.allclose(ours.encode_text(ids), oc.encode_text(ids, normalize=True), atol=1e-5)


def test_wrong_activation_is_detectable():
    """The comparison above can fail: importing a QuickGELU model as GELU changes the embeddings."""
    cfg = CONFIGS[0]
    oc = _open_clip(cfg)
    sd, mcfg = import_clip(oc.state_dict(), quick_gelu=False, open_clip_cfg=cfg)
    wrong = build_model(mcfg).eval()
    wrong.load_state_dict(sd)  # strict: the converted state dict names every tensor of the dual encoder
    x, ids = _inputs(cfg)
    with torch.no_grad():
        assert (wrong.encode_image(x) - oc.encode_image(x, normalize=True)).abs().max() > 1e-4
        assert (wrong.encode_text(ids) - oc.encode_text(ids, normalize=True)).abs().max() > 1e-4


def test_unsupported_open_clip_options_are_refused():
    cfg = dict(CONFIGS[0], vision_cfg=dict(CONFIGS[0]["vision_cfg"], ls_init_value=1e-5))
    with pytest.raises(ConversionError, match="ls_init_value"):
        import_clip(_open_clip(CONFIGS[0]).state_dict(), quick_gelu=True, open_clip_cfg=cfg)
    with pytest.raises(ConversionError, match="not an open_clip"):
        import_clip({"foo": torch.zeros(1)}, quick_gelu=True)


def test_import_clip_gives_a_state_dict_and_a_config_without_building_a_model():
    cfg = CONFIGS[1]
    sd, mcfg = import_clip(_open_clip(cfg).state_dict(), quick_gelu=False, open_clip_cfg=cfg)
    assert isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())
    assert (mcfg.kind, mcfg.embed_dim, mcfg.text.width, mcfg.image.image_size) == ("clip", 24, 48, 32)
    assert sd["text.proj.weight"].shape == (24, 48) and sd["image.backbone.cls_token"].shape == (1, 1, 48)


def test_import_checkpoint_refuses_a_state_dict_that_does_not_fill_the_model(tmp_path):
    sd = _open_clip(CONFIGS[1]).state_dict()
    del sd["ln_final.bias"]
    torch.save(sd, tmp_path / "partial.pt")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": CONFIGS[1]}))
    with pytest.raises(ConversionError, match=r"does not fit the dual encoder: missing \['text.ln_final.bias'\]"):
        import_checkpoint(tmp_path / "partial.pt", tmp_path / "run", open_clip_config=tmp_path / "open_clip_config.json")
    assert not (tmp_path / "run").exists()


def test_torchscript_archive_and_unreadable_files(tmp_path):
    """OpenAI's released checkpoints are TorchScript archives: their state dict is read without running them."""
    from contrast.towers.convert import ConversionError, load_foreign_state_dict

    m = torch.jit.script(torch.nn.Linear(3, 2))
    m.save(str(tmp_path / "m.pt"))
    sd = load_foreign_state_dict(str(tmp_path / "m.pt"))
    assert set(sd) == {"weight", "bias"} and torch.equal(sd["weight"], m.weight.detach())
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="bad.pt"):
        load_foreign_state_dict(str(tmp_path / "bad.pt"))
