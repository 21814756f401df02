"""COCO and Flickr30k retrieval in the Karpathy-split JSON layout (``dataset_coco.json``, ``dataset_flickr30k.json``).

Karpathy & Fei-Fei, "Deep Visual-Semantic Alignments for Generating Image Descriptions" (2015) fixed the splits
that retrieval results on COCO (5,000 test images) and Flickr30k (1,000 test images) are reported on. Their JSON::

    {"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
      "split": "test", "sentences": [{"raw": "A man riding ...", "tokens": [...]}, ...], ...}, ...]}

``split`` is one of train, restval, val, test (Flickr30k has no restval; ``val`` also accepts ``validation``).
Images are read from local files: ``IMAGES/filepath/filename`` (``IMAGES/filename`` when an entry has no
filepath, as in Flickr30k), ``IMAGES`` defaulting to the JSON's folder. Each image keeps its first
``max_captions`` captions (5 by default, the protocol's five per image; a few COCO images list six or seven), so
the result is one row per image with a list of captions, which :func:`contrast.evaluate.retrieval.group_captions`
groups by row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contrast.config import ConfigError
from contrast.evaluate.taskfile import read_text

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def is_karpathy_json(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return p.suffix == ".json" and p.is_file()


def _entries(path: Path) -> tuple[list[dict], str]:
    try:
        doc = json.loads(read_text(path, "Karpathy-split JSON"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ConfigError(f"{path} is not a Karpathy-split file: expected {{\"images\": [{{\"filename\", \"split\", "
                          "\"sentences\"}, ...]}} as in dataset_coco.json / dataset_flickr30k.json")
    return doc["images"], str(doc.get("dataset", path.stem))


def _image_path(root: Path, entry: dict) -> str:
    parts = [str(entry.get("filepath") or ""), str(entry["filename"])]
    return str(root.joinpath(*[p for p in parts if p]))


def _captions(entry: dict, max_captions: int) -> list[str]:
    raw = [s.get("raw") if isinstance(s, dict) else s for s in entry.get("sentences") or []]
    caps = [str(c).strip() for c in raw if c is not None]
    return caps[:max_captions] if max_captions > 0 else caps


def load_karpathy(path: str | Path, split: str = "test", images: str | Path | None = None, max_captions: int = 5,
                  check: int = 8) -> Any:
    """The images of ``split`` with their captions: a Dataset with ``image`` (file path), ``caption`` (a list of
    strings) and ``image_id``. The first ``check`` image files must exist (else a one-line error naming the path
    tried and ``images``); a missing file further on is a bad sample, left out and counted by the evaluator."""
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"Karpathy-split file not found: {p} (dataset_coco.json / dataset_flickr30k.json, e.g. "
                          "from the caption_datasets.zip of Karpathy's NeuralTalk2 release)")
    if split not in KARPATHY_SPLITS and split != "validation":
        raise ConfigError(f"split must be one of {', '.join(KARPATHY_SPLITS)}, got '{split}'")
    wanted = "val" if split == "validation" else split
    root = Path(images).expanduser() if images else p.parent
    entries, name = _entries(p)
    rows = [e for e in entries if isinstance(e, dict) and e.get("split") == wanted and "filename" in e]
    if not rows:
        found = sorted({str(e.get("split")) for e in entries if isinstance(e, dict)})
        raise ConfigError(f"{p} has no '{wanted}' images (its splits: {', '.join(found)})")
    paths = [_image_path(root, e) for e in rows]
    if not any(Path(q).is_file() for q in paths[:check]):
        raise ConfigError(f"{name} images not found: {paths[0]} does not exist; point --images (a task's images:) "
                          f"at the folder holding {rows[0].get('filepath') or 'the image files'}")
    features = Features({"image": ImageFeature(decode=False), "caption": Sequence(Value("string")),
                         "image_id": Value("string")})
    return Dataset.from_dict({
        "image": paths,
        "caption": [_captions(e, max_captions) for e in rows],
        "image_id": [str(e.get("cocoid", e.get("imgid", e["filename"]))) for e in rows],
    }, features=features)
