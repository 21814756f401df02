"""The ``contrast`` command line: ``contrast train | plan | eval | data | features | caption | generate | export | import |
index``.

``contrast plan`` measures a recipe (parameters, FLOPs, activation memory) and predicts whether and how it fits a
device before training.

Argument parsing lives here, one module per command group, each offering ``add_cli(subparsers)``; this module only
assembles them, so adding a command is one line in ``COMMAND_MODULES``. Commands call the library below.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from contrast.errors import UserError

COMMAND_MODULES = [
    "contrast.cli.train",
    "contrast.cli.plan",
    "contrast.cli.evaluate",
    "contrast.cli.data",
    "contrast.cli.features",
    "contrast.cli.caption",
    "contrast.cli.generate",
    "contrast.cli.export",
    "contrast.cli.index",
]

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrast", description="Contrastive image-text pretraining toolkit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError) as e:
        print(f"contrast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
