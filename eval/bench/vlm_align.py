"""Aligning the LiT emoji tower to SmolLM2-135M-Instruct through each bridge: held-out caption loss against two
references, generated names, speed and memory of an align step.

    python eval/bench/vlm_align.py [--runs runs/vlm_bench] [--bridges unified,xattn,blip2] [--steps 200]
        [--image-seeds 1] [--ref-seeds 2]

For each bridge it trains (or reuses, when its run directory holds a finished run) runs with the bridge's recipe
(recipes/vlm_unified_emoji.yaml, vlm_xattn_emoji.yaml, vlm_blip2_emoji.yaml): for each of ``--image-seeds`` seeds one
with the image path and, for each of ``--ref-seeds`` seeds, one with ``use_images: false`` (a learned prompt of the
same size that carries no image content, trained the same way; a learned prompt's result depends on its random start,
and every run on its data order, so the spread of the seeds is shown). Every
run is scored by the same function (:func:`contrast.evaluate.captions.caption_loss`: plain cross-entropy summed over
the answer's tokens, divided by their count) on the held-out source: Twitter's art, test split (emoji never trained
on, in an art style never trained on). The bare LM is the same frozen SmolLM2 given the same prompt without the
image (``text_only``). Each training runs in its own process; its peak resident memory (ru_maxrss) and the mean
images/s of its logged steps after the first are reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
RECIPES = {"unified": "recipes/vlm_unified_emoji.yaml", "xattn": "recipes/vlm_xattn_emoji.yaml",
           "blip2": "recipes/vlm_blip2_emoji.yaml"}
NO_IMAGES = {"unified": "model.bridge.use_images=false", "xattn": "model.bridge.use_images=false",
             "blip2": "model.blip2.use_images=false"}
TRAIN = """
import json, resource, sys
from contrast.config import load_recipe
from contrast.train.loop import train
cfg = load_recipe(sys.argv[1], sys.argv[3:])
train(cfg, sys.argv[2], progress=False)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def prerequisites(runs: Path, bridges: list[str], stage1_steps: int | None = None) -> dict[str, str]:
    """The emoji sets, SmolLM2 and the runs the recipes start from (made when missing)."""
    from contrast.data.emoji import fetch_emoji
    from contrast.data.lm_fetch import fetch_lm

    paths = {"google": str(fetch_emoji(style="google")), "twitter": str(fetch_emoji(style="twitter")),
             "lm": str(fetch_lm("smollm2-135m-instruct"))}
    needs = [("lit", "recipes/lit_emoji.yaml", [])]
    if "blip2" in bridges:
        steps = [f"train.steps={stage1_steps}"] if stage1_steps else []
        needs.append(("stage1", "recipes/blip2_stage1_emoji.yaml", [f"model.blip2.tower={runs / 'lit'}", *steps]))
    for name, recipe, sets in needs:
        out = runs / name
        if not (out / "checkpoints" / "latest").is_file():
            train_run(recipe, out, [f"data.source={paths['google']}", *sets])
        paths[name] = str(out)
    return paths


def train_run(recipe: str, out: Path, sets: list[str]) -> dict:
    """Train ``recipe`` into ``out`` in a fresh process; its peak memory and mean images/s."""
    if not (out / "checkpoints" / "latest").is_file():
        done = subprocess.run([sys.executable, "-c", TRAIN, str(REPO / recipe), str(out), *sets], check=True,
                              capture_output=True, text=True, cwd=REPO)
        (out / "bench_train.json").write_text(done.stdout.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ips = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]
    saved = out / "bench_train.json"
    peak = json.loads(saved.read_text())["peak_rss_mb"] if saved.is_file() else float("nan")
    return {"images_per_s": sum(ips) / max(1, len(ips)), "peak_rss_mb": peak}


def held_out(run: Path, twitter: str, images: bool = True, limit: int = 0) -> float:
    from datasets import load_from_disk

    import contrast
    from contrast.data.decode import SampleReader
    from contrast.evaluate.captions import caption_batches, caption_loss, caption_rows

    model, preprocess, tokenizer = contrast.load(run)
    ds = load_from_disk(twitter)["test"]
    batches = caption_batches(caption_rows(ds), preprocess, tokenizer, SampleReader(), 32, limit)
    return caption_loss(model, batches, images=images)["nats_per_token"]


def samples(run: Path, twitter: str, n: int = 6) -> list[tuple[str, str]]:
    from datasets import load_from_disk

    import contrast
    from contrast.generate import generate

    model, preprocess, tokenizer = contrast.load(run)
    ds = load_from_disk(twitter)["test"].select(range(0, 465, 465 // n))
    pixels = torch.stack([preprocess(im.convert("RGB")) for im in ds["image"]])
    return [(true, g.text) for true, g in zip(ds["caption"], generate(model, tokenizer, pixels, max_new_tokens=12))]


def trainable(run: Path) -> int:
    import contrast

    return sum(p.numel() for p in contrast.load(run)[0].parameters() if p.requires_grad)


def run_name(bridge: str, seed: int, images: bool = True) -> str:
    """The run directory of one bridge run: seed 0 is the recipe's, the others carry their seed."""
    return bridge + ("" if images else "_noimg") + (f"_s{seed}" if seed else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/vlm_bench")
    p.add_argument("--bridges", default="unified,xattn,blip2")
    p.add_argument("--steps", type=int, default=None, help="train.steps of every run (default: the recipes')")
    p.add_argument("--stage1-steps", type=int, default=None, help="train.steps of the BLIP-2 stage-1 run")
    p.add_argument("--limit", type=int, default=0, help="held-out rows scored (0: all 465)")
    p.add_argument("--ref-seeds", type=int, default=2, help="seeds of each no-image reference (their spread is the "
                   "reference's noise)")
    p.add_argument("--image-seeds", type=int, default=1, help="seeds of each bridge's run with the image path (their "
                   "spread is the bridge's own noise)")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="a recipe override for every bridge run and its no-image reference (repeatable)")
    args = p.parse_args()
    bridges = args.bridges.split(",")
    runs = Path(args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    paths = prerequisites(runs, bridges, args.stage1_steps)
    common = [f"data.source={paths['google']}", *args.sets] + ([f"train.steps={args.steps}"] if args.steps else [])
    rows, bare = [], None
    for b in bridges:
        where = ([f"model.bridge.tower={paths['lit']}", f"model.bridge.decoder.hf_path={paths['lm']}"] if b != "blip2"
                 else [f"model.blip2.stage1={paths['stage1']}", f"model.blip2.decoder.hf_path={paths['lm']}"])
        seeded = [[f"train.seed={seed}"] if seed else [] for seed in range(max(args.image_seeds, args.ref_seeds))]
        speed = train_run(RECIPES[b], runs / b, common + where)
        for seed in range(1, args.image_seeds):
            train_run(RECIPES[b], runs / run_name(b, seed), common + where + seeded[seed])
        for seed in range(args.ref_seeds):  # seed 0 is the recipe's; the others change the prompt's start and the order
            train_run(RECIPES[b], runs / run_name(b, seed, images=False), common + where + [NO_IMAGES[b]] + seeded[seed])
        refs = [held_out(runs / run_name(b, seed, images=False), paths["twitter"], limit=args.limit)
                for seed in range(args.ref_seeds)]
        with_img = [held_out(runs / run_name(b, seed), paths["twitter"], limit=args.limit)
                    for seed in range(args.image_seeds)]
        if bare is None:
            bare = held_out(runs / b, paths["twitter"], images=False, limit=args.limit)
        rows.append((b, with_img, refs, speed, trainable(runs / b)))
        print(f"{b}: held-out {' / '.join(f'{w:.3f}' for w in with_img)} nats/token, no-image reference "
              f"{' / '.join(f'{r:.3f}' for r in refs)}", flush=True)
    print("\nheld-out caption loss (Twitter art, test split: 465 emoji never trained on, nats per answer token)")
    print(f"bare SmolLM2-135M-Instruct, same prompt without the image: {bare:.3f}\n")
    print(f"runs with images: seeds {', '.join(map(str, range(args.image_seeds)))}; no-image references: seeds "
          f"{', '.join(map(str, range(args.ref_seeds)))}; the cut is mean against mean and, strictest, the highest "
          "with images against the lowest reference\n")
    print("| bridge | with images (each seed) | trained no-image prompt (each seed) | cut, means | cut, strictest "
          "| trainable params | align images/s | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for b, w, refs, s, n in rows:
        mean, low, w_mean, w_high = sum(refs) / len(refs), min(refs), sum(w) / len(w), max(w)
        print(f"| {b} | {' / '.join(f'{x:.3f}' for x in w)} | {' / '.join(f'{r:.3f}' for r in refs)} "
              f"| {100 * (mean - w_mean) / mean:.1f}% | {100 * (low - w_high) / low:.1f}% | {n / 1e6:.2f} M "
              f"| {s['images_per_s']:.1f} | {s['peak_rss_mb']:.0f} |")
    for b in bridges:
        print(f"\n{b}: greedy answers for held-out images (true name -> generated)")
        for true, got in samples(runs / b, paths["twitter"]):
            print(f"  {true!r} -> {got!r}")


if __name__ == "__main__":
    main()
