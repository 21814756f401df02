"""How often greedy captions of a BLIP run name the right colour and shape of the built-in shapes images.

    # score existing runs
    python eval/bench/blip_caption.py runs/blip_tiny [runs/other ...]
    # train a recipe (with overrides) into a directory, then score it
    python eval/bench/blip_caption.py --train recipes/blip_tiny.yaml --out /tmp/blip --set train.threads=1

Two sets of single-shape images (caption "a <size> <colour> <shape>"):

- ``val``: the validation split, new images of (colour, shape) pairs seen in training;
- ``test held-out``: single-shape images of the test split whose (colour, shape) pair never occurs in training
  (``contrast.data.synthetic.HELD_OUT``), so naming both right needs composition.

A caption counts for colour (shape) when the image's colour (shape) word is one of its words; "both" needs the two.
Chance for either word alone is 1/6. Decoding is greedy (``contrast caption``'s default).
"""

from __future__ import annotations

import argparse
import time

import torch

import contrast
from contrast.caption import caption_images
from contrast.data import load_source
from contrast.data.synthetic import HELD_OUT
from contrast.runs import load_config_of


@torch.no_grad()
def caption_rates(model, preprocess, tokenizer, rows, batch_size: int = 128) -> dict:
    """Fractions of ``rows`` (with image, colour, shape) whose greedy caption names the colour, the shape, both."""
    hits = {"colour": 0, "shape": 0, "both": 0}
    examples = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        pixels = torch.stack([preprocess(im.convert("RGB")) for im in chunk["image"]])
        caps = caption_images(model, tokenizer, pixels)
        for cap, colour, shape in zip(caps, chunk["colour"], chunk["shape"]):
            words = cap.text.split()
            c, s = colour in words, shape in words
            hits["colour"] += c
            hits["shape"] += s
            hits["both"] += c and s
            if len(examples) < 3:
                examples.append(f"{colour} {shape} -> {cap.text!r}")
    n = len(rows)
    return {**{k: v / max(n, 1) for k, v in hits.items()}, "n": n, "examples": examples}


def eval_sets(cfg, n_val: int | None = None) -> dict:
    """The single-shape val rows and the held-out-pair test rows of a run's data source."""
    val = load_source(cfg.data, "val", cfg.model.image.image_size).filter(lambda r: r["n_shapes"] == 1)
    if n_val is not None:
        val = val.select(range(min(n_val, len(val))))
    test = load_source(cfg.data, "test", cfg.model.image.image_size).filter(lambda r: r["n_shapes"] == 1 and (r["colour"], r["shape"]) in HELD_OUT)
    return {"val": val, "test held-out": test}


def score_run(run: str, n_val: int | None = None) -> dict:
    cfg, _ = load_config_of(run)
    model, preprocess, tokenizer = contrast.load(run)
    return {name: caption_rates(model, preprocess, tokenizer, rows) for name, rows in eval_sets(cfg, n_val).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="run directories of models of kind blip")
    p.add_argument("--train", metavar="RECIPE", help="train this recipe into --out first, then score it")
    p.add_argument("--out", help="run directory for --train")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for --train")
    p.add_argument("--n-val", type=int, default=None, help="score at most this many val images")
    p.add_argument("--examples", action="store_true", help="print a few captions per run and set")
    args = p.parse_args()
    runs = list(args.runs)
    train_s = {}
    if args.train:
        if not args.out:
            p.error("--train needs --out")
        from contrast.config import load_recipe
        from contrast.train.loop import train

        cfg = load_recipe(args.train, args.set)
        t0 = time.perf_counter()
        res = train(cfg, args.out, progress=False)
        train_s[args.out] = (time.perf_counter() - t0, res.last_loss)
        runs.append(args.out)
    if not runs:
        p.error("give run directories or --train RECIPE --out DIR")
    torch.manual_seed(0)
    print("greedy captions of single-shape images: fraction naming the right colour / shape / both (chance 1/6)")
    print("| run | steps x batch | train s | last loss | val colour | val shape | val both | n | "
          "held-out colour | held-out shape | held-out both | n |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        cfg, _ = load_config_of(run)
        r = score_run(run, args.n_val)
        secs, loss = train_s.get(run, (float("nan"), float("nan")))
        v, t = r["val"], r["test held-out"]
        print(f"| {run} | {cfg.train.steps} x {cfg.train.batch_size} | {secs:.0f} | {loss:.3f} | "
              f"{v['colour']:.3f} | {v['shape']:.3f} | {v['both']:.3f} | {v['n']} | "
              f"{t['colour']:.3f} | {t['shape']:.3f} | {t['both']:.3f} | {t['n']} |")
        if args.examples:
            for name, rr in r.items():
                print(f"  {name}: " + "; ".join(rr["examples"]))


if __name__ == "__main__":
    main()
