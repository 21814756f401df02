"""``contrast caption IMAGE ... --checkpoint RUN_DIR``: captions from a trained BLIP model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import UnidentifiedImageError

from contrast.caption import MAX_CAPTION_TOKENS, Caption, caption_images
from contrast.data.collate import decode_image
from contrast.errors import UserError
from contrast.runs import load


def _caption(args: argparse.Namespace) -> int:
    model, preprocess, tokenizer = load(args.checkpoint, device=args.device)
    if not model.supports("caption"):
        raise UserError(
            f"{args.checkpoint} holds a {type(model).__name__}, which has no captioning decoder; "
            "train a model of kind blip (e.g. recipes/blip_tiny.yaml) to caption images"
        )
    if args.beams < 1:
        raise UserError(f"--beams must be at least 1, got {args.beams}")
    pixels = []
    for path in args.images:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"image not found: {p}")
        try:
            pixels.append(preprocess(decode_image(p).convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read {p} as an image ({e})") from e
    results: list[Caption] = []
    for lo in range(0, len(pixels), args.batch_size):
        chunk = torch.stack(pixels[lo : lo + args.batch_size]).to(args.device)
        results += caption_images(model, tokenizer, chunk, args.beams, args.max_length, args.length_penalty)
    for path, cap in zip(args.images, results):
        if args.json:
            print(json.dumps({"image": path, "caption": cap.text, "logprob": round(cap.logprob, 4)}))
        else:
            print(f"{path}\t{cap.text}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="caption images with a trained BLIP model")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint of a model of kind blip")
    p.add_argument("--beams", type=int, default=1, help="beam width; 1 (default) is greedy decoding")
    p.add_argument("--max-length", type=int, default=MAX_CAPTION_TOKENS, help="most tokens per caption, start token included")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: rank finished beams by logprob / length ** this")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(func=_caption)
