"""How good and how fast an index is: recall against exact search over the same stored vectors, hit rate against
ground-truth pairs, queries per second, and memory.

Queries should be held out: a caption's text embedding searched against an image index (the row's own image is
the ground truth), an image against a caption index, or images of another split against an image index. Searching
an index with its own stored vectors (:func:`evaluate_index`) overstates recall: every query sits exactly on an
indexed point, and quantisers trained on the indexed vectors place text queries, which lie elsewhere (the modality
gap), worse than the vectors they were trained on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from contrast.index.factory import search_params
from contrast.index.files import IndexStoreError
from contrast.index.store import RetrievalIndex

KS = (1, 10, 100)


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


def overlap(got: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |got[:, :k] ∩ exact[:, :k]| / k over the queries (``-1`` entries of ``got`` never count)."""
    return float(np.mean([len(set(a[:k][a[:k] >= 0].tolist()) & set(b[:k].tolist())) for a, b in zip(got, exact)])
                 ) / k


def hit_rate(got: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Share of queries whose ground-truth row is among the first ``k`` rows of ``got``."""
    return float(np.mean((got[:, :k] == truth[:, None]).any(axis=1)))


@dataclass
class QueryEval:
    """One query set against one index."""

    direction: str  # e.g. text->image
    num_queries: int
    ks: list[int]
    recall: dict[int, float]  # recall@K of the index against exact search over the same stored vectors
    qps: float  # index queries per second (one batched search call)
    exact_qps: float  # brute-force queries per second over the stored shards
    hit: dict[int, float] | None = None  # ground truth within the index's top K
    exact_hit: dict[int, float] | None = None  # ground truth within the exact top K (the model's own ceiling)
    search: dict[str, int | None] = field(default_factory=dict)  # nprobe / ef_search / k_factor / rerank used
    memory_bytes: int = 0  # what the index holds in memory to search
    disk_bytes: int = 0  # inverted lists on disk
    count: int = 0

    @property
    def bytes_per_vector(self) -> float:
        return self.memory_bytes / max(1, self.count)


def evaluate_queries(index: RetrievalIndex, queries: np.ndarray, *, direction: str = "vectors",
                     truth: Sequence[int] | np.ndarray | None = None, ks: Sequence[int] = KS,
                     nprobe: int | None = None, ef_search: int | None = None,
                     k_factor: int | None = None, rerank: int | None = None) -> QueryEval:
    """Recall@K of ``index`` for the ``(Q, E)`` held-out ``queries`` against exact search over the index's stored
    vectors; with ``truth`` (the row each query should find, ``-1`` for none), hit@K as well."""
    q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
    if q.shape[0] == 0:
        raise IndexStoreError("no queries to evaluate with")
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    ks = sorted({min(int(k), len(index)) for k in ks if k >= 1})
    kmax = ks[-1]
    t = time.perf_counter()
    _, exact = exact_search(index.shards(), q, kmax)
    exact_time = time.perf_counter() - t
    settings = {"nprobe": nprobe, "ef_search": ef_search, "k_factor": k_factor, "rerank": rerank}
    index.search(q[:1], kmax, with_metadata=False, **settings)  # warm-up
    t = time.perf_counter()
    got = index.search(q, kmax, with_metadata=False, **settings).rows
    index_time = time.perf_counter() - t
    ev = QueryEval(direction=direction, num_queries=len(q), ks=ks, recall={k: overlap(got, exact, k) for k in ks},
                   qps=len(q) / max(index_time, 1e-9), exact_qps=len(q) / max(exact_time, 1e-9),
                   search={**search_params(index.index), "rerank": rerank if rerank is not None else
                           index.manifest.rerank}, memory_bytes=index.memory_bytes(),
                   disk_bytes=index.disk_bytes(), count=len(index))
    if truth is not None:
        tr = np.asarray(truth, dtype=np.int64)
        if tr.shape != (len(q),):
            raise IndexStoreError(f"truth has shape {tr.shape}, expected ({len(q)},): one row per query")
        keep = tr >= 0
        if keep.any():
            ev.hit = {k: hit_rate(got[keep], tr[keep], k) for k in ks}
            ev.exact_hit = {k: hit_rate(exact[keep], tr[keep], k) for k in ks}
    return ev


@dataclass
class IndexEval:
    k: int
    num_queries: int
    recall: float  # mean |approximate top-k ∩ exact top-k| / k
    qps: float  # index queries per second (one batched search call)
    exact_qps: float  # brute-force queries per second over the stored shards
    nprobe: int | None
    ef_search: int | None
    k_factor: int | None = None


def sample_rows(n_rows: int, n: int, seed: int = 0) -> np.ndarray:
    """``min(n, n_rows)`` distinct rows, sorted, drawn with ``seed``."""
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=min(n, n_rows), replace=False))


def evaluate_index(index: RetrievalIndex, k: int = 10, num_queries: int = 1000, *, seed: int = 0,
                   nprobe: int | None = None, ef_search: int | None = None, k_factor: int | None = None) -> IndexEval:
    """Recall@k against exact search with queries drawn from the stored vectors themselves, and speed. This
    overstates recall (see the module docstring); :func:`evaluate_queries` takes held-out queries."""
    pick = sample_rows(len(index), num_queries, seed)
    ev = evaluate_queries(index, index.vectors(pick), direction="stored", ks=(k,), nprobe=nprobe, ef_search=ef_search,
                          k_factor=k_factor)
    kk = ev.ks[0]
    return IndexEval(k=k, num_queries=ev.num_queries, recall=ev.recall[kk], qps=ev.qps, exact_qps=ev.exact_qps,
                     nprobe=ev.search["nprobe"], ef_search=ev.search["ef_search"], k_factor=ev.search["k_factor"])
