"""Data-loading throughput from webdataset shards: contrast's loader vs open_clip's ``get_wds_dataset``, in one run.

The shards are made here, with ``contrast data shard``'s writer, from real photographs (scikit-image's sample
photos: random crops of 256..640 px per side, re-encoded as JPEG quality 90) and real PNG art (emoji from the
npm packages ``contrast data fetch emoji`` caches, where present; else photo crops saved as PNG). Both loaders
read the same shards with the same worker count and batch size and produce 224 px training batches: decode,
random resized crop (area 0.9..1, bicubic), normalise, tokenize (BPE, context 32), batch.

Rows:
- loader: one epoch's batches (open_clip's count for the epoch, the same count from contrast's endless stream);
  images/s counted from the first batch on (worker start-up is reported apart, as "first batch s").
- train: the same small CLIP (ViT 224 px, patch 32, width 256, 6 layers; text width 256, 4 layers; embedding 256)
  trained from the shards: open_clip's model + ClipLoss + AdamW over its wds loader in a plain loop, and
  contrast's engine (``contrast.train.loop.setup`` + ``train_step``) over its loader; images/s of the steps after
  the warm-up ones. Decoding workers and the training step share this machine's cores.

Each measurement runs in its own process, ``--repeats`` times with the libraries alternating; the table shows each
one's best repeat (and every repeat: on a shared machine other load shows up as spread). Ends with the line
``contrast / open_clip: X.XXx images/s`` (the loader rows).

open_clip's loader is run with one fix: webdataset >= 0.2.96 ends each shard with an end-of-file marker that
open_clip's ``group_by_keys_nothrow`` does not expect (KeyError 'fname'); ``eof_value=None`` is passed, the fix given
in open_clip's issue 935.

    python eval/bench/data_throughput.py [--samples 2000] [--workers 2] [--batch 64] [--png-share 0.2]
        [--train-steps 5] [--train-batch 32] [--repeats 2] [--no-train] [--work DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

SIZE, CTX, EMBED, WIDTH, PATCH, V_LAYERS, T_LAYERS, HEADS = 224, 32, 256, 256, 32, 6, 4, 4
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "colorwheel", "camera", "coins", "moon", "clock", "grass", "gravel", "brick")
ADJECTIVES = ("bright", "dark", "close", "wide", "small", "sharp", "soft", "busy", "quiet", "warm")


# --------------------------------------------------------------------------------------------------- the shards


def photos() -> dict[str, object]:
    """scikit-image's bundled sample photos (no download), as RGB PIL images."""
    import skimage.data
    from PIL import Image

    out = {}
    for name in PHOTOS:
        try:
            arr = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a sample that needs a download here
            continue
        arr = arr[0] if isinstance(arr, tuple) else arr
        out[name] = Image.fromarray(arr).convert("RGB")
    return out


def emoji_pngs(cache: Path) -> list[Path]:
    """Emoji PNGs of the packages ``contrast data fetch emoji`` unpacked into ``cache`` (any style)."""
    return sorted(cache.glob("emoji-datasource-*/package/img/*/64/*.png"))


def photo_crop(img, rng: random.Random):
    """A random crop of ``img`` resized to a random 256..640 px per side."""
    from PIL import Image

    w, h = rng.randint(256, 640), rng.randint(256, 640)
    scale = rng.uniform(0.35, 1.0)
    cw = max(16, min(img.width, round(img.width * scale)))
    ch = max(16, min(img.height, round(cw * h / w)))
    x, y = rng.randint(0, img.width - cw), rng.randint(0, img.height - ch)
    return img.resize((w, h), Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))


def samples(n: int, png_share: float, seed: int, cache: Path) -> Iterator[dict]:
    """``n`` image-caption rows: JPEG photo crops and (a ``png_share`` of them) PNG art."""
    rng = random.Random(seed)
    pics, art = photos(), emoji_pngs(cache)
    names = sorted(pics)
    for i in range(n):
        adjective = ADJECTIVES[i % len(ADJECTIVES)]
        png = rng.random() < png_share
        if png and art:
            path = art[rng.randrange(len(art))]
            data, caption = path.read_bytes(), f"a {adjective} emoji drawing {path.stem}"
        else:  # a photo crop: JPEG, or PNG where no emoji art is at hand
            name = names[rng.randrange(len(names))]
            img, buf = photo_crop(pics[name], rng), io.BytesIO()
            img.save(buf, format="PNG" if png else "JPEG", **({} if png else {"quality": 90}))
            data, caption = buf.getvalue(), f"a {adjective} photo of the {name.replace('_', ' ')}, crop {i}"
        yield {"image": {"bytes": data, "path": None}, "caption": caption}


def make_shards(work: Path, n: int, png_share: float, shards: int, seed: int, cache: Path) -> Path:
    """A save_to_disk source of ``n`` rows, written as ``shards`` webdataset shards by contrast's shard writer."""
    import datasets
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    from contrast.config import DataConfig
    from contrast.data.shard import write_shards

    datasets.disable_progress_bars()
    feats = Features({"image": ImageFeature(), "caption": Value("string")})
    ds = Dataset.from_generator(samples, gen_kwargs={"n": n, "png_share": png_share, "seed": seed, "cache": cache},
                                features=feats, cache_dir=str(work / "hf-cache"))
    DatasetDict({"train": ds}).save_to_disk(str(work / "source"))
    report = write_shards(DataConfig(source=str(work / "source")), work / "shards", "train",
                          shard_size=-(-n // shards))
    print(report.summary())
    return work / "shards"


def shard_mix(folder: Path) -> str:
    import webdataset as wds

    counts: dict[str, int] = {}
    total_bytes = 0
    for s in wds.WebDataset(sorted(str(p) for p in folder.glob("*.tar")), shardshuffle=False):
        ext = next(k for k in ("jpg", "png", "webp", "gif") if k in s)
        counts[ext] = counts.get(ext, 0) + 1
        total_bytes += len(s[ext])
    n = sum(counts.values())
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"; mean image {total_bytes / n / 1024:.1f} KiB"


# --------------------------------------------------------------------------------------------------- the loaders


def open_clip_loader(shards: Path, workers: int, batch: int):
    """open_clip's training loader over the shards (its own preprocess and tokenizer); yields (pixels, ids)."""
    import functools

    import open_clip
    import open_clip_train.data as ocd
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip_train.data import get_wds_dataset

    # webdataset >= 0.2.96 ends each shard with an end-of-file marker ({}) that open_clip's group_by_keys_nothrow
    # does not expect (KeyError 'fname': open_clip issue 935, webdataset issue 384); the fix named there is
    # eof_value=None, applied to the function open_clip's pipeline calls (workers fork with it).
    if not isinstance(ocd.tar_file_expander, functools.partial):
        ocd.tar_file_expander = functools.partial(ocd.tar_file_expander, eof_value=None)
    n = len(list(shards.glob("train-*.tar")))
    args = argparse.Namespace(
        train_data=str(shards / f"train-{{00000..{n - 1:05d}}}.tar"), val_data=None, dataset_resampled=False,
        train_num_samples=None, train_data_upsampling_factors=None, seed=0, batch_size=batch, world_size=1,
        workers=workers,
    )
    preprocess = open_clip.image_transform(SIZE, is_train=True)
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=SimpleTokenizer(context_length=CTX))
    return info.dataloader, info.dataloader.num_batches


def contrast_config(shards: Path, workers: int, batch: int, steps: int = 1000):
    from contrast.config import new_config

    cfg = new_config("clip")
    cfg.data.source = str(shards)
    cfg.data.num_workers = workers
    cfg.model.image.image_size = SIZE
    cfg.model.embed_dim = EMBED
    cfg.model.image.kwargs = dict(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=V_LAYERS, num_heads=HEADS,
                                  global_pool="token", fc_norm=False)
    cfg.model.text.context_length, cfg.model.text.width = CTX, WIDTH
    cfg.model.text.layers, cfg.model.text.heads = T_LAYERS, HEADS
    cfg.train.batch_size, cfg.train.steps, cfg.train.lr = batch, steps, 1e-4
    cfg.train.warmup_steps, cfg.train.checkpoint_every, cfg.train.log_every = 0, 0, 1_000_000
    return cfg


def contrast_loader(shards: Path, workers: int, batch: int):
    """contrast's training loader over the same shards; yields batch dicts."""
    from contrast.tokenizer import build_tokenizer
    from contrast.train.data import build_loader

    cfg = contrast_config(shards, workers, batch)
    return normalised(build_loader(cfg, build_tokenizer(cfg.model.text), cfg.data.train_split), cfg.model.image)


def normalised(batches, image_cfg):
    """contrast's workers send uint8 pixels, normalised on the training device; here that is this process's CPU,
    and the time it takes is counted, so both rows end with the same normalised float batches."""
    import torch

    from contrast.data.transforms import normalise_batch

    mean, std = torch.tensor(image_cfg.mean).view(-1, 1, 1), torch.tensor(image_cfg.std).view(-1, 1, 1)
    for b in batches:
        b["pixels"] = normalise_batch(b["pixels"], mean, std)
        yield b


def pixels_of(batch) -> object:
    return batch["pixels"] if isinstance(batch, dict) else batch[0]


def time_batches(batches: Iterable, n: int, on_batch=None) -> dict:
    """Take ``n`` batches; images/s from the first batch's arrival to the last (start-up reported apart)."""
    start = time.perf_counter()
    first = images = 0
    for i, batch in enumerate(batches):
        pixels = pixels_of(batch)
        assert tuple(pixels.shape[1:]) == (3, SIZE, SIZE), pixels.shape
        if on_batch is not None:
            on_batch(batch, i)
        if i == 0:
            first = time.perf_counter()
        else:
            images += pixels.shape[0]
        if i + 1 == n:
            break
    end = time.perf_counter()
    return {"first_batch_s": first - start, "images": images, "seconds": end - first,
            "images_per_s": images / max(end - first, 1e-9), "batches": i + 1}


def run_loader(impl: str, shards: Path, workers: int, batch: int) -> dict:
    oc, n = open_clip_loader(shards, workers, batch)
    if impl == "open_clip":
        return time_batches(oc, n)
    del oc
    return time_batches(contrast_loader(shards, workers, batch), n)


# --------------------------------------------------------------------------------------------------- training


def open_clip_model_and_step():
    """open_clip's CLIP of the bench's size, its ClipLoss and AdamW; the step takes its loader's (pixels, ids)."""
    from common import open_clip_trainer

    model, train = open_clip_trainer(embed=EMBED, image_size=SIZE, patch=PATCH, width=WIDTH, v_layers=V_LAYERS,
                                     heads=HEADS, ctx=CTX, t_layers=T_LAYERS)
    return model, lambda batch, i: train(*batch)


def run_train(impl: str, shards: Path, workers: int, batch: int, steps: int, warmup: int, work: Path) -> dict:
    import torch

    torch.manual_seed(0)
    if impl == "open_clip":
        model, step = open_clip_model_and_step()
        model.train()
        loader, _ = open_clip_loader(shards, workers, batch)
    else:
        from contrast.train.loop import setup, train_step

        run = setup(contrast_config(shards, workers, batch, steps + warmup), work / f"contrast-run-{os.getpid()}")
        run.model.train()
        model, loader = run.model, run.loader

        def step(b, i):
            train_step(run, b)

    it = iter(loader)
    for i in range(warmup):  # worker start-up, first allocations
        step(next(it), i)
    r = time_batches(it, steps + 1, on_batch=step)  # the first timed batch starts the clock
    r["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return r


# --------------------------------------------------------------------------------------------------- driver


def child(args: argparse.Namespace, what: str, impl: str) -> dict:
    """Run one measurement in a fresh process (its own workers and memory)."""
    cmd = [sys.executable, __file__, "--child", what, impl, "--work", str(args.work), "--workers", str(args.workers),
           "--batch", str(args.batch), "--train-batch", str(args.train_batch), "--train-steps", str(args.train_steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(lines[-1])


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000, help="samples in the shards")
    ap.add_argument("--shards", type=int, default=8, help="number of shards (at least --workers)")
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes, both libraries")
    ap.add_argument("--batch", type=int, default=64, help="loader rows' batch size")
    ap.add_argument("--png-share", type=float, default=0.2, help="share of PNG images among the samples")
    ap.add_argument("--train-batch", type=int, default=32, help="train rows' batch size")
    ap.add_argument("--train-steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    ap.add_argument("--no-train", action="store_true", help="skip the end-to-end training rows")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each measurement (the best is reported)")
    ap.add_argument("--work", type=Path, default=None, help="keep the shards here (default: a temporary folder)")
    ap.add_argument("--emoji-cache", type=Path, default=Path.home() / ".cache" / "contrast",
                    help="where contrast data fetch emoji unpacked its packages (PNG art)")
    ap.add_argument("--child", nargs=2, metavar=("WHAT", "IMPL"), help=argparse.SUPPRESS)
    return ap.parse_args()


Rows = dict[tuple[str, str], list[dict]]  # (row, impl) -> one result per repeat


def best(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if "error" not in r]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else None


def print_table(rows: Rows) -> None:
    print(f"{'row':<8} {'impl':<10} {'img/s':>8} {'images':>7} {'seconds':>8} {'first batch s':>14} {'params M':>9}"
          "  every repeat's img/s")
    for (what, impl), runs in rows.items():
        r = best(runs)
        if r is None:
            print(f"{what:<8} {impl:<10} failed: {runs[0]['error']}")
            continue
        every = ", ".join(f"{x['images_per_s']:.1f}" if "error" not in x else "failed" for x in runs)
        params = f"{r['params_m']:.2f}" if "params_m" in r else "-"
        print(f"{what:<8} {impl:<10} {r['images_per_s']:>8.1f} {r['images']:>7} {r['seconds']:>8.2f} "
              f"{r['first_batch_s']:>14.2f} {params:>9}  {every}")


def ratio(rows: Rows, what: str) -> str:
    ours, theirs = best(rows.get((what, "contrast"), [])), best(rows.get((what, "open_clip"), []))
    if ours is None or theirs is None:
        return "n/a"
    return f"{ours['images_per_s'] / theirs['images_per_s']:.2f}x"


def measure(args: argparse.Namespace, whats: list[str]) -> Rows:
    """Every (row, impl) ``args.repeats`` times, alternating which library goes first (drift and other load on the
    machine hit both alike); the table reports each one's best repeat."""
    rows: Rows = {}
    for what in whats:
        for rep in range(args.repeats):
            for impl in ("open_clip", "contrast")[:: 1 if rep % 2 == 0 else -1]:
                rows.setdefault((what, impl), []).append(child(args, what, impl))
    return {k: rows[k] for k in sorted(rows, key=lambda k: (whats.index(k[0]), k[1] != "open_clip"))}


def main() -> None:
    args = parse_args()
    if args.child:
        what, impl = args.child
        shards = args.work / "shards"
        r = (run_loader(impl, shards, args.workers, args.batch) if what == "loader" else
             run_train(impl, shards, args.workers, args.train_batch, args.train_steps, 2, args.work))
        print(json.dumps(r))
        return
    if args.shards < args.workers:
        sys.exit(f"--shards ({args.shards}) must be at least --workers ({args.workers}): open_clip needs a shard a worker")
    keep = args.work is not None
    args.work = args.work or Path(tempfile.mkdtemp(prefix="data-throughput-"))
    try:
        bench(args)
    finally:
        if not keep:
            shutil.rmtree(args.work, ignore_errors=True)


def bench(args: argparse.Namespace) -> None:
    import torch

    t0 = time.perf_counter()
    if (args.work / "shards" / "info.json").is_file():
        print(f"reusing the shards in {args.work / 'shards'}")
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        make_shards(args.work, args.samples, args.png_share, args.shards, 0, args.emoji_cache)
    print(f"shards: {shard_mix(args.work / 'shards')} ({time.perf_counter() - t0:.0f} s to make)")
    rows = measure(args, ["loader"] + ([] if args.no_train else ["train"]))
    print(f"CPUs: {os.cpu_count()} (usable {len(os.sched_getaffinity(0))}); load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.workers} workers; {SIZE} px; loader "
          f"batch {args.batch}; train batch {args.train_batch} x {args.train_steps} timed steps; best of "
          f"{args.repeats} repeats")
    print_table(rows)
    if not args.no_train:
        print(f"train (end to end) contrast / open_clip: {ratio(rows, 'train')} images/s")
    print(f"contrast / open_clip: {ratio(rows, 'loader')} images/s")


if __name__ == "__main__":
    main()
