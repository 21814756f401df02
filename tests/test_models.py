"""One contract over every model family: built from its config, a forward returns a ModelOutput whose parts match the
family's default loss terms, and each declared capability works (and undeclared ones refuse clearly)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_dict

from contrast.config import FAMILIES, from_dict
from contrast.models import Model, ModelOutput, build_model
from contrast.objectives import build_objective
from contrast.tokenizer import ClipTokenizer

SMALL_DECODER = {"width": 32, "layers": 1, "heads": 2, "max_positions": 32}
EXTRA = {
    "blip": {},
    "blip2_stage1": {"qformer": {"num_queries": 4, "width": 32, "layers": 2, "heads": 2}},
    "blip2_stage2": {"qformer": {"num_queries": 4, "width": 32, "layers": 2, "heads": 2},
                     "blip2": {"decoder": SMALL_DECODER}},
    "caption_lm": {"blip2": {"decoder": SMALL_DECODER}},
    "decoder": {"bridge": {"decoder": SMALL_DECODER, "layer": -1}},
    "clip": {},
}
CAPTIONS = ["a small red circle", "a large blue square", "a small green triangle", "a large white star"]


def _model(kind: str) -> tuple[Model, object]:
    cfg = from_dict({"model": {**tiny_model_dict(kind), **EXTRA[kind]}})
    torch.manual_seed(0)
    return build_model(cfg.model), cfg


def _batch(model: Model | None = None) -> dict[str, torch.Tensor]:
    """Four images and captions; a decoder model's captions through its own prompt tokenizer."""
    g = torch.Generator().manual_seed(0)
    text = model.text_tokenizer()(CAPTIONS) if model is not None and model.supports("decoder") else {
        "input_ids": ClipTokenizer(16)(CAPTIONS)}
    return {"pixels": torch.randn(4, 3, 16, 16, generator=g), **text}


def test_every_family_is_covered():
    assert set(EXTRA) == set(FAMILIES)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_forward_feeds_the_family_default_objective(kind):
    model, cfg = _model(kind)
    assert isinstance(model, Model)
    out = model(_batch(model))
    assert isinstance(out, ModelOutput)
    losses = build_objective(cfg.loss)(out)  # the family's default terms all find their parts
    assert torch.isfinite(losses.total) and set(losses.parts) == {
        n for n in ("itc", "sigmoid", "itm", "lm") if getattr(cfg.loss, n) > 0}
    losses.total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_capabilities_are_what_the_model_declares(kind):
    model, _ = _model(kind)
    model.eval()
    b = _batch(model)
    with torch.no_grad():
        if model.supports("embed"):
            img, txt = model.encode_image(b["pixels"]), model.encode_text(b["input_ids"])
            sim = model.similarity(img, txt)
            assert sim.shape == (4, 4)
            assert torch.allclose(txt.norm(dim=-1), torch.ones(4), atol=1e-5)
        else:
            with pytest.raises(NotImplementedError, match="does not embed"):
                model.encode_text(b["input_ids"])
        if model.supports("itm"):
            assert model.itm_score(b["pixels"], b["input_ids"]).shape == (4,)
        else:
            with pytest.raises(NotImplementedError, match="matching head"):
                model.itm_score(b["pixels"], b["input_ids"])
        if model.supports("caption"):
            tokens = model.image_tokens(b["pixels"])
            logits = model.lm_logits(b["input_ids"][:, :5], tokens)
            assert logits.shape[:2] == (4, 5)
        if model.supports("bridge"):
            assert model.bridge_state()
        else:
            with pytest.raises(NotImplementedError, match="bridge"):
                model.bridge_state()


def test_a_missing_part_is_a_user_error_naming_it():
    from contrast.errors import UserError

    model, _ = _model("caption_lm")
    with pytest.raises(UserError, match="CaptionLM has no image tower"):
        _ = model.image_tower
    with pytest.raises(UserError, match="CaptionLM does not embed images"):
        model.encode_image(_batch()["pixels"])


def test_a_loss_the_model_cannot_produce_is_named():
    model, _ = _model("caption_lm")
    loss = from_dict({"model": {"kind": "caption_lm"}, "loss": {"itm": 1.0}}).loss
    with pytest.raises(ValueError, match="loss.itm is on but this model produces no itm"):
        build_objective(loss)(model(_batch(model)))
