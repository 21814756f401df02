"""Retrieval indexes over embedding collections, built and searched with faiss.

References: Johnson, Douze, Jégou, "Billion-scale similarity search with GPUs", 2017 (faiss); Jégou, Douze,
Schmid, "Product Quantization for Nearest Neighbor Search", 2011 (IVF, PQ); Malkov, Yashunin, "Efficient and
robust approximate nearest neighbor search using Hierarchical Navigable Small World graphs", 2018 (HNSW).

The core knows nothing about models: :func:`build_index` takes an iterable of items and an encoder
(a batch of items -> float32 (B, E) L2-normalised vectors). Vectors are compared by inner product, which on
unit vectors is cosine similarity.

An index directory holds::

    build.json                 settings of the build (a resumed build must use the same ones)
    shards/emb_00000.npy       float32 (S, E) embeddings of items [i*S, (i+1)*S); written last, atomically,
    shards/meta_00000.jsonl    so an existing emb file marks a finished shard
    index.faiss                the faiss index; row r of the index is item ids[r]
    ids.npy                    int64 (N,) item id of each index row
    metadata.jsonl             one JSON object per index row (path, caption, ...)
    metadata_offsets.npy       int64 (N,) byte offset of each metadata line, for random access
    manifest.json              written last: its presence marks a finished index

Memory during a build is bounded by the shard size (plus the training sample for factories that train),
never by the collection size: embeddings go to disk shard by shard and are added back to faiss in chunks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from contrast.errors import UserError

FORMAT_VERSION = 1
METRIC = "inner_product"
MIN_POINTS_PER_LIST = 39  # faiss k-means wants at least this many training points per centroid
DEFAULT_EF_SEARCH = 64

Encoder = Callable[[list[Any]], Any]  # batch of items -> (B, E) float32 L2-normalised (numpy or torch)
Describer = Callable[[Any], dict[str, Any]]  # item -> JSON-serialisable metadata


class IndexStoreError(UserError, ValueError):
    """A missing, corrupt or mismatched index directory, or settings faiss cannot build."""


# --------------------------------------------------------------------------------------------------- files


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _emb_path(out: Path, i: int) -> Path:
    return out / "shards" / f"emb_{i:05d}.npy"


def _meta_path(out: Path, i: int) -> Path:
    return out / "shards" / f"meta_{i:05d}.jsonl"


# --------------------------------------------------------------------------------------------------- manifest


@dataclass
class IndexManifest:
    """What an index was built from and how; ``manifest.json`` in the index directory."""

    embed_dim: int
    count: int
    factory: str  # as requested
    factory_effective: str  # as built (IVF list count clamped to the collection size)
    checkpoint: str | None  # the weights file the vectors came from, when built from a model
    checkpoint_hash: str | None  # sha256 of that file
    modality: str | None  # image | text: what the indexed vectors encode
    source: str | None
    split: str | None
    shard_size: int
    num_shards: int
    nprobe: int | None  # default search parameters (IVF lists probed, HNSW beam width)
    ef_search: int | None
    created: str
    build_seconds: float
    metric: str = METRIC
    format_version: int = FORMAT_VERSION
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_file(cls, path: Path) -> IndexManifest:
        fix = "rebuild the index with `contrast index build`"
        if not path.is_file():
            raise IndexStoreError(f"{path.parent} is not a finished index: {path.name} is missing ({fix})")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IndexStoreError(f"{path} is corrupt (not valid JSON: {e}); {fix}") from None
        if not isinstance(raw, dict):
            raise IndexStoreError(f"{path} is corrupt (expected a JSON object); {fix}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        unknown = sorted(set(raw) - set(fields))
        if missing or unknown:
            raise IndexStoreError(f"{path} is corrupt (missing keys {missing}, unknown keys {unknown}); {fix}")
        for name, want in (("embed_dim", int), ("count", int), ("factory_effective", str), ("shard_size", int),
                           ("num_shards", int), ("format_version", int)):
            if not isinstance(raw[name], want) or isinstance(raw[name], bool):
                raise IndexStoreError(f"{path} is corrupt ({name} should be {want.__name__}, "
                                      f"got {raw[name]!r}); {fix}")
        if raw.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise IndexStoreError(f"{path} has format version {raw['format_version']}, this version of contrast "
                                  f"reads {FORMAT_VERSION}; {fix}")
        if raw.get("metric", METRIC) != METRIC:
            raise IndexStoreError(f"{path}: metric {raw['metric']!r} is not supported (only {METRIC!r}); {fix}")
        return cls(**raw)


# --------------------------------------------------------------------------------------------------- factory


_IVF_RE = re.compile(r"IVF(\d+)")
_PQ_RE = re.compile(r"(?:^|,)PQ(\d+)(?:x(\d+))?")


def plan_factory(factory: str, dim: int, count: int) -> tuple[str, list[str]]:
    """The faiss factory string to build for ``count`` vectors of width ``dim``, and notes on any change.

    IVF list counts are clamped to ``count // 39`` (faiss k-means needs about 39 training points per list),
    so ``IVF1024,PQ32`` on 10k vectors becomes ``IVF256,PQ32``. Settings that cannot be clamped sensibly
    (a PQ size that does not divide the width, a PQ codebook larger than the collection) are errors.
    """
    notes: list[str] = []
    m = _IVF_RE.search(factory)
    if m:
        nlist = int(m.group(1))
        cap = max(1, count // MIN_POINTS_PER_LIST)
        if nlist > cap:
            factory = factory[: m.start(1)] + str(cap) + factory[m.end(1):]
            notes.append(f"IVF{nlist} needs >= {MIN_POINTS_PER_LIST * nlist} vectors to train, the collection "
                         f"has {count}: clamped to IVF{cap}")
    m = _PQ_RE.search(factory)
    if m:
        M, nbits = int(m.group(1)), int(m.group(2) or 8)
        if dim % M:
            ok = max(d for d in range(1, M + 1) if dim % d == 0)
            raise IndexStoreError(f"factory {factory!r}: PQ{M} needs the embedding width ({dim}) to be a multiple "
                                  f"of {M}; use a PQ size that divides {dim}, e.g. PQ{ok}")
        if count < 2**nbits:
            raise IndexStoreError(f"factory {factory!r}: PQ codebooks need at least {2**nbits} vectors to train, "
                                  f"the collection has {count}; use Flat or HNSW32 for a collection this small")
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1]
        raise IndexStoreError(f"faiss cannot build factory {factory!r} for width {dim}: {msg}. "
                              f"Known good choices: Flat, HNSW32, IVF1024,PQ32") from None
    return factory, notes


def _default_search_params(index: faiss.Index) -> tuple[int | None, int | None]:
    ivf = faiss.try_extract_index_ivf(index)
    nprobe = min(ivf.nlist, max(8, ivf.nlist // 16)) if ivf is not None else None
    ef = DEFAULT_EF_SEARCH if hasattr(index, "hnsw") else None
    return nprobe, ef


def _set_search_params(index: faiss.Index, nprobe: int | None, ef_search: int | None, k: int) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = int(nprobe)
    if hasattr(index, "hnsw") and ef_search is not None:
        index.hnsw.efSearch = max(int(ef_search), k)


# --------------------------------------------------------------------------------------------------- build


def _as_vectors(x: Any, n: int, dim: int | None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().float().cpu().numpy()
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] != n:
        raise IndexStoreError(f"the encoder returned shape {tuple(x.shape)} for a batch of {n} items; "
                              f"it must return ({n}, E)")
    if dim is not None and x.shape[1] != dim:
        raise IndexStoreError(f"the encoder returned width {x.shape[1]}, expected {dim}")
    norms = np.linalg.norm(x, axis=1)
    if not np.all(np.abs(norms - 1.0) < 1e-3):
        raise IndexStoreError(f"the encoder must return L2-normalised vectors (norms range "
                              f"{norms.min():.4g}..{norms.max():.4g}); normalise them before returning")
    return x


def _indexable(items: Any) -> bool:
    """Sequence-like sources (lists, arrays, ``datasets.Dataset``): ``len`` and integer indexing."""
    return isinstance(items, Sequence) or (
        hasattr(items, "__len__") and hasattr(items, "__getitem__") and not isinstance(items, dict))


def _items_from(items: Iterable[Any], start: int) -> Iterator[Any]:
    if _indexable(items):
        return (items[i] for i in range(start, len(items)))  # random access: skipping reads nothing
    return itertools.islice(iter(items), start, None)


def _finished_shards(out: Path) -> list[int]:
    """Row counts of the finished shards 0..k-1 (contiguous from 0)."""
    rows = []
    for i in itertools.count():
        p = _emb_path(out, i)
        if not p.is_file():
            break
        rows.append(int(np.load(p, mmap_mode="r").shape[0]))
    return rows


def build_index(
    items: Iterable[Any],
    encode: Encoder,
    out_dir: str | os.PathLike,
    *,
    factory: str = "Flat",
    describe: Describer | None = None,
    batch_size: int = 64,
    shard_size: int = 4096,
    add_chunk: int = 16384,
    max_train: int = 65536,
    dim: int | None = None,
    checkpoint: str | None = None,
    checkpoint_hash: str | None = None,
    modality: str | None = None,
    source: str | None = None,
    split: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> RetrievalIndex:
    """Encode ``items`` in batches, store the vectors in shards, and build a faiss index over them.

    ``encode(list_of_items) -> (B, E)`` float32 unit vectors; ``describe(item) -> dict`` gives each item's
    metadata (path, caption). An unfinished build in ``out_dir`` with the same settings is resumed from its
    last finished shard; a different one is refused unless ``overwrite``.
    """
    if batch_size < 1 or shard_size < 1 or add_chunk < 1:
        raise IndexStoreError("batch_size, shard_size and add_chunk must be positive")
    out = Path(out_dir)
    t0 = time.perf_counter()
    _prepare_out_dir(out, overwrite)
    params = {"factory": factory, "shard_size": shard_size, "checkpoint_hash": checkpoint_hash,
              "modality": modality, "source": source, "split": split}
    state = _open_build_state(out, params)
    if state.get("encoded") is None:  # step 1: encode into shards (resumes from the last finished shard)
        state["encoded"] = _encode_remaining(items, encode, describe, out, shard_size, batch_size, dim, progress)
        state["elapsed"] = float(state.get("elapsed", 0.0)) + time.perf_counter() - t0
        t0 = time.perf_counter()
        _atomic_write_json(out / "build.json", state)
    count = int(state["encoded"])
    if count == 0:
        raise IndexStoreError("the source yielded no items; nothing to index")

    num_shards = -(-count // shard_size)
    index, effective, notes = _trained_index(out, factory, count, shard_size, min(count, max_train), seed)  # step 2
    dim = index.d
    _write_index_files(index, out, count, num_shards, add_chunk)  # step 3: add vectors, write index + metadata
    nprobe, ef = _default_search_params(index)
    manifest = IndexManifest(
        embed_dim=dim, count=count, factory=factory, factory_effective=effective, checkpoint=checkpoint,
        checkpoint_hash=checkpoint_hash, modality=modality, source=source, split=split, shard_size=shard_size,
        num_shards=num_shards, nprobe=nprobe, ef_search=ef,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        build_seconds=round(float(state.get("elapsed", 0.0)) + time.perf_counter() - t0, 3), notes=notes,
    )
    _atomic_write_json(out / "manifest.json", dataclasses.asdict(manifest))  # last: marks the index finished
    return RetrievalIndex(out, manifest, index)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Clear the directory if ``overwrite``, refuse a finished index, create ``shards/``, drop half-written files."""
    if overwrite and out.exists():
        _remove_index_files(out)
    if (out / "manifest.json").exists():
        raise IndexStoreError(f"{out} already holds a finished index; choose another output directory "
                              f"or pass overwrite (--overwrite) to replace it")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.tmp*"), *(out / "shards").glob("*.tmp*")]:  # half-written files of a killed build
        stale.unlink()


def _open_build_state(out: Path, params: dict[str, Any]) -> dict[str, Any]:
    """The build state of an unfinished build with the same ``params``, or a fresh one written to ``build.json``."""
    build_file = out / "build.json"
    state: dict[str, Any] = {"params": params, "encoded": None, "elapsed": 0.0}
    if not build_file.exists():
        if any((out / "shards").iterdir()):
            raise IndexStoreError(f"{out}/shards holds files but no build.json; pass overwrite (--overwrite)")
        _atomic_write_json(build_file, state)
        return state
    try:
        state = json.loads(build_file.read_text())
        old = state["params"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise IndexStoreError(f"{build_file} is corrupt; pass overwrite (--overwrite) to start over") from None
    diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
        raise IndexStoreError(f"{out} holds an unfinished build with other settings ({what}); rerun with the "
                              f"same settings to resume it, or pass overwrite (--overwrite) to start over")
    return state


def _encode_remaining(items: Iterable[Any], encode: Encoder, describe: Describer | None, out: Path, shard_size: int,
                      batch_size: int, dim: int | None, progress: bool) -> int:
    """Encode what the finished shards lack; returns the total item count."""
    rows = _finished_shards(out)
    if any(r != shard_size for r in rows[:-1]) or (rows and rows[-1] > shard_size):
        raise IndexStoreError(f"{out}/shards does not match shard size {shard_size}; pass overwrite")
    if rows and rows[-1] < shard_size:  # a short shard is the last one: the source ended there
        return sum(rows)
    return _encode_shards(items, encode, describe, out, len(rows), shard_size, batch_size, dim, progress)


def _trained_index(out: Path, factory: str, count: int, shard_size: int, n_train: int,
                   seed: int) -> tuple[faiss.Index, str, list[str]]:
    """An empty faiss index for ``factory`` as planned for the stored vectors, trained on ``n_train`` of them when it
    needs training; with the effective factory string and the planning notes."""
    dim = int(np.load(_emb_path(out, 0), mmap_mode="r").shape[1])
    effective, notes = plan_factory(factory, dim, count)
    for note in notes:
        print(f"contrast index: {note}")
    index = faiss.index_factory(dim, effective, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        sample = _training_sample(out, count, shard_size, n_train, seed)
        index.train(sample)
        del sample
    return index, effective, notes


def _write_index_files(index: faiss.Index, out: Path, count: int, num_shards: int, add_chunk: int) -> None:
    """Add every shard to ``index`` and write index.faiss, ids.npy, metadata_offsets.npy, metadata.jsonl.

    Each file is written under a temporary name and moved into place only when all of them are complete.
    """
    pid = os.getpid()
    ids_tmp = out / f"ids.npy.tmp{pid}"
    offsets_tmp = out / f"metadata_offsets.npy.tmp{pid}"
    meta_tmp = out / f"metadata.jsonl.tmp{pid}"
    ids_all = np.lib.format.open_memmap(ids_tmp, mode="w+", dtype=np.int64, shape=(count,))
    offsets = np.lib.format.open_memmap(offsets_tmp, mode="w+", dtype=np.int64, shape=(count,))
    with open(meta_tmp, "wb") as meta_out:
        row = _add_shards(index, out, num_shards, add_chunk, ids_all, offsets, meta_out)
    if row != count or index.ntotal != count:
        raise IndexStoreError(f"{out}/shards hold {row} metadata rows and {index.ntotal} vectors, expected {count}; "
                              f"pass overwrite (--overwrite) to rebuild")
    ids_all.flush()
    offsets.flush()
    del ids_all, offsets
    tmp = out / f"index.faiss.tmp{pid}"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / "index.faiss")
    os.replace(ids_tmp, out / "ids.npy")
    os.replace(offsets_tmp, out / "metadata_offsets.npy")
    os.replace(meta_tmp, out / "metadata.jsonl")


def _add_shards(index: faiss.Index, out: Path, num_shards: int, add_chunk: int, ids_all: np.ndarray,
                offsets: np.ndarray, meta_out: Any) -> int:
    """Add the shards' vectors to ``index`` in chunks and copy their metadata; returns the rows written."""
    row = 0
    for s in range(num_shards):
        emb = np.load(_emb_path(out, s), mmap_mode="r")
        for lo in range(0, emb.shape[0], add_chunk):
            index.add(np.ascontiguousarray(emb[lo : lo + add_chunk]))
        with open(_meta_path(out, s), "rb") as f:
            for line in f:
                offsets[row] = meta_out.tell()
                ids_all[row] = json.loads(line)["id"]
                meta_out.write(line)
                row += 1
    return row


def _encode_shards(items: Iterable[Any], encode: Encoder, describe: Describer | None, out: Path, first_shard: int,
                   shard_size: int, batch_size: int, dim: int | None, progress: bool) -> int:
    """Encode items from shard ``first_shard`` on; returns the total item count."""
    from tqdm.auto import tqdm

    start = first_shard * shard_size
    total = len(items) if _indexable(items) else None
    bar = tqdm(total=total, initial=start, unit="item", desc="encoding", disable=not progress)
    it = _items_from(items, start)
    shard, next_id = first_shard, start
    while True:
        vecs: list[np.ndarray] = []
        lines: list[bytes] = []
        filled = 0
        while filled < shard_size:
            batch = list(itertools.islice(it, min(batch_size, shard_size - filled)))
            if not batch:
                break
            v = _as_vectors(encode(batch), len(batch), dim)
            dim = v.shape[1]
            vecs.append(v)
            for item in batch:
                meta = describe(item) if describe is not None else {}
                lines.append((json.dumps({**meta, "id": next_id}) + "\n").encode())
                next_id += 1
            filled += len(batch)
            bar.update(len(batch))
        if filled == 0:
            break
        _atomic_write_bytes(_meta_path(out, shard), b"".join(lines))
        _atomic_save_npy(_emb_path(out, shard), np.concatenate(vecs))  # (filled, E); marks the shard finished
        shard += 1
        if filled < shard_size:
            break
    bar.close()
    return next_id


def _training_sample(out: Path, count: int, shard_size: int, n: int, seed: int) -> np.ndarray:
    """``n`` vectors drawn without replacement across the shards, read shard by shard."""
    pick = np.sort(np.random.default_rng(seed).choice(count, size=n, replace=False))
    parts = []
    for s in range(-(-count // shard_size)):
        lo, hi = np.searchsorted(pick, [s * shard_size, (s + 1) * shard_size])
        if hi > lo:
            emb = np.load(_emb_path(out, s), mmap_mode="r")
            parts.append(np.asarray(emb[pick[lo:hi] - s * shard_size]))
    return np.ascontiguousarray(np.concatenate(parts))


def _remove_index_files(out: Path) -> None:
    for name in ("manifest.json", "build.json", "index.faiss", "ids.npy", "metadata.jsonl",
                 "metadata_offsets.npy"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "shards", ignore_errors=True)
    for p in out.glob("*.tmp*"):
        p.unlink()


# --------------------------------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    scores: np.ndarray  # (Q, k) float32 inner products (cosine), best first
    ids: np.ndarray  # (Q, k) int64 item ids; -1 where the index found fewer than k
    rows: np.ndarray  # (Q, k) int64 index rows; -1 where the index found fewer than k
    metadata: list[list[dict[str, Any]]]  # per query, per hit: the item's metadata (with "id")


class RetrievalIndex:
    """A finished index directory: the faiss index, item ids, metadata and manifest."""

    REQUIRED = ("index.faiss", "ids.npy", "metadata.jsonl", "metadata_offsets.npy")

    def __init__(self, path: Path, manifest: IndexManifest, index: faiss.Index):
        self.path = Path(path)
        self.manifest = manifest
        self.index = index
        self._ids = np.load(self.path / "ids.npy", mmap_mode="r")
        self._offsets = np.load(self.path / "metadata_offsets.npy", mmap_mode="r")

    def __len__(self) -> int:
        return self.manifest.count

    @property
    def dim(self) -> int:
        return self.manifest.embed_dim

    def check_model(self, model_file: str | os.PathLike | None = None, embed_dim: int | None = None) -> None:
        """Refuse a model other than the one the index was built with (by weights hash and by width)."""
        m = self.manifest
        if embed_dim is not None and embed_dim != m.embed_dim:
            raise IndexStoreError(f"the index at {self.path} holds {m.embed_dim}-wide vectors but the model "
                                  f"embeds to {embed_dim}: it was built by another model; query it with "
                                  f"{m.checkpoint or 'the model it was built with'}")
        if model_file is not None:
            digest = file_sha256(model_file)
            if m.checkpoint_hash is not None and digest != m.checkpoint_hash:
                raise IndexStoreError(f"the index at {self.path} was built by another model: {model_file} has "
                                      f"sha256 {digest[:12]}..., the index was built from {m.checkpoint} with "
                                      f"sha256 {m.checkpoint_hash[:12]}...; query with that checkpoint or "
                                      f"rebuild the index with this one")

    def search(self, queries: Any, k: int = 10, *, nprobe: int | None = None, ef_search: int | None = None,
               with_metadata: bool = True) -> SearchResult:
        """Top ``k`` items for each of the ``(Q, E)`` query vectors (normalised here if they are not)."""
        q = queries.detach().float().cpu().numpy() if hasattr(queries, "detach") else np.asarray(queries)
        q = np.ascontiguousarray(np.atleast_2d(q).astype(np.float32))  # (Q, E)
        if q.shape[1] != self.dim:
            raise IndexStoreError(f"query vectors are {q.shape[1]} wide but the index at {self.path} holds "
                                  f"{self.dim}-wide vectors: it was built by another model")
        if k < 1:
            raise IndexStoreError(f"k must be at least 1, got {k}")
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        _set_search_params(self.index, nprobe if nprobe is not None else self.manifest.nprobe,
                           ef_search if ef_search is not None else self.manifest.ef_search, k)
        scores, rows = self.index.search(q, k)
        ids = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)  # reads only the hits' ids
        meta = self.metadata(rows) if with_metadata else []
        return SearchResult(scores=scores, ids=ids, rows=rows, metadata=meta)

    def metadata(self, rows: Any) -> list[list[dict[str, Any]]]:
        """Metadata of the index rows in the (Q, k) array ``rows`` (``-1`` entries skipped), read by offset."""
        out = []
        with open(self.path / "metadata.jsonl", "rb") as f:
            for qrows in np.atleast_2d(rows):
                hits = []
                for r in qrows:
                    if r >= 0:
                        f.seek(int(self._offsets[int(r)]))
                        hits.append(json.loads(f.readline()))
                out.append(hits)
        return out

    def shards(self) -> Iterator[np.ndarray]:
        """The stored embeddings, shard by shard (memory-mapped), in index row order."""
        for s in range(self.manifest.num_shards):
            p = _emb_path(self.path, s)
            if not p.is_file():
                raise IndexStoreError(f"{p} is missing; the stored embeddings are incomplete, rebuild the index")
            yield np.load(p, mmap_mode="r")


def open_index(path: str | os.PathLike) -> RetrievalIndex:
    """Open a finished index directory; missing or corrupt files are clear errors."""
    path = Path(path)
    if not path.is_dir():
        raise IndexStoreError(f"{path} is not a directory; build an index there with `contrast index build`")
    manifest = IndexManifest.from_file(path / "manifest.json")
    for name in RetrievalIndex.REQUIRED:
        if not (path / name).is_file():
            raise IndexStoreError(f"{path / name} is missing; the index is incomplete, rebuild it with "
                                  f"`contrast index build --overwrite`")
    try:
        index = faiss.read_index(str(path / "index.faiss"))
    except RuntimeError as e:
        raise IndexStoreError(f"{path / 'index.faiss'} cannot be read by faiss "
                              f"({str(e).strip().splitlines()[-1]}); rebuild the index") from None
    try:
        n_ids = np.load(path / "ids.npy", mmap_mode="r").shape[0]
        n_off = np.load(path / "metadata_offsets.npy", mmap_mode="r").shape[0]
    except (ValueError, OSError) as e:
        raise IndexStoreError(f"{path}: ids.npy or metadata_offsets.npy is corrupt ({e}); rebuild the index") from None
    if index.d != manifest.embed_dim or index.ntotal != manifest.count or n_ids != manifest.count \
            or n_off != manifest.count:
        raise IndexStoreError(f"{path}: files disagree with manifest.json (index {index.ntotal}x{index.d}, "
                              f"{n_ids} ids, {n_off} metadata rows; manifest {manifest.count}x"
                              f"{manifest.embed_dim}); rebuild the index")
    return RetrievalIndex(path, manifest, index)


# --------------------------------------------------------------------------------------------------- eval


@dataclass
class IndexEval:
    k: int
    num_queries: int
    recall: float  # mean |approximate top-k ∩ exact top-k| / k
    qps: float  # index queries per second (one batched search call)
    exact_qps: float  # brute-force queries per second over the stored shards
    nprobe: int | None
    ef_search: int | None


def exact_search(shards: Iterable[np.ndarray], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top ``k`` over embeddings given shard by shard; returns (scores, rows), (Q, k) each."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((q.shape[0], 0), -np.inf, dtype=np.float32)
    best_r = np.zeros((q.shape[0], 0), dtype=np.int64)
    base = 0
    for emb in shards:
        s = q @ np.asarray(emb).T  # (Q, S)
        r = np.broadcast_to(np.arange(base, base + s.shape[1]), s.shape)
        base += s.shape[1]
        s, r = np.concatenate([best_s, s], 1), np.concatenate([best_r, r], 1)
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best_s, best_r = np.take_along_axis(s, top, 1), np.take_along_axis(r, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)


def evaluate_index(index: RetrievalIndex, k: int = 10, num_queries: int = 1000, *, seed: int = 0,
                   nprobe: int | None = None, ef_search: int | None = None) -> IndexEval:
    """Recall@k of the index against exact search, with queries drawn from the stored vectors, and speed."""
    n = min(num_queries, len(index))
    pick = np.sort(np.random.default_rng(seed).choice(len(index), size=n, replace=False))
    shard_size = index.manifest.shard_size
    queries = np.concatenate([np.asarray(emb[pick[(pick >= s * shard_size) & (pick < s * shard_size + len(emb))]
                                             - s * shard_size]) for s, emb in enumerate(index.shards())])
    t = time.perf_counter()
    _, exact = exact_search(index.shards(), queries, k)
    exact_time = time.perf_counter() - t
    t = time.perf_counter()
    res = index.search(queries, k, nprobe=nprobe, ef_search=ef_search, with_metadata=False)
    index_time = time.perf_counter() - t
    hits = [len(set(a[a >= 0].tolist()) & set(b.tolist())) for a, b in zip(res.rows, exact)]
    ivf = faiss.try_extract_index_ivf(index.index)
    return IndexEval(k=k, num_queries=n, recall=float(np.mean(hits)) / min(k, len(index)),
                     qps=n / max(index_time, 1e-9), exact_qps=n / max(exact_time, 1e-9),
                     nprobe=ivf.nprobe if ivf is not None else None,
                     ef_search=index.index.hnsw.efSearch if hasattr(index.index, "hnsw") else None)
