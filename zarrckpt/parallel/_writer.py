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

from ..errors import DistributedSaveError
from ..format._codec import encode_chunk, encode_piece
from ..format._layout import ArrayLayout
from ..format._metadata import ArrayEntry, array_document, group_document
from ..format._shard import PieceTarget, StoredArray, storage_positions
from ..storage._base import Staging
from ..storage._local import as_staging
from ..storage._posix import WRITEBACK_MIN_BYTES

__all__ = [
    "ChunkWrite",
    "IndexWrite",
    "WriteResult",
    "crc_table",
    "write_arrays",
    "default_threads",
    "parallel_map",
]

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
    """One piece this process writes: piece ``index`` of the grid ``pieces`` of
    ``entry``, from ``source`` (whose element ``[0, ...]`` is array element
    ``origin``), to ``target`` (:meth:`StoredArray.target`)."""

    entry: ArrayEntry
    pieces: ArrayLayout
    index: tuple[int, ...]
    source: np.ndarray
    origin: tuple[int, ...]
    target: PieceTarget

    @classmethod
    def of(
        cls,
        entry: ArrayEntry,
        stored: StoredArray,
        index: tuple[int, ...],
        source: np.ndarray,
        origin: tuple[int, ...],
    ) -> ChunkWrite:
        return cls(entry, stored.pieces, index, source, origin, stored.target(index))

    @property
    def nbytes(self) -> int:
        return self.pieces.chunk_nbytes


@dataclass(frozen=True)
class IndexWrite:
    """The index of a shard file (``"shard"`` mode), written by one rank at offset 0."""

    entry: ArrayEntry
    data: bytes

    @classmethod
    def of(cls, entry: ArrayEntry, stored: StoredArray) -> IndexWrite:
        return cls(entry, stored.index_bytes())


@dataclass
class WriteResult:
    """What a process wrote: chunk bytes and, per array, the crc32c of every inner
    chunk by its position in the crc table (gathered into the manifest at commit)."""

    nbytes: int = 0
    crcs: dict[str, dict[int, int]] = dataclasses.field(default_factory=dict)

    def merge(self, other: WriteResult) -> None:
        self.nbytes += other.nbytes
        for fqn, table in other.crcs.items():
            self.crcs.setdefault(fqn, {}).update(table)


def crc_table(entry: ArrayEntry, stored: StoredArray, crcs: dict[int, int]) -> bytes:
    """The manifest's crc32c table of an array from the crcs every writer reported;
    every position a complete save fills must be there."""
    if stored.mode == "plain" and stored.pieces.shape and 0 in crcs:  # one chunk: position 0
        return int(crcs[0]).to_bytes(4, "little")
    table = np.zeros(stored.layout.crc_table_size, dtype="<u4")
    expected = storage_positions(stored)
    missing = [p for p in expected if p not in crcs]
    if missing:
        raise DistributedSaveError(
            f"internal error: no rank reported the crc32c of {len(missing)} inner chunk(s) "
            f"of {entry.fqn!r} (positions {missing[:8]})"
        )
    for position, crc in crcs.items():
        table[position] = crc
    return table.tobytes()


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


def _write_chunks(
    staging: Staging, writes: list[ChunkWrite | IndexWrite], writeback: bool
) -> WriteResult:
    made: set[str] = set()
    result = WriteResult()
    for w in writes:
        layout = w.entry.layout
        key = f"{w.entry.path}/{layout.chunk_key((0,) * layout.ndim)}"
        if isinstance(w, ChunkWrite):
            target = w.target
            key = f"{w.entry.path}/{target.key}"
        parent = key.rpartition("/")[0]
        if parent not in made:
            staging.ensure_dir(parent)
            made.add(parent)
        if isinstance(w, IndexWrite):
            staging.write_chunk_at(key, 0, [w.data])
            continue
        big = w.nbytes >= _WRITEBACK_MIN_BYTES
        if target.offset is None:
            buffers, crcs = encode_chunk(layout, w.index, w.source, w.origin)
            result.nbytes += staging.write_chunk(key, buffers, writeback=writeback and big)
        else:
            buffers, crcs = encode_piece(w.pieces, w.index, w.source, w.origin)
            result.nbytes += staging.write_chunk_at(
                key, target.offset, buffers, writeback=writeback and big
            )
        if len(crcs) != len(target.positions):  # pragma: no cover - same rule both sides
            raise AssertionError(f"{w.entry.fqn}: {len(crcs)} crcs for {target.positions}")
        table = result.crcs.setdefault(w.entry.fqn, {})
        table.update(zip(target.positions, crcs, strict=True))
    return result


def write_arrays(
    staging: str | Staging,
    metadata: list[ArrayEntry],
    chunks: Sequence[ChunkWrite | IndexWrite],
    *,
    threads: int,
    fsync: bool = False,
) -> WriteResult:
    """Write array metadata then pieces (and shard indexes) into ``staging`` (or a
    staging directory); return the chunk bytes written and the crc32c of every
    inner chunk written.

    Pieces are written by a pool of ``threads`` threads; small pieces are
    batched into tasks of about 8 MiB so a thousand tiny tensors do not pay a
    thousand task hand-offs. With ``fsync`` (the caller syncs the tree
    afterwards) large pieces start their writeback while they are being
    written, so the disk works in parallel with the copying.
    """
    target = as_staging(staging)
    fanout = target.requests_per_thread
    per_batch = 64 if fanout == 1 else 1  # object stores: one request per task
    batches = [metadata[i : i + per_batch] for i in range(0, len(metadata), per_batch)]
    parallel_map(lambda b: write_metadata(target, b), batches, threads * fanout)
    return _run_chunk_tasks(target, list(chunks), threads, fsync)


def _write_size(w: ChunkWrite | IndexWrite) -> int:
    return w.nbytes if isinstance(w, ChunkWrite) else len(w.data)


def _run_chunk_tasks(
    staging: Staging, chunks: list[ChunkWrite | IndexWrite], threads: int, writeback: bool
) -> WriteResult:
    tasks: list[list[ChunkWrite | IndexWrite]] = []
    current: list[ChunkWrite | IndexWrite] = []
    size = 0
    fanout = staging.requests_per_thread
    # local files: tasks of ~8 MiB; object stores: one object (one request) per task
    task_bytes = _TASK_BYTES if fanout == 1 else 0
    for w in sorted(chunks, key=lambda w: -_write_size(w)):
        current.append(w)
        size += _write_size(w)
        if size >= task_bytes:
            tasks.append(current)
            current, size = [], 0
    if current:
        tasks.append(current)
    result = WriteResult()
    workers = threads * fanout
    for part in parallel_map(lambda t: _write_chunks(staging, t, writeback), tasks, workers):
        result.merge(part)
    return result
