"""``contrast train RECIPE [--out RUN_DIR] [--set a.b=value ...] [--resume latest|CKPT]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from contrast import distributed as D
from contrast.config import load_recipe
from contrast.runs import load
from contrast.train.loop import train


def default_run_dir(recipe: str) -> Path:
    return Path("runs") / Path(recipe).stem


def _train(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.set)
    out = Path(args.out) if args.out else default_run_dir(args.recipe)
    result = train(cfg, out, resume=args.resume, progress=not args.no_progress)
    if not D.info().is_main:
        return 0
    print(f"\ntrained {result.step} steps; final loss {result.last_loss:.4f}")
    if result.skipped:
        print("skipped samples: " + ", ".join(f"{n} {cause.replace('_', ' ')}" for cause, n in result.skipped.items()))
    if cfg.eval.tasks:
        from contrast.evaluate.zeroshot import evaluate_zeroshot, load_task

        model, preprocess, tokenizer = load(out)
        print("zero-shot on held-out data:")
        for t in cfg.eval.tasks:
            r = evaluate_zeroshot(model, preprocess, tokenizer, load_task(t), data_cfg=cfg.data,
                                  image_size=cfg.model.image.image_size,
                                  batch_size=cfg.eval.batch_size)
            print(f"  {r['task']:<12} top-1 {r['top1']:.3f}  top-5 {r['top5']:.3f}  "
                  f"(n={r['n']}, chance {r['chance_top1']:.3f})")
    print(f"checkpoint: {result.checkpoint}")
    print(f"metrics:    {out / 'metrics.jsonl'}")
    print(f"loss plot:  {out / 'loss.png'}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a recipe")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/clip_tiny.yaml")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--resume", help="'latest' (the run directory's newest checkpoint) or a checkpoint path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
