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
    trained.faiss              the trained, empty index (the quantizer and codebooks every addition reuses)
    index.faiss                the faiss index; row r of the index is item ids[r]
    lists_000.ivfdata          an on-disk IVF index's inverted lists (``on_disk``; the number counts additions)
    ids.npy                    int64 (N,) item id of each index row
    metadata.jsonl             one JSON object per index row (path, caption, ...)
    metadata_offsets.npy       int64 (N,) byte offset of each metadata line, for random access
    manifest.json              written last: its presence marks a finished index
    add.json                   an addition in progress (:func:`add_to_index`)

Memory during a build is bounded by the shard size (plus the training sample for factories that train), never by
the collection size: embeddings go to disk shard by shard and are added back to faiss in chunks. An in-memory index
is as big as its codes; an on-disk IVF index (:mod:`contrast.index.ondisk`) holds only its quantizer in memory.

Finishing a build or an addition writes every new file under a ``.next`` name, records ``"phase": "commit"`` in the
state file, then renames them into place (the manifest last): a process killed at any moment leaves either the old
index or the new one, and the same command run again finishes the job.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from contrast.index import ondisk
from contrast.index.factory import (
    check_on_disk,
    choose_factory,
    default_search_params,
    layers,
    plan_factory,
    set_search_params,
)
from contrast.index.files import (
    IndexStoreError,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_index,
    atomic_write_json,
    file_sha256,
)

FORMAT_VERSION = 1
METRIC = "inner_product"
STORAGES = ("memory", "on_disk")
TRAINED = "trained.faiss"
NEXT = ".next"
ROW_FILES = ("ids.npy", "metadata_offsets.npy", "metadata.jsonl")

Encoder = Callable[[list[Any]], Any]  # batch of items -> (B, E) float32 L2-normalised (numpy or torch)
Describer = Callable[[Any], dict[str, Any]]  # item -> JSON-serialisable metadata

__all__ = ["IndexStoreError", "file_sha256", "plan_factory"]  # re-exported; the rest is listed in contrast.index


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
    factory_effective: str  # as built (IVF list count clamped to the collection size; auto resolved)
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
    storage: str = "memory"  # memory | on_disk (IVF inverted lists in lists_GGG.ivfdata)
    k_factor: int | None = None  # refine factories: candidates re-ranked per result wanted
    additions: list[dict[str, Any]] = field(default_factory=list)  # every add_to_index, in order
    rerank: int | None = None  # default: re-rank rerank * k candidates exactly from the stored shards

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
        if raw.get("storage", "memory") not in STORAGES:
            raise IndexStoreError(f"{path} is corrupt (storage {raw['storage']!r} is not one of {STORAGES}); {fix}")
        return cls(**raw)

    @property
    def generation(self) -> int:
        return len(self.additions)


# --------------------------------------------------------------------------------------------------- shards


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


def shard_rows(out: str | os.PathLike) -> list[int]:
    """Row counts of the finished shards 0..k-1 (contiguous from 0), read from the .npy headers."""
    rows = []
    for i in itertools.count():
        p = _emb_path(Path(out), i)
        if not p.is_file():
            break
        rows.append(int(np.load(p, mmap_mode="r").shape[0]))
    return rows


def pending_items(out: str | os.PathLike) -> int:
    """Items the unfinished build or addition in ``out`` has encoded so far (what a resumed run skips)."""
    out = Path(out)
    first = _read_state(out / "add.json")["first_shard"] if (out / "add.json").is_file() else 0
    return sum(shard_rows(out)[first:])


def _encode_shards(items: Iterable[Any], encode: Encoder, describe: Describer | None, out: Path, first_shard: int,
                   done: int, first_id: int, shard_size: int, batch_size: int, dim: int | None,
                   progress: bool) -> int:
    """Encode items from item ``done`` on (the first ``done`` sit in finished shards from ``first_shard``) into
    shards numbered on from there, with ids from ``first_id + done``; returns the count of items encoded in all."""
    from tqdm.auto import tqdm

    total = len(items) if _indexable(items) else None
    bar = tqdm(total=total, initial=done, unit="item", desc="encoding", disable=not progress)
    it = _items_from(items, done)
    shard, n = first_shard + done // shard_size, done
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
                lines.append((json.dumps({**meta, "id": first_id + n}) + "\n").encode())
                n += 1
            filled += len(batch)
            bar.update(len(batch))
        if filled == 0:
            break
        atomic_write_bytes(_meta_path(out, shard), b"".join(lines))
        atomic_save_npy(_emb_path(out, shard), np.concatenate(vecs))  # (filled, E); marks the shard finished
        shard += 1
        if filled < shard_size:
            break
    bar.close()
    return n


def _encode_remaining(items: Iterable[Any], encode: Encoder, describe: Describer | None, out: Path, first_shard: int,
                      first_id: int, shard_size: int, batch_size: int, dim: int | None, progress: bool) -> int:
    """Encode what the finished shards from ``first_shard`` on lack; returns the item count of this build or
    addition."""
    rows = shard_rows(out)[first_shard:]
    if any(r != shard_size for r in rows[:-1]) or (rows and rows[-1] > shard_size):
        raise IndexStoreError(f"{out}/shards does not match shard size {shard_size}; pass overwrite")
    if rows and rows[-1] < shard_size:  # a short shard is the last one: the source ended there
        return sum(rows)
    return _encode_shards(items, encode, describe, out, first_shard, sum(rows), first_id, shard_size, batch_size,
                          dim, progress)


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


# --------------------------------------------------------------------------------------------------- state files


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
        state["params"]  # noqa: B018
    except (json.JSONDecodeError, KeyError, TypeError):
        raise IndexStoreError(f"{path} is corrupt; pass overwrite (--overwrite) to start over") from None
    return state


def _check_params(out: Path, state: dict[str, Any], params: dict[str, Any], what: str) -> None:
    diff = {k: (state["params"].get(k), v) for k, v in params.items() if state["params"].get(k) != v}
    if diff:
        how = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
        raise IndexStoreError(f"{out} holds an unfinished {what} with other settings ({how}); rerun with the "
                              f"same settings to resume it, or pass overwrite (--overwrite) to start over")


def _finished_with(out: Path, params: dict[str, Any]) -> bool:
    """``out`` holds a finished index built with these settings."""
    if not (out / "manifest.json").is_file() or not (out / "build.json").is_file():
        return False
    try:
        return json.loads((out / "build.json").read_text()).get("params") == params
    except (json.JSONDecodeError, AttributeError):
        return False


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Clear the directory if ``overwrite``, refuse a finished index, create ``shards/``, drop half-written files."""
    if overwrite and out.exists():
        _remove_index_files(out)
    if (out / "manifest.json").exists():
        raise IndexStoreError(f"{out} already holds a finished index built with other settings; choose another "
                              f"output directory or pass overwrite (--overwrite) to replace it")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    _drop_half_written(out)


def _drop_half_written(out: Path) -> None:
    for stale in [*out.glob("*.tmp*"), *(out / "shards").glob("*.tmp*"), *(out / ondisk.BLOCKS).glob("*.tmp*")]:
        stale.unlink()  # half-written files of a killed process


def _open_build_state(out: Path, params: dict[str, Any]) -> dict[str, Any]:
    """The build state of an unfinished build with the same ``params``, or a fresh one written to ``build.json``."""
    build_file = out / "build.json"
    state: dict[str, Any] = {"params": params, "encoded": None, "elapsed": 0.0}
    if not build_file.exists():
        if any((out / "shards").iterdir()):
            raise IndexStoreError(f"{out}/shards holds files but no build.json; pass overwrite (--overwrite)")
        atomic_write_json(build_file, state)
        return state
    state = _read_state(build_file)
    _check_params(out, state, params, "build")
    return state


def _remove_index_files(out: Path) -> None:
    for name in ("manifest.json", "build.json", "add.json", "index.faiss", TRAINED, *ROW_FILES):
        (out / name).unlink(missing_ok=True)
        (out / (name + NEXT)).unlink(missing_ok=True)
    for p in out.glob("lists_*.ivfdata"):
        p.unlink()
    shutil.rmtree(out / "shards", ignore_errors=True)
    shutil.rmtree(out / ondisk.BLOCKS, ignore_errors=True)
    for p in out.glob("*.tmp*"):
        p.unlink()


def _commit(out: Path, state_file: Path, state: dict[str, Any]) -> None:
    """Move every ``.next`` file into place, the manifest last; safe to run again after a kill at any point."""
    if state.get("phase") != "commit":
        state["phase"] = "commit"
        atomic_write_json(state_file, state)
    for name in ("index.faiss", *ROW_FILES, "manifest.json"):
        nxt = out / (name + NEXT)
        if nxt.exists():
            os.replace(nxt, out / name)
    ondisk.remove_blocks(out)
    for p in out.glob("lists_*.ivfdata"):  # lists of earlier generations
        if p.name not in state.get("keep", []):
            p.unlink()


# --------------------------------------------------------------------------------------------------- build


@dataclass
class _Plan:
    """A build's factory as resolved for the stored vectors."""

    factory: str
    effective: str
    on_disk: bool
    notes: list[str]
    rerank: int | None = None  # chosen by auto


def build_index(
    items: Iterable[Any],
    encode: Encoder,
    out_dir: str | os.PathLike,
    *,
    factory: str = "Flat",
    on_disk: bool = False,
    memory_gib: float | None = None,
    target_recall: float = 0.95,
    rerank: int | None = None,
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
    metadata (path, caption). ``on_disk`` keeps an IVF factory's inverted lists on disk. ``factory="auto"`` picks
    the index type for the collection from ``memory_gib`` and ``target_recall`` (:func:`choose_factory`).
    ``rerank`` makes searches re-rank ``rerank * k`` candidates exactly against the stored shards by default. An
    unfinished build in ``out_dir`` with the same settings is resumed from its last finished shard; a different
    one is refused unless ``overwrite``.
    """
    if batch_size < 1 or shard_size < 1 or add_chunk < 1 or (rerank is not None and rerank < 1):
        raise IndexStoreError("batch_size, shard_size, add_chunk and rerank must be positive")
    _check_request(factory, on_disk, memory_gib)
    out = Path(out_dir)
    t0 = time.perf_counter()
    params = {"factory": factory, "shard_size": shard_size, "checkpoint_hash": checkpoint_hash,
              "modality": modality, "source": source, "split": split, "on_disk": on_disk,
              **({"memory_gib": memory_gib, "target_recall": target_recall} if factory == "auto" else {})}
    if _finished_with(out, params) and not overwrite:  # the same command again after it finished (or was killed
        print(f"contrast index: {out} holds this build finished already")  # between its last rename and its exit)
        return open_index(out)
    _prepare_out_dir(out, overwrite)
    state = _open_build_state(out, params)
    if state.get("encoded") is None:  # step 1: encode into shards (resumes from the last finished shard)
        state["encoded"] = _encode_remaining(items, encode, describe, out, 0, 0, shard_size, batch_size, dim, progress)
        state["elapsed"] = float(state.get("elapsed", 0.0)) + time.perf_counter() - t0
        t0 = time.perf_counter()
        atomic_write_json(out / "build.json", state)
    count = int(state["encoded"])
    if count == 0:
        raise IndexStoreError("the source yielded no items; nothing to index")
    if state.get("phase") != "commit":
        trained, plan = _trained_index(out, state, min(count, max_train), seed)  # step 2
        index = _filled(trained, out, range(-(-count // shard_size)), 0, plan.on_disk, None, add_chunk)  # step 3
        _write_row_files(out, range(-(-count // shard_size)), count, None)
        manifest = _manifest(index, plan, count, state, t0, checkpoint=checkpoint, checkpoint_hash=checkpoint_hash,
                             modality=modality, source=source, split=split, shard_size=shard_size,
                             rerank=rerank if rerank is not None else plan.rerank)
        atomic_write_index(index, out / ("index.faiss" + NEXT))
        atomic_write_json(out / ("manifest.json" + NEXT), dataclasses.asdict(manifest))
        state["keep"] = [ondisk.lists_name(0)] if plan.on_disk else []
    _commit(out, out / "build.json", state)  # step 4: move the new files into place, the manifest last
    return open_index(out)


def _check_request(factory: str, on_disk: bool, memory_gib: float | None) -> None:
    if factory == "auto" and memory_gib is None:
        raise IndexStoreError("factory 'auto' needs a memory budget: pass memory_gib (--memory GiB)")
    if factory != "auto" and on_disk and ("IVF" not in factory or "Refine" in factory or "RFlat" in factory):
        raise IndexStoreError(f"factory {factory!r} cannot keep its inverted lists on disk: on_disk needs an IVF "
                              "index without a refine stage, e.g. IVF4096,Flat, IVF4096,SQ8 or OPQ32,IVF4096,PQ32")


def _resolve(out: Path, state: dict[str, Any], count: int, dim: int) -> _Plan:
    """The factory to build for the stored vectors (``auto`` chosen here), with the notes saying why."""
    p = state["params"]
    factory, on_disk, notes, rerank = p["factory"], bool(p["on_disk"]), [], None
    if factory == "auto":
        choice = choose_factory(count, dim, p["memory_gib"], p["target_recall"])
        factory, on_disk, rerank = choice.factory, choice.on_disk, choice.rerank
        notes.append(f"auto: {choice.reason}")
    effective, more = plan_factory(factory, dim, count)
    for note in notes + more:
        print(f"contrast index: {note}")
    return _Plan(p["factory"], effective, on_disk, notes + more, rerank)


def _trained_index(out: Path, state: dict[str, Any], n_train: int, seed: int) -> tuple[faiss.Index, _Plan]:
    """The trained, empty index (``trained.faiss``, kept so a resumed build and later additions reuse the same
    quantizer), trained on ``n_train`` stored vectors when the factory needs training."""
    count, shard_size = int(state["encoded"]), int(state["params"]["shard_size"])
    dim = int(np.load(_emb_path(out, 0), mmap_mode="r").shape[1])
    if "plan" in state and (out / TRAINED).is_file():
        return faiss.read_index(str(out / TRAINED)), _Plan(**state["plan"])
    plan = _resolve(out, state, count, dim)
    index = faiss.index_factory(dim, plan.effective, faiss.METRIC_INNER_PRODUCT)
    for part in layers(index):  # polysemous codes serve a Hamming pre-filter we never search with; training them
        if hasattr(part, "do_polysemous_training"):  # is most of a PQ index's training time
            part.do_polysemous_training = False
    if plan.on_disk:
        check_on_disk(index, plan.effective)
    if not index.is_trained:
        sample = _training_sample(out, count, shard_size, n_train, seed)
        index.train(sample)
        del sample
    atomic_write_index(index, out / TRAINED)
    state["plan"] = dataclasses.asdict(plan)
    atomic_write_json(out / "build.json", state)
    return index, plan


def _shard_vectors(out: Path, shards: Iterable[int]) -> Iterator[tuple[int, int, np.ndarray]]:
    """(shard, first row, memory-mapped vectors) of each shard, rows counted over all shards before it."""
    rows = shard_rows(out)
    starts = np.concatenate([[0], np.cumsum(rows)])
    for s in shards:
        yield s, int(starts[s]), np.load(_emb_path(out, s), mmap_mode="r")


def _filled(start: faiss.Index, out: Path, shards: range, generation: int, on_disk: bool,
            previous: faiss.Index | None, add_chunk: int) -> faiss.Index:
    """``start`` (the trained index, or the previous index in memory) with the vectors of ``shards`` added; on disk:
    the trained index with the previous lists and the shards' blocks merged into this generation's lists file."""
    if on_disk:
        blocks = ondisk.write_blocks(start, out, _shard_vectors(out, shards), add_chunk)
        return ondisk.merge(start, blocks, out / ondisk.lists_name(generation), previous)
    for _, _, emb in _shard_vectors(out, shards):
        for lo in range(0, emb.shape[0], add_chunk):
            start.add(np.ascontiguousarray(emb[lo : lo + add_chunk]))
    return start


def _write_row_files(out: Path, shards: range, count: int, previous: int | None) -> None:
    """ids.npy, metadata_offsets.npy and metadata.jsonl (as ``.next`` files) of the rows before (copied from the
    current files when ``previous`` rows exist) and of the shards'."""
    paths = {name: out / (name + NEXT) for name in ROW_FILES}
    tmp = {name: p.with_name(p.name + f".tmp{os.getpid()}") for name, p in paths.items()}
    ids = np.lib.format.open_memmap(tmp["ids.npy"], mode="w+", dtype=np.int64, shape=(count,))
    offsets = np.lib.format.open_memmap(tmp["metadata_offsets.npy"], mode="w+", dtype=np.int64, shape=(count,))
    row = 0
    with open(tmp["metadata.jsonl"], "wb") as meta_out:
        if previous:
            ids[:previous] = np.load(out / "ids.npy", mmap_mode="r")
            offsets[:previous] = np.load(out / "metadata_offsets.npy", mmap_mode="r")
            with open(out / "metadata.jsonl", "rb") as f:
                shutil.copyfileobj(f, meta_out)
            row = previous
        for s in shards:
            with open(_meta_path(out, s), "rb") as f:
                for line in f:
                    offsets[row] = meta_out.tell()
                    ids[row] = json.loads(line)["id"]
                    meta_out.write(line)
                    row += 1
        meta_out.flush()
        os.fsync(meta_out.fileno())
    if row != count:
        raise IndexStoreError(f"{out}/shards hold {row} metadata rows, expected {count}; pass overwrite "
                              "(--overwrite) to rebuild")
    ids.flush()
    offsets.flush()
    del ids, offsets
    for name in ROW_FILES:
        os.replace(tmp[name], paths[name])


def _manifest(index: faiss.Index, plan: _Plan, count: int, state: dict[str, Any], t0: float,
              **fields: Any) -> IndexManifest:
    nprobe, ef, kf = default_search_params(index)
    return IndexManifest(
        embed_dim=index.d, count=count, factory=plan.factory, factory_effective=plan.effective,
        num_shards=-(-count // fields["shard_size"]), nprobe=nprobe, ef_search=ef, k_factor=kf,
        storage="on_disk" if plan.on_disk else "memory", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        build_seconds=round(float(state.get("elapsed", 0.0)) + time.perf_counter() - t0, 3), notes=plan.notes,
        **fields)


# --------------------------------------------------------------------------------------------------- add


def add_to_index(
    index_dir: str | os.PathLike,
    items: Iterable[Any],
    encode: Encoder,
    *,
    describe: Describer | None = None,
    batch_size: int = 64,
    add_chunk: int = 16384,
    checkpoint_hash: str | None = None,
    source: str | None = None,
    split: str | None = None,
    record: Callable[[], dict[str, Any]] | None = None,
    progress: bool = True,
) -> RetrievalIndex:
    """Append ``items`` to a finished index: encoded into new shards, ids continuing from the index's count, added
    to the trained index (in memory, or merged into the next lists file on disk); the manifest lists the addition
    (with ``record()``'s fields). ``checkpoint_hash`` must be the index's own model's. An interrupted addition
    resumes when called again with the same settings; an addition of the same source and split that has finished
    already is not repeated."""
    out = Path(index_dir)
    t0 = time.perf_counter()
    m = IndexManifest.from_file(out / "manifest.json")
    if m.checkpoint_hash is not None and checkpoint_hash != m.checkpoint_hash:
        raise IndexStoreError(f"the index at {out} was built by another model ({m.checkpoint}, sha256 "
                              f"{m.checkpoint_hash[:12]}...); add to it with that model, or build a new index")
    params = {"checkpoint_hash": checkpoint_hash, "source": source, "split": split}
    state = _open_add_state(out, m, params)
    if state is None:
        print(f"contrast index: {source}:{split} was added to {out} already; nothing to do")
        return open_index(out)
    first_shard, first_id = int(state["first_shard"]), int(state["first_id"])
    if state.get("phase") != "commit":
        new = _encode_remaining(items, encode, describe, out, first_shard, first_id, m.shard_size, batch_size,
                                m.embed_dim, progress)
        if new == 0:
            (out / "add.json").unlink()
            raise IndexStoreError("the source yielded no items; nothing to add")
        shards = range(first_shard, first_shard + -(-new // m.shard_size))
        _write_addition(out, m, state, shards, new, add_chunk, t0, record)
    _commit(out, out / "add.json", state)
    (out / "add.json").unlink()
    return open_index(out)


def _open_add_state(out: Path, m: IndexManifest, params: dict[str, Any]) -> dict[str, Any] | None:
    """The state of the addition in progress (``add.json``), a fresh one, or None when it finished already."""
    path = out / "add.json"
    _drop_half_written(out)
    if path.is_file():
        state = _read_state(path)
        _check_params(out, state, params, "addition")
        return state
    if any(all(a.get(k) == v for k, v in params.items()) for a in m.additions):
        return None
    state = {"params": params, "first_shard": m.num_shards, "first_id": m.count, "generation": m.generation + 1}
    if len(shard_rows(out)) != m.num_shards:
        raise IndexStoreError(f"{out}/shards holds {len(shard_rows(out))} shards, the manifest {m.num_shards}; "
                              "the index is damaged, rebuild it")
    atomic_write_json(path, state)
    return state


def _write_addition(out: Path, m: IndexManifest, state: dict[str, Any], shards: range, new: int, add_chunk: int,
                    t0: float, record: Callable[[], dict[str, Any]] | None) -> None:
    """The ``.next`` files of the index with ``shards`` added."""
    on_disk, gen = m.storage == "on_disk", int(state["generation"])
    if on_disk:
        previous = ondisk.read(out / "index.faiss")
        index = _filled(faiss.read_index(str(out / TRAINED)), out, shards, gen, True, previous, add_chunk)
        del previous
    else:
        index = _filled(faiss.read_index(str(out / "index.faiss")), out, shards, gen, False, None, add_chunk)
    _write_row_files(out, shards, m.count + new, m.count)
    entry = {**state["params"], "generation": gen, "first_id": m.count, "count": new,
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t0, 3),
             **(record() if record is not None else {})}
    manifest = dataclasses.replace(m, count=m.count + new, num_shards=shards.stop, additions=[*m.additions, entry])
    atomic_write_index(index, out / ("index.faiss" + NEXT))
    atomic_write_json(out / ("manifest.json" + NEXT), dataclasses.asdict(manifest))
    state["keep"] = [ondisk.lists_name(gen)] if on_disk else []


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
               k_factor: int | None = None, rerank: int | None = None, with_metadata: bool = True) -> SearchResult:
        """Top ``k`` items for each of the ``(Q, E)`` query vectors (normalised here if they are not).

        ``rerank`` (default: the manifest's; 0 turns it off): the index proposes ``rerank * k`` candidates whose
        stored float32 vectors are read back from the shards (memory-mapped) and scored exactly."""
        q = queries.detach().float().cpu().numpy() if hasattr(queries, "detach") else np.asarray(queries)
        q = np.ascontiguousarray(np.atleast_2d(q).astype(np.float32))  # (Q, E)
        if q.shape[1] != self.dim:
            raise IndexStoreError(f"query vectors are {q.shape[1]} wide but the index at {self.path} holds "
                                  f"{self.dim}-wide vectors: it was built by another model")
        if k < 1:
            raise IndexStoreError(f"k must be at least 1, got {k}")
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        m = self.manifest
        set_search_params(self.index, nprobe if nprobe is not None else m.nprobe,
                          ef_search if ef_search is not None else m.ef_search,
                          k_factor if k_factor is not None else m.k_factor, k)
        rr = rerank if rerank is not None else (m.rerank or 0)
        if rr > 1:
            scores, rows = self._reranked(q, *self.index.search(q, k * rr), k)
        else:
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

    def _reranked(self, q: np.ndarray, _: np.ndarray, cand: np.ndarray, k: int, chunk: int = 64
                  ) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` of each query's candidate rows by exact inner product with their stored vectors."""
        scores = np.full((len(q), k), -np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        for lo in range(0, len(q), chunk):
            c = cand[lo : lo + chunk]  # (C, k * rerank)
            uniq, pos = np.unique(c[c >= 0], return_inverse=True)
            vec = self.vectors(uniq)  # (U, E): each candidate read once
            s = np.full(c.shape, -np.inf, np.float32)
            s[c >= 0] = np.einsum("ij,ij->i", vec[pos], np.repeat(q[lo : lo + chunk], (c >= 0).sum(1), axis=0))
            top = np.argsort(-s, axis=1, kind="stable")[:, :k]
            scores[lo : lo + chunk, : top.shape[1]] = np.take_along_axis(s, top, 1)
            rows[lo : lo + chunk, : top.shape[1]] = np.where(np.isfinite(np.take_along_axis(s, top, 1)),
                                                             np.take_along_axis(c, top, 1), -1)
        return scores, rows

    def _shard_starts(self) -> np.ndarray:
        if not hasattr(self, "_starts"):
            self._starts = np.concatenate([[0], np.cumsum([e.shape[0] for e in self.shards()])])
        return self._starts

    def vectors(self, rows: Any) -> np.ndarray:
        """The stored (exact) vectors of index ``rows``, (R, E) float32, read from the shards they sit in."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        starts = self._shard_starts()
        shard = np.searchsorted(starts, rows, side="right") - 1
        for s in np.unique(shard):
            hit = shard == s
            out[hit] = np.load(_emb_path(self.path, int(s)), mmap_mode="r")[rows[hit] - starts[s]]
        return out

    def memory_bytes(self) -> int:
        """Bytes the index holds in memory to search: its serialised size (an on-disk index: without its lists)."""
        return (self.path / "index.faiss").stat().st_size

    def disk_bytes(self) -> int:
        """Bytes of inverted lists kept on disk (0 for an in-memory index)."""
        return sum(p.stat().st_size for p in self.path.glob("lists_*.ivfdata"))


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
        index = ondisk.read(path / "index.faiss") if manifest.storage == "on_disk" else \
            faiss.read_index(str(path / "index.faiss"))
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
