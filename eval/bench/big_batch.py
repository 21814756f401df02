"""A large contrastive batch on one process: contrast's exact gradient caching against the plain step at the
micro-batch size and against open_clip's ``--accum-freq K``, measured in one run on this machine.

The model is train_throughput.py's small CLIP (ViT 64 px, patch 8, width 256, 6 layers; text context 32, width 256,
4 layers; embedding 256; AdamW; fp32; no gradient clipping). Rows, each in its own process (peak resident memory,
``ru_maxrss``, is that process's own, model, optimizer state and the input batch included):

  contrast plain   the Stepper's plain ("whole") step at batch = --micro: the memory and speed to match;
  contrast cache   the Stepper's gradient-cached step at batch = --batch in micro-batches of --micro (exact: the
                   gradients of the whole batch's loss); each micro-batch is embedded twice, once without a graph;
  open_clip accum  open_clip's accumulation at batch = --batch with K = batch / micro micro-batches, written after its
                   ``train_one_epoch`` for ``accum_freq`` > 1 (eval/bench/common.py ``_accumulating_step``): embed
                   every micro-batch without gradients, then per micro-batch a forward with gradients, the loss over
                   the whole batch with its features substituted, and a backward; one optimizer step;
  contrast full    the plain step at batch = --batch, only where --batch <= 1024 (above, it would not fit here).

Each row times --steps steps after --warmup untimed ones and reports images/s from their mean step time. Closing
lines: caching over the plain micro-batch step (peak memory, images/s) and caching over open_clip's accumulation.

    python eval/bench/big_batch.py [--batch 4096] [--micro 512] [--steps 2] [--warmup 1] [--threads N]
    python eval/bench/big_batch.py --batch 1024 --micro 128      # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from common import matmul_peak
from train_throughput import build_contrast, build_open_clip, make_batch

ROWS = ("contrast plain", "contrast cache", "open_clip accum", "contrast full")
FULL_LIMIT = 1024  # the largest batch the plain whole-batch row is run at


def build(row: str, batch: int, micro: int):
    """``(rows per step, model, step)`` for ``row``."""
    if row == "contrast plain":
        return (micro, *build_contrast(micro))
    if row == "contrast cache":
        return (batch, *build_contrast(batch, micro=micro))
    if row == "open_clip accum":
        return (batch, *build_open_clip(accum_freq=batch // micro))
    return (batch, *build_contrast(batch))


def run_one(row: str, batch: int, micro: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    n, model, step = build(row, batch, micro)
    model.train()
    pixels, ids = make_batch(n)
    for _ in range(warmup):
        step(pixels, ids)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(pixels, ids)
        times.append(time.perf_counter() - t)
    mean = sum(times) / len(times)
    return {"row": row, "batch": n, "micro": micro if row in ("contrast cache", "open_clip accum") else n,
            "step_s": mean, "images_per_s": n / mean,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(args, row: str) -> dict | None:
    """The row's result from a fresh process; None where ``contrast full`` failed (most likely out of memory)."""
    cmd = [sys.executable, __file__, "--row", row, "--batch", str(args.batch), "--micro", str(args.micro),
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode and row == "contrast full":
        print(f"contrast full at batch {args.batch} failed (exit {out.returncode}, likely out of memory): "
              f"{out.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    if out.returncode:
        sys.exit(f"{row} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(args, peak: float, rows: list[dict], full_note: str | None) -> None:
    k = args.batch // args.micro
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(2048^3 matmul, best of 10); batch {args.batch} = {k} x {args.micro}, fp32, mean of {args.steps} steps "
          f"after {args.warmup} warm-up")
    print(f"{'row':<16} {'batch':>6} {'micro':>6} {'step s':>9} {'img/s':>8} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['row']:<16} {r['batch']:>6} {r['micro']:>6} {r['step_s']:>9.2f} {r['images_per_s']:>8.1f} "
              f"{r['peak_rss_mib']:>13.0f}")
    if full_note:
        print(full_note)
    by = {r["row"]: r for r in rows}
    cache, plain, oc = by["contrast cache"], by["contrast plain"], by["open_clip accum"]
    mem, speed = cache["peak_rss_mib"] / plain["peak_rss_mib"], cache["images_per_s"] / plain["images_per_s"]
    print(f"caching peak memory / plain micro-batch peak memory: {mem:.2f}x (aim: at most 1.3x)")
    print(f"caching images/s / plain images/s: {speed:.2f}x (aim: plain at most 1.4x faster, i.e. >= {1 / 1.4:.2f}x)")
    print(f"contrast cache / open_clip accum: {cache['images_per_s'] / oc['images_per_s']:.2f}x images/s, "
          f"{cache['peak_rss_mib'] / oc['peak_rss_mib']:.2f}x peak memory")
    if "contrast full" in by:
        full = by["contrast full"]
        print(f"contrast cache / contrast full (batch {args.batch} whole): "
              f"{cache['images_per_s'] / full['images_per_s']:.2f}x images/s, "
              f"{cache['peak_rss_mib'] / full['peak_rss_mib']:.2f}x peak memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.micro < 1 or args.batch % args.micro or args.micro >= args.batch:
        ap.error(f"--micro {args.micro} must be a divisor of --batch {args.batch} below it")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.row:
        print(json.dumps(run_one(args.row, args.batch, args.micro, args.steps, args.warmup)))
        return
    peak = matmul_peak()
    full = args.batch <= FULL_LIMIT
    rows = [child(args, row) for row in ROWS if full or row != "contrast full"]
    note = None if full else f"contrast full: skipped (batch {args.batch} > {FULL_LIMIT}: its activations would not fit)"
    if full and rows[-1] is None:
        note = f"contrast full: did not complete at batch {args.batch} (see stderr)"
    print_table(args, peak, [r for r in rows if r is not None], note)


if __name__ == "__main__":
    main()
