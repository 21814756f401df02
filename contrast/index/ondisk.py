"""IVF indexes whose inverted lists live on disk (faiss ``OnDiskInvertedLists``), built in bounded memory.

Reference: the faiss wiki, "Indexes that do not fit in RAM" (the ``merge_ondisk`` recipe of ``faiss.contrib``).

A build adds each shard of stored vectors to its own copy of the trained (empty) index, written as a block file
(``blocks/block_SSSSS.faiss``, one per shard, atomically, so a killed build keeps its finished blocks), then merges
every block's lists into one ``lists_GGG.ivfdata`` file that is memory-mapped at search time. Memory while building
is the quantizer plus one shard; while searching, the quantizer and the lists' offsets; the lists themselves are
read through the page cache. An addition merges the previous lists with the new blocks into the next generation's
file (``GGG`` counts additions), so the index in use is never written to.

Row ``r`` of the collection carries faiss id ``r`` (blocks add with explicit ids), so the merged index answers with
the same rows as one built in memory from the same trained index.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np

from contrast.index.files import atomic_write_index

BLOCKS = "blocks"
READ_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR  # the lists file is found beside index.faiss, wherever the folder moved


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """faiss's on-disk lists print progress lines ("resizing ...", "updating ondisk filename ...") straight to the
    process's stdout, which would corrupt a command's JSON output: send them to /dev/null while they run."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def lists_name(generation: int) -> str:
    return f"lists_{generation:03d}.ivfdata"


def block_path(out: Path, shard: int) -> Path:
    return out / BLOCKS / f"block_{shard:05d}.faiss"


def write_blocks(trained: faiss.Index, out: Path, shards: Iterable[tuple[int, int, np.ndarray]],
                 add_chunk: int) -> list[Path]:
    """One block file per ``(shard, first_row, vectors)``, skipping blocks a killed build already finished."""
    (out / BLOCKS).mkdir(exist_ok=True)
    paths = []
    for shard, first_row, emb in shards:
        path = block_path(out, shard)
        paths.append(path)
        if path.is_file():
            continue
        block = faiss.clone_index(trained)
        for lo in range(0, emb.shape[0], add_chunk):
            chunk = np.ascontiguousarray(emb[lo : lo + add_chunk], dtype=np.float32)
            block.add_with_ids(chunk, np.arange(first_row + lo, first_row + lo + len(chunk), dtype=np.int64))
        atomic_write_index(block, path)
        del block
    return paths


def merge(trained: faiss.Index, blocks: list[Path], lists_file: Path, previous: faiss.Index | None = None
          ) -> faiss.Index:
    """``trained`` (empty) with the lists of ``previous`` (an on-disk index, or None) and of every block merged, in
    that order, into ``lists_file``."""
    keep = [faiss.read_index(str(p), faiss.IO_FLAG_MMAP) for p in blocks]  # alive until merged: they own the lists
    sources = faiss.InvertedListsPtrVector()
    if previous is not None:
        sources.push_back(faiss.extract_index_ivf(previous).invlists)
    for block in keep:
        sources.push_back(faiss.extract_index_ivf(block).invlists)
    index = faiss.clone_index(trained)
    ivf = faiss.extract_index_ivf(index)
    lists_file.unlink(missing_ok=True)  # a killed merge left a partial file: start it again
    with _quiet():
        invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists_file))
        total = invlists.merge_from_multiple(sources.data(), sources.size(), False)
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()  # the index owns it now
    ivf.ntotal = index.ntotal = total
    del keep
    return index


def read(path: Path) -> faiss.Index:
    """An on-disk index: its lists file is memory-mapped by faiss (reading the index with IO_FLAG_MMAP as well is
    not supported for on-disk lists)."""
    with _quiet():
        return faiss.read_index(str(path), READ_FLAGS)


def remove_blocks(out: Path) -> None:
    for p in (out / BLOCKS).glob("block_*"):
        p.unlink()
