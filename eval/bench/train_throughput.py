"""Training throughput of the same small CLIP in contrast and in open_clip, measured in one run on this machine.

Config (both libraries): ViT image tower 64 px, patch 8, width 256, 6 layers, 4 heads; text context 32, width 256,
4 layers, 4 heads; embedding 256; batch 128; AdamW; fp32. Each library trains with its own model, loss and
optimizer set-up, each in its own process (so peak memory is that process's own). Reported: images/s, achieved
FLOP/s (FLOPs of one training step counted by torch.utils.flop_counter, divided by the measured step time), its
share of this machine's fp32 matmul peak (measured here on a large matmul), and peak resident memory.

    python eval/bench/train_throughput.py [--steps 8] [--warmup 2] [--batch 128] [--threads N] [--compile]
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
from common import matmul_peak, open_clip_trainer

WIDTH, IMAGE, PATCH, V_LAYERS, T_LAYERS, HEADS, CTX, EMBED = 256, 64, 8, 6, 4, 4, 32, 256


def build_contrast(compile: bool = False):
    from contrast.config import Config, TrainConfig
    from contrast.models import build_model
    from contrast.objectives import build_objective
    from contrast.train.optim import build_optimizer

    cfg = Config()
    cfg.model.embed_dim = EMBED
    cfg.model.image.image_size = IMAGE
    cfg.model.image.kwargs = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=V_LAYERS, num_heads=HEADS,
                                  global_pool="token", fc_norm=False)
    cfg.model.text.context_length, cfg.model.text.width = CTX, WIDTH
    cfg.model.text.layers, cfg.model.text.heads = T_LAYERS, HEADS
    model = build_model(cfg.model)
    opt = build_optimizer(model, TrainConfig(lr=1e-4))
    objective = build_objective(cfg.loss)
    forward = torch.compile(model) if compile else model

    def step(pixels, ids):
        loss = objective(forward({"pixels": pixels, "input_ids": ids})).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return model, step


def build_open_clip():
    return open_clip_trainer(embed=EMBED, image_size=IMAGE, patch=PATCH, width=WIDTH, v_layers=V_LAYERS, heads=HEADS,
                             ctx=CTX, t_layers=T_LAYERS)


def run_one(impl: str, steps: int, warmup: int, batch: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    builders = {"contrast": build_contrast, "open_clip": build_open_clip,
                "contrast+compile": lambda: build_contrast(compile=True)}
    model, step = builders[impl]()
    model.train()
    pixels = torch.randn(batch, 3, IMAGE, IMAGE)
    ids = torch.randint(1, 49406, (batch, CTX))
    ids[:, -1] = 49407  # end-of-text last, as the tokenizer leaves it for full-length captions
    if impl.endswith("+compile"):  # count FLOPs on the eager model; compiling happens in the warm-up steps
        eager, eager_step = build_contrast()
        with FlopCounterMode(display=False) as fc:
            eager_step(pixels, ids)
        del eager, eager_step
        warmup += 1
    else:
        with FlopCounterMode(display=False) as fc:
            step(pixels, ids)
    flops = fc.get_total_flops()
    for _ in range(max(0, warmup - 1)):
        step(pixels, ids)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(pixels, ids)
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    return {
        "impl": impl,
        "step_s": med,
        "images_per_s": batch / med,
        "flops_per_step": flops,
        "flop_per_s": flops / med,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="add a row for contrast with train.compile (torch.compile)")
    ap.add_argument("--impl", choices=["contrast", "open_clip", "contrast+compile"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.impl:
        print(json.dumps(run_one(args.impl, args.steps, args.warmup, args.batch)))
        return
    peak = matmul_peak()
    rows = []
    for impl in ("open_clip", "contrast") + (("contrast+compile",) if args.compile else ()):
        cmd = [sys.executable, __file__, "--impl", impl, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch)] + (["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode:
            sys.exit(f"{impl} run failed:\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(2048^3 matmul, best of 10); batch {args.batch}, median of {args.steps} steps")
    print(f"{'impl':<16} {'img/s':>8} {'step s':>8} {'GFLOP/step':>11} {'GFLOP/s':>9} {'% peak':>7} "
          f"{'peak RSS MiB':>13} {'params M':>9}")
    for r in rows:
        print(f"{r['impl']:<16} {r['images_per_s']:>8.1f} {r['step_s']:>8.3f} {r['flops_per_step'] / 1e9:>11.2f} "
              f"{r['flop_per_s'] / 1e9:>9.1f} {100 * r['flop_per_s'] / peak:>6.1f}% {r['peak_rss_mib']:>13.0f} "
              f"{r['params_m']:>9.2f}")
    oc = rows[0]
    for ours in rows[1:]:
        print(f"{ours['impl']} / open_clip: {ours['images_per_s'] / oc['images_per_s']:.2f}x images/s, "
              f"{ours['peak_rss_mib'] / oc['peak_rss_mib']:.2f}x peak memory")


if __name__ == "__main__":
    main()
