"""Retrieval index build and query speed: contrast's faiss indexes against brute-force torch search.

Data: N clustered unit vectors (default 200,000 x 256, 1,000 clusters) and Q held-out queries near them. Each faiss
factory is built through ``contrast.index.build_index`` (the full path: encoder batches, shards on disk,
training on a sample, chunked adds, saving), with an identity encoder so only the index work is timed.
Brute force is a torch matmul + topk over all vectors in memory (its "build" is the copy into one tensor).

Reported per method: build seconds, queries/s for one batched call of Q queries, milliseconds per query one at a
time (first 100 queries), recall@10 against the exact torch result, NN@1 (the first hit is the exact nearest
neighbour) and the index size on disk. The clustered set is deliberately hard: within a cluster the noise is
isotropic in all dimensions, so a query's 2nd..10th neighbours are nearly equidistant and quantized codes (PQ)
scramble them; NN@1 shows whether the true nearest item is still found.

    python eval/bench/index.py [--n 200000] [--dim 256] [--queries 1000] [--factory Flat --factory HNSW32 ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from contrast.index import build_index, open_index

K = 10


def clustered(n: int, dim: int, clusters: int, seed: int, noise: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    for lo in range(0, n, 50_000):  # in chunks: float64 noise for 200k x 256 would be 400 MB
        m = min(50_000, n - lo)
        x[lo : lo + m] = centres[rng.integers(0, clusters, m)] + (noise / np.sqrt(dim)) * rng.standard_normal(
            (m, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def torch_topk(base: torch.Tensor, q: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    out = []
    for lo in range(0, q.shape[0], chunk):
        out.append((q[lo : lo + chunk] @ base.T).topk(k, dim=1).indices)  # (chunk, N) -> (chunk, k)
    return torch.cat(out)


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k."""
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / exact.shape[1] for a, b in zip(got, exact)]))


def top1(got: np.ndarray, exact: np.ndarray) -> float:
    """Share of queries whose first hit is the exact nearest neighbour."""
    return float(np.mean(got[:, 0] == exact[:, 0]))


def dir_mb(path: Path, names: tuple[str, ...]) -> float:
    return sum((path / n).stat().st_size for n in names) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--factory", action="append", default=None,
                    help="faiss factory strings (repeat); default Flat, HNSW32, IVF1024,Flat, IVF1024,PQ32")
    ap.add_argument("--shard-size", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: theirs)")
    ap.add_argument("--workdir", default=None, help="where to write the indexes (default: a temporary folder)")
    args = ap.parse_args()
    factories = args.factory or ["Flat", "HNSW32", "IVF1024,Flat", "IVF1024,PQ32"]
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    x = clustered(args.n, args.dim, args.clusters, seed=0)
    rng = np.random.default_rng(1)
    q = x[rng.choice(args.n, args.queries, replace=False)] + (0.2 / np.sqrt(args.dim)) * rng.standard_normal(
        (args.queries, args.dim), dtype=np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    print(f"{args.n:,} vectors x {args.dim}, {args.clusters} clusters, {args.queries} held-out queries, k={K}; "
          f"torch threads {torch.get_num_threads()}, faiss threads {faiss.omp_get_max_threads()}, "
          f"{os.cpu_count()} CPUs")

    rows = []
    t = time.perf_counter()
    base = torch.from_numpy(x).clone()
    build_s = time.perf_counter() - t
    qt = torch.from_numpy(q)
    torch_topk(base, qt[:8], K)  # warm-up
    t = time.perf_counter()
    exact = torch_topk(base, qt, K).numpy()
    batch_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(min(100, len(q))):
        torch_topk(base, qt[i : i + 1], K)
    single_ms = (time.perf_counter() - t) / min(100, len(q)) * 1e3
    rows.append(("torch brute force", "", build_s, len(q) / batch_s, single_ms, 1.0, 1.0, x.nbytes / 2**20))

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for factory in factories:
            out = Path(work) / factory.replace(",", "_")
            t = time.perf_counter()
            build_index(x, lambda b: np.stack(b), out, factory=factory, batch_size=4096,
                        shard_size=args.shard_size, progress=False)
            build_s = time.perf_counter() - t
            ix = open_index(out)
            ix.search(q[:8], K, with_metadata=False)  # warm-up
            t = time.perf_counter()
            res = ix.search(q, K, with_metadata=False)
            batch_s = time.perf_counter() - t
            t = time.perf_counter()
            for i in range(min(100, len(q))):
                ix.search(q[i : i + 1], K, with_metadata=False)
            single_ms = (time.perf_counter() - t) / min(100, len(q)) * 1e3
            m = ix.manifest
            params = f"nprobe={m.nprobe}" if m.nprobe else (f"efSearch={m.ef_search}" if m.ef_search else "")
            rows.append((f"faiss {m.factory_effective}", params, build_s, len(q) / batch_s, single_ms,
                         recall(res.ids, exact), top1(res.ids, exact), dir_mb(out, ("index.faiss",))))
            print(f"  done: {factory} ({build_s:.1f}s)", flush=True)

    head = f"| {'method':<24} | {'search':<11} | {'build s':>8} | {'batch q/s':>10} | {'ms/query':>8} | " \
           f"{'recall@10':>9} | {'NN@1':>6} | {'size MB':>8} |"
    print()
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, params, b, qps, ms, r, r1, mb in rows:
        print(f"| {name:<24} | {params:<11} | {b:8.2f} | {qps:10,.0f} | {ms:8.3f} | {r:9.4f} | {r1:6.3f} | "
              f"{mb:8.1f} |")


if __name__ == "__main__":
    main()
