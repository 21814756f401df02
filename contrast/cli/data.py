"""``contrast data fetch emoji [--cache DIR] [--skin-tones keep|drop] [--force]``."""

from __future__ import annotations

import argparse

from contrast.data.emoji import EmojiError, fetch_emoji, load_emoji
from contrast.errors import UserError


def _fetch(args: argparse.Namespace) -> int:
    if args.name != "emoji":
        raise UserError(f"unknown dataset '{args.name}'; available: emoji")
    try:
        out = fetch_emoji(args.cache, skin_tones=args.skin_tones, force=args.force, npm=args.npm)
    except EmojiError as e:
        raise UserError(str(e)) from e
    sizes = ", ".join(f"{s} {len(load_emoji(out, s))}" for s in ("train", "val", "test"))
    print(f"emoji dataset at {out} ({sizes})")
    print(f"train on it with: --set data.source={out}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="fetch and prepare real image-caption datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = data_sub.add_parser(
        "fetch", help="download a dataset into a cache folder and save it as a datasets folder"
    )
    fetch.add_argument("name", choices=["emoji"], help="emoji: Google's 64x64 emoji with their Unicode names (npm)")
    fetch.add_argument("--cache", default=None, help="cache folder (default ~/.cache/contrast)")
    fetch.add_argument(
        "--skin-tones", choices=["keep", "drop"], default="keep",
        help="keep skin-tone variants (in their base emoji's split) or drop them",
    )
    fetch.add_argument("--force", action="store_true", help="rebuild the dataset even if it exists")
    fetch.add_argument("--npm", default="npm", help="the npm executable")
    fetch.set_defaults(func=_fetch)
