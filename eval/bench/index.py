"""Retrieval index build and query cost: contrast's faiss indexes against brute-force torch search.

Synthetic part: N clustered unit vectors (default 1,000,000 x 512, 4,096 clusters), generated in chunks and
written once as the store's shards (float32, through ``build_index`` with an identity encoder); every factory is
then built from those same shards (its folder links them, so the vectors are stored once) in a fresh child
process, and searched in another, so each reports its own peak memory (``ru_maxrss``; an empty child that only
imports faiss and numpy is reported as the baseline). Two query sets of Q each:

- image-like: an indexed vector plus a little noise (a near-duplicate look-up);
- text-like: an indexed vector plus a shared offset (the modality gap between CLIP's text and image embeddings)
  plus noise, cosine ~0.55 to its own vector, as a caption is to its image. Quantisers trained on the indexed
  vectors place these worse (clip-retrieval #76); hit@10 says whether the source vector is found.

Reported per index: build seconds (train + add + write, from the stored shards), peak memory of the build and of the
search process, bytes per vector held in memory (on-disk: the quantizer and offsets; the lists' size on disk in
its own column), queries/s of one batched call for each query set, recall@10 of each against the exact torch
top 10 of the same vectors, and the text queries' speed-up over brute force. The real-embedding part trains a small
CLIP on the cached emoji set's train split (written as one parquet table, split 90 / 5 / 5 by row; a short run made
here; nothing is downloaded), indexes the table's train rows' images and evaluates their captions as text->image
queries with ``contrast.index.model.evaluate_from_checkpoint``.

    python eval/bench/index.py [--n 1000000] [--dim 512] [--factory IVF1024,SQ8 ...] [--on-disk IVF1024,Flat ...]
    python eval/bench/index.py --real-only [--real-steps 60]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

K = 10
GAP = 0.8  # length of the shared text offset, relative to the unit vectors
CHUNK = 65_536


def gen_chunk(lo: int, m: int, dim: int, clusters: int, noise: float = 0.35) -> np.ndarray:
    """Rows [lo, lo + m) of the synthetic collection: a pure function of (lo, dim, clusters)."""
    centres = np.random.default_rng(0).standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(1000 + lo)
    x = centres[rng.integers(0, clusters, m)] + (noise / np.sqrt(dim)) * rng.standard_normal((m, dim),
                                                                                             dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Collection:
    """The synthetic vectors as an iterable of rows, generated chunk by chunk (never all in memory)."""

    def __init__(self, n: int, dim: int, clusters: int):
        self.n, self.dim, self.clusters = n, dim, clusters

    def __iter__(self):
        for lo in range(0, self.n, CHUNK):
            yield from gen_chunk(lo, min(CHUNK, self.n - lo), self.dim, self.clusters)


def queries(shards: list[np.ndarray], n_total: int, q: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image-like queries, text-like queries, the row each was made from)."""
    rng = np.random.default_rng(7)
    rows = np.sort(rng.choice(n_total, q, replace=False))
    starts = np.cumsum([0] + [len(s) for s in shards])
    base = np.stack([shards[np.searchsorted(starts, r, side="right") - 1][r - starts[np.searchsorted(
        starts, r, side="right") - 1]] for r in rows])
    gap = rng.standard_normal((1, dim)).astype(np.float32)
    gap /= np.linalg.norm(gap)
    img = base + (0.2 / np.sqrt(dim)) * rng.standard_normal(base.shape).astype(np.float32)
    txt = base + GAP * gap + (1.2 / np.sqrt(dim)) * rng.standard_normal(base.shape).astype(np.float32)
    unit = lambda a: np.ascontiguousarray(a / np.linalg.norm(a, axis=1, keepdims=True), dtype=np.float32)  # noqa: E731
    return unit(img), unit(txt), rows


def torch_exact(shards: list[np.ndarray], q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact top ``k`` rows with every vector in one in-memory tensor (built here), and queries/s of that search."""
    base = torch.from_numpy(np.concatenate(shards))  # (N, E): the brute-force baseline holds everything in memory
    qt = torch.from_numpy(q)
    (qt[:8] @ base.T).topk(k, dim=1)  # warm-up
    t = time.perf_counter()
    out = torch.cat([(qt[lo : lo + 256] @ base.T).topk(k, dim=1).indices for lo in range(0, len(qt), 256)])
    qps = len(q) / (time.perf_counter() - t)
    del base
    return out.numpy(), qps


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / exact.shape[1] for a, b in zip(got, exact)]))


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry the parent's over exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------- child processes


def _child_init(threads: int) -> None:
    faiss.omp_set_num_threads(threads)


def child_baseline(_: int) -> float:
    import contrast.index  # noqa: F401

    return peak_mb()


def parse(text: str) -> tuple[str, int | None, int | None]:
    """``FACTORY[+R<rerank>][@<nprobe>]`` -> (factory, rerank, nprobe)."""
    text, _, nprobe = text.partition("@")
    factory, _, rerank = text.partition("+R")
    return factory, int(rerank) if rerank else None, int(nprobe) if nprobe else None


def child_build(spec: dict) -> dict:
    """Build ``spec['factory']`` in ``spec['out']`` from the shards of ``spec['shards']``."""
    from contrast.index import build_index

    out = Path(spec["out"])
    out.mkdir(parents=True)
    (out / "shards").symlink_to(spec["shards"], target_is_directory=True)
    params = {"factory": spec["factory"], "shard_size": spec["shard_size"], "checkpoint_hash": None,
              "modality": None, "source": None, "split": None, "on_disk": spec["on_disk"]}
    # the vectors are encoded already (the same build state a resumed build finds): only the index is built
    (out / "build.json").write_text(json.dumps({"params": params, "encoded": spec["n"], "elapsed": 0.0}))
    t = time.perf_counter()
    ix = build_index([], lambda b: b, out, factory=spec["factory"], on_disk=spec["on_disk"], rerank=spec["rerank"],
                     shard_size=spec["shard_size"], progress=False)
    return {"build_s": time.perf_counter() - t, "build_mb": peak_mb(), "factory": ix.manifest.factory_effective,
            "memory_bytes": ix.memory_bytes(), "disk_bytes": ix.disk_bytes(), "nprobe": ix.manifest.nprobe,
            "ef": ix.manifest.ef_search, "k_factor": ix.manifest.k_factor, "rerank": ix.manifest.rerank}


def child_search(spec: dict) -> dict:
    from contrast.index import open_index

    ix = open_index(spec["out"])
    res = {}
    for name in ("img", "txt"):
        q = np.load(spec[name])
        ix.search(q[:8], K, nprobe=spec["nprobe"], with_metadata=False)  # warm-up (on disk: the first page-ins)
        t = time.perf_counter()
        res[name] = ix.search(q, K, nprobe=spec["nprobe"], with_metadata=False).rows
        res[name + "_qps"] = len(q) / (time.perf_counter() - t)
    res["search_mb"] = peak_mb()
    return res


def in_child(fn, arg, threads: int):
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, initializer=_child_init, initargs=(threads,)) as pool:
        return pool.apply(fn, (arg,))


# --------------------------------------------------------------------------------------------------- synthetic


def synthetic(args: argparse.Namespace, work: Path) -> None:
    from contrast.index import build_index

    threads = args.threads or os.cpu_count()
    col = Collection(args.n, args.dim, args.clusters)
    t = time.perf_counter()
    base = work / "vectors"
    # the shards are what every factory below is built from; this folder's own index is a small placeholder
    build_index(col, np.stack, base, factory="PCA8,Flat", batch_size=8192, shard_size=args.shard_size, progress=False)
    encode_s = time.perf_counter() - t
    shards = [np.load(p, mmap_mode="r") for p in sorted((base / "shards").glob("emb_*.npy"))]
    img, txt, rows = queries(shards, args.n, args.queries, args.dim)
    np.save(work / "img.npy", img)
    np.save(work / "txt.npy", txt)
    exact_img, brute_img = torch_exact(shards, img, K)
    exact_txt, brute_txt = torch_exact(shards, txt, K)
    hit_exact = float(np.mean((exact_txt == rows[:, None]).any(1)))
    print(f"{args.n:,} vectors x {args.dim}, {args.clusters} clusters, {args.queries} image-like and text-like "
          f"queries, k={K}; threads {threads} of {os.cpu_count()} CPUs; shards written in {encode_s:.1f}s; "
          f"text queries' exact hit@10 {hit_exact:.3f}", flush=True)
    flat_bpv = 4 * args.dim
    rows_out = [("torch brute force", "", 0.0, 0.0, 0.0, flat_bpv, 0.0, brute_img, brute_txt, 1.0, 1.0, 1.0)]
    baseline = in_child(child_baseline, 0, threads)
    runs = [(f, False) for f in args.factory] + [(f, True) for f in args.on_disk]
    for text, on_disk in runs:
        factory, rerank, nprobe = parse(text)
        out = work / f"index{len(rows_out)}"
        spec = {"factory": factory, "on_disk": on_disk, "out": str(out), "shards": str(base / "shards"),
                "shard_size": args.shard_size, "n": args.n, "img": str(work / "img.npy"), "txt": str(work / "txt.npy"),
                "rerank": rerank, "nprobe": nprobe}
        b = in_child(child_build, spec, threads)
        s = in_child(child_search, spec, threads)
        b["nprobe"] = nprobe or b["nprobe"]
        params = ",".join(f"{k}={b[v]}" for k, v in (("nprobe", "nprobe"), ("ef", "ef"), ("kf", "k_factor"),
                                                      ("rerank", "rerank")) if b[v])
        name = f"{b['factory']}{' + rerank' if rerank else ''}{' (on disk)' if on_disk else ''}"
        rows_out.append((name, params, b["build_s"], b["build_mb"], s["search_mb"], b["memory_bytes"] / args.n,
                         b["disk_bytes"] / 2**20, s["img_qps"], s["txt_qps"], recall(s["img"], exact_img),
                         recall(s["txt"], exact_txt), s["txt_qps"] / brute_txt))
        print(f"  done: {name} build {b['build_s']:.1f}s", flush=True)
        shutil.rmtree(out)
    print_table(rows_out, baseline)


def print_table(rows: list[tuple], baseline: float) -> None:
    head = (f"| {'index':<34} | {'search':<24} | {'build s':>7} | {'build MB':>8} | {'query MB':>8} | {'B/vec':>6} | "
            f"{'disk MB':>7} | {'img q/s':>8} | {'txt q/s':>8} | {'R@10 img':>8} | {'R@10 txt':>8} | {'txt x brute':>11} |")
    print(f"\n(peak memory of a child process that only imports contrast.index: {baseline:.0f} MB; build and query MB "
          "below include it)")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for name, params, b, bmb, smb, bpv, disk, qi, qt, ri, rt, sp in rows:
        print(f"| {name:<34} | {params:<24} | {b:7.1f} | {bmb:8.0f} | {smb:8.0f} | {bpv:6.0f} | {disk:7.0f} | "
              f"{qi:8,.0f} | {qt:8,.0f} | {ri:8.4f} | {rt:8.4f} | {sp:11.1f} |")


# --------------------------------------------------------------------------------------------------- real embeddings


def real(args: argparse.Namespace, work: Path) -> None:
    from contrast.config import load_recipe
    from contrast.index.model import build_from_checkpoint, evaluate_from_checkpoint
    from contrast.train.loop import train

    source = str(Path(args.emoji).expanduser())
    if not Path(source).is_dir():
        print(f"real-embedding set skipped: {source} is missing (contrast data fetch emoji)")
        return
    import datasets

    table = work / "emoji_train.parquet"  # one table (90 / 5 / 5 by row): train on its train rows, index them
    datasets.load_from_disk(source)["train"].to_parquet(str(table))
    source = str(table)
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "clip_emoji_scratch.yaml"
    cfg = load_recipe(recipe, [f"data.source={source}", f"train.steps={args.real_steps}", "train.warmup_steps=10",
                               "train.log_every=1000"])
    cfg.eval.tasks = []
    t = time.perf_counter()
    train(cfg, work / "run", progress=False)
    print(f"\nreal embeddings: CLIP {cfg.model.embed_dim}-d trained {args.real_steps} steps on {source} in "
          f"{time.perf_counter() - t:.0f}s; index over its train split's images, its captions as text queries")
    print(f"| {'index':<30} | {'vectors':>7} | {'B/vec':>6} | {'text->image R@1':>15} | {'R@10':>6} | {'R@100':>6} | "
          f"{'hit@10':>6} | {'exact hit@10':>12} | {'image->image R@10':>17} |")
    print("|" + "|".join("-" * w for w in (32, 9, 8, 17, 8, 8, 8, 14, 19)) + "|")
    for factory, on_disk in [("Flat", False), ("IVF64,SQ8", False), ("IVF64,PQ16", False), ("IVF64,PQ16,RFlat", False),
                             ("IVF64,Flat", True)]:
        out = work / f"emoji_{factory.replace(',', '_')}{'_disk' if on_disk else ''}"
        ix = build_from_checkpoint(work / "run", source, out, split="train", factory=factory, on_disk=on_disk,
                                   workers=2, progress=False)
        txt, img = evaluate_from_checkpoint(ix, queries=("text", "image"), num_queries=1000, ks=(1, 10, 100),
                                            query_split="val")
        name = factory + (" (on disk)" if on_disk else "")
        print(f"| {name:<30} | {len(ix):>7} | {ix.memory_bytes() / len(ix):6.0f} | {txt.recall[1]:15.4f} | "
              f"{txt.recall[10]:6.4f} | {txt.recall[100]:6.4f} | {txt.hit[10]:6.3f} | {txt.exact_hit[10]:12.3f} | "
              f"{img.recall[10]:17.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--factory", action="append", default=None,
                    help="in-memory faiss factories (repeat), each FACTORY[+R<rerank>][@<nprobe>] (+R8: re-rank "
                         "8 x k candidates exactly from the stored shards; @16: search 16 lists); default Flat, "
                         "IVF1024,Flat, IVF1024,SQ8, IVF1024,SQ8@16, IVF1024,PQ64, IVF1024,PQ64,Refine(SQ8), "
                         "IVF1024,PQ64,RFlat, IVF1024,PQ128x4fs+R20, IVF1024,PQ128x4fs+R20@16")
    ap.add_argument("--on-disk", action="append", default=None,
                    help="factories built with on-disk inverted lists (repeat); default IVF1024,SQ8, IVF1024,Flat")
    ap.add_argument("--shard-size", type=int, default=65_536)
    ap.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: all CPUs)")
    ap.add_argument("--workdir", default=None, help="where to write the indexes (default: a temporary folder)")
    ap.add_argument("--real-only", action="store_true", help="only the real-embedding part")
    ap.add_argument("--no-real", action="store_true", help="skip the real-embedding part")
    ap.add_argument("--real-steps", type=int, default=60)
    ap.add_argument("--emoji", default="~/.cache/contrast/emoji-google-twitter")
    args = ap.parse_args()
    args.factory = args.factory or ["Flat", "IVF1024,Flat", "IVF1024,SQ8", "IVF1024,SQ8@16", "IVF1024,PQ64",
                                    "IVF1024,PQ64,Refine(SQ8)", "IVF1024,PQ64,RFlat", "IVF1024,PQ128x4fs+R20",
                                    "IVF1024,PQ128x4fs+R20@16"]
    args.on_disk = args.on_disk if args.on_disk is not None else ["IVF1024,SQ8", "IVF1024,Flat"]
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    from common import matmul_peak

    print(f"load average before: {open('/proc/loadavg').read().strip()}; fp32 matmul peak "
          f"{matmul_peak() / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        if not args.real_only:
            synthetic(args, Path(work))
        if not args.no_real:
            real(args, Path(work))
    print(f"load average after: {open('/proc/loadavg').read().strip()}; fp32 matmul peak "
          f"{matmul_peak() / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
