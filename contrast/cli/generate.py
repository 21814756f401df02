"""``contrast generate IMAGE ... --checkpoint RUN [--prompt TEXT] [--beams K]``: answers from a decoder model, and
``contrast eval caption --checkpoint RUN [--data SRC] [--split val] [--no-images]``: its held-out caption loss.

Images are read through :mod:`contrast.data.decode` (the run's ``data.max_image_pixels`` and ``data.strict``):
unreadable ones are skipped with one summary line on stderr, so stdout holds one line per answered image.
"""

from __future__ import annotations

import argparse
import json

from contrast.cli.caption import _read_images
from contrast.cli.common import device, user_errors
from contrast.data.collate import stack_images
from contrast.data.decode import SampleReader
from contrast.errors import UserError
from contrast.runs import load, load_config_of


def _load_decoder(checkpoint: str, dev: str):
    cfg, _ = load_config_of(checkpoint)
    model, preprocess, tokenizer = load(checkpoint, device=dev)
    if not model.supports("decoder"):
        raise UserError(f"{checkpoint} holds a {type(model).__name__}, which has no language-model decoder; train a "
                        "model of kind decoder or blip2_stage2 (e.g. recipes/decoder_unified_tiny.yaml)")
    return cfg, model, preprocess, tokenizer


def _generate(args: argparse.Namespace) -> int:
    from contrast.generate import generate

    dev = device(args.device)
    cfg, model, preprocess, tokenizer = _load_decoder(args.checkpoint, dev)
    paths, pixels = _read_images(args.images, preprocess, SampleReader.of(cfg.data))
    with user_errors():
        for lo in range(0, len(pixels), args.batch_size):
            chunk = {k: v.to(dev) for k, v in stack_images(pixels[lo : lo + args.batch_size]).items()}
            found = generate(model, tokenizer, chunk, args.prompt, args.beams, args.max_new_tokens, args.length_penalty)
            for path, g in zip(paths[lo : lo + args.batch_size], found):
                if args.json:
                    print(json.dumps({"image": path, "answer": g.text, "logprob": round(g.logprob, 4)}), flush=True)
                else:
                    print(f"{path}\t{g.text}", flush=True)
    return 0


def _caption_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from contrast.data import load_source
    from contrast.evaluate.captions import caption_batches, caption_loss, caption_rows

    dev = device(args.device)
    cfg, model, preprocess, tokenizer = _load_decoder(args.checkpoint, dev)
    data_cfg = dataclasses.replace(cfg.data, source=args.data) if args.data else cfg.data
    split = args.split or cfg.data.eval_split
    with user_errors():
        ds = load_source(data_cfg, split, cfg.model.image.image_size)
        result = {}
        for images in ([True, False] if args.no_images else [True]):
            reader = SampleReader.of(data_cfg)
            batches = caption_batches(caption_rows(ds), preprocess, tokenizer, reader, args.batch_size, args.limit)
            r = caption_loss(model, batches, dev, images=images)
            result["with_images" if images else "images_off"] = {**r, "skipped": reader.skips.as_dict()}
    for name, r in result.items():
        print(f"caption loss ({name.replace('_', ' ')}): {r['nats_per_token']:.4f} nats/token over "
              f"{int(r['tokens'])} answer tokens of {int(r['captions'])} captions ({data_cfg.source}, {split})")
    if args.no_images:
        w, o = result["with_images"]["nats_per_token"], result["images_off"]["nats_per_token"]
        print(f"the images cut the caption loss by {100 * (o - w) / o:.1f}% on this data")
    if args.json:
        print(json.dumps(result))
    return 0


def add_caption_eval(ev: argparse._SubParsersAction) -> None:
    """``contrast eval caption``, registered by the eval command group."""
    c = ev.add_parser("caption", help="held-out caption loss (nats/token) of a decoder model, with and without images")
    c.add_argument("--checkpoint", required=True, help="run directory or checkpoint of a decoder model")
    c.add_argument("--data", help="a captioned source (default: the run's data.source): synthetic, a captions "
                   "folder, parquet, a save_to_disk folder")
    c.add_argument("--split", help="train | val | test (default: the run's data.eval_split)")
    c.add_argument("--limit", type=int, default=0, help="evaluate the first N rows only (0: all)")
    c.add_argument("--no-images", action="store_true", help="also report the loss with the image path off")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--device", default="auto")
    c.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    c.set_defaults(func=_caption_eval)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a prompt about images with a decoder model (greedy or beam search)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", required=True, help="run directory or checkpoint of kind decoder or blip2_stage2")
    p.add_argument("--prompt", help="the instruction beside the image (default: the run's decoder instruction)")
    p.add_argument("--beams", type=int, default=1, help="beam width; 1 (default) is greedy decoding")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: rank by logprob / length ** this")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.set_defaults(func=_generate)
