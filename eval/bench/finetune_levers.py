"""Fine-tuning an imported CLIP: each lever's held-out retrieval and zero-shot, before and after.

The start is a checkpoint the project trains and exports itself: the real-tower LiT run (recipes/lit_emoji.yaml,
trained on Google's emoji art) written in open_clip's format by ``contrast export --format open_clip`` and read back
by ``contrast import``: an imported CLIP. Every row fine-tunes it with recipes/finetune_clip_emoji.yaml on a new art
style, Twitter's (``train`` split), and is scored by eval/bench/lit_quality.py's ``evaluate`` (retrieval hit@k both
ways with shared captions counted as matches, zero-shot Unicode-category top-1) on

- Twitter ``test``: emoji never trained on, in the new style (what fine-tuning is for);
- Google ``test``: emoji never trained on, in the style the start was made on (what fine-tuning keeps).

Rows: ``imported`` (no training); ``lit`` (image tower locked, text tower and projections trained: LiT on top of the
import); ``full_bn_train`` (every layer at the towers' rate, no layer decay, the CNN's batch-norm statistics updated
from the training batches); ``full`` (the same with them frozen, as the recipe sets); ``full_ema`` (the same run's moving average,
RUN/ema); ``full_wise`` (WiSE-FT of ``full`` at alpha 0.5: ``contrast train wise``); ``decay`` (layer-wise decay
0.75, the recipe); ``decay_ema`` (its moving average). The runs differ only in the keys named; same steps, batches
and seed.

With ``--family siglip`` the start is the same LiT recipe trained on SigLIP's sigmoid loss (CCA heads, then 100 steps
with a learned logit bias), and the rows fine-tune it with recipes/finetune_siglip_emoji.yaml.

    python eval/bench/finetune_levers.py [--out runs/finetune_levers] [--steps 150] [--rows ...] [--family siglip]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lit_quality import contrast_encoder, emoji_sets, evaluate  # noqa: E402

RECIPES = {"clip": ROOT / "recipes/finetune_clip_emoji.yaml", "siglip": ROOT / "recipes/finetune_siglip_emoji.yaml"}
# --family siglip: the LiT start trained on SigLIP's sigmoid loss (CCA heads, then sigmoid steps with a learned bias)
SIGLIP_START = ["loss.itc=0", "loss.sigmoid=1", "model.init_logit_bias=-10", "model.init_logit_scale=2.302585",
                "train.steps=100", "train.log_every=20"]
ROWS = {  # row -> (training run, overrides) ; None: no training
    "imported": None,
    "lit": ("lit", ["model.image.locked=true", "train.layer_decay=null", "train.ema=0"]),
    "full_bn_train": ("full_bn_train", ["train.layer_decay=null", "model.image.frozen_norm_stats=false"]),
    "full": ("full", ["train.layer_decay=null"]),
    "full_ema": ("full", None),
    "full_wise": ("full", None),
    "decay": ("decay", []),
    "decay_ema": ("decay", None),
}


def contrast_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "contrast", *args], check=True, cwd=ROOT)


def imported_start(out: Path, family: str) -> Path:
    """The LiT run (trained when missing; for SigLIP on the sigmoid loss), exported to open_clip format and imported
    back."""
    lit = out / ("lit_emoji" if family == "clip" else "lit_emoji_siglip")
    if not (lit / "checkpoints" / "latest").is_file():
        sets = [f"data.source={emoji_sets()['google']}", *(SIGLIP_START if family == "siglip" else [])]
        contrast_cli("train", "recipes/lit_emoji.yaml", "--out", str(lit), *[x for v in sets for x in ("--set", v)])
    exported, imported = out / f"{lit.name}_open_clip", out / f"{family}_imported"
    if not (exported / "open_clip_config.json").is_file():
        contrast_cli("export", "--checkpoint", str(lit), "--format", "open_clip", "--out", str(exported))
    if not (imported / "config.yaml").is_file():
        contrast_cli("import", "--weights", str(exported), "--out", str(imported))
    return imported


def fine_tune(recipe: Path, name: str, overrides: list[str], out: Path, start: Path, twitter: Path,
              steps: int | None) -> float:
    """Train one row's run (unless finished); its wall seconds."""
    from contrast.config import load_recipe
    from contrast.train.loop import train

    run = out / name
    if (run / "checkpoints" / "latest").is_file():
        return float("nan")
    sets = [f"train.init_from={start}", f"data.source={twitter}", "eval.tasks=[]", "eval.retrieval_split=null",
            *(["train.steps=" + str(steps)] if steps else []), *overrides]
    started = time.perf_counter()
    train(load_recipe(recipe, sets), run, progress=False)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/finetune_levers"))
    ap.add_argument("--steps", type=int, default=None, help="train.steps of every run (default: the recipe's)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--family", choices=sorted(RECIPES), default="clip",
                    help="clip: the LiT run on InfoNCE; siglip: on the sigmoid loss (its recipe and runs in OUT/siglip)")
    args = ap.parse_args(argv)
    from datasets import load_from_disk

    out = args.out.resolve() / ("" if args.family == "clip" else args.family)
    out.mkdir(parents=True, exist_ok=True)
    sets = emoji_sets()
    start = imported_start(out, args.family)
    rows = args.rows.split(",")
    wall: dict[str, float] = {}
    for row in rows:
        spec = ROWS[row]
        if spec is not None and spec[1] is not None:
            wall[spec[0]] = fine_tune(RECIPES[args.family], spec[0], spec[1], out, start, sets["twitter"], args.steps)
    if "full_wise" in rows and not (out / "full_wise" / "model.safetensors").is_file():
        contrast_cli("train", "wise", str(out / "full"), "--alpha", "0.5", "--out", str(out / "full_wise"))
    runs = {"imported": start, "lit": out / "lit", "full_bn_train": out / "full_bn_train", "full": out / "full", "full_ema": out / "full" / "ema",
            "full_wise": out / "full_wise", "decay": out / "decay", "decay_ema": out / "decay" / "ema"}
    eval_sets = {"twitter test (new style)": load_from_disk(str(sets["twitter"]))["test"],
                 "google test (start's style)": load_from_disk(str(sets["google"]))["test"]}
    results = {}
    for row in rows:
        with torch.no_grad():
            enc = contrast_encoder(runs[row])
            results[row] = {where: evaluate(enc, ds) for where, ds in eval_sets.items()}
        print(json.dumps({"row": row, **results[row]}), flush=True)
    cols = ["i2t@1", "i2t@10", "t2i@1", "t2i@10", "zs_top1"]
    print("\n| row | " + " | ".join(f"{w.split(' (')[0]} {c}" for w in eval_sets for c in cols) + " | train s |")
    print("|---" * (1 + len(cols) * len(eval_sets) + 1) + "|")
    for row in rows:
        spec = ROWS[row]
        took = wall.get(spec[0], float("nan")) if spec is not None and spec[1] is not None else float("nan")
        cells = [f"{results[row][w][c]:.3f}" for w in eval_sets for c in cols]
        print(f"| {row} | " + " | ".join(cells) + f" | {took:.0f} |")


if __name__ == "__main__":
    main()
