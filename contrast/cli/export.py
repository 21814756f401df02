"""``contrast export --checkpoint RUN --format timm|hf|open_clip|llava --out DIR`` and ``contrast import --weights ...``."""

from __future__ import annotations

import argparse

from contrast.errors import UserError
from contrast.export import FORMATS, ExportError, export_checkpoint, import_checkpoint
from contrast.import_checkpoints import READS
from contrast.towers.convert import ConversionError


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        if args.format == "llava":  # a whole unified-embedding decoder run, not only its tower
            from contrast.export_llava import export_llava_checkpoint

            report = export_llava_checkpoint(args.checkpoint, args.out)
        else:
            report = export_checkpoint(args.checkpoint, args.format, args.out)
    except (ExportError, ConversionError) as e:
        raise UserError(str(e)) from e
    print(report.summary())
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    qg = {"auto": None, "yes": True, "no": False}[args.quick_gelu]
    try:
        out = import_checkpoint(args.weights, args.out, open_clip_config=args.open_clip_config, quick_gelu=qg,
                                tokenizer=args.tokenizer)
    except ConversionError as e:
        raise UserError(str(e)) from e
    print(f"imported {args.weights} into {out} (load with contrast.load('{out}'), train with --set or eval as any run)")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a trained image tower to timm / Hugging Face / open_clip, verified")
    p.add_argument("--checkpoint", required=True, help="RUN_DIR or a step directory")
    p.add_argument("--format", required=True, choices=[*FORMATS, "llava"],
                   help="timm / hf / open_clip: the image tower; llava: a decoder run (tower, projector, LM, processor)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_cmd_export)
    q = subparsers.add_parser(
        "import", help="convert a Hugging Face CLIP / SigLIP or open_clip / OpenAI checkpoint into a contrast run",
        description="Reads: " + "; ".join(READS) + ". What cannot be converted is refused, naming the part.")
    q.add_argument("--weights", required=True, help="a Hugging Face or open_clip (local-dir) folder, or a state dict: "
                   ".safetensors, .pt/.bin, or an OpenAI TorchScript .pt")
    q.add_argument("--tokenizer", default=None,
                   help="a local Hugging Face tokenizer folder, for checkpoints that name one they do not ship "
                   "(open_clip SigLIP's hf_tokenizer_name)")
    q.add_argument("--open-clip-config", default=None, help="open_clip model config JSON (open_clip_config.json or model_cfg)")
    q.add_argument("--quick-gelu", choices=("auto", "yes", "no"), default="auto",
                   help="auto: from the open_clip config; QuickGELU for OpenAI checkpoints without one")
    q.add_argument("--out", required=True, help="run directory to create")
    q.set_defaults(func=_cmd_import)
