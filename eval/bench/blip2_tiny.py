"""BLIP-2 figures on the built-in shapes set: stage-1 retrieval and stage-2 caption loss with / without the prompt.

    python eval/bench/blip2_tiny.py --stage1 runs/blip2_stage1_tiny --stage2 runs/blip2_stage2_tiny \
        --decoder runs/blip2_decoder_tiny [--features runs/shapes_feats] [--split test]

Retrieval: every test image against every test caption, scored by the best query (ITC). A hit is a retrieved
caption identical to the image's own (captions repeat in this set); chance is the mean share of such captions.
Caption loss: plain next-token cross-entropy per token over the split, with the stage-2 visual prompt and without
it (the frozen decoder alone).
"""

from __future__ import annotations

import argparse

import torch

import contrast
from contrast.data import load_source
from contrast.evaluate.metrics import positive_mask, retrieval_ranks
from contrast.objectives import lm_nll
from contrast.runs import load_config_of


def _batches(cfg, split: str, features: str | None, preprocess, batch_size: int):
    """(image input, captions) batches: saved features when given, else preprocessed pixels."""
    if features:
        from contrast.features import FeatureShards

        rows = FeatureShards(features, split)
        for lo in range(0, len(rows), batch_size):
            items = [rows[i] for i in range(lo, min(len(rows), lo + batch_size))]
            yield torch.stack([r["image_feats"] for r in items]).float(), [r["caption"] for r in items]
        return
    ds = load_source(cfg.data, split, cfg.model.image.image_size)
    for lo in range(0, len(ds), batch_size):
        rows = ds[lo : lo + batch_size]
        yield torch.stack([preprocess(im) for im in rows["image"]]), list(rows["caption"])


@torch.no_grad()
def stage1_retrieval(run: str, split: str, features: str | None, batch_size: int = 250) -> dict:
    cfg, _ = load_config_of(run)
    model, preprocess, tokenizer = contrast.load(run)
    imgs, txts, caps = [], [], []
    for x, c in _batches(cfg, split, features, preprocess, batch_size):
        imgs.append(model.encode_image(x))  # (b, Q, E)
        txts.append(model.encode_text(tokenizer(c)))  # (b, E)
        caps += c
    sim = model.similarity(torch.cat(imgs), torch.cat(txts))  # (N, N)
    ids = {c: i for i, c in enumerate(dict.fromkeys(caps))}
    group = torch.tensor([ids[c] for c in caps])
    pos = positive_mask(group, group)  # same caption text
    i2t = retrieval_ranks(sim, pos)
    t2i = retrieval_ranks(sim.t(), pos)
    return {
        "n": len(caps),
        "distinct_captions": len(ids),
        "i2t_hit@1": float((i2t < 1).double().mean()),
        "t2i_hit@1": float((t2i < 1).double().mean()),
        "i2t_hit@5": float((i2t < 5).double().mean()),
        "t2i_hit@5": float((t2i < 5).double().mean()),
        "chance_hit@1": float(pos.double().mean(dim=1).mean()),
    }


@torch.no_grad()
def caption_loss(stage2: str, decoder: str | None, split: str, features: str | None, batch_size: int = 250) -> dict:
    cfg, _ = load_config_of(stage2)
    model, preprocess, tokenizer = contrast.load(stage2)
    lm, lm_tok = contrast.load(decoder)[::2] if decoder else (None, None)
    sums = {"prompt": [0.0, 0], "no_prompt": [0.0, 0], "decoder_alone": [0.0, 0]}
    for x, c in _batches(cfg, split, features, preprocess, batch_size):
        batch = {"image_feats" if x.ndim == 3 else "pixels": x, **tokenizer(c)}
        outs = {"prompt": model(batch), "no_prompt": model.text_only(batch)}
        if lm is not None:
            outs["decoder_alone"] = lm(lm_tok(c))
        for k, o in outs.items():
            nll, n = lm_nll(o.lm.logits, o.lm.targets)
            sums[k][0] += nll
            sums[k][1] += n
    return {f"{k}_nats_per_token": s / n for k, (s, n) in sums.items() if n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage1")
    p.add_argument("--stage2")
    p.add_argument("--decoder", help="the caption_lm run the stage-2 decoder came from (a cross-check)")
    p.add_argument("--features", help="a features directory to read instead of running the tower")
    p.add_argument("--split", default="test")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.stage1:
        r = stage1_retrieval(args.stage1, args.split, args.features)
        print(f"stage 1 retrieval on {args.split} ({r['n']} images, {r['distinct_captions']} distinct captions)")
        print("  direction      hit@1   hit@5")
        print(f"  image->text   {r['i2t_hit@1']:.3f}   {r['i2t_hit@5']:.3f}")
        print(f"  text->image   {r['t2i_hit@1']:.3f}   {r['t2i_hit@5']:.3f}")
        print(f"  chance hit@1  {r['chance_hit@1']:.4f}")
    if args.stage2:
        r = caption_loss(args.stage2, args.decoder, args.split, args.features)
        print(f"stage 2 caption loss on {args.split} (nats per token, plain cross-entropy)")
        for k, v in r.items():
            print(f"  {k.removesuffix('_nats_per_token'):<14} {v:.4f}")


if __name__ == "__main__":
    main()
