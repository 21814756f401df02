"""faiss retrieval indexes over image or caption embeddings: build (resumable, sharded), open, search, evaluate.

``build_index(items, encode, out_dir)`` works with any encoder; ``build_from_checkpoint`` and ``query`` (in
:mod:`contrast.index.model`) wire in a trained ``contrast`` model.
"""

from __future__ import annotations

from contrast.index.store import (
    IndexEval,
    IndexManifest,
    IndexStoreError,
    RetrievalIndex,
    SearchResult,
    build_index,
    evaluate_index,
    exact_search,
    file_sha256,
    open_index,
    plan_factory,
)

build = build_index
open = open_index  # noqa: A001


def search(index: RetrievalIndex | str, queries, k: int = 10, **kwargs) -> SearchResult:
    """Top ``k`` of each query vector in ``index`` (an open index or an index directory)."""
    if not isinstance(index, RetrievalIndex):
        index = open_index(index)
    return index.search(queries, k, **kwargs)


__all__ = [
    "IndexEval", "IndexManifest", "IndexStoreError", "RetrievalIndex", "SearchResult", "build", "build_index",
    "evaluate_index", "exact_search", "file_sha256", "open", "open_index", "plan_factory", "search",
]
