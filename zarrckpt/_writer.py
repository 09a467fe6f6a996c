"""Write arrays (metadata and chunks) into a staging directory with a thread pool."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import _chunkio
from ._chunkio import encode_chunk
from ._metadata import ArrayEntry, array_document, group_document

__all__ = ["ChunkWrite", "write_arrays", "default_threads"]

#: small writes are grouped into tasks of about this many bytes
_TASK_BYTES = 8 << 20


def default_threads() -> int:
    """Default size of the I/O thread pool."""
    return max(2, min(8, (os.cpu_count() or 2)))


@dataclass(frozen=True)
class ChunkWrite:
    """One chunk this process writes: chunk ``index`` of ``entry`` from ``source``."""

    entry: ArrayEntry
    index: tuple[int, ...]
    source: np.ndarray
    origin: tuple[int, ...]


def _array_dirs(path: str) -> list[str]:
    """Group directories of a (possibly split) array path, outermost first."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def write_metadata(root: str, entries: Iterable[ArrayEntry]) -> None:
    """Create array directories and their ``zarr.json`` (and split-name groups)."""
    groups_done: set[str] = set()
    group_bytes = json.dumps(group_document()).encode()
    for entry in entries:
        for group in _array_dirs(entry.path):
            if group not in groups_done:
                os.makedirs(os.path.join(root, group), exist_ok=True)
                with open(os.path.join(root, group, "zarr.json"), "wb") as f:
                    f.write(group_bytes)
                groups_done.add(group)
        array_dir = os.path.join(root, entry.path)
        os.makedirs(array_dir, exist_ok=True)
        with open(os.path.join(array_dir, "zarr.json"), "wb") as f:
            f.write(json.dumps(array_document(entry), ensure_ascii=False, indent=1).encode())


def _write_chunks(root: str, writes: list[ChunkWrite]) -> int:
    made: set[str] = set()
    total = 0
    for w in writes:
        path = os.path.join(root, w.entry.path, *w.entry.layout.chunk_key(w.index).split("/"))
        parent = os.path.dirname(path)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        # looked up on the module so tests can inject failures (_chunkio.write_file)
        buffers = encode_chunk(w.entry.layout, w.index, w.source, w.origin)
        total += _chunkio.write_file(path, buffers)
    return total


def write_arrays(
    root: str,
    metadata: list[ArrayEntry],
    chunks: list[ChunkWrite],
    *,
    threads: int,
) -> int:
    """Write array metadata then chunks under ``root``; return chunk bytes written.

    Chunks are written by a pool of ``threads`` threads; small chunks are
    batched into tasks of about 8 MiB so a thousand tiny tensors do not pay a
    thousand task hand-offs.
    """
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="zarrckpt") as pool:
        batches = [metadata[i : i + 64] for i in range(0, len(metadata), 64)]
        list(pool.map(lambda b: write_metadata(root, b), batches))
        return _run_chunk_tasks(root, chunks, pool, threads)


def _run_chunk_tasks(
    root: str, chunks: list[ChunkWrite], pool: ThreadPoolExecutor, threads: int
) -> int:
    tasks: list[list[ChunkWrite]] = []
    current: list[ChunkWrite] = []
    size = 0
    for w in sorted(chunks, key=lambda w: -w.entry.layout.chunk_nbytes):
        current.append(w)
        size += w.entry.layout.chunk_nbytes
        if size >= _TASK_BYTES:
            tasks.append(current)
            current, size = [], 0
    if current:
        tasks.append(current)
    if len(tasks) <= 1 or threads <= 1:
        return sum(_write_chunks(root, t) for t in tasks)
    return sum(pool.map(lambda t: _write_chunks(root, t), tasks))
