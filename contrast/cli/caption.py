"""``contrast caption IMAGE ... --checkpoint RUN_DIR``: captions from a trained BLIP model.

Images are read through :mod:`contrast.data.decode` (the run's ``data.max_image_pixels`` and ``data.strict``):
unreadable ones are skipped with one summary line on stderr, so stdout holds one caption line per captioned image.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from contrast.caption import MAX_CAPTION_TOKENS, Caption, caption_images
from contrast.data.decode import SampleReader
from contrast.errors import UserError
from contrast.runs import load, load_config_of


def _caption(args: argparse.Namespace) -> int:
    cfg, _ = load_config_of(args.checkpoint)
    model, preprocess, tokenizer = load(args.checkpoint, device=args.device)
    if not model.supports("caption"):
        raise UserError(
            f"{args.checkpoint} holds a {type(model).__name__}, which has no captioning decoder; "
            "train a model of kind blip (e.g. recipes/blip_tiny.yaml) to caption images"
        )
    if args.beams < 1:
        raise UserError(f"--beams must be at least 1, got {args.beams}")
    paths, pixels = _read_images(args.images, preprocess, SampleReader.of(cfg.data))
    results: list[Caption] = []
    for lo in range(0, len(pixels), args.batch_size):
        chunk = torch.stack(pixels[lo : lo + args.batch_size]).to(args.device)
        results += caption_images(model, tokenizer, chunk, args.beams, args.max_length, args.length_penalty)
    for path, cap in zip(paths, results):
        if args.json:
            print(json.dumps({"image": path, "caption": cap.text, "logprob": round(cap.logprob, 4)}))
        else:
            print(f"{path}\t{cap.text}")
    return 0


def _read_images(images: list[str], preprocess, reader: SampleReader) -> tuple[list[str], list[torch.Tensor]]:
    """The readable images among ``images`` and their pixels; the others are skipped, with one summary line on
    stderr (the run's data.strict stops at the first instead). None readable is an error naming the first."""
    paths, pixels = [], []
    for path in images:
        img = reader.image(path, path)
        if img is not None:
            paths.append(path)
            pixels.append(preprocess(img))
    if reader.first_error is not None and not paths:
        where, e = reader.first_error
        what = f"image not found: {where}" if e.cause == "missing" else f"cannot read {where} as an image ({e})"
        others = "" if len(images) == 1 else f"; no other image could be read either ({reader.skips.summary()})"
        raise UserError(what + others)
    if reader.skips:
        print(f"{reader.skips.summary()}; captioned the other {len(paths)}", file=sys.stderr)
    return paths, pixels


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
