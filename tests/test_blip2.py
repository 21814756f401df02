"""BLIP-2 stage 1 / stage 2: loss terms against hand computations, frozen parts, decoders, saved features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from contrast.config import from_dict
from contrast.models import build_model
from contrast.models.blip2 import Blip2Stage1, Blip2Stage2, CaptionLM
from contrast.models.lm import packed_targets
from contrast.objectives import build_objective, info_nce, similarity
from contrast.runs import build

TOWER = {"name": "vit_tiny_patch16_224", "image_size": 16,
         "kwargs": {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}}


def _cfg(kind="blip2_stage1", decoder=None, loss=None, features=None, steps=3):
    blip2 = {"decoder": decoder or {"width": 32, "layers": 1, "heads": 2, "max_positions": 32}}
    if features:
        blip2["features"] = str(features)
    return from_dict({
        "model": {"kind": kind, "embed_dim": 24, "image": TOWER, "text": {"context_length": 12},
                  "qformer": {"num_queries": 4, "width": 32, "layers": 2, "heads": 2}, "blip2": blip2},
        # saved features are of un-augmented images: the through-tower runs compared with them take the same pixels
        "data": {"synthetic": {"train_size": 48, "val_size": 8, "test_size": 16}, "augment": {"enabled": False}},
        "loss": loss or {"itc": 1.0, "itm": 1.0, "lm": 1.0},
        "train": {"steps": steps, "batch_size": 8, "warmup_steps": 1, "checkpoint_every": 0, "log_every": 1,
                  "lr": 1e-3},
    })


def _batch(n=6):
    from contrast.tokenizer import ClipTokenizer

    caps = ["a red circle", "a blue square", "a red circle", "a large green star", "a purple cross",
            "a small white diamond above a red circle"][:n]
    return {"pixels": torch.randn(n, 3, 16, 16), "input_ids": ClipTokenizer(12)(caps)}


def test_packed_targets_by_hand():
    ids = torch.tensor([[49406, 5, 6, 49407, 0, 0], [49406, 7, 49407, 0, 0, 0]])
    where, targets, rows = packed_targets(ids)
    next_token_targets = ids[:, 1:].masked_fill(~where, -100)  # the (B, T-1) targets, -100 where none
    assert next_token_targets.tolist() == [[5, 6, 49407, -100, -100], [7, 49407, -100, -100, -100]]
    assert where.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert targets.tolist() == [5, 6, 49407, 7, 49407] and rows.tolist() == [0, 0, 0, 1, 1]


def _packed_rows(ids: torch.Tensor) -> list[int]:
    """Caption number of every predicted token: caption i has (end-of-text position) targets."""
    return [i for i, n in enumerate(ids.argmax(-1).tolist()) for _ in range(n)]


def test_itc_max_over_queries_matches_hand_computation():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 4, 5), dim=-1)
    txt = F.normalize(torch.randn(3, 5), dim=-1)
    scale = torch.tensor(7.0)
    sim = torch.empty(3, 3)
    for i in range(3):
        for j in range(3):
            sim[i, j] = max(float(img[i, q] @ txt[j]) for q in range(4))
    labels = torch.arange(3)
    want = 0.5 * (F.cross_entropy(scale * sim, labels) + F.cross_entropy(scale * sim.t(), labels))
    torch.testing.assert_close(info_nce(img, txt, scale), want)
    assert torch.allclose(similarity(img, txt), sim, atol=1e-6)


def test_itc_max_over_queries_local_loss_under_gather():
    """Two ranks' local losses (gathering the other half) average to the loss on the whole batch."""
    torch.manual_seed(1)
    img, txt, scale = F.normalize(torch.randn(4, 3, 5), dim=-1), F.normalize(torch.randn(4, 5), dim=-1), 5.0
    full = info_nce(img, txt, torch.tensor(scale))
    halves = [(img[:2], txt[:2]), (img[2:], txt[2:])]

    def gather(x):  # what gather_with_grad returns on either rank: both halves in rank order
        return torch.cat([h[0] for h in halves]) if x.ndim == 3 else torch.cat([h[1] for h in halves])

    per_rank = [info_nce(i, t, torch.tensor(scale), gather=gather, rank=r) for r, (i, t) in enumerate(halves)]
    torch.testing.assert_close(sum(per_rank) / 2, full)


def test_stage1_output_and_itm_hard_negatives():
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg.model)
    assert isinstance(model, Blip2Stage1)
    batch = _batch()
    out = model(batch)
    B, Q = 6, 4
    assert out.image_emb.shape == (B, Q, 24) and out.text_emb.shape == (B, 24)
    assert torch.allclose(out.image_emb.norm(dim=-1), torch.ones(B, Q), atol=1e-5)
    assert out.itm.logits.shape == (3 * B, 2)
    assert out.itm.labels.tolist() == [1] * B + [0] * (2 * B)
    rows = _packed_rows(batch["input_ids"])
    assert out.lm.logits.shape == (len(rows), cfg.model.text.vocab_size + 1) and out.lm.rows.tolist() == rows
    assert out.lm.num_captions == B
    # padding columns after the longest caption change nothing (hard negatives drawn with the same seed)
    longest = int(batch["input_ids"].argmax(-1).max()) + 1
    torch.manual_seed(3)
    a = model(batch)
    torch.manual_seed(3)
    b = model({**batch, "input_ids": batch["input_ids"][:, :longest]})
    for part in (lambda o: o.image_emb, lambda o: o.text_emb, lambda o: o.itm.logits, lambda o: o.lm.logits):
        torch.testing.assert_close(part(a), part(b), atol=1e-5, rtol=1e-5)
    # the ITM rows are the head averaged over queries for (image, text), (image, negative text), (negative image, text)
    torch.manual_seed(5)
    out = model(batch)
    feats = model.image_features(batch)
    ids = batch["input_ids"]
    with torch.no_grad():
        pos = model.itm_logits(feats, ids)
    torch.testing.assert_close(out.itm.logits[:B], pos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.itm_score(batch["pixels"], ids), pos[:, 1] - pos[:, 0], atol=1e-5, rtol=1e-5)
    # each negative row matches some (image j, text k) pair with differing captions, never the positive
    with torch.no_grad():
        jj, kk = torch.meshgrid(torch.arange(B), torch.arange(B), indexing="ij")
        table = model.itm_logits(feats[jj.flatten()], ids[kk.flatten()]).view(B, B, 2)  # (image, text, 2)
    for r in range(B, 3 * B):
        i = r % B
        hits = (table - out.itm.logits[r]).abs().amax(-1) < 1e-5  # (B, B)
        if r < 2 * B:  # (image i, hard-negative text)
            found = [(i, k) for k in range(B) if hits[i, k]]
        else:  # (hard-negative image, text i)
            found = [(j, i) for j in range(B) if hits[j, i]]
        assert found, r
        assert all(not torch.equal(ids[j], ids[k]) for j, k in found), (r, found)


def test_stage1_objective_and_frozen_tower():
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg.model).train()
    assert not model.tower.training, "the frozen tower stays in eval mode"
    assert not any(p.requires_grad for p in model.tower.parameters())
    losses = build_objective(cfg.loss)(model(_batch()))
    assert set(losses.parts) == {"itc", "itm", "lm"}
    # untrained: ITC near log(B) (identical captions 0 and 2 aside), ITM near log 2, ITG near log(V)
    assert abs(float(losses.parts["itc"]) - math.log(6)) < 0.3
    assert abs(float(losses.parts["itm"]) - math.log(2)) < 0.3
    assert abs(float(losses.parts["lm"]) - math.log(49409)) < 1.0
    losses.total.backward()
    assert model.qformer.query_tokens.grad is not None and model.itm_head.weight.grad is not None


def test_training_from_features_equals_training_through_tower(tmp_path):
    from contrast.data import load_source
    from contrast.data.transforms import build_transform
    from contrast.features import FeatureShards, extract
    from contrast.runs import frozen_tower
    from contrast.train.loop import train

    cfg = _cfg()
    through = train(cfg, tmp_path / "tower", progress=False)
    torch.manual_seed(cfg.train.seed)
    tower = frozen_tower(cfg.model)
    ds = load_source(cfg.data, "train", cfg.model.image.image_size)
    tf = build_transform(cfg.model.image)
    extract(tower, ds, tf, tmp_path / "feats", "train", batch_size=16, shard_size=20, progress=False,
            image_cfg=cfg.model.image)
    shards = FeatureShards(tmp_path / "feats", "train")
    assert len(shards) == 48 and len(shards.paths) == 3  # 20 + 20 + 8 rows
    with torch.no_grad():
        for i in (0, 19, 20, 47):  # rows on both sides of a shard boundary
            want = tower.forward_tokens(tf(ds[i]["image"])[None])[0]
            torch.testing.assert_close(shards[i]["image_feats"], want)
            assert shards[i]["caption"] == ds[i]["caption"]
    from_feats = train(_cfg(features=tmp_path / "feats"), tmp_path / "feats_run", progress=False)
    assert len(through.losses) == len(from_feats.losses) == 3
    for (s1, l1), (s2, l2) in zip(through.losses, from_feats.losses):
        assert s1 == s2 and l1 == pytest.approx(l2, abs=1e-5)


def test_features_cli_and_errors(tmp_path):
    import yaml

    from contrast.cli import main
    from contrast.config import to_dict
    from contrast.features import FeatureError, FeatureShards, build_feature_data

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(_cfg())))
    assert main(["features", "extract", "--recipe", str(recipe), "--split", "test", "--out", str(tmp_path / "f"),
                 "--shard-size", "10"]) == 0
    rows = FeatureShards(tmp_path / "f", "test")
    assert len(rows) == 16 and rows.width == 32 and rows[15]["image_feats"].shape == (5, 32)  # 4 patches + cls
    with pytest.raises(FeatureError, match="not 'train'"):
        FeatureShards(tmp_path / "f", "train")
    with pytest.raises(FeatureError, match="features directory"):
        FeatureShards(tmp_path, "test")
    other = _cfg(features=tmp_path / "f")
    other.model.image.image_size = 32
    with pytest.raises(FeatureError, match="image_size"):
        build_feature_data(other, None, "test")
    assert main(["features", "extract", "--out", str(tmp_path / "g")]) == 2  # no tower source


# --------------------------------------------------------------------------------------------------- stage 2

def _decoders(tmp_path) -> dict:
    from lm_fixtures import hf_config, make_tokenizer

    tok = str(make_tokenizer(tmp_path / "tok"))
    return {
        "own": {"width": 32, "layers": 1, "heads": 2, "max_positions": 32},
        "gpt2": {"source": "hf", "hf_config": hf_config("gpt2"), "tokenizer": tok},
        "llama": {"source": "hf", "hf_config": hf_config("llama"), "tokenizer": tok},
    }


CAPTIONS = ["a red circle", "a blue square", "a red circle", "a large green star", "a purple cross",
            "a small white diamond above a red circle"]


def _prompted(model, n=6):
    return {**model.text_tokenizer()(CAPTIONS[:n]), "pixels": torch.randn(n, 3, 16, 16)}


@pytest.mark.parametrize("decoder", ["own", "gpt2", "llama"])
def test_stage2_trains_only_qformer_and_projection(decoder, tmp_path):
    torch.manual_seed(0)
    cfg = _cfg("blip2_stage2", decoder=_decoders(tmp_path)[decoder], loss={"itc": 0.0, "lm": 1.0})
    model = build(cfg.model).train()
    assert isinstance(model, Blip2Stage2) and not model.lm.training and not model.tower.training
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"qformer", "proj"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = _prompted(model)
    out = model(batch)
    answer_tokens = int((batch["labels"][:, 1:] != -100).sum())
    assert out.lm.logits.shape == (answer_tokens, model.lm.vocab_size) and out.lm.num_captions == 6
    build_objective(cfg.loss)(out).total.backward()
    opt.step()
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"qformer", "proj"}


@pytest.mark.parametrize("decoder", ["own", "gpt2"])
def test_stage2_prompt_reaches_decoder_and_no_prompt_is_plain_lm(decoder, tmp_path):
    torch.manual_seed(0)
    decoders = _decoders(tmp_path)
    cfg = _cfg("blip2_stage2", decoder=decoders[decoder], loss={"itc": 0.0, "lm": 1.0})
    model = build(cfg.model).eval()
    lm = build(_cfg("caption_lm", decoder=decoders[decoder], loss={"itc": 0.0, "lm": 1.0}).model).eval()
    assert isinstance(lm, CaptionLM)
    lm.lm.load_state_dict(model.lm.state_dict())
    batch = _prompted(model)
    alone_batch = lm.text_tokenizer()(CAPTIONS)
    with torch.no_grad():
        plain, alone = model.text_only(batch), lm(alone_batch)
        torch.testing.assert_close(plain.lm.logits, alone.lm.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain.lm.targets, alone.lm.targets)
        # with the prompt, text logits change, and they equal the decoder run on [prompt; text] embeddings by hand
        prompted = model(batch)
        assert not torch.allclose(prompted.lm.logits, plain.lm.logits)
        prompt = model.proj(model.qformer.encode_queries(model.tower.forward_tokens(batch["pixels"])))
        x = torch.cat([prompt, model.lm.embed(alone_batch["input_ids"])], dim=1)  # the soft prompt goes first
        mask = torch.cat([torch.ones(6, 4, dtype=torch.long), alone_batch["attention_mask"]], dim=1)
        h, _ = model.lm.hidden(x, mask)
        where = alone_batch["labels"][:, 1:] != -100
        torch.testing.assert_close(prompted.lm.logits, model.lm.logits(h[:, 4:-1][where]), atol=1e-5, rtol=1e-5)


def test_stage2_loads_stage1_and_decoder_runs(tmp_path):
    from contrast.train.loop import train

    s1 = train(_cfg(steps=1), tmp_path / "s1", progress=False)
    dec = train(_cfg("caption_lm", loss={"itc": 0.0, "lm": 1.0}, steps=1), tmp_path / "dec", progress=False)
    cfg = _cfg("blip2_stage2", loss={"itc": 0.0, "lm": 1.0}, steps=1)
    cfg.model.blip2.stage1 = str(s1.run_dir)
    cfg.model.blip2.decoder.weights = str(dec.run_dir)
    import contrast

    stage1 = contrast.load(s1.run_dir)[0]
    decoder_lm = contrast.load(dec.run_dir)[0]
    model = build(cfg.model)
    for name, t in stage1.qformer.state_dict().items():
        torch.testing.assert_close(model.qformer.state_dict()[name], t)
    for name, t in decoder_lm.lm.state_dict().items():
        torch.testing.assert_close(model.lm.state_dict()[name], t)
    assert set(model.rebuilt_prefixes) == {"lm.", "tower."}  # frozen and rebuilt from those runs: not checkpointed
    bad = _cfg("blip2_stage2")
    bad.model.blip2.stage1 = str(dec.run_dir)
    with pytest.raises(ValueError, match="blip2_stage1 run"):
        build(bad.model)
