"""``contrast train RECIPE [--out RUN_DIR] [--set a.b=value ...] [--resume latest|CKPT]`` and
``contrast train consolidate CHECKPOINT`` (a sharded FSDP checkpoint -> model.safetensors, one process)."""

from __future__ import annotations

import argparse
from pathlib import Path

from contrast import distributed as D
from contrast.config import load_recipe
from contrast.errors import UserError
from contrast.runs import load
from contrast.train.checkpoint import consolidate
from contrast.train.loop import train

CONSOLIDATE = "consolidate"


def default_run_dir(recipe: str) -> Path:
    return Path("runs") / Path(recipe).stem


def _consolidate(args: argparse.Namespace) -> int:
    if not args.checkpoint:
        raise UserError("contrast train consolidate needs a checkpoint: a run directory or a step directory")
    print(f"consolidated weights: {consolidate(args.checkpoint)}")
    return 0


def _train(args: argparse.Namespace) -> int:
    if args.recipe == CONSOLIDATE:
        return _consolidate(args)
    if args.checkpoint:
        raise UserError(f"unexpected argument '{args.checkpoint}'; contrast train takes one recipe "
                        f"(or: contrast train {CONSOLIDATE} CHECKPOINT)")
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
    p = sub.add_parser("train", help="train a model from a recipe (or consolidate a sharded checkpoint)")
    p.add_argument("recipe", help=f"YAML recipe, e.g. recipes/clip_tiny.yaml; or '{CONSOLIDATE}' followed by a "
                                  "checkpoint to write the model.safetensors of a sharded (FSDP) checkpoint")
    p.add_argument("checkpoint", nargs="?", help=f"with '{CONSOLIDATE}': a run directory, its checkpoints folder or "
                                                 "a step directory (in one process, no torchrun)")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--resume", help="'latest' (the run directory's newest checkpoint) or a checkpoint path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)
