"""Labelled image folders: one subfolder per class (``ROOT/CLASS/*.jpg``), optionally under split folders.

``ROOT/train/CLASS/...``, ``ROOT/val/CLASS/...`` (or ``validation``), ``ROOT/test/CLASS/...`` are used as given.
A folder without split folders is split per class with a fixed seed: 70% train, 10% val, 20% test, so every split
holds every class. ``all`` takes every image, from every split folder when there are some. Labels are class indices in the sorted order of the class folder names (a ``datasets``
ClassLabel carrying the names), so a task file lists its class names in that order.
"""

from __future__ import annotations

from pathlib import Path

from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
FRACTIONS = {"train": (0.0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _images(d))


def _split_root(root: Path, split: str) -> Path | None:
    for name in SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def is_class_folder(path: str | Path) -> bool:
    """True for a folder of class subfolders (or of split folders holding class subfolders) and no caption file."""
    root = Path(path).expanduser()
    if not root.is_dir() or any((root / f).is_file() for f in ("captions.jsonl", "captions.csv", "dataset_info.json",
                                                               "dataset_dict.json")):
        return False
    if any(root.glob("*.parquet")) or any(root.glob("*.arrow")):
        return False
    split = next((s for s in ("train", "test") if _split_root(root, s) is not None), None)
    return bool(_class_dirs(_split_root(root, split) if split else root))


def _all_files(root: Path, has_splits: bool) -> tuple[list[tuple[Path, int]], list[str]]:
    bases = [r for s in SPLIT_DIRS if (r := _split_root(root, s)) is not None] if has_splits else [root]
    names = sorted({d.name for b in bases for d in _class_dirs(b)})
    index = {n: i for i, n in enumerate(names)}
    return [(p, index[d.name]) for b in bases for d in _class_dirs(b) for p in _images(d)], names


def load_class_folder(path: str | Path, split: str, label_column: str = "label", seed: int = 0) -> Dataset:
    """One split (or ``all``) of a class-folder dataset with columns ``image`` and ``label_column`` (ClassLabel)."""
    import random

    root = Path(path).expanduser()
    if split not in SPLIT_DIRS and split != "all":
        raise ValueError(f"split must be one of {(*SPLIT_DIRS, 'all')}, got '{split}'")
    has_splits = any(_split_root(root, s) is not None for s in SPLIT_DIRS)
    if split == "all":
        files, names = _all_files(root, has_splits)
        if not files:
            raise ValueError(f"{root} holds no class subfolders with images (expected ROOT/CLASS_NAME/image.jpg)")
    elif has_splits:
        base = _split_root(root, split)
        if base is None:
            raise ValueError(f"{root} has split folders but none for '{split}' (expected {' or '.join(SPLIT_DIRS[split])}/)")
        # class names come from the union over splits, so indices agree between them
        names = sorted({d.name for s in SPLIT_DIRS if (r := _split_root(root, s)) for d in _class_dirs(r)})
        index = {n: i for i, n in enumerate(names)}
        files = [(p, index[d.name]) for d in _class_dirs(base) for p in _images(d)]
    else:
        classes = _class_dirs(root)
        if not classes:
            raise ValueError(f"{root} holds no class subfolders with images (expected ROOT/CLASS_NAME/image.jpg)")
        names = [d.name for d in classes]
        lo, hi = FRACTIONS[split]
        files = []
        for label, d in enumerate(classes):
            imgs = _images(d)
            random.Random(f"{seed}-{d.name}").shuffle(imgs)
            n = len(imgs)
            files += [(p, label) for p in imgs[round(lo * n) : round(hi * n)]]
    features = Features({"image": ImageFeature(), label_column: ClassLabel(names=names)})
    return Dataset.from_dict(
        {"image": [str(p) for p, _ in files], label_column: [lab for _, lab in files]}, features=features
    )


def split_description(path: str | Path, split: str) -> str:
    """What ``split`` of a class folder holds, in words (for reports): a split folder, a seeded share, or all."""
    root = Path(path).expanduser()
    if split == "all":
        return "every image"
    if any(_split_root(root, s) is not None for s in SPLIT_DIRS):
        return f"the {split} split folder"
    lo, hi = FRACTIONS[split]
    return (f"a seeded {round((hi - lo) * 100)}% of each class (the folder has no split folders; "
            "split: all evaluates every image)")
