"""``contrast index build | add | query | eval``: faiss retrieval indexes over a collection's images or captions."""

from __future__ import annotations

import argparse
import json
import os

from contrast.cli.common import device, user_errors
from contrast.index import QueryEval, open_index
from contrast.index.model import (
    QUERY_KINDS,
    SKIPPED,
    add_from_checkpoint,
    build_from_checkpoint,
    evaluate_from_checkpoint,
    query,
    read_skips,
)


def _split(args: argparse.Namespace) -> str:
    """``--split``, by default ``test``, or ``all`` for shards without split subfolders (one collection)."""
    from contrast.data.sources import has_splits

    return args.split or ("test" if has_splits(args.data) else "all")


SPLIT_CHOICES = ["train", "val", "test", "all"]
SPLIT_HELP = ("the split to index (all: every row; default test, or all for webdataset shards without train/val/test "
              "subfolders, which are one collection)")


def _build(args: argparse.Namespace) -> int:
    with user_errors():
        ix = build_from_checkpoint(args.checkpoint, args.data, args.out, split=_split(args), modality=args.modality,
                                   factory=args.factory, on_disk=args.on_disk, memory_gib=args.memory,
                                   target_recall=args.target_recall, rerank=args.rerank, batch_size=args.batch_size,
                                   shard_size=args.shard_size, device=device(args.device), precision=args.precision,
                                   workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    m = ix.manifest
    where = " (inverted lists on disk)" if m.storage == "on_disk" else ""
    print(f"index: {ix.path}  {m.count} {m.modality} vectors x {m.embed_dim}  factory {m.factory_effective}{where}  "
          f"built in {m.build_seconds:.1f}s")
    for note in m.notes:
        if note.startswith("auto:"):
            print(note)
    skipped = read_skips(ix.path)
    if skipped:
        from contrast.data.decode import Skips

        print(f"{Skips(skipped).summary()} (left out of the index; counts in {ix.path / SKIPPED})")
    return 0


def _add(args: argparse.Namespace) -> int:
    with user_errors():
        before = len(open_index(args.index))
        ix = add_from_checkpoint(args.index, args.checkpoint, args.data, split=_split(args), batch_size=args.batch_size,
                                 device=device(args.device), precision=args.precision, workers=args.workers,
                                 progress=not args.no_progress)
    entry = ix.manifest.additions[-1] if ix.manifest.additions else {}
    print(f"index: {ix.path}  {len(ix) - before} vectors added (ids {before}..{len(ix) - 1}), {len(ix)} in all, "
          f"{len(ix.manifest.additions)} addition(s)")
    if entry.get("skipped"):
        from contrast.data.decode import Skips

        print(f"{Skips(entry['skipped']).summary()} (left out; counts in the manifest's additions)")
    return 0


def _query(args: argparse.Namespace) -> int:
    with user_errors():
        res = query(args.index, text=args.text, image=args.image, k=args.k, checkpoint=args.checkpoint,
                    device=device(args.device), nprobe=args.nprobe, ef_search=args.ef_search, k_factor=args.k_factor,
                    rerank=args.rerank)
    hits = [{"rank": r + 1, "score": float(s), **meta} for r, (s, meta) in enumerate(zip(res.scores[0],
                                                                                         res.metadata[0]))]
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    print(f"{'rank':>4}  {'score':>7}  {'id':>7}  path  caption")
    for h in hits:
        print(f"{h['rank']:>4}  {h['score']:7.4f}  {h['id']:>7}  {h['path']}  {h.get('caption', '')}")
    return 0


def _eval_doc(r: QueryEval) -> dict:
    return {"direction": r.direction, "num_queries": r.num_queries, "qps": r.qps, "exact_qps": r.exact_qps,
            "recall": {str(k): v for k, v in r.recall.items()},
            "hit": None if r.hit is None else {str(k): v for k, v in r.hit.items()},
            "exact_hit": None if r.exact_hit is None else {str(k): v for k, v in r.exact_hit.items()}, **r.search}


def _check_held_out(ix, args: argparse.Namespace) -> None:
    """Queries of the index's own modality come from another split; an index of a whole collection without splits
    has none: say which queries work."""
    from contrast.data.sources import has_splits
    from contrast.errors import UserError

    m = ix.manifest
    own = "image" if m.modality == "image" else "text"
    if own in args.queries and not args.query_split and m.split == "all" and m.source and not has_splits(m.source):
        other = "text" if own == "image" else "image"
        raise UserError(f"{ix.path} indexes the whole of {m.source}, which has no splits, so there are no held-out "
                        f"{own} queries: pass --queries {other} (the pairs of indexed rows) or --queries stored, or "
                        "--query-split with a split of a source that has one")


def _eval(args: argparse.Namespace) -> int:
    with user_errors():
        ix = open_index(args.index)
        _check_held_out(ix, args)
        results = evaluate_from_checkpoint(ix, queries=args.queries, query_split=args.query_split,
                                           num_queries=args.num_queries, ks=args.k, checkpoint=args.checkpoint,
                                           device=device(args.device), nprobe=args.nprobe, ef_search=args.ef_search,
                                           k_factor=args.k_factor, rerank=args.rerank)
    m = ix.manifest
    doc = {"index": str(ix.path), "factory": m.factory_effective, "storage": m.storage, "count": len(ix),
           "memory_bytes": ix.memory_bytes(), "bytes_per_vector": ix.memory_bytes() / max(1, len(ix)),
           "flat_bytes_per_vector": 4 * m.embed_dim, "disk_bytes": ix.disk_bytes(),
           "results": [_eval_doc(r) for r in results]}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{doc['factory']} over {len(ix):,} {m.modality} vectors x {m.embed_dim}: {doc['bytes_per_vector']:.0f} "
          f"bytes/vector in memory (Flat: {4 * m.embed_dim})" + (f", {ix.disk_bytes() / 2**20:.1f} MiB of lists on "
                                                                   "disk" if ix.disk_bytes() else ""))
    for r in results:
        rec = "  ".join(f"recall@{k} {v:.4f}" for k, v in r.recall.items())
        hit = "" if r.hit is None else "   hit: " + "  ".join(
            f"@{k} {v:.3f} (exact {r.exact_hit[k]:.3f})" for k, v in r.hit.items())
        params = ", ".join(f"{k}={v}" for k, v in r.search.items() if v is not None)
        print(f"{r.direction:<14} {r.num_queries} queries  {rec}{hit}   {r.qps:,.0f} q/s "
              f"(exact {r.exact_qps:,.0f} q/s){'  ' + params if params else ''}")
    return 0


def _encoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="run the model under autocast at bf16 / fp16 (fp16: GPU only); default fp32")
    p.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))),
                   help="DataLoader processes decoding images (default: 4, or the CPU count if fewer; 0: decode in "
                        "the main process)")
    p.add_argument("--no-progress", action="store_true")


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to probe (default from the manifest)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search beam (default from the manifest)")
    p.add_argument("--k-factor", type=int, default=None,
                   help="refine factories: candidates re-ranked per result (default from the manifest)")
    p.add_argument("--rerank", type=int, default=None,
                   help="re-rank rerank x k candidates exactly from the stored shards (default from the manifest; "
                        "0: off)")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="faiss retrieval indexes: build, add, query, eval")
    sub = p.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")

    b = sub.add_parser("build", help="encode a data source with a trained model and index it")
    b.add_argument("--checkpoint", required=True, help="run directory or checkpoint step directory")
    b.add_argument("--data", required=True, metavar="SOURCE",
                   help="synthetic | a folder with captions.jsonl/csv | a .parquet/.arrow file or folder | "
                        "webdataset shards (a folder with train/val/test subfolders of .tar, or a folder of .tar "
                        "without them, as img2dataset writes it)")
    b.add_argument("--out", required=True, metavar="INDEX_DIR")
    b.add_argument("--split", default=None, choices=SPLIT_CHOICES, help=SPLIT_HELP)
    b.add_argument("--factory", default="Flat",
                   help="faiss index factory string: Flat (exact), HNSW32, IVF4096,SQ8, IVF4096,PQ64,Refine(SQ8), "
                        "OPQ64,IVF4096,PQ64,RFlat, ...; or auto (with --memory) to choose by size (default Flat)")
    b.add_argument("--on-disk", action="store_true", help="keep an IVF index's inverted lists on disk")
    b.add_argument("--rerank", type=int, default=None, metavar="R",
                   help="searches re-rank R x k candidates exactly from the stored float32 shards (memory-mapped): "
                        "PQ codes in memory, exact order")
    b.add_argument("--memory", type=float, default=None, metavar="GiB",
                   help="memory budget of the index, for --factory auto")
    b.add_argument("--target-recall", type=float, default=0.95, help="recall@10 --factory auto aims for")
    b.add_argument("--modality", default="image", choices=["image", "text"],
                   help="index image embeddings or caption embeddings (default image)")
    b.add_argument("--shard-size", type=int, default=4096, help="embeddings per shard on disk (bounds memory)")
    b.add_argument("--overwrite", action="store_true", help="replace a finished or unfinished index in --out")
    _encoding_args(b)
    b.set_defaults(func=_build)

    a = sub.add_parser("add", help="append a data source to an index built with the same model")
    a.add_argument("index", metavar="INDEX_DIR")
    a.add_argument("--checkpoint", required=True, help="the model the index was built with")
    a.add_argument("--data", required=True, metavar="SOURCE")
    a.add_argument("--split", default=None, choices=SPLIT_CHOICES, help=SPLIT_HELP)
    _encoding_args(a)
    a.set_defaults(func=_add)

    q = sub.add_parser("query", help="top-k items for a text or an image")
    q.add_argument("index", metavar="INDEX_DIR")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--text")
    g.add_argument("--image", metavar="PATH")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--checkpoint", default=None,
                   help="the model to encode the query with (default: the one in the manifest; must be the same)")
    _search_args(q)
    q.add_argument("--device", default="auto")
    q.add_argument("--json", action="store_true", help="print the hits as JSON")
    q.set_defaults(func=_query)

    e = sub.add_parser("eval", help="recall@K of held-out queries against exact search, hit@K, queries per second")
    e.add_argument("index", metavar="INDEX_DIR")
    e.add_argument("--queries", nargs="+", default=["text", "image"], choices=QUERY_KINDS,
                   help="text: captions (of indexed rows against an image index, each to find its image); image: "
                        "images (of indexed rows against a caption index; of --query-split against an image index); "
                        "stored: the indexed vectors themselves (overstates recall). Default: text image")
    e.add_argument("--query-split", default=None, choices=["train", "val", "test"],
                   help="split for queries of the index's own modality (default: val, or test for a val index)")
    e.add_argument("-k", type=int, nargs="+", default=[1, 10, 100], help="cut-offs (default 1 10 100)")
    e.add_argument("--num-queries", type=int, default=1000, help="queries per kind (default 1000)")
    e.add_argument("--checkpoint", default=None, help="the index's model (default: the one in the manifest)")
    _search_args(e)
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_eval)
