"""``contrast export --checkpoint RUN --format timm|hf|open_clip --out DIR`` and ``contrast import --weights ...``."""

from __future__ import annotations

import argparse

from contrast.errors import UserError
from contrast.export import FORMATS, ExportError, export_checkpoint, import_checkpoint
from contrast.towers.convert import ConversionError


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        report = export_checkpoint(args.checkpoint, args.format, args.out)
    except (ExportError, ConversionError) as e:
        raise UserError(str(e)) from e
    print(report.summary())
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    qg = {"auto": None, "yes": True, "no": False}[args.quick_gelu]
    try:
        out = import_checkpoint(args.weights, args.out, open_clip_config=args.open_clip_config, quick_gelu=qg)
    except ConversionError as e:
        raise UserError(str(e)) from e
    print(f"imported {args.weights} into {out} (load with contrast.load('{out}'), train with --set or eval as any run)")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a trained image tower to timm / Hugging Face / open_clip, verified")
    p.add_argument("--checkpoint", required=True, help="RUN_DIR or a step directory")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_export)
    q = subparsers.add_parser("import", help="convert an open_clip / OpenAI CLIP checkpoint into a contrast run directory")
    q.add_argument("--weights", required=True, help="state dict: .safetensors, .pt/.bin, or an OpenAI TorchScript .pt")
    q.add_argument("--open-clip-config", default=None, help="open_clip model config JSON (open_clip_config.json or model_cfg)")
    q.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto",
                   help="auto: from the open_clip config; QuickGELU for OpenAI checkpoints without one")
    q.add_argument("--out", required=True, help="run directory to create")
    q.set_defaults(func=_cmd_import)
