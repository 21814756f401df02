"""faiss retrieval indexes over image or caption embeddings: build (resumable, sharded, in memory or with inverted
lists on disk), add to, open, search, evaluate with held-out queries.

``build_index(items, encode, out_dir)`` works with any encoder; ``build_from_checkpoint``, ``add_from_checkpoint``,
``evaluate_from_checkpoint`` and ``query`` (in :mod:`contrast.index.model`) wire in a trained ``contrast`` model.
"""

from __future__ import annotations

from contrast.index.evaluate import (
    IndexEval,
    QueryEval,
    evaluate_index,
    evaluate_queries,
    exact_search,
)
from contrast.index.factory import Choice, choose_factory, plan_factory
from contrast.index.files import IndexStoreError, file_sha256
from contrast.index.store import (
    IndexManifest,
    RetrievalIndex,
    SearchResult,
    add_to_index,
    build_index,
    open_index,
)

build = build_index
add = add_to_index
open = open_index  # noqa: A001


def search(index: RetrievalIndex | str, queries, k: int = 10, **kwargs) -> SearchResult:
    """Top ``k`` of each query vector in ``index`` (an open index or an index directory)."""
    if not isinstance(index, RetrievalIndex):
        index = open_index(index)
    return index.search(queries, k, **kwargs)


__all__ = [
    "Choice", "IndexEval", "IndexManifest", "IndexStoreError", "QueryEval", "RetrievalIndex", "SearchResult", "add",
    "add_to_index", "build", "build_index", "choose_factory", "evaluate_index", "evaluate_queries", "exact_search",
    "file_sha256", "open", "open_index", "plan_factory", "search",
]
