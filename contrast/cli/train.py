"""``contrast train RECIPE [--out RUN_DIR] [--set a.b=value ...] [--resume latest|CKPT]`` and
``contrast train consolidate CHECKPOINT`` (a sharded FSDP checkpoint -> model.safetensors, one process) and
``contrast train wise RUN --alpha A --out DIR`` (WiSE-FT: unlocked tower layers averaged with their pretrained weights)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from contrast.config import load_recipe
from contrast.errors import UserError
from contrast.train.checkpoint import consolidate
from contrast.train.loop import train

CONSOLIDATE = "consolidate"
WISE = "wise"


def default_run_dir(recipe: str) -> Path:
    return Path("runs") / Path(recipe).stem


def _consolidate(args: argparse.Namespace) -> int:
    if not args.checkpoint:
        raise UserError("contrast train consolidate needs a checkpoint: a run directory or a step directory")
    print(f"consolidated weights: {consolidate(args.checkpoint)}")
    return 0


def _wise(args: argparse.Namespace) -> int:
    from contrast.train.wise import wise_ft

    if not args.checkpoint or args.alpha is None or not args.out:
        raise UserError("contrast train wise needs a run, --alpha (0: pretrained towers .. 1: the fine-tuned run) "
                        "and --out, e.g. contrast train wise runs/lit --alpha 0.5 --out runs/lit_wise")
    out, names = wise_ft(args.checkpoint, args.alpha, args.out)
    print(f"WiSE-FT (alpha {args.alpha}): {len(names)} pretrained tensors averaged; run directory {out}")
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.recipe == CONSOLIDATE:
        return _consolidate(args)
    if args.recipe == WISE:
        return _wise(args)
    if args.checkpoint:
        raise UserError(f"unexpected argument '{args.checkpoint}'; contrast train takes one recipe "
                        f"(or: contrast train {CONSOLIDATE} CHECKPOINT)")
    cfg = load_recipe(args.recipe, args.set)
    out = Path(args.out) if args.out else default_run_dir(args.recipe)
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if not result.main:  # the process group is gone by now: the run says which process reports
        return 0
    if math.isfinite(result.last_loss):
        print(f"\ntrained {result.step} steps; final loss {result.last_loss:.4f}")
    else:  # no step taken here: train.steps 0 (closed-form heads), or a run resumed at its last step
        print(f"\nno training step taken in this call (the run is at step {result.step})")
    if result.skipped:
        print("skipped samples: " + ", ".join(f"{n} {cause.replace('_', ' ')}" for cause, n in result.skipped.items()))
    if result.metrics:
        print("evaluation at the end (held-out data):")
        for name, value in result.metrics.items():
            print(f"  {name:<40} {value:.4f}")
    if result.best:
        print(f"best {result.best['metric']}: {result.best['value']:.4f} at step {result.best['step']} "
              f"({out / 'checkpoints' / 'best'} names its checkpoint)")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {out / 'metrics.jsonl'}")
    print(f"loss plot:  {out / 'loss.png'}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a recipe (or consolidate a sharded checkpoint)")
    p.add_argument("recipe", help=f"YAML recipe, e.g. recipes/clip_tiny.yaml; or '{CONSOLIDATE}' followed by a "
                                  "checkpoint to write the model.safetensors of a sharded (FSDP) checkpoint")
    p.add_argument("checkpoint", nargs="?", help=f"with '{CONSOLIDATE}': a run directory, its checkpoints folder or "
                                                 f"a step directory (in one process, no torchrun); with '{WISE}': a run")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--resume", help="'latest' (the run directory's newest checkpoint) or a checkpoint path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--alpha", type=float, help=f"with '{WISE}': the fine-tuned weights' share (WiSE-FT)")
    p.set_defaults(func=_train)
