"""Shared pieces of the import tests: a tiny word-level tokenizer folder, a labelled shapes folder, and zero-shot
top-1 computed from the foreign library's own encoders next to ``contrast eval zeroshot`` on the imported run."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from contrast.cli import main as cli_main
from contrast.data.synthetic import COLOURS, Item, render

CLASSES = sorted(["circle", "square", "triangle", "diamond", "cross", "star"])  # class folders sort
TEMPLATES = ["a {}", "a picture of a {}"]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]  # ids 0..3: the end-of-text id is neither 2 nor the highest


def word_tokenizer(folder: Path, max_length: int, words: list[str] | None = None) -> int:
    """Save a word-level fast tokenizer (``<bos> words <eos>``) into ``folder``; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = words or sorted({w for t in TEMPLATES for w in t.split() if w != "{}"} | set(CLASSES) | {"red", "shape"})
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)
    fast.save_pretrained(str(folder))
    return len(vocab)


def shapes_folder(root: Path, size: int, per_class: int = 3) -> tuple[Path, list[tuple[str, Path]]]:
    """ROOT/CLASS/*.png single-shape images (per_class of each class) and the task file that reads them."""
    rng = random.Random(0)
    files = []
    for shape in CLASSES:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            item = Item(shape, rng.choice(sorted(COLOURS)), rng.choice(["small", "large"]), rng.uniform(0.35, 0.65),
                        rng.uniform(0.35, 0.65))
            path = root / shape / f"{i}.png"
            render([item], size).save(path)
            files.append((shape, path))
    task = root.parent / "task.json"
    task.write_text(json.dumps({"name": "shapes_import", "data": str(root), "split": "all",
                                "classnames": CLASSES, "templates": TEMPLATES}))
    return task, files


def cli_zeroshot(run: Path, task: Path, out: Path) -> dict:
    """``contrast eval zeroshot`` on the run (in this process); its result for the task."""
    rc = cli_main(["eval", "zeroshot", "--checkpoint", str(run), "--task", str(task), "--out", str(out),
                   "--out-dir", str(out.parent / "report")])
    assert rc == 0
    return json.loads(out.read_text())[0]


@torch.no_grad()
def library_predictions(encode_image: Callable, encode_text: Callable, tokenize: Callable,
                        pixels: torch.Tensor) -> torch.Tensor:
    """Zero-shot predictions from the library's own encoders: normalised template embeddings averaged per class."""
    classes = []
    for name in CLASSES:
        emb = F.normalize(encode_text(tokenize([t.format(name) for t in TEMPLATES])), dim=-1)
        classes.append(F.normalize(emb.mean(dim=0), dim=-1))
    weights = torch.stack(classes, dim=1)  # (E, C)
    return (F.normalize(encode_image(pixels), dim=-1) @ weights).argmax(dim=-1)  # (N,)


def check_zeroshot(run: Path, tmp: Path, size: int, encode_image: Callable, encode_text: Callable,
                   tokenize: Callable) -> tuple[float, float]:
    """(library top-1, contrast eval zeroshot top-1) on the same 18 labelled shapes, and the same confusion."""
    from PIL import Image

    from contrast.runs import load

    task, files = shapes_folder(tmp / "shapes", size)
    _, preprocess, _ = load(run)
    pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for _, p in files])
    labels = torch.tensor([CLASSES.index(c) for c, _ in files])
    pred = library_predictions(encode_image, encode_text, tokenize, pixels)
    ours = cli_zeroshot(run, task, tmp / "zs.json")
    confusion = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    for t, p in zip(labels.tolist(), pred.tolist()):
        confusion[t, p] += 1
    assert ours["n"] == len(files)
    assert torch.equal(torch.tensor(ours["confusion"]), confusion), (ours["confusion"], confusion)
    return float((pred == labels).float().mean()), float(ours["top1"])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
