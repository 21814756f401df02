"""``contrast plan RECIPE [--set a.b=value ...] [--memory GiB] [--peak-tflops X] [--world N] [--mfu F] [--json]``."""

from __future__ import annotations

import argparse
import json

from contrast.config import load_recipe
from contrast.plan import Target, format_plan, make_plan, make_target


def _plan(args: argparse.Namespace) -> int:
    target = make_target(args.memory, args.peak_tflops, args.world, args.mfu)  # bad numbers fail before building
    cfg = load_recipe(args.recipe, args.set)
    plan = make_plan(cfg, target)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan, args.recipe))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    d = Target()
    p = sub.add_parser("plan", help="measure a recipe's memory, FLOPs and step time, and say what makes it fit",
                       description="Measure the recipe's model on this machine (a few small micro-steps) and predict "
                                   "per-device memory, FLOPs and step time for its batch; advise the --set overrides "
                                   "(micro_batch_size, grad_checkpointing, fsdp) that make it fit --memory.")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/clip_tiny.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.batch_size=4096 (repeatable)")
    p.add_argument("--memory", default=str(d.memory_gib), metavar="GiB",
                   help=f"memory per device in GiB (default {d.memory_gib:g})")
    p.add_argument("--peak-tflops", default=str(d.peak_tflops), metavar="X",
                   help=f"peak TFLOP/s of one device in the recipe's precision (default {d.peak_tflops:g}, H100 bf16)")
    p.add_argument("--world", default=str(d.world), metavar="N", help=f"number of devices (default {d.world})")
    p.add_argument("--mfu", default=str(d.mfu), metavar="F",
                   help=f"share of the peak the step achieves, 0..1 (default {d.mfu:g})")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)
