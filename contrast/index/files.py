"""Crash-safe file writes of an index directory: every file is written under a temporary name and moved into place
when complete, so a process killed at any moment leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from contrast.errors import UserError
from contrast.runs import atomic_write_bytes

__all__ = ["IndexStoreError", "atomic_write_bytes", "atomic_write_json", "atomic_save_npy", "atomic_write_index",
           "read_json", "file_sha256"]


class IndexStoreError(UserError, ValueError):
    """A missing, corrupt or mismatched index directory, or settings faiss cannot build."""


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_index(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
