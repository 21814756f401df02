"""BLIP: the shared text transformer's three modes, hard negatives, LM loss, momentum distillation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_dict

from contrast.config import from_dict
from contrast.models import build_model
from contrast.models.blip import BlipModel
from contrast.objectives import build_objective, distilled_info_nce, hard_negative_indices, info_nce, lm_loss
from contrast.tokenizer import ClipTokenizer

TINY = tiny_model_dict("blip", text_layers=2)
CAPTIONS = ["a small red circle", "a large blue square above a small green star", "a small red circle",
            "a large white cross"]


def tiny_model(**blip) -> BlipModel:
    torch.manual_seed(0)
    return build_model(from_dict({"model": {**TINY, "blip": blip}}).model)


def batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    caps = (CAPTIONS * n)[:n]
    return {"pixels": torch.randn(n, 3, 16, 16, generator=g), "input_ids": ClipTokenizer(16)(caps)}


def test_output_layout():
    model = tiny_model()
    b = batch()
    out = model(b)
    B, ids = 4, b["input_ids"]
    assert out.itm.logits.shape == (3 * B, 2)
    assert out.itm.labels.tolist() == [1] * B + [0] * (2 * B)
    # packed LM targets: every caption's tokens after the start token, end-of-text included, in order
    n_tokens = (ids > 0).sum(dim=1)  # start .. end-of-text
    assert out.lm.logits.shape == (int((n_tokens - 1).sum()), model.text.vocab_size)
    for i in range(B):
        assert out.lm.targets[out.lm.rows == i].tolist() == ids[i, 1 : n_tokens[i]].tolist()
    assert model.text.vocab_size == ClipTokenizer(16).vocab_size + 3


def test_hard_negatives_skip_positive_and_identical_captions():
    model = tiny_model()
    b = batch()  # captions 0 and 2 are identical
    ids = b["input_ids"]
    same = (ids[:, None] == ids[None]).all(-1)
    for _ in range(8):
        out = model(b)
        for i in range(4):
            assert not same[i, out.itm.neg_text[i]], "an identical caption was drawn as a negative"
            assert not same[i, out.itm.neg_image[i]], "an image of an identical caption was drawn as a negative"


def test_hard_negative_draw_is_reproducible_and_follows_the_similarities():
    model = tiny_model(negatives_seed=7)
    b = batch()
    out = model(b)
    # the draw equals hard_negative_indices on the batch similarities with the documented generator
    g = torch.Generator().manual_seed(7 * 1_000_003 + 0)
    sim = out.logit_scale.detach() * out.image_emb.detach() @ out.text_emb.detach().t()
    ids = b["input_ids"]
    same = (ids[:, None] == ids[None]).all(-1)
    pos = torch.arange(4)
    assert out.itm.neg_text.tolist() == hard_negative_indices(sim, pos, exclude=same, generator=g).tolist()
    assert out.itm.neg_image.tolist() == hard_negative_indices(sim.t(), pos, exclude=same, generator=g).tolist()
    assert int(model.draws) == 1  # the next step draws with a fresh seed


def test_decoder_shares_everything_but_self_attention():
    model = tiny_model()
    b = batch()
    tokens = model.image_tokens(b["pixels"])
    enc = model.itm_logits(b["input_ids"], tokens).sum()
    dec = model.lm_logits(b["input_ids"], tokens).sum()
    text_params = dict(model.text.named_parameters())
    g_enc = torch.autograd.grad(enc, list(text_params.values()), allow_unused=True, retain_graph=True)
    g_dec = torch.autograd.grad(dec, list(text_params.values()), allow_unused=True)
    used_enc = {n for n, g in zip(text_params, g_enc) if g is not None and g.abs().sum() > 0}
    used_dec = {n for n, g in zip(text_params, g_dec) if g is not None and g.abs().sum() > 0}
    self_attn = {n for n in text_params if ".attn." in n or ".ln_1." in n}
    dec_self_attn = {n for n in text_params if ".dec_attn." in n or ".dec_ln_1." in n}
    assert self_attn and dec_self_attn
    assert used_enc == set(text_params) - dec_self_attn
    assert used_dec == set(text_params) - self_attn


def test_masks_causal_decoder_bidirectional_encoder_image_free_cls():
    model = tiny_model().eval()
    b = batch()
    tokens = model.image_tokens(b["pixels"])
    ids2 = b["input_ids"].clone()
    ids2[1, 4] = 320  # change one word of caption 1 (a long caption; position 4 is inside it)
    with torch.no_grad():
        dec1, dec2 = model.lm_logits(b["input_ids"], tokens), model.lm_logits(ids2, tokens)
        enc1, enc2 = model.text(b["input_ids"], "enc", tokens), model.text(ids2, "enc", tokens)
        cls_a = model.encode_text(b["input_ids"])
    assert torch.equal(dec1[1, :4], dec2[1, :4])  # earlier positions never see a later token
    assert not torch.allclose(dec1[1, 4:], dec2[1, 4:])
    assert not torch.allclose(enc1[1, 0], enc2[1, 0])  # [ENC] attends to the whole caption
    # the unimodal [CLS] path ignores the image; padding beyond end-of-text changes nothing
    b2 = batch(seed=1)
    out_a, out_b = model(b), model(b2)
    torch.testing.assert_close(out_a.text_emb, out_b.text_emb)
    torch.testing.assert_close(cls_a, out_a.text_emb)
    short = b["input_ids"][:, :12]
    torch.testing.assert_close(model.encode_text(short), cls_a, rtol=1e-5, atol=1e-6)


def test_lm_loss_is_label_smoothed_mean_per_caption():
    g = torch.Generator().manual_seed(0)
    V = 7
    logits = torch.randn(5, V, generator=g)
    targets = torch.tensor([1, 2, 3, 4, 5])
    rows = torch.tensor([0, 0, 0, 1, 1])
    logp = torch.log_softmax(logits, dim=1)
    eps = 0.1
    per = [-(1 - eps) * logp[k, targets[k]] - eps * logp[k].mean() for k in range(5)]
    expected = 0.5 * ((per[0] + per[1] + per[2]) / 3 + (per[3] + per[4]) / 2)
    torch.testing.assert_close(lm_loss(logits, targets, rows, 2, eps), expected)


def test_distilled_itc_limits():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    s = torch.tensor(5.0)
    # alpha 0, teacher == student, no queue: plain InfoNCE
    torch.testing.assert_close(distilled_info_nce(img, txt, s, img, txt, 0.0), info_nce(img, txt, s))
    # alpha 1 with a queue: cross-entropy against the teacher's softmax over batch + queue
    q_img = F.normalize(torch.randn(8, 8, generator=g), dim=-1)
    q_txt = F.normalize(torch.randn(8, 8, generator=g), dim=-1)
    t_img = F.normalize(img + 0.3 * torch.randn(4, 8, generator=g), dim=-1)
    t_txt = F.normalize(txt + 0.3 * torch.randn(4, 8, generator=g), dim=-1)
    all_img, all_txt = torch.cat([t_img, q_img]), torch.cat([t_txt, q_txt])
    p_i2t = torch.softmax(s * t_img @ all_txt.t(), dim=1)
    p_t2i = torch.softmax(s * t_txt @ all_img.t(), dim=1)
    expected = 0.5 * (F.cross_entropy(s * img @ all_txt.t(), p_i2t) + F.cross_entropy(s * txt @ all_img.t(), p_t2i))
    torch.testing.assert_close(distilled_info_nce(img, txt, s, all_img, all_txt, 1.0), expected)


def test_momentum_teacher_and_queue():
    model = tiny_model(momentum_distill=True, queue_size=8, momentum=0.9)
    b = batch()
    with torch.no_grad():
        model.text_proj.weight.add_(0.5)  # student moves away from the (copied) teacher
    old = model.teacher["text_proj"].weight.detach().clone()
    queue_before = model.image_queue.clone()
    out = model(b)
    new_teacher = model.teacher["text_proj"].weight
    torch.testing.assert_close(new_teacher, 0.9 * old + 0.1 * model.text_proj.weight.detach())
    # image tower unchanged since the copy, so teacher image features equal the student's; they are enqueued
    torch.testing.assert_close(model.image_queue[:4], out.image_emb.detach())
    torch.testing.assert_close(model.image_queue[4:], queue_before[4:])
    assert int(model.queue_ptr) == 4
    assert out.teacher.image_emb.shape == (4 + 8, 32)
    torch.testing.assert_close(out.teacher.image_emb[4:], queue_before)  # the queue as it was before this step
    loss = build_objective(from_dict({"loss": {"itc": 1.0, "itm": 1.0, "lm": 1.0}}).loss)(out)
    assert math.isfinite(loss.total.item()) and set(loss.parts) == {"itc", "itm", "lm"}
    model(b)
    assert int(model.queue_ptr) == 0  # wrapped around


def test_queue_size_must_be_a_multiple_of_the_batch():
    model = tiny_model(momentum_distill=True, queue_size=6)
    with pytest.raises(ValueError, match="queue_size 6 is not a multiple"):
        model(batch())


def test_itm_score_and_image_grounded_modes_need_images():
    model = tiny_model().eval()
    b = batch()
    with torch.no_grad():
        score = model.itm_score(b["pixels"], b["input_ids"])
        logits = model.itm_logits(b["input_ids"], model.image_tokens(b["pixels"]))
    assert score.shape == (4,)
    torch.testing.assert_close(score, logits[:, 1] - logits[:, 0])
    with pytest.raises(ValueError, match="needs image tokens"):
        model.text(b["input_ids"], "dec")
