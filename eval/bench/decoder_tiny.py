"""Held-out caption loss of decoder runs (kind ``decoder``): with images against the same decoder without them.

    python eval/bench/decoder_tiny.py runs/decoder_unified runs/decoder_unified_noimg \
        runs/decoder_xattn runs/decoder_xattn_noimg [--split val]

Every run is scored by the same function on the same rows: plain next-token cross-entropy (no label smoothing)
summed over the caption tokens of the split and divided by their count (``contrast.objectives.lm_nll``).
The val split is the default: its (colour, shape) pairs are all seen in training, so the figure measures how well
the decoder reads the image, not composition (the test split adds held-out pairs).
"""

from __future__ import annotations

import argparse

import torch

import contrast
from contrast.data import load_source
from contrast.objectives import lm_nll
from contrast.runs import load_config_of


@torch.no_grad()
def held_out_nll(run: str, split: str = "val", batch_size: int = 250) -> float:
    """Mean next-token NLL per caption token of ``run`` over ``split`` of its own data source."""
    cfg, _ = load_config_of(run)
    model, preprocess, tokenizer = contrast.load(run)
    ds = load_source(cfg.data, split, cfg.model.image.image_size)
    total, count = 0.0, 0
    for lo in range(0, len(ds), batch_size):
        rows = ds[lo : lo + batch_size]
        batch = {"pixels": torch.stack([preprocess(im) for im in rows["image"]]), **tokenizer(rows["caption"])}
        out = model(batch)
        nll, n = lm_nll(out.lm.logits, out.lm.targets)
        total, count = total + nll, count + n
    return total / count


def describe(run: str) -> dict:
    cfg, _ = load_config_of(run)
    b, t = cfg.model.bridge, cfg.train
    if b.tower:
        tower = f"{b.tower} ({'frozen' if b.tower_locked else 'tuned'})"
    else:
        tower = "fresh (trained with the decoder)"
    return {"mode": b.mode, "images": "on" if b.use_images else "off", "steps_x_batch": f"{t.steps} x {t.batch_size}",
            "tower": tower}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="decoder run directories")
    p.add_argument("--split", default="val")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"held-out caption loss on the {args.split} split (nats per caption token, plain cross-entropy)")
    print("| run | bridge | images | steps x batch | tower | NLL/token |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        d = describe(run)
        nll = held_out_nll(run, args.split)
        print(f"| {run} | {d['mode']} | {d['images']} | {d['steps_x_batch']} | {d['tower']} | {nll:.3f} |", flush=True)


if __name__ == "__main__":
    main()
