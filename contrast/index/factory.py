"""faiss factory strings: planning one for a collection, its search settings, and the automatic choice.

Factories this module knows how to tune (any other faiss factory string is accepted and built as given):

- ``Flat``: exact search, 4 bytes per dimension per vector.
- ``HNSW32``: a graph over full vectors (search beam ``efSearch``); more memory than Flat, much faster.
- ``IVFn,Flat`` / ``IVFn,SQ8`` / ``IVFn,SQfp16`` / ``IVFn,PQm``: ``n`` k-means lists, ``nprobe`` of them scanned,
  vectors stored whole, as 8- or 16-bit scalars per dimension, or as ``m``-byte product codes; ``OPQm,`` in front
  rotates the vectors first so PQ loses less.
- ``...,RFlat`` / ``...,Refine(SQ8)``: faiss's refine, the exact (RFlat) or 8-bit re-ranking of a shortlist of
  ``k_factor * k`` candidates; PQ codes find the shortlist, the refine stage orders it.
- ``SQ8`` / ``SQfp16``: every vector scanned, stored in 1 or 2 bytes per dimension.

An IVF index may keep its inverted lists on disk (``on_disk``, :mod:`contrast.index.ondisk`): memory then holds only
the coarse quantizer and list offsets.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import faiss

from contrast.index.files import IndexStoreError

MIN_POINTS_PER_LIST = 39  # faiss k-means wants at least this many training points per centroid
DEFAULT_EF_SEARCH = 64
DEFAULT_K_FACTOR = 8  # refine: candidates re-ranked per result wanted
GIB = 2**30

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
                           f"Known good choices: Flat, HNSW32, IVF1024,Flat, IVF1024,SQ8, IVF1024,PQ32,RFlat") from None
    return factory, notes


# --------------------------------------------------------------------------------------------------- search settings


def layers(index: faiss.Index) -> list[faiss.Index]:
    """``index`` and the indexes it wraps (a refine's base, a pre-transform's inner index), outermost first."""
    out = [index]
    while True:
        cur = faiss.downcast_index(out[-1])
        if isinstance(cur, faiss.IndexRefine):
            out.append(faiss.downcast_index(cur.base_index))
        elif isinstance(cur, faiss.IndexPreTransform):
            out.append(faiss.downcast_index(cur.index))
        else:
            return out


def _find(index: faiss.Index, kind: type) -> faiss.Index | None:
    return next((ix for ix in layers(index) if isinstance(ix, kind)), None)


def default_search_params(index: faiss.Index) -> tuple[int | None, int | None, int | None]:
    """(nprobe, efSearch, k_factor) a new index searches with; None where the index has no such setting."""
    ivf = faiss.try_extract_index_ivf(index)
    nprobe = min(ivf.nlist, max(8, ivf.nlist // 16)) if ivf is not None else None
    ef = DEFAULT_EF_SEARCH if _find(index, faiss.IndexHNSW) is not None else None
    kf = DEFAULT_K_FACTOR if _find(index, faiss.IndexRefine) is not None else None
    return nprobe, ef, kf


def set_search_params(index: faiss.Index, nprobe: int | None, ef_search: int | None, k_factor: int | None,
                      k: int) -> None:
    """Set the search settings the index has (the others are ignored)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and nprobe is not None:
        ivf.nprobe = int(nprobe)
    hnsw = _find(index, faiss.IndexHNSW)
    if hnsw is not None and ef_search is not None:
        hnsw.hnsw.efSearch = max(int(ef_search), k)
    refine = _find(index, faiss.IndexRefine)
    if refine is not None and k_factor is not None:
        refine.k_factor = float(k_factor)


def search_params(index: faiss.Index) -> dict[str, int | None]:
    """The settings the index searches with now."""
    ivf = faiss.try_extract_index_ivf(index)
    hnsw, refine = _find(index, faiss.IndexHNSW), _find(index, faiss.IndexRefine)
    return {"nprobe": ivf.nprobe if ivf is not None else None,
            "ef_search": hnsw.hnsw.efSearch if hnsw is not None else None,
            "k_factor": int(refine.k_factor) if refine is not None else None}


def check_on_disk(index: faiss.Index, factory: str) -> None:
    """On-disk inverted lists need an IVF index at the core, with no refine stage (a rotation such as OPQ is fine)."""
    chain = layers(index)
    if not isinstance(chain[-1], faiss.IndexIVF) or any(isinstance(ix, faiss.IndexRefine) for ix in chain) \
            or isinstance(chain[-1], faiss.IndexIVFPQR):
        raise IndexStoreError(f"factory {factory!r} cannot keep its inverted lists on disk: on_disk needs an IVF index "
                           "without a refine stage, e.g. IVF4096,Flat, IVF4096,SQ8 or OPQ32,IVF4096,PQ32")


# --------------------------------------------------------------------------------------------------- automatic choice


def nlist_for(count: int) -> int:
    """IVF list count for ``count`` vectors: about sqrt(N), a power of two, at least 39 vectors per list (more lists
    search faster but cost more to train and assign; sqrt(N) keeps a CPU build of millions of vectors in minutes)."""
    n = 2 ** round(math.log2(max(1.0, math.sqrt(count))))
    return max(1, min(n, count // MIN_POINTS_PER_LIST))


@dataclass(frozen=True)
class Option:
    """One index type with its measured trade-off (eval/bench/index.py, 1M clustered vectors x 512, text-like
    queries, recall@10 against exact search at the default search settings; speed-up over brute force)."""

    factory: str  # {nlist}, {pq} (width / 8) and {pq4} (width / 4) are filled in for the collection
    on_disk: bool
    code_bytes: Callable[[int], float]  # bytes per vector held in memory for width d (on disk: on disk)
    recall: float
    speedup: float
    rerank: int | None = None  # re-rank this many x k candidates exactly from the stored shards

    def resident_bytes(self, count: int, dim: int) -> float:
        """Memory the index holds while searching: codes and ids (an on-disk index: only its quantizer and list
        offsets), plus the quantizer."""
        nlist = nlist_for(count)
        quantizer = nlist * dim * 4 + nlist * 64
        return quantizer if self.on_disk else count * (self.code_bytes(dim) + 8) + quantizer

    def build(self, count: int, dim: int) -> str:
        return self.factory.format(nlist=nlist_for(count), pq=dim // 8, pq4=dim // 4)

    def describe(self, count: int, dim: int) -> str:
        return self.build(count, dim) + (f" + exact re-rank of {self.rerank} x k" if self.rerank else "") + (
            " (inverted lists on disk)" if self.on_disk else "")


# measured on 1M x 512 clustered vectors, text-like queries, 2 CPU threads, default search settings (README,
# Benchmarks: eval/bench/index.py); speed-up: queries/s over brute-force torch search of the same queries
OPTIONS = (
    Option("IVF{nlist},Flat", False, lambda d: 4 * d, recall=0.998, speedup=1.5),
    Option("IVF{nlist},SQ8", False, lambda d: d, recall=0.964, speedup=2.5),
    Option("IVF{nlist},PQ{pq},Refine(SQ8)", False, lambda d: d // 8 + d, recall=0.677, speedup=10.9),
    Option("IVF{nlist},PQ{pq},RFlat", False, lambda d: d // 8 + 4 * d, recall=0.678, speedup=10.2),
    Option("IVF{nlist},PQ{pq4}x4fs", False, lambda d: d // 8, recall=0.981, speedup=17.6, rerank=20),
    Option("IVF{nlist},SQ8", True, lambda d: d, recall=0.964, speedup=1.8),
    Option("IVF{nlist},Flat", True, lambda d: 4 * d, recall=0.998, speedup=0.8),
)
SMALL = 100_000  # below this many vectors exact search is fast enough: Flat


@dataclass(frozen=True)
class Choice:
    factory: str
    on_disk: bool
    reason: str
    rerank: int | None = None


def choose_factory(count: int, dim: int, memory_gib: float, target_recall: float = 0.95) -> Choice:
    """The fastest index type that fits ``memory_gib`` and reached ``target_recall`` in the measurements, and why."""
    budget = memory_gib * GIB
    flat = count * dim * 4
    if count < SMALL and flat <= budget:
        return Choice("Flat", False, f"{count:,} vectors: exact search is fast enough at this size "
                                     f"({flat / GIB:.2f} GiB of {memory_gib:g} GiB)")
    fits = [o for o in OPTIONS if o.resident_bytes(count, dim) <= budget]
    good = sorted((o for o in fits if o.recall >= target_recall), key=lambda o: (-o.speedup, o.on_disk))
    if good:
        o = good[0]
        return Choice(o.build(count, dim), o.on_disk, _why(o, count, dim, memory_gib, target_recall, len(good)),
                      o.rerank)
    if fits:
        o = max(fits, key=lambda o: o.recall)
        return Choice(o.build(count, dim), o.on_disk, f"no measured option reaches recall {target_recall:g} within "
                      f"{memory_gib:g} GiB; the most accurate that fits: " + _why(o, count, dim, memory_gib, None, 1),
                      o.rerank)
    raise IndexStoreError(f"no index type fits {count:,} vectors x {dim} in {memory_gib:g} GiB, not even the "
                          f"quantizer of an on-disk IVF index; raise --memory")


def _why(o: Option, count: int, dim: int, memory_gib: float, target: float | None, n: int) -> str:
    line = (f"{o.describe(count, dim)}: {o.resident_bytes(count, dim) / GIB:.2f} GiB resident of {memory_gib:g} GiB "
            f"(Flat: {count * dim * 4 / GIB:.2f} GiB); measured recall@10 {o.recall:.3f} on text-like queries at "
            f"{o.speedup:.1f}x brute-force speed on 1M x 512")
    if target is not None:
        line += f"; the fastest of {n} measured option(s) that reach recall {target:g} and fit"
    return line
