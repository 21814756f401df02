"""``contrast index build | query | eval``: faiss retrieval indexes over a collection's images or captions."""

from __future__ import annotations

import argparse
import json

from contrast.cli.common import device, user_errors
from contrast.index.model import SKIPPED, build_from_checkpoint, query, read_skips
from contrast.index.store import evaluate_index, open_index


def _build(args: argparse.Namespace) -> int:
    with user_errors():
        ix = build_from_checkpoint(args.checkpoint, args.data, args.out, split=args.split, modality=args.modality,
                                   factory=args.factory, batch_size=args.batch_size, shard_size=args.shard_size,
                                   device=device(args.device), overwrite=args.overwrite,
                                   progress=not args.no_progress)
    m = ix.manifest
    print(f"index: {ix.path}  {m.count} {m.modality} vectors x {m.embed_dim}  factory {m.factory_effective}  "
          f"built in {m.build_seconds:.1f}s")
    skipped = read_skips(ix.path)
    if skipped:
        from contrast.data.decode import Skips

        print(f"{Skips(skipped).summary()} (left out of the index; counts in {ix.path / SKIPPED})")
    return 0


def _query(args: argparse.Namespace) -> int:
    with user_errors():
        res = query(args.index, text=args.text, image=args.image, k=args.k, checkpoint=args.checkpoint,
                    device=device(args.device), nprobe=args.nprobe, ef_search=args.ef_search)
    hits = [{"rank": r + 1, "score": float(s), **meta} for r, (s, meta) in enumerate(zip(res.scores[0],
                                                                                         res.metadata[0]))]
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    print(f"{'rank':>4}  {'score':>7}  {'id':>7}  path  caption")
    for h in hits:
        print(f"{h['rank']:>4}  {h['score']:7.4f}  {h['id']:>7}  {h['path']}  {h.get('caption', '')}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    with user_errors():
        ix = open_index(args.index)
        r = evaluate_index(ix, k=args.k, num_queries=args.queries, nprobe=args.nprobe, ef_search=args.ef_search)
    out = {"index": str(ix.path), "factory": ix.manifest.factory_effective, "count": len(ix),
           **{f.name: getattr(r, f.name) for f in r.__dataclass_fields__.values()}}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['factory']} over {out['count']} vectors, {r.num_queries} queries from the collection "
          f"(nprobe={r.nprobe}, efSearch={r.ef_search})")
    print(f"recall@{r.k} vs exact: {r.recall:.4f}   index: {r.qps:,.0f} queries/s   "
          f"exact (numpy over shards): {r.exact_qps:,.0f} queries/s")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="faiss retrieval indexes: build, query, eval")
    sub = p.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")

    b = sub.add_parser("build", help="encode a data source with a trained model and index it")
    b.add_argument("--checkpoint", required=True, help="run directory or checkpoint step directory")
    b.add_argument("--data", required=True, metavar="SOURCE",
                   help="synthetic | a folder with captions.jsonl/csv | a .parquet/.arrow file or folder")
    b.add_argument("--out", required=True, metavar="INDEX_DIR")
    b.add_argument("--split", default="test", choices=["train", "val", "test"])
    b.add_argument("--factory", default="Flat",
                   help="faiss index factory string: Flat (exact), HNSW32, IVF1024,PQ32, ... (default Flat)")
    b.add_argument("--modality", default="image", choices=["image", "text"],
                   help="index image embeddings or caption embeddings (default image)")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--shard-size", type=int, default=4096, help="embeddings per shard on disk (bounds memory)")
    b.add_argument("--device", default="auto")
    b.add_argument("--overwrite", action="store_true", help="replace a finished or unfinished index in --out")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_build)

    q = sub.add_parser("query", help="top-k items for a text or an image")
    q.add_argument("index", metavar="INDEX_DIR")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--text")
    g.add_argument("--image", metavar="PATH")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--checkpoint", default=None,
                   help="the model to encode the query with (default: the one in the manifest; must be the same)")
    q.add_argument("--nprobe", type=int, default=None, help="IVF lists to probe (default from the manifest)")
    q.add_argument("--ef-search", type=int, default=None, help="HNSW search beam (default from the manifest)")
    q.add_argument("--device", default="auto")
    q.add_argument("--json", action="store_true", help="print the hits as JSON")
    q.set_defaults(func=_query)

    e = sub.add_parser("eval", help="recall@k against exact search, and queries per second")
    e.add_argument("index", metavar="INDEX_DIR")
    e.add_argument("-k", type=int, default=10)
    e.add_argument("--queries", type=int, default=1000, help="queries drawn from the indexed vectors")
    e.add_argument("--nprobe", type=int, default=None)
    e.add_argument("--ef-search", type=int, default=None)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_eval)
