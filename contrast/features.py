"""Frozen image-tower features, computed once and saved to safetensors shards (BLIP-2 stage 1 trains from them).

Layout of an extraction directory::

    DIR/meta.json                     tower width, token count, dtype, image config, rows per split
    DIR/tower.safetensors             the frozen tower's weights (a model trained from DIR uses exactly this tower)
    DIR/SPLIT/shard_00000.safetensors ``features`` (n, N, width) and ``index`` (n,) = row numbers in the split
    DIR/SPLIT/captions.json           the captions of those rows, in order

``FeatureShards(DIR, split)`` is a torch dataset over the shards; ``FeatureCollator`` tokenizes its captions and
stacks ``image_feats`` (B, N, width) -- the batch key :class:`contrast.models.blip2.Blip2Stage1` reads instead of
running its tower. CLI: ``contrast features extract (--checkpoint RUN_DIR | --recipe FILE) --out DIR``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from contrast.data import load_source
from contrast.data.collate import decode_image
from contrast.data.transforms import build_transform
from contrast.errors import UserError
from contrast.runs import FEATURES_TOWER as TOWER
from contrast.runs import frozen_tower, save_model_weights

META = "meta.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FeatureError(UserError, ValueError):
    """A features directory that is missing, incomplete or made by another tower."""


def read_meta(root: str | Path) -> dict:
    path = Path(root) / META
    if not path.is_file():
        raise FeatureError(f"{root} is not a features directory (no {META}); write one with `contrast features extract`")
    return json.loads(path.read_text())


@torch.no_grad()
def extract(
    tower: torch.nn.Module,
    dataset: Any,
    transform: Callable,
    out_dir: str | Path,
    split: str,
    *,
    batch_size: int = 256,
    shard_size: int = 4096,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    image_cfg: Any = None,
    source: str = "",
    progress: bool = True,
) -> dict:
    """Run ``tower.forward_tokens`` over a datasets split (columns image, caption) and write shards. Returns meta."""
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise FeatureError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    out = Path(out_dir)
    (out / split).mkdir(parents=True, exist_ok=True)
    tower = tower.to(device).eval()
    meta = read_meta(out) if (out / META).is_file() else {"splits": {}}
    if not (out / TOWER).is_file():
        save_model_weights(tower, out / TOWER)
    captions: list[str] = []
    buf_f: list[torch.Tensor] = []
    buf_i: list[int] = []
    shards: list[str] = []
    width = tokens = None

    def flush() -> None:
        if not buf_f:
            return
        name = f"shard_{len(shards):05d}.safetensors"
        save_file({"features": torch.cat(buf_f).contiguous(), "index": torch.tensor(buf_i, dtype=torch.long)},
                  str(out / split / name))
        shards.append(name)
        buf_f.clear()
        buf_i.clear()

    n = len(dataset)
    pending = 0
    for lo in tqdm(range(0, n, batch_size), disable=not progress, desc=f"features {split}"):
        rows = dataset[lo : min(n, lo + batch_size)]
        pixels = torch.stack([transform(decode_image(img)) for img in rows["image"]]).to(device)
        feats = tower.forward_tokens(pixels).to("cpu", DTYPES[dtype])  # (b, N, width)
        width, tokens = int(feats.shape[2]), int(feats.shape[1])
        for j in range(feats.shape[0]):
            buf_f.append(feats[j : j + 1])
            buf_i.append(lo + j)
            captions.append(rows["caption"][j])
            pending += 1
            if pending == shard_size:
                flush()
                pending = 0
    flush()
    (out / split / "captions.json").write_text(json.dumps(captions))
    if meta.get("width") not in (None, width) or meta.get("tokens") not in (None, tokens):
        raise FeatureError(f"{out} already holds features of another tower ({meta['tokens']} x {meta['width']})")
    meta.update({
        "width": width, "tokens": tokens, "dtype": dtype, "source": source,
        "image": asdict(image_cfg) if image_cfg is not None else meta.get("image"),
    })
    meta["splits"][split] = {"rows": len(captions), "shards": shards}
    (out / META).write_text(json.dumps(meta, indent=2))
    return meta


class FeatureShards(torch.utils.data.Dataset):
    """Rows of one split of an extraction directory: ``{"image_feats": (N, width), "caption": str, "__index__": i}``.

    Shards are opened lazily and read row by row through safetensors slices, so memory stays one batch deep.
    """

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        meta = read_meta(root)
        if split not in meta["splits"]:
            raise FeatureError(
                f"{root} has features for splits {sorted(meta['splits'])}, not '{split}'; "
                f"run `contrast features extract ... --split {split} --out {root}`"
            )
        self.meta = meta
        info = meta["splits"][split]
        self.paths = [self.root / split / s for s in info["shards"]]
        self.captions: list[str] = json.loads((self.root / split / "captions.json").read_text())
        self.starts: list[int] = []
        total = 0
        for p in self.paths:
            if not p.is_file():
                raise FeatureError(f"shard {p} is missing; extract the features again")
            self.starts.append(total)
            with safe_open(str(p), "pt") as f:
                total += f.get_slice("index").get_shape()[0]
        if total != len(self.captions):
            raise FeatureError(f"{self.root / split}: {total} feature rows but {len(self.captions)} captions")
        self._open: dict[int, Any] = {}

    @property
    def width(self) -> int:
        return int(self.meta["width"])

    def __len__(self) -> int:
        return len(self.captions)

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = max(k for k, start in enumerate(self.starts) if start <= i)
        return s, i - self.starts[s]

    def _shard(self, s: int):
        if s not in self._open:
            self._open[s] = safe_open(str(self.paths[s]), "pt")
        return self._open[s]

    def __getitem__(self, i: int) -> dict:
        s, j = self._locate(int(i))
        feats = self._shard(s).get_slice("features")[j : j + 1][0]  # (N, width)
        return {"image_feats": feats, "caption": self.captions[int(i)], "__index__": int(i)}

    def __getstate__(self) -> dict:  # open safetensors handles do not cross process boundaries (DataLoader workers)
        return {**self.__dict__, "_open": {}}


class FeatureCollator:
    """Stack ``image_feats`` and tokenize captions; rows with empty captions are skipped and counted."""

    def __init__(self, tokenizer: Callable[[list[str]], Any]):
        self.tokenizer = tokenizer
        self.skipped_images = 0
        self.skipped_captions = 0

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor] | None:
        keep = [r for r in rows if isinstance(r["caption"], str) and r["caption"].strip()]
        self.skipped_captions += len(rows) - len(keep)
        if not keep:
            return None
        tokens = self.tokenizer([r["caption"].strip() for r in keep])
        return {
            "image_feats": torch.stack([r["image_feats"] for r in keep]).float(),  # (B, N, width)
            "index": torch.tensor([r["__index__"] for r in keep]),
            "input_ids": tokens,
        }


def build_feature_data(cfg: Any, tokenizer: Callable, split: str) -> tuple[FeatureShards, FeatureCollator]:
    """The training rows and collator when the model reads saved features (``model.blip2.features``)."""
    rows = FeatureShards(cfg.model.features_dir, split)
    image = rows.meta.get("image") or {}
    for name in ("name", "image_size"):
        if name in image and image[name] != getattr(cfg.model.image, name):
            raise FeatureError(
                f"the features in {cfg.model.features_dir} come from model.image.{name}={image[name]!r}, but this "
                f"recipe has {getattr(cfg.model.image, name)!r}; extract features with this recipe's tower"
            )
    return rows, FeatureCollator(tokenizer)


def extract_for(cfg: Any, out: str | Path, splits: list[str], *, tower_run: str | None = None, batch_size: int = 256,
                shard_size: int = 4096, dtype: str = "float32", device: str = "cpu", source: str = "") -> dict:
    """Extract ``splits`` of ``cfg.data`` with the image tower of the run ``tower_run``, or a fresh ``cfg.model.image``
    tower built exactly as the training run would build it. Returns the directory's meta."""
    torch.manual_seed(cfg.train.seed)
    tower = frozen_tower(cfg.model, tower_run)
    transform = build_transform(cfg.model.image)
    meta: dict = {}
    for split in splits:
        meta = extract(tower, load_source(cfg.data, split, cfg.model.image.image_size), transform, out, split,
                       batch_size=batch_size, shard_size=shard_size, dtype=dtype, device=device,
                       image_cfg=cfg.model.image, source=source)
    return meta


__all__ = ["extract", "extract_for", "FeatureShards", "FeatureCollator", "build_feature_data", "read_meta",
           "FeatureError"]
