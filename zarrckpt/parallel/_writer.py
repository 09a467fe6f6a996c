"""Write arrays (metadata and chunks) into a :class:`~zarrckpt.storage._base.Staging`
with a thread pool."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ..format._codec import encode_chunk
from ..format._metadata import ArrayEntry, array_document, group_document
from ..storage._base import Staging
from ..storage._local import as_staging
from ..storage._posix import WRITEBACK_MIN_BYTES

__all__ = ["ChunkWrite", "write_arrays", "default_threads", "parallel_map"]

T = TypeVar("T")
R = TypeVar("R")

#: small writes are grouped into tasks of about this many bytes
_TASK_BYTES = 8 << 20
#: chunk files at least this large start their writeback while being written (fsync saves)
_WRITEBACK_MIN_BYTES = WRITEBACK_MIN_BYTES


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


def parallel_map(fn: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    """``[fn(x) for x in items]`` computed by up to ``threads`` threads.

    Plain threads rather than a ``concurrent.futures`` pool: such pools refuse
    new work once the interpreter starts shutting down, and a save still
    running then (an ``async_save`` nobody waited for, a save in an exit
    handler) must be able to finish. The first error stops the hand-out of
    items and is raised once every thread has stopped.
    """
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    results: list[R | None] = [None] * len(items)
    errors: list[BaseException] = []
    lock = threading.Lock()
    position = 0

    def work() -> None:
        nonlocal position
        while True:
            with lock:
                if errors or position >= len(items):
                    return
                i = position
                position += 1
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # raised by the caller below
                with lock:
                    errors.append(e)
                return

    workers = [
        threading.Thread(target=work, name=f"zarrckpt-io-{k}", daemon=True)
        for k in range(min(threads, len(items)))
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def _array_dirs(path: str) -> list[str]:
    """Group directories of a (possibly split) array path, outermost first."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


_FQN_MARK = "\x00zarrckpt-fqn\x00"
_PATH_MARK = "\x00zarrckpt-path\x00"
_TEMPLATES: dict[tuple[object, ...], tuple[list[str], list[str]] | None] = {}
_MAX_TEMPLATES = 4096


def _template(entry: ArrayEntry) -> tuple[list[str], list[str]] | None:
    """``array_json`` text of ``entry`` cut around its FQN, each side cut where
    the last component of its path goes (``dimension_names``), or None if the
    document depends on more than these (then it is dumped whole)."""
    try:
        marked = dataclasses.replace(entry, fqn=_FQN_MARK, path=_PATH_MARK)
        text = json.dumps(array_document(marked), ensure_ascii=False, indent=1)
    except (TypeError, ValueError):
        return None
    fqn_json = json.dumps(_FQN_MARK, ensure_ascii=False)
    path_json = json.dumps(_PATH_MARK, ensure_ascii=False)[1:-1]
    if text.count(fqn_json) != 1:
        return None
    head, tail = text.split(fqn_json)
    return head.split(path_json), tail.split(path_json)


def array_json(entry: ArrayEntry) -> bytes:
    """The bytes of an array's ``zarr.json``: ``json.dumps(array_document(entry),
    ensure_ascii=False, indent=1)``, encoded as UTF-8.

    The indented dump runs in pure Python (tens of microseconds), so arrays that
    differ only by their FQN and path (the common case: a thousand bias vectors)
    share one template and only the FQN and the path's last component (in
    ``dimension_names``) are filled in per array; the bytes are identical.
    """
    key = (entry.dtype.zarr_name, repr(entry.dtype.fill_value), entry.layout, entry.kind)
    if key not in _TEMPLATES:
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.clear()
        _TEMPLATES[key] = _template(entry)
    template = _TEMPLATES[key]
    if template is None:  # the document depends on more than the FQN: dump it whole
        return json.dumps(array_document(entry), ensure_ascii=False, indent=1).encode()
    head, tail = template
    name = json.dumps(entry.path.rsplit("/", 1)[-1], ensure_ascii=False)[1:-1]
    return (
        name.join(head) + json.dumps(entry.fqn, ensure_ascii=False) + name.join(tail)
    ).encode()


def write_metadata(staging: str | Staging, entries: Iterable[ArrayEntry]) -> None:
    """Create array directories and their ``zarr.json`` (and split-name groups)."""
    target = as_staging(staging)
    groups_done: set[str] = set()
    group_bytes = json.dumps(group_document()).encode()
    for entry in entries:
        for group in _array_dirs(entry.path):
            if group not in groups_done:
                target.ensure_dir(group)
                target.write_small(f"{group}/zarr.json", group_bytes)
                groups_done.add(group)
        target.ensure_dir(entry.path)
        target.write_small(f"{entry.path}/zarr.json", array_json(entry))


def _write_chunks(staging: Staging, writes: list[ChunkWrite], writeback: bool) -> int:
    made: set[str] = set()
    total = 0
    for w in writes:
        key = f"{w.entry.path}/{w.entry.layout.chunk_key(w.index)}"
        parent = key.rpartition("/")[0]
        if parent not in made:
            staging.ensure_dir(parent)
            made.add(parent)
        buffers = encode_chunk(w.entry.layout, w.index, w.source, w.origin)
        big = w.entry.layout.chunk_nbytes >= _WRITEBACK_MIN_BYTES
        total += staging.write_chunk(key, buffers, writeback=writeback and big)
    return total


def write_arrays(
    staging: str | Staging,
    metadata: list[ArrayEntry],
    chunks: list[ChunkWrite],
    *,
    threads: int,
    fsync: bool = False,
) -> int:
    """Write array metadata then chunks into ``staging`` (or a staging directory);
    return the chunk bytes written.

    Chunks are written by a pool of ``threads`` threads; small chunks are
    batched into tasks of about 8 MiB so a thousand tiny tensors do not pay a
    thousand task hand-offs. With ``fsync`` (the caller syncs the tree
    afterwards) large chunk files start their writeback while they are being
    written, so the disk works in parallel with the copying.
    """
    target = as_staging(staging)
    batches = [metadata[i : i + 64] for i in range(0, len(metadata), 64)]
    parallel_map(lambda b: write_metadata(target, b), batches, threads)
    return _run_chunk_tasks(target, chunks, threads, fsync)


def _run_chunk_tasks(
    staging: Staging, chunks: list[ChunkWrite], threads: int, writeback: bool
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
    return sum(parallel_map(lambda t: _write_chunks(staging, t, writeback), tasks, threads))
