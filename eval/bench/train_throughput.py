"""Training throughput of the same small CLIP in contrast and in open_clip, measured in one run on this machine.

Config (both libraries): ViT image tower 64 px, patch 8, width 256, 6 layers, 4 heads; text context 32, width 256,
4 layers, 4 heads; embedding 256; batch 128; AdamW. Each row trains with its library's own model, loss and optimizer
set-up, each in its own process (so peak memory is that process's own). contrast's rows go through
``contrast.train.step.Stepper``, the training step ``contrast train`` runs (per-tower gradient norms, the non-finite
guard, the fused AdamW step, the learning-rate schedule), with ``train.grad_clip: null``: open_clip's training script
clips no gradients by default, so neither does any row here.

Rows: ``open_clip`` and ``contrast`` in fp32; ``contrast cache``, the same global batch computed exactly by gradient
caching over micro-batches of batch/4 (``train.micro_batch_size``; one more forward per micro-batch);
``open_clip bf16`` (forward and loss under ``torch.autocast`` bf16, fp32 weights, as its ``--precision amp_bf16``)
and ``contrast bf16`` (``train.precision: bf16``, the same autocast); with ``--compile``, ``contrast+compile``
(``torch.compile`` of the model, as ``train.compile``). Reported: images/s, achieved FLOP/s (FLOPs of one training
step as run, counted by torch.utils.flop_counter, divided by the measured step time; the cache row counts its second
forward), its share of this machine's fp32 matmul peak (measured here on a large matmul; bf16 rows are compared
with the fp32 peak too), and peak resident memory. Closing lines: each contrast row over open_clip fp32, and
contrast bf16 over open_clip bf16.

On a GPU (``--device cuda``): steps are timed between CUDA synchronisations, peak memory is the device's
(torch.cuda.max_memory_allocated), and the share of peak is MFU against the card's data-sheet dense bf16 peak
(``common.GPU_BF16_PEAKS``, by torch.cuda.get_device_name; a measured bf16 matmul for cards not listed).
``--size vitb16`` trains a ViT-B/16 CLIP instead (224 px, patch 16, width 768, 12 layers, 12 heads; text context 77,
width 512, 12 layers, 8 heads; embedding 512); ``--rows`` picks rows; ``--json PATH`` also writes the results.

    python eval/bench/train_throughput.py [--steps 8] [--warmup 2] [--batch 128] [--threads N] [--compile]
                                          [--device cpu|cuda] [--size small|vitb16] [--rows R1,R2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
from common import cuda_bf16_matmul_peak, gpu_bf16_peak, matmul_peak, open_clip_trainer

# the model's geometry: image width, size, patch, layers, heads; text context, width, layers, heads; embedding
SIZES = {
    "small": dict(width=256, image=64, patch=8, v_layers=6, heads=4, ctx=32, t_width=256, t_layers=4, t_heads=4,
                  embed=256),
    "vitb16": dict(width=768, image=224, patch=16, v_layers=12, heads=12, ctx=77, t_width=512, t_layers=12, t_heads=8,
                   embed=512),
}
G = dict(SIZES["small"])  # the geometry of this process (set from --size)
ROWS = ("open_clip", "contrast", "contrast cache", "open_clip bf16", "contrast bf16")
COMPILED = "contrast+compile"
COMPILED_BF16 = "contrast bf16+compile"
DEVICE = torch.device("cpu")  # set from --device


def contrast_config(batch: int, precision: str = "fp32", micro: int | None = None):
    """The bench's CLIP as a contrast Config; its train section as the rows use it (no clipping, see above)."""
    from contrast.config import Config, TrainConfig

    cfg = Config()
    cfg.model.embed_dim = G["embed"]
    cfg.model.image.image_size = G["image"]
    cfg.model.image.kwargs = dict(img_size=G["image"], patch_size=G["patch"], embed_dim=G["width"], depth=G["v_layers"],
                                  num_heads=G["heads"], global_pool="token", fc_norm=False)
    cfg.model.text.context_length, cfg.model.text.width = G["ctx"], G["t_width"]
    cfg.model.text.layers, cfg.model.text.heads = G["t_layers"], G["t_heads"]
    cfg.train = TrainConfig(lr=1e-4, batch_size=batch, micro_batch_size=micro, precision=precision, grad_clip=None)
    return cfg


def build_contrast(batch: int, precision: str = "fp32", micro: int | None = None, compile: bool = False):
    """contrast's model and its real training step: ``(model, step(pixels, ids) -> loss)``, the step one
    ``Stepper`` call ("whole", or "cache" over micro-batches of ``micro`` when it is below ``batch``)."""
    from contrast.models import build_model
    from contrast.objectives import build_objective
    from contrast.train.host import keep_freed_memory
    from contrast.train.optim import build_optimizer, build_scheduler
    from contrast.train.step import Stepper, autocast

    cfg = contrast_config(batch, precision, micro)
    device = DEVICE
    if cfg.train.keep_host_memory and device.type == "cpu":  # as the training loop does on the CPU
        keep_freed_memory()
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.train)
    run = SimpleNamespace(cfg=cfg, model=model, train_model=torch.compile(model) if compile else model,
                          objective=build_objective(cfg.loss), optimizer=optimizer,
                          scheduler=build_scheduler(optimizer, cfg.train), autocast=autocast(device, precision),
                          device=device)
    mode = "cache" if micro is not None and micro < batch else "whole"
    stepper = Stepper(run, mode, micro)
    return model, lambda pixels, ids: stepper({"pixels": pixels, "input_ids": ids})[0].total


def build_open_clip(precision: str = "fp32", accum_freq: int = 1):
    return open_clip_trainer(embed=G["embed"], image_size=G["image"], patch=G["patch"], width=G["width"],
                             v_layers=G["v_layers"], heads=G["heads"], ctx=G["ctx"], t_layers=G["t_layers"],
                             precision=precision, accum_freq=accum_freq, device=DEVICE.type, text_width=G["t_width"],
                             text_heads=G["t_heads"])


def builder(impl: str, batch: int):
    return {
        "open_clip": lambda: build_open_clip(),
        "open_clip bf16": lambda: build_open_clip("bf16"),
        "contrast": lambda: build_contrast(batch),
        "contrast bf16": lambda: build_contrast(batch, "bf16"),
        "contrast cache": lambda: build_contrast(batch, micro=max(1, batch // 4)),
        COMPILED: lambda: build_contrast(batch, compile=True),
        COMPILED_BF16: lambda: build_contrast(batch, "bf16", compile=True),
    }[impl]


def make_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = torch.randn(batch, 3, G["image"], G["image"])
    ids = torch.randint(1, 49406, (batch, G["ctx"]))
    ids[:, -1] = 49407  # end-of-text last, as the tokenizer leaves it for full-length captions
    return pixels.to(DEVICE), ids.to(DEVICE)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib() -> float:
    """The device's peak allocated memory on a GPU; the process's peak resident set on the CPU."""
    if DEVICE.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(impl: str, steps: int, warmup: int, batch: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, step = builder(impl, batch)()
    model.train()
    pixels, ids = make_batch(batch)
    if impl in (COMPILED, COMPILED_BF16):  # count FLOPs on the eager model; compiling happens in the warm-up steps
        eager, eager_step = build_contrast(batch, "bf16" if impl == COMPILED_BF16 else "fp32")
        with FlopCounterMode(display=False) as fc:
            eager_step(pixels, ids)
        del eager, eager_step
        warmup += 1
    else:
        with FlopCounterMode(display=False) as fc:
            step(pixels, ids)
    flops = fc.get_total_flops()
    if DEVICE.type == "cuda":  # peak memory of the steps themselves (not of the compiled row's eager FLOP count)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(max(0, warmup - 1)):
        step(pixels, ids)
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        step(pixels, ids)
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    return {
        "impl": impl,
        "step_s": med,
        "images_per_s": batch / med,
        "flops_per_step": flops,
        "flop_per_s": flops / med,
        "peak_rss_mib": peak_memory_mib(),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def child(args, impl: str) -> dict:
    cmd = [sys.executable, __file__, "--impl", impl, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--device", args.device, "--size", args.size]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        sys.exit(f"{impl} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(args, peak: float, peak_note: str, rows: list[dict]) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {peak_note}; {args.size} model, "
          f"batch {args.batch}, median of {args.steps} steps; no gradient clipping")
    memory = "peak GPU MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"{'impl':<21} {'img/s':>8} {'step s':>8} {'GFLOP/step':>11} {'GFLOP/s':>9} {'% peak':>7} "
          f"{memory:>13} {'params M':>9}")
    for r in rows:
        print(f"{r['impl']:<21} {r['images_per_s']:>8.1f} {r['step_s']:>8.3f} {r['flops_per_step'] / 1e9:>11.2f} "
              f"{r['flop_per_s'] / 1e9:>9.1f} {100 * r['flop_per_s'] / peak:>6.1f}% {r['peak_rss_mib']:>13.0f} "
              f"{r['params_m']:>9.2f}")
    by = {r["impl"]: r for r in rows}
    pairs = [(impl, "open_clip bf16" if "bf16" in impl else "open_clip") for impl in by if impl.startswith("contrast")]
    pairs = [(ours, theirs) for ours, theirs in pairs if theirs in by]
    if "contrast bf16" in by and "open_clip" in by:
        pairs.append(("contrast bf16", "open_clip"))
    for ours, theirs in pairs:
        a, b = by[ours], by[theirs]
        print(f"{ours} / {theirs}: {a['images_per_s'] / b['images_per_s']:.2f}x images/s, "
              f"{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x peak memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="add a row for contrast with train.compile (torch.compile)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", choices=list(SIZES), default="small", help="the model's geometry (see above)")
    ap.add_argument("--rows", default=None, help="comma-separated rows to run (default: all; "
                    f"choices: {', '.join(ROWS + (COMPILED, COMPILED_BF16))})")
    ap.add_argument("--json", default=None, help="also write the rows, the peak and the device to this JSON file")
    ap.add_argument("--impl", choices=ROWS + (COMPILED, COMPILED_BF16), help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    G.update(SIZES[args.size])
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.impl:
        print(json.dumps(run_one(args.impl, args.steps, args.warmup, args.batch)))
        return
    impls = args.rows.split(",") if args.rows else list(ROWS + ((COMPILED,) if args.compile else ()))
    unknown = [r for r in impls if r not in ROWS + (COMPILED, COMPILED_BF16)]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {', '.join(ROWS + (COMPILED, COMPILED_BF16))}")
    peak, peak_note = device_peak(args.device)
    rows = []
    for impl in impls:  # the JSON is rewritten after each row: a row that fails leaves the ones before it
        rows.append(child(args, impl))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device_name(args.device), "peak_flop_per_s": peak, "peak": peak_note,
                           "size": args.size, "batch": args.batch, "rows": rows}, f, indent=2)
    print_table(args, peak, peak_note, rows)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def device_peak(device: str) -> tuple[float, str]:
    """The FLOP/s the share-of-peak column divides by, and a note saying what it is."""
    if device == "cpu":
        peak = matmul_peak()
        return peak, f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (2048^3 matmul, best of 10)"
    name = device_name(device)
    peak = gpu_bf16_peak(name)
    if peak is not None:
        return peak, f"{name}: MFU against its data-sheet dense bf16 peak {peak / 1e12:.0f} TFLOP/s"
    peak = cuda_bf16_matmul_peak()
    return peak, f"{name}: MFU against its measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s (8192^3)"


if __name__ == "__main__":
    main()
