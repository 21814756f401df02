"""Hugging Face CLIPModel / SiglipModel / Siglip2Model folders imported into a contrast run give the library's own
image and text embeddings (within 1e-5), its zero-shot predictions through ``contrast eval zeroshot``, and export back
to Hugging Face's vision layout tensor for tensor."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from import_helpers import check_zeroshot, max_diff, word_tokenizer
from safetensors.torch import load_file

from contrast.cli import main as cli_main
from contrast.export import import_checkpoint
from contrast.runs import load
from contrast.towers.convert import ConversionError

SIZE, PATCH, CTX = 32, 8, 16


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():  # transformers zero-inits biases and sets LayerNorms to 1 / 0: make every tensor matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _sizes(vocab: int, **text) -> tuple[dict, dict]:
    t = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=CTX, pad_token_id=0, bos_token_id=2, eos_token_id=3, **text)
    v = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, patch_size=PATCH)
    return t, v


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object


def _folder(tmp_path, kind: str):
    """A saved tiny model with random weights; its tokenizer in the folder, or (SigLIP 2, whose model type would make
    transformers rebuild the word-level test tokenizer as a Gemma one) in ``tmp_path / "tokenizer"``."""
    folder = tmp_path / kind
    vocab = word_tokenizer(tmp_path / "tokenizer" if kind == "siglip2" else folder, CTX)
    t, v = _sizes(vocab)
    if kind == "clip":
        cfg = transformers.CLIPConfig(text_config=t, vision_config=dict(v, image_size=SIZE), projection_dim=24)
        model = transformers.CLIPModel(cfg)
    elif kind == "siglip":
        cfg = transformers.SiglipConfig(text_config=t, vision_config=dict(v, image_size=SIZE))
        model = transformers.SiglipModel(cfg)
    else:
        cfg = transformers.Siglip2Config(text_config=t, vision_config=dict(v, num_patches=(SIZE // PATCH) ** 2))
        model = transformers.Siglip2Model(cfg)
    model = _perturb(model)
    model.save_pretrained(str(folder))
    return folder, model


def _tokenize(folder, pad_to_context: bool):
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    padding = "max_length" if pad_to_context else "longest"
    return lambda texts: tok(texts, padding=padding, max_length=CTX, truncation=True, return_tensors="pt")["input_ids"]


def _siglip2_image(model):
    """Siglip2Model reads (B, N, P*P*C) patches flattened row, column, channel, with a mask and the grid shape."""
    g = SIZE // PATCH

    def encode(x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        patches = x.reshape(B, 3, g, PATCH, g, PATCH).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, -1)  # (B, N, P*P*C)
        mask = torch.ones(B, g * g, dtype=torch.long)
        shapes = torch.tensor([[g, g]] * B)
        return _features(model.get_image_features(pixel_values=patches, pixel_attention_mask=mask,
                                                  spatial_shapes=shapes))
    return encode


@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip2"])
def test_hf_folder_imports_with_equal_embeddings_and_zeroshot(tmp_path, kind):
    folder, hf = _folder(tmp_path, kind)
    tok_dir = tmp_path / "tokenizer" if kind == "siglip2" else None
    run = import_checkpoint(folder, tmp_path / "run", tokenizer=tok_dir)
    ours, _, tokenizer = load(run)
    tokenize = _tokenize(tok_dir or folder, pad_to_context=kind != "clip")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, SIZE, SIZE, generator=g)
    ids = tokenize(["a circle", "a picture of a red star", "a cross"])
    assert torch.equal(tokenizer(["a circle", "a picture of a red star", "a cross"]), ids)  # the folder's tokenizer
    encode_image = _siglip2_image(hf) if kind == "siglip2" else lambda p: _features(hf.get_image_features(pixel_values=p))
    mask = (ids != 0).long() if kind == "clip" else None  # SigLIP attends to its padding, as it was trained
    with torch.no_grad():
        d_img = max_diff(ours.encode_image(x, normalize=False), encode_image(x))
        d_txt = max_diff(ours.encode_text(ids, normalize=False),
                         _features(hf.get_text_features(input_ids=ids, attention_mask=mask)))
    assert d_img < 1e-5 and d_txt < 1e-5, (d_img, d_txt)
    assert float(ours.logit_scale) == pytest.approx(float(hf.logit_scale))
    if kind != "clip":
        assert float(ours.logit_bias) == pytest.approx(float(hf.logit_bias))
    text = lambda i: _features(hf.get_text_features(input_ids=i))  # noqa: E731
    lib, cli = check_zeroshot(run, tmp_path, SIZE, encode_image, text, tokenize)
    assert lib == cli


def test_wrong_pooling_is_detectable(tmp_path):
    """The comparison above can fail: pooling the highest id (not the first end-of-text id) changes the text."""
    folder, hf = _folder(tmp_path, "clip")
    run = import_checkpoint(folder, tmp_path / "run")
    ours, _, tokenizer = load(run)
    ids = tokenizer(["a circle", "a picture of a red star"])
    ours.text.cfg.pool = "eot"
    with torch.no_grad():
        assert max_diff(ours.encode_text(ids, normalize=False), _features(hf.get_text_features(input_ids=ids))) > 1e-3


def test_hf_clip_export_round_trips_the_vision_tensors(tmp_path):
    folder, hf = _folder(tmp_path, "clip")
    run = import_checkpoint(folder, tmp_path / "run")
    assert cli_main(["export", "--checkpoint", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    orig = {k: v for k, v in hf.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    orig = {k: v for k, v in orig.items() if not k.endswith("position_ids")}
    assert set(back) == set(orig)
    assert all(torch.equal(back[k], orig[k]) for k in orig)


def test_siglip_export_round_trips_the_vision_tensors(tmp_path):
    folder, hf = _folder(tmp_path, "siglip")
    run = import_checkpoint(folder, tmp_path / "run")
    assert cli_main(["export", "--checkpoint", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    orig = {k: v for k, v in hf.vision_model.state_dict().items() if not k.endswith("position_ids")}
    back = {k.removeprefix("vision_model."): v for k, v in back.items()}
    assert set(back) == set(orig)
    assert all(torch.equal(back[k], orig[k]) for k in orig)


def test_refusals_name_the_part(tmp_path):
    folder, _ = _folder(tmp_path, "clip")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()
    with pytest.raises(ConversionError, match="no tokenizer in .*--tokenizer DIR"):
        import_checkpoint(folder, tmp_path / "run")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match="model_type 'bert' is not an image-text dual encoder"):
        import_checkpoint(bert, tmp_path / "run2")


def test_cli_import_lists_what_it_reads_and_imports_a_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["import", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for family in ("CLIPModel", "SiglipModel", "Siglip2Model", "open_clip", "ConvNeXt", "EVA", "RN50", "OpenAI"):
        assert family in help_text
    folder, hf = _folder(tmp_path, "siglip")
    assert cli_main(["import", "--weights", str(folder), "--out", str(tmp_path / "run")]) == 0
    ours, _, tokenizer = load(tmp_path / "run")
    ids = tokenizer(["a star"])
    assert ids.shape == (1, CTX)  # SigLIP pads to its context: it pools the last position
    with torch.no_grad():
        assert max_diff(ours.encode_text(ids, normalize=False), _features(hf.get_text_features(input_ids=ids))) < 1e-5
    assert cli_main(["import", "--weights", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
