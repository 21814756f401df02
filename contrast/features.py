"""Frozen image-tower features, computed once and saved to safetensors shards (BLIP-2 stage 1 trains from them).

Layout of an extraction directory::

    DIR/meta.json                     tower width, token count, dtype, image config; per split its rows, shards
                                      and ``skipped`` ({cause: n} of the rows left out: unreadable image, no caption)
    DIR/tower.safetensors             the frozen tower's weights (a model trained from DIR uses exactly this tower)
    DIR/SPLIT/shard_00000.safetensors ``features`` (n, N, width) and ``index`` (n,) = row numbers in the split
    DIR/SPLIT/captions.json           the captions of those rows, in order
    DIR/SPLIT/shard_00000.json        where the shard ends (the next row), its captions and the skip counts so far:
                                      a stopped extraction continues after the last shard that has one

``FeatureShards(DIR, split)`` is a torch dataset over the shards; ``FeatureCollator`` tokenizes its captions and
stacks ``image_feats`` (B, N, width) -- the batch key :class:`contrast.models.blip2.Blip2Stage1` reads instead of
running its tower. CLI: ``contrast features extract (--checkpoint RUN_DIR | --recipe FILE) --out DIR``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from contrast.data import load_source
from contrast.data.decode import SampleReader, Skips, describe_cell
from contrast.data.transforms import build_transform
from contrast.errors import UserError
from contrast.runs import FEATURES_TOWER as TOWER
from contrast.runs import atomic_write_text, frozen_tower, read_weights, save_model_weights

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
    reader: SampleReader | None = None,
) -> dict:
    """Run ``tower.forward_tokens`` over a datasets split (columns image, caption) and write shards. Returns meta.

    Rows whose image cannot be read or whose caption is missing or empty are left out (``index`` keeps the row
    numbers of those written) and counted by ``reader`` (default: skip and count) into the split's ``skipped``.
    Each shard is written atomically with a record of where it ends, so an extraction that was stopped (killed,
    out of memory) continues from its last complete shard when run again, with the same result as one run."""
    from tqdm import tqdm

    if dtype not in DTYPES:
        raise FeatureError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    out = Path(out_dir)
    (out / split).mkdir(parents=True, exist_ok=True)
    tower = tower.to(device).eval()
    meta = read_meta(out) if (out / META).is_file() else {"splits": {}}
    _check_or_save_tower(tower, out)
    reader = reader if reader is not None else SampleReader()
    shards = _ShardWriter(out / split, shard_size, reader, {"source": source, "rows": len(dataset),
                                                            "batch_size": batch_size, "dtype": dtype})
    batches = _usable_batches(dataset, transform, reader, batch_size, shards.resume_from)
    for pixels, rows, captions, lo, before in tqdm(batches, total=-(-(len(dataset) - shards.resume_from) // batch_size),
                                                   disable=not progress, desc=f"features {split}"):
        if rows:  # (b, N, w); a resumed batch is computed whole and its rows already written are dropped
            shards.add(tower.forward_tokens(pixels.to(device)).to("cpu", DTYPES[dtype]), rows, captions, lo, before)
    shards.close()
    if shards.width is None:
        raise FeatureError(f"no usable rows in split '{split}' of {source or 'the data'} ({reader.skips.summary()})")
    if meta.get("width") not in (None, shards.width) or meta.get("tokens") not in (None, shards.tokens):
        raise FeatureError(f"{out} already holds features of another tower ({meta['tokens']} x {meta['width']})")
    meta.update({
        "width": shards.width, "tokens": shards.tokens, "dtype": dtype, "source": source,
        "image": asdict(image_cfg) if image_cfg is not None else meta.get("image"),
    })
    meta["splits"][split] = {"rows": len(shards.captions), "shards": shards.names, "skipped": reader.skips.as_dict()}
    atomic_write_text(out / META, json.dumps(meta, indent=2))
    return meta


def _check_or_save_tower(tower: torch.nn.Module, out: Path) -> None:
    """Save the tower's weights, or check that those saved (by an earlier, maybe stopped, extraction) are its own."""
    path = out / TOWER
    if not path.is_file():
        tmp = path.with_name(path.name + ".tmp")
        save_model_weights(tower, tmp)
        tmp.replace(path)
        return
    saved = read_weights(path)
    own = {k: v.detach().cpu() for k, v in tower.state_dict().items()}
    if saved.keys() != own.keys() or any(not torch.equal(saved[k], own[k]) for k in own):
        raise FeatureError(f"{out} holds features of another tower ({TOWER} differs from this one); extract into "
                           "another --out, or delete that directory first")


def _usable_batches(dataset: Any, transform: Callable, reader: SampleReader, batch_size: int, start: int = 0
                    ) -> Iterator[tuple[torch.Tensor | None, list[int], list[str], int, dict[str, int]]]:
    """Per ``batch_size`` rows from ``start`` (a batch boundary): (pixels (b, 3, H, W), row numbers, captions of the
    usable ones (b may be 0), the batch's first row, the skip counts before it)."""
    from datasets import Image as ImageFeature

    if isinstance(dataset.features.get("image"), ImageFeature):
        dataset = dataset.cast_column("image", ImageFeature(decode=False))
    for lo in range(start, len(dataset), batch_size):
        before = reader.skips.as_dict()
        chunk = dataset[lo : lo + batch_size]
        pixels, rows, captions = [], [], []
        for j, (cell, raw) in enumerate(zip(chunk["image"], chunk["caption"])):
            where = describe_cell(cell, lo + j)
            caption = reader.caption(raw, where)
            if caption is None or (img := reader.image(cell, where)) is None:
                continue
            pixels.append(transform(img))
            rows.append(lo + j)
            captions.append(caption)
        yield (torch.stack(pixels) if pixels else None), rows, captions, lo, before


class _ShardWriter:
    """Features written to ``shard_XXXXX.safetensors`` files of ``shard_size`` rows, each followed by its record
    ``shard_XXXXX.json``: its captions, its last row, and where to continue (the first row of the batch it ended in,
    with the skip counts before that batch). A shard counts only once its record exists; a writer over a folder of
    such shards continues after the last one, computing that batch again whole and dropping the rows written."""

    def __init__(self, folder: Path, shard_size: int, reader: SampleReader, identity: dict):
        self.folder, self.shard_size, self.reader, self.identity = folder, shard_size, reader, identity
        self.feats: list[torch.Tensor] = []
        self.rows: list[int] = []
        self.pending: list[str] = []
        self.captions: list[str] = []
        self.names: list[str] = []
        self.width = self.tokens = None
        self.resume_from, self.last_row = 0, -1
        self._resume()

    def _resume(self) -> None:
        while (record := self.folder / f"shard_{len(self.names):05d}.json").is_file():
            name = record.with_suffix(".safetensors").name
            done = json.loads(record.read_text())
            if not (self.folder / name).is_file():
                break
            if done.get("identity") != self.identity:
                raise FeatureError(f"{self.folder} holds features of another extraction ({done.get('identity')}, "
                                   f"not {self.identity}); extract into another --out, or delete it first")
            self.names.append(name)
            self.captions.extend(done["captions"])
            self.resume_from, self.last_row = done["resume_from"], done["last_row"]
            self.width, self.tokens = done["width"], done["tokens"]
            self.reader.skips = Skips(done["skipped_before"])

    def add(self, feats: torch.Tensor, rows: list[int], captions: list[str], lo: int, before: dict) -> None:
        self.width, self.tokens = int(feats.shape[2]), int(feats.shape[1])
        for j, row in enumerate(rows):
            if row <= self.last_row:
                continue  # written before the extraction was stopped
            self.feats.append(feats[j : j + 1])
            self.rows.append(row)
            self.pending.append(captions[j])
            if len(self.rows) == self.shard_size:
                self._flush(lo, before)

    def _flush(self, lo: int, before: dict) -> None:
        name = f"shard_{len(self.names):05d}.safetensors"
        tmp = self.folder / (name + ".tmp")
        save_file({"features": torch.cat(self.feats).contiguous(), "index": torch.tensor(self.rows, dtype=torch.long)},
                  str(tmp))
        tmp.replace(self.folder / name)
        atomic_write_text((self.folder / name).with_suffix(".json"), json.dumps({
            "captions": self.pending, "last_row": self.rows[-1], "resume_from": lo, "skipped_before": before,
            "width": self.width, "tokens": self.tokens, "identity": self.identity}))
        self.names.append(name)
        self.captions.extend(self.pending)
        self.last_row = self.rows[-1]
        self.feats, self.rows, self.pending = [], [], []

    def close(self) -> None:
        if self.rows:
            self._flush(self.identity["rows"], self.reader.skips.as_dict())  # the end: nothing after it to compute
        atomic_write_text(self.folder / "captions.json", json.dumps(self.captions))


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
        tokens = self.tokenizer([r["caption"].strip() for r in keep])  # ids, or a prompt tokenizer's dict
        return {
            "image_feats": torch.stack([r["image_feats"] for r in keep]).float(),  # (B, N, width)
            "index": torch.tensor([r["__index__"] for r in keep]),
            **(tokens if isinstance(tokens, dict) else {"input_ids": tokens}),
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
    transform = build_transform(cfg.model.image)  # the eval transform: features are computed once, unaugmented
    meta: dict = {}
    for split in splits:
        meta = extract(tower, load_source(cfg.data, split, cfg.model.image.image_size), transform, out, split,
                       batch_size=batch_size, shard_size=shard_size, dtype=dtype, device=device,
                       image_cfg=cfg.model.image, source=source,
                       reader=SampleReader.of(cfg.data, draft=transform.decode_size))
    return meta


__all__ = ["extract", "extract_for", "FeatureShards", "FeatureCollator", "build_feature_data", "read_meta",
           "FeatureError"]
