"""open_clip export of the tower kinds beyond CLIP's ViT and text transformer: a timm trunk (CNN or a ViT open_clip's
own ViT cannot hold) and a Hugging Face text encoder. The run is built here from a config (a tiny BERT and its
word-level tokenizer in a folder, as the LiT recipe's MiniLM is), exported with ``contrast export``, loaded by a fresh
``open_clip.create_model("local-dir:...")`` whose encoders equal ours within 1e-5, and imported back with
``contrast import``: the same tensors, logit scale and bias as the original run."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from import_helpers import max_diff, word_tokenizer

from contrast.cli import main as cli_main
from contrast.config import ClipModelConfig, ImageTowerConfig, TextTowerConfig
from contrast.export import EXTRA_TENSORS, ExportError, export_open_clip
from contrast.import_checkpoints import import_checkpoint, write_run
from contrast.models import build_model
from contrast.runs import load, load_model

CTX = 16
TEXTS = ["a circle", "a picture of a red star", "a shape"]


def _bert(folder, kind: str = "bert") -> str:
    """A tiny random Hugging Face encoder (BERT, or DistilBERT which open_clip does not hold) with a word tokenizer."""
    import transformers

    vocab = word_tokenizer(folder, CTX)
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                            pad_token_id=0, max_position_embeddings=32)
    else:
        cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, pad_token_id=0, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(cfg).save_pretrained(str(folder))
    return str(folder)


CASES = {  # image tower, text tower (hf: the tiny BERT), logit bias (SigLIP-style runs have one)
    "cnn_hf": (dict(name="test_efficientnet", image_size=64), "hf", None),  # the LiT recipe's shape
    "vit_map_hf_siglip": (dict(name="test_vit3", image_size=160, proj_bias=True), "hf", -10.0),  # MAP head, registers
    "cnn_clip_text": (dict(name="test_resnet", image_size=64), "clip", None),  # open_clip's CLIP with a timm trunk
    "native_vit_clip_text": (dict(name="vit_base_patch16_clip_224", image_size=16, kwargs=dict(  # open_clip's own
        img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, act_layer="quick_gelu")), "clip", None),  # ViT, text
}
NATIVE_VIT_HF = (dict(name="vit_tiny_patch16_224", image_size=32, kwargs=dict(  # CLIP's layout: open_clip's own ViT
    patch_size=8, embed_dim=32, depth=1, num_heads=2, pre_norm=True, act_layer="quick_gelu")), "hf", None)


def _run(tmp_path, case: tuple):
    """A run directory holding a randomly perturbed dual encoder of ``case`` (a value of CASES), and its config."""
    image, text_kind, bias = case
    if text_kind == "hf":
        text = TextTowerConfig(kind="hf", hf_path=_bert(tmp_path / "bert"), context_length=CTX)
    else:
        text = TextTowerConfig(context_length=CTX, width=32, layers=1, heads=2, act="quick_gelu")
    mcfg = ClipModelConfig(image=ImageTowerConfig(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), **image), text=text,
                           embed_dim=24, init_logit_scale=2.5, init_logit_bias=bias)
    torch.manual_seed(0)
    model = build_model(mcfg)
    with torch.no_grad():  # zero biases, unit norms and BN statistics at init: make every tensor matter
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.02 * torch.randn_like(t))
    return write_run(mcfg, model.state_dict(), tmp_path / "run"), mcfg


def _export_and_compare(tmp_path, case: tuple):
    """Export the run of ``case`` with ``contrast export``; a fresh open_clip model from the folder embeds as ours."""
    run, mcfg = _run(tmp_path, case)
    out = tmp_path / "oc"
    assert cli_main(["export", "--checkpoint", str(run), "--format", "open_clip", "--out", str(out)]) == 0
    oc = open_clip.create_model(f"local-dir:{out}").eval()  # fresh: config, weights, HF encoder config from out
    tokenize = open_clip.get_tokenizer(f"local-dir:{out}")
    ours, _, own_tokenizer = load(run)
    size = mcfg.image.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    ids = tokenize(TEXTS)
    with torch.no_grad():
        assert max_diff(ours.encode_image(x, normalize=False), oc.encode_image(x)) < 1e-5
        assert max_diff(ours.encode_text(ids, normalize=False), oc.encode_text(ids)) < 1e-5
        assert max_diff(ours.encode_text(own_tokenizer(TEXTS), normalize=False), oc.encode_text(ids)) < 1e-5
    if mcfg.text.kind == "hf":  # self-contained: the encoder's config and tokenizer live in the export
        text_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
        assert text_cfg["hf_model_name"] == str((out / "text_encoder").resolve())
        assert (out / EXTRA_TENSORS).is_file()  # the encoder's unused pooler, which open_clip's model lacks
    return ours, oc, out


def test_native_vit_beside_a_hugging_face_text_tower_exports_to_open_clip(tmp_path):
    """open_clip's own ViT (QuickGELU: the quick_gelu flag) in a CustomTextCLIP with the HF encoder."""
    _export_and_compare(tmp_path, NATIVE_VIT_HF)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_tower_kinds_export_to_open_clip_and_import_back(tmp_path, case):
    ours, oc, out = _export_and_compare(tmp_path, CASES[case])
    back = load_model(import_checkpoint(out, tmp_path / "back"))
    orig, again = ours.state_dict(), back.state_dict()
    assert set(orig) == set(again)
    assert all(torch.equal(orig[k], again[k]) for k in orig), [k for k in orig if not torch.equal(orig[k], again[k])]
    assert back.logit_scale.item() == ours.logit_scale.item() == pytest.approx(oc.logit_scale.item())
    if CASES[case][2] is None:
        assert back.logit_bias is None and oc.logit_bias is None
    else:
        assert back.logit_bias.item() == ours.logit_bias.item() == pytest.approx(oc.logit_bias.item())


def _model(tmp_path, image: dict, text: str = "bert"):
    text_cfg = TextTowerConfig(kind="hf", hf_path=_bert(tmp_path / text, text), context_length=CTX)
    return build_model(ClipModelConfig(image=ImageTowerConfig(**image), text=text_cfg, embed_dim=24)).eval()


def test_refusals_name_the_part_and_the_formats_that_fit(tmp_path):
    # ConvNeXt's head normalises after its average: open_clip's TimmModel always runs it, our pool default does not
    m = _model(tmp_path, dict(name="test_convnext", image_size=64))
    with pytest.raises(ExportError, match=r"^the image tower does not fit open_clip: .*pool 'default' gives other "
                                          r"features than the own head of 'test_convnext'.*Formats that fit: timm$"):
        export_open_clip(m, tmp_path / "a")
    m.image.cfg.pool = "head"  # its own head pools as open_clip's TimmModel does: written
    assert "encode_image" in export_open_clip(m, tmp_path / "b").checks
    # a ViT at another input size than timm's default: TimmModel cannot pass img_size
    m = _model(tmp_path, dict(name="test_vit", image_size=64))
    with pytest.raises(ExportError, match=r"'test_vit' at image_size 64 differs from timm's default build"):
        export_open_clip(m, tmp_path / "c")
    # an encoder open_clip's HFTextEncoder does not know
    m = _model(tmp_path, dict(name="test_efficientnet", image_size=64), text="distilbert")
    with pytest.raises(ExportError, match=r"^the Hugging Face text tower does not fit open_clip's HFTextEncoder: a "
                                          r"'distilbert' encoder .*Formats that fit: timm$"):
        export_open_clip(m, tmp_path / "d")
