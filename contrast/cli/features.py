"""``contrast features extract (--checkpoint RUN_DIR | --recipe FILE) --out DIR``: frozen image-tower features."""

from __future__ import annotations

import argparse

from contrast.config import Blip2ModelConfig, load_recipe
from contrast.data.decode import Skips
from contrast.errors import UserError
from contrast.features import DTYPES, extract_for
from contrast.runs import load_config_of


def _cmd_extract(args: argparse.Namespace) -> int:
    if bool(args.checkpoint) == bool(args.recipe):
        raise UserError("give exactly one tower source: --checkpoint RUN_DIR or --recipe FILE")
    if args.checkpoint:  # any run: its image tower
        cfg, _ = load_config_of(args.checkpoint)
        tower_run = str(args.checkpoint)
    else:  # a recipe: the run its BLIP-2 section names (model.blip2.tower), else a fresh model.image
        cfg = load_recipe(args.recipe, args.set)
        tower_run = cfg.model.blip2.tower if isinstance(cfg.model, Blip2ModelConfig) else None
    if args.data:
        cfg.data.source = args.data
    splits = args.split or [cfg.data.train_split, cfg.data.eval_split]
    for split in splits:
        meta = extract_for(cfg, args.out, [split], tower_run=tower_run, batch_size=args.batch_size, shard_size=args.shard_size,
                           dtype=args.dtype, device=args.device, source=str(args.checkpoint or args.recipe))
        info = meta["splits"][split]
        print(f"{split}: {info['rows']} rows x {meta['tokens']} tokens x {meta['width']} -> {args.out}/{split} "
              f"({len(info['shards'])} shards)")
        if info.get("skipped"):
            print(f"{split}: {Skips(info['skipped']).summary()} (counts in {args.out}/meta.json)")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="precompute frozen image-tower features")
    fsub = p.add_subparsers(dest="features_command", required=True, metavar="ACTION")
    e = fsub.add_parser("extract", help="run a frozen image tower over a data source and save safetensors shards")
    e.add_argument("--checkpoint", help="a run directory or checkpoint whose image tower to use")
    e.add_argument("--recipe", help="a recipe whose tower to use (model.blip2.tower, else a fresh model.image)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    e.add_argument("--data", help="data source (default: the run's / recipe's data.source)")
    e.add_argument("--split", action="append", help="split(s) to extract (default: train and eval splits)")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--shard-size", type=int, default=4096, help="rows per shard file")
    e.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=_cmd_extract)
