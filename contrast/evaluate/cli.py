"""``contrast eval ...`` commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _zeroshot(args: argparse.Namespace) -> int:
    import contrast
    from contrast.api import load_config_of
    from contrast.evaluate.zeroshot import evaluate_zeroshot, load_task

    cfg, _ = load_config_of(args.checkpoint)
    model, preprocess, tokenizer = contrast.load(args.checkpoint)
    results = []
    for task_path in args.task:
        task = load_task(task_path)
        r = evaluate_zeroshot(model, preprocess, tokenizer, task, data_cfg=cfg.data, batch_size=args.batch_size)
        results.append(r)
        print(f"{r['task']}: top-1 {r['top1']:.3f}  top-5 {r['top5']:.3f}  (n={r['n']}, chance {r['chance_top1']:.3f})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model")
    ev = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    z = ev.add_parser("zeroshot", help="zero-shot classification on task files")
    z.add_argument("--checkpoint", required=True, help="run directory or checkpoint step directory")
    z.add_argument("--task", required=True, nargs="+", help="task file(s), e.g. eval/tasks/shapes.yaml")
    z.add_argument("--batch-size", type=int, default=256)
    z.add_argument("--out", help="write the results as JSON here")
    z.set_defaults(func=_zeroshot)
