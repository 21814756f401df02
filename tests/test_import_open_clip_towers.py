"""open_clip models of every tower kind, built by open_clip with random weights from its own configs (sizes shrunk
through create_model's overrides: a smaller timm trunk of the same family, a small text tower), imported into a
contrast run: image and text embeddings equal open_clip's within 1e-5 and zero-shot predictions through
``contrast eval zeroshot`` equal open_clip's own."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from import_helpers import CLASSES, TEMPLATES, check_zeroshot, max_diff, word_tokenizer
from safetensors.torch import load_file, save_file

from contrast.cli import main as cli_main
from contrast.export import import_checkpoint
from contrast.runs import load
from contrast.towers.convert import ConversionError

CTX = 16
SMALL_TEXT = dict(context_length=CTX, vocab_size=49408, width=32, heads=2, layers=1)


def _kind(name: str, tmp_path) -> tuple[str, dict]:
    """(open_clip config name, overrides) for one tower kind; overrides keep the kind and shrink the sizes."""
    base = open_clip.get_model_config(name)
    if name == "convnext_base":  # timm trunk + open_clip's linear head; ConvNeXt pools through its head norm
        return name, dict(embed_dim=32, text_cfg=SMALL_TEXT,
                          vision_cfg=dict(base["vision_cfg"], timm_model_name="convnext_atto"))
    if name == "EVA02-B-16":  # timm trunk whose own (biased) classifier is the projection; custom text tower
        return name, dict(embed_dim=32, text_cfg=SMALL_TEXT,
                          vision_cfg=dict(base["vision_cfg"], timm_model_name="eva02_tiny_patch14_224"))
    if name == "RN50":  # ModifiedResNet at 64 px: the attention pool over a 2 x 2 map
        return name, dict(embed_dim=64, text_cfg=SMALL_TEXT, vision_cfg=dict(base["vision_cfg"], image_size=64))
    if name == "ViT-B-16-SigLIP":  # SigLIP's text tower and tokenizer; a tiny timm ViT with its MAP head, proj none
        word_tokenizer(tmp_path / "tok", CTX)
        text = dict(base["text_cfg"], hf_tokenizer_name=str(tmp_path / "tok"), context_length=CTX, vocab_size=32,
                    width=48, heads=2, layers=2)
        vision = dict(base["vision_cfg"], timm_model_name="vit_tiny_patch16_224")
        return name, dict(embed_dim=192, text_cfg=text, vision_cfg=vision)
    raise ValueError(name)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():  # zero-initialised biases and unit norms: make every tensor matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def _save(model: torch.nn.Module, cfg: dict, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))


def _build(name: str, tmp_path):
    name, over = _kind(name, tmp_path)
    torch.manual_seed(0)
    model = _perturb(open_clip.create_model(name, pretrained=None, **over))
    cfg = {**open_clip.get_model_config(name), **over}
    _save(model, cfg, tmp_path / "oc")
    return model, cfg


def _tokenizer(cfg: dict):
    tc = cfg["text_cfg"]
    if tc.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(tc["hf_tokenizer_name"], context_length=CTX,
                                               **tc.get("tokenizer_kwargs", {}))
    return lambda texts: open_clip.tokenize(texts, context_length=CTX)


@pytest.mark.parametrize("name", ["convnext_base", "EVA02-B-16", "RN50", "ViT-B-16-SigLIP"])
def test_open_clip_tower_kind_imports_with_equal_embeddings_and_zeroshot(tmp_path, name):
    oc, cfg = _build(name, tmp_path)
    tok_dir = cfg["text_cfg"].get("hf_tokenizer_name")
    run = import_checkpoint(tmp_path / "oc", tmp_path / "run", tokenizer=tok_dir)
    ours, _, tokenizer = load(run)
    size = int(cfg["vision_cfg"]["image_size"])
    tokenize = _tokenizer(cfg)
    texts = ["a circle", "a picture of a star", "a cross"]
    ids = tokenize(texts)
    assert torch.equal(tokenizer(texts), ids)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d_img = max_diff(ours.encode_image(x, normalize=False), oc.encode_image(x))
        d_txt = max_diff(ours.encode_text(ids, normalize=False), oc.encode_text(ids))
    assert d_img < 1e-5 and d_txt < 1e-5, (d_img, d_txt)
    assert float(ours.logit_scale) == pytest.approx(float(oc.logit_scale))
    if getattr(oc, "logit_bias", None) is not None:
        assert float(ours.logit_bias) == pytest.approx(float(oc.logit_bias))
    lib, cli = check_zeroshot(run, tmp_path, size, oc.encode_image, oc.encode_text, tokenize)
    assert lib == cli


def test_open_clip_zeroshot_classifier_equals_ours(tmp_path):
    """open_clip's own zero-shot classifier builder and contrast's give the same class weights on the imported run."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from contrast.evaluate.zeroshot import zeroshot_classifier

    oc, cfg = _build("convnext_base", tmp_path)
    ours, _, tokenizer = load(import_checkpoint(tmp_path / "oc", tmp_path / "run"))
    with torch.no_grad():
        theirs = build_zero_shot_classifier(oc, _tokenizer(cfg), CLASSES, [lambda c, t=t: t.format(c) for t in TEMPLATES],
                                            num_classes_per_batch=None, device="cpu", use_tqdm=False)  # (E, C)
        assert max_diff(zeroshot_classifier(ours, tokenizer, CLASSES, TEMPLATES), theirs) < 1e-5


def test_hf_text_tower_imports(tmp_path):
    """open_clip's Hugging Face text tower (mean pooling, linear projection) from a local model folder."""
    import transformers

    folder = tmp_path / "bert"
    vocab = word_tokenizer(folder, CTX)
    transformers.BertModel(transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=64, pad_token_id=0,
                                                   max_position_embeddings=32)).save_pretrained(str(folder))
    cfg = dict(embed_dim=24, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
               text_cfg=dict(hf_model_name=str(folder), hf_tokenizer_name=str(folder), hf_pooler_type="mean_pooler",
                             hf_proj_type="linear", context_length=CTX))
    torch.manual_seed(0)
    oc = _perturb(open_clip.CustomTextCLIP(embed_dim=24, vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"]))
    _save(oc, cfg, tmp_path / "oc")
    run = import_checkpoint(tmp_path / "oc", tmp_path / "run")
    ours, _, tokenizer = load(run)
    tokenize = _tokenizer(cfg)
    ids = tokenize(["a circle", "a picture of a star"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(ours.encode_image(x, normalize=False), oc.encode_image(x)) < 1e-5
        assert max_diff(ours.encode_text(ids, normalize=False), oc.encode_text(ids)) < 1e-5
        assert max_diff(ours.encode_text(tokenizer(["a circle", "a picture of a star"]), normalize=False),
                        oc.encode_text(ids)) < 1e-5  # the run's own tokenizer pads shorter: same embeddings
    lib, cli = check_zeroshot(run, tmp_path, 32, oc.encode_image, oc.encode_text, tokenize)
    assert lib == cli


def test_native_vit_round_trips_through_open_clip_export(tmp_path):
    cfg = dict(embed_dim=24, quick_gelu=False, vision_cfg=dict(layers=1, width=48, head_width=24, patch_size=16,
                                                                 image_size=32), text_cfg=SMALL_TEXT)
    torch.manual_seed(0)
    oc = _perturb(open_clip.CLIP(**cfg))
    _save(oc, cfg, tmp_path / "oc")
    run = import_checkpoint(tmp_path / "oc", tmp_path / "run")
    assert cli_main(["export", "--checkpoint", str(run), "--format", "open_clip", "--out", str(tmp_path / "ex")]) == 0
    back = load_file(str(tmp_path / "ex" / "open_clip_model.safetensors"))
    orig = oc.state_dict()
    assert set(back) == set(orig) and all(torch.equal(back[k], orig[k]) for k in orig)


def test_refusals_name_the_part(tmp_path):
    name, over = _kind("convnext_base", tmp_path)
    over["vision_cfg"] = dict(over["vision_cfg"], timm_proj="mlp")
    oc = open_clip.create_model(name, pretrained=None, **over)
    _save(oc, {**open_clip.get_model_config(name), **over}, tmp_path / "mlp")
    with pytest.raises(ConversionError, match="timm_proj='mlp'"):
        import_checkpoint(tmp_path / "mlp", tmp_path / "run1")
    oc, cfg = _build("ViT-B-16-SigLIP", tmp_path)
    with pytest.raises(ConversionError, match="tokenizes with the Hugging Face tokenizer .*--tokenizer DIR"):
        import_checkpoint(tmp_path / "oc", tmp_path / "run2")
    cfg = dict(cfg, text_cfg=dict(cfg["text_cfg"], hf_model_name="roberta-base"))
    with pytest.raises(ConversionError, match="'roberta-base' is not a local Hugging Face folder"):
        from contrast.import_checkpoints import save_text_encoder

        save_text_encoder("roberta-base", {}, tmp_path / "enc", tmp_path / "tok")
