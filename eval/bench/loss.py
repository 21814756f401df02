"""Contrastive loss forward+backward: contrast against open_clip, and the tiled loss at a batch open_clip cannot hold.

ITC (``contrast.objectives.info_nce`` vs ``open_clip.loss.ClipLoss``) and the sigmoid loss (``sigmoid_loss`` vs
``SigLipLoss``) on one process, B in {1024, 4096, 16384}, D = 512, fp32 (``--precision bf16``: both under
``torch.autocast``). contrast runs with the training default ``loss.tile_size`` (``--tile-size`` to change it): a
logit matrix of at most tile_size^2 entries is computed whole, a larger one in tiles; where the default tiles, a
``contrast-whole`` row shows tile_size 0 as well. Features are L2-normalised random vectors (texts correlated with
their images); scale 1/0.07 for ITC, scale 10 and bias -10 for SigLIP.

Time: for each (loss, B) one process calls the implementations in turn, once untimed, then ``--reps`` times each;
the best is reported (on a shared machine the least disturbed). Memory: each implementation in a fresh process,
after a warm-up call on a batch of 64, makes one call; its peak extra memory is the peak resident set during the
call minus the resident set just before it (Linux VmHWM, reset through /proc/self/clear_refs just before): all the
call allocates, input gradients included. Then the tiled losses at B = 65,536 (``--big``), measured the same way.

On a GPU (``--device cuda``) calls are timed between CUDA synchronisations and the peak extra memory is the
device's (torch.cuda.max_memory_allocated during the call minus the memory allocated before it). ``--json PATH``
also writes the results.

    python eval/bench/loss.py [--sizes 1024,4096,16384] [--big 65536] [--big-losses itc,sigmoid] [--reps 3]
                              [--tile-size N] [--no-whole] [--precision fp32|bf16] [--threads N]
                              [--device cpu|cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from common import matmul_peak

D = 512
SCALES = {"itc": (1 / 0.07, None), "sigmoid": (10.0, -10.0)}
DEVICE = torch.device("cpu")  # set from --device


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_mib(fn) -> tuple[float, object]:
    """Run ``fn``; return (peak resident memory during it minus resident memory before it, in MiB; its result).
    On a GPU: the device's peak allocated memory during it minus what was allocated before it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, out
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    out = fn()
    return (_status_kib("VmHWM") - before) / 1024, out


def make_inputs(n: int, loss: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n, D, generator=g), dim=-1).to(DEVICE)
    txt = F.normalize(img + torch.randn(n, D, generator=g).to(DEVICE), dim=-1)
    scale, bias = SCALES[loss]
    extra = [torch.tensor(bias, device=DEVICE, requires_grad=True)] if bias is not None else []
    return [img.requires_grad_(), txt.requires_grad_(), torch.tensor(scale, device=DEVICE, requires_grad=True)] + extra


def loss_fn(impl: str, loss: str, tile_size: int):
    """``open_clip``, ``contrast`` (with ``tile_size``) or ``contrast-whole`` (tile_size 0: never tiled)."""
    from open_clip.loss import ClipLoss, SigLipLoss

    from contrast.objectives import info_nce, sigmoid_loss

    if impl == "open_clip":
        return ClipLoss() if loss == "itc" else SigLipLoss()
    tile = 0 if impl == "contrast-whole" else tile_size
    if loss == "itc":
        return lambda i, t, s: info_nce(i, t, s, tile_size=tile)
    return lambda i, t, s, b: sigmoid_loss(i, t, s, b, tile_size=tile)


def step(fn, inputs: list[torch.Tensor], precision: str) -> float:
    """One forward+backward; returns seconds. Gradients are dropped afterwards."""
    amp = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    cuda = DEVICE.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    with amp:
        value = fn(*inputs)
    value.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    for x in inputs:
        x.grad = None
    return seconds


def child_time(loss: str, n: int, impls: list[str], reps: int, tile_size: int, precision: str) -> dict:
    """Best of ``reps`` calls of each implementation, alternating, after one untimed call each."""
    inputs = make_inputs(n, loss)
    fns = {impl: loss_fn(impl, loss, tile_size) for impl in impls}
    for fn in fns.values():
        step(fn, inputs, precision)
    best = {impl: float("inf") for impl in impls}
    for _ in range(reps):
        for impl, fn in fns.items():
            best[impl] = min(best[impl], step(fn, inputs, precision))
    return best


def child_memory(loss: str, n: int, impl: str, tile_size: int, precision: str) -> dict:
    """Peak extra memory (and time) of one call, after a warm-up call on a batch of 64 (threads, kernels)."""
    fn = loss_fn(impl, loss, tile_size)
    step(fn, make_inputs(64, loss), precision)
    inputs = make_inputs(n, loss)
    mib, seconds = peak_extra_mib(lambda: step(fn, inputs, precision))
    return {"peak_mib": mib, "seconds": seconds}


def run_child(args, *child_args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *child_args, "--reps", str(args.reps),
           "--tile-size", str(args.tile_size), "--precision", args.precision, "--device", args.device]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode:
        sys.exit(f"{' '.join(child_args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args, loss: str, n: int) -> dict:
    """Times (one process, alternating) and peak extra memory (a fresh process per implementation)."""
    impls = ["contrast", "open_clip"]
    if args.whole_too and mode(n, args.tile_size) != "whole":
        impls.insert(1, "contrast-whole")
    best = run_child(args, "time", loss, str(n), ",".join(impls))
    return {impl: {"best_s": best[impl], **run_child(args, "memory", loss, str(n), impl)} for impl in impls}


def mode(n: int, tile_size: int) -> str:
    return "whole" if tile_size == 0 or n * n <= tile_size * tile_size else f"tiled {tile_size}"


def print_table(args, results: list[tuple[str, int, dict]]) -> None:
    print(f"{'loss':<8} {'B':>6} {'impl':<15} {'mode':<11} {'fwd+bwd s':>10} {'peak extra MiB':>15}")
    for loss, n, res in results:
        for impl, r in res.items():
            kind = {"contrast": mode(n, args.tile_size), "contrast-whole": "whole"}.get(impl, "-")
            print(f"{loss:<8} {n:>6} {impl:<15} {kind:<11} {r['best_s']:>10.3f} {r['peak_mib']:>15.0f}")
    print("speed-up (open_clip's time over contrast's) and peak extra memory (contrast's over open_clip's):")
    for loss, n, res in results:
        for impl in (i for i in res if i.startswith("contrast")):
            ratio = res["open_clip"]["best_s"] / res[impl]["best_s"]
            memory = res[impl]["peak_mib"] / max(res["open_clip"]["peak_mib"], 1.0)
            name = "contrast" if impl == "contrast" else "contrast (whole)"
            print(f"{loss:<8} B={n:<6} memory {memory:.2f}x  {name} / open_clip: {ratio:.2f}x")


def print_big(args, n: int, results: list[tuple[str, dict]]) -> None:
    if args.device == "cuda":
        ram_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    tile = args.tile_size
    print(f"\nB={n}, D={D}, contrast tiled ({tile}x{tile} tiles), one call in a fresh process after a warm-up on B=64:")
    for loss, r in results:
        print(f"{loss:<8} {n:>6} contrast   {mode(n, tile):<11} {r['seconds']:>8.1f} s {r['peak_mib']:>9.0f} MiB extra")
    full = n * n * 4 / 2**30  # one fp32 (n, n) matrix
    verdict = "cannot run here" if 4 * full > ram_gib else "not run"
    print(f"open_clip: {verdict}. Its ClipLoss holds two {n}x{n} fp32 logit matrices ({full:.1f} GiB each) and their "
          f"log-softmaxes at least ({4 * full:.1f} GiB), SigLipLoss the logits, a label matrix and their products; "
          f"this {'GPU' if args.device == 'cuda' else 'machine'} has {ram_gib:.0f} GiB of memory.")


def main() -> None:
    from contrast.config import LossConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,4096,16384", help="comma-separated batch sizes for the side-by-side table")
    ap.add_argument("--big", type=int, default=65536, help="batch size of the tiled-only runs (0: skip them)")
    ap.add_argument("--big-losses", default="itc,sigmoid")
    ap.add_argument("--losses", default="itc,sigmoid")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tile-size", type=int, default=LossConfig.tile_size, help="loss.tile_size for contrast")
    ap.add_argument("--no-whole", dest="whole_too", action="store_false",
                    help="no extra contrast row with tile_size 0 where the default tiles")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        kind, loss, n, impls = args.child
        if kind == "time":
            out = child_time(loss, int(n), impls.split(","), args.reps, args.tile_size, args.precision)
        else:
            out = child_memory(loss, int(n), impls, args.tile_size, args.precision)
        print(json.dumps(out))
        return
    where = (torch.cuda.get_device_name() if args.device == "cuda" else
             f"{torch.get_num_threads()} threads, fp32 matmul peak {matmul_peak() / 1e9:.1f} GFLOP/s (2048^3 matmul, "
             "best of 10)")
    print(f"torch {torch.__version__}, {where}; D={D}, {args.precision}, loss.tile_size {args.tile_size}; "
          f"time: best of {args.reps} calls after a first one; memory: one call in a fresh process")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    losses = [s for s in args.losses.split(",") if s]
    table = [(loss, n, measure(args, loss, n)) for n in sizes for loss in losses]
    print_table(args, table)
    write_json(args, table, [])  # written again below: a failed big run leaves the table
    if args.big:
        if args.tile_size == 0:
            args.tile_size = LossConfig.tile_size
        big = [(loss, run_child(args, "memory", loss, str(args.big), "contrast")) for loss in args.big_losses.split(",")]
        print_big(args, args.big, big)
        write_json(args, table, big)


def write_json(args, table: list[tuple[str, int, dict]], big: list[tuple[str, dict]]) -> None:
    if not args.json:
        return
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                   "precision": args.precision, "tile_size": args.tile_size,
                   "table": [{"loss": loss, "B": n, **res} for loss, n, res in table],
                   "big": [{"loss": loss, "B": args.big, **r} for loss, r in big]}, f, indent=2)


if __name__ == "__main__":
    main()
