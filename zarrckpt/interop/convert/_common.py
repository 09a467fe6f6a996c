"""What every converter shares: the one path into zarrckpt and the one path out of it.

Into zarrckpt (:func:`ingest`): a converter describes its source as a list of
:class:`TensorSource` (each array's dtype and shape, and its contents as
:class:`Piece` buffers opened one at a time) plus the pickled and bytes
values; :func:`ingest` declares the arrays, writes and releases the pieces,
counts the progress and commits the checkpoint.

Out of zarrckpt (:func:`open_checkpoint`, :class:`Streamer`): the committed
source checkpoint and its conversion record, and each tensor's contents as
slabs of rows read on demand, counted for the progress callback.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...errors import UnsupportedValueError
from ...format._dtypes import info_for_torch
from ...format._layout import ArrayLayout
from ...format._metadata import ArrayEntry
from ...parallel._reader import CheckpointFiles, ReadRequest
from ...parallel._writer import default_threads
from .._formats import FORMATS
from ._builder import CheckpointBuilder, ProgressFn, ProgressTracker
from ._remote import check_paths

__all__ = [
    "FORMATS",
    "MANIFEST_MEMBER",
    "ConvertResult",
    "PathLike",
    "Piece",
    "ProgressFn",
    "Streamer",
    "TensorSource",
    "c_span",
    "check_dense",
    "ingest",
    "open_checkpoint",
    "threads_or_default",
]

PathLike = str | os.PathLike[str]

#: manifest member where converters record what the tree alone does not say
MANIFEST_MEMBER = "convert"
#: bytes read from a zarrckpt checkpoint per slab when writing a file
_SLAB_BYTES = 64 << 20


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion did."""

    src: str
    dst: str
    src_format: str
    dst_format: str
    #: tensors converted
    tensors: int
    #: tensor bytes converted
    nbytes: int


def threads_or_default(threads: int | None) -> int:
    return threads or default_threads()


def _counter(tracker: ProgressTracker, total: int) -> Callable[[int], None]:
    """Counts one tensor's written bytes; marks the tensor done at ``total``."""
    if total == 0:
        tracker.tensor_done()
        return lambda n: None
    done = [0]

    def written(n: int) -> None:
        tracker.add_bytes(n)
        done[0] += n
        if done[0] == total:
            tracker.tensor_done()

    return written


def c_span(array: np.ndarray, region: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """(byte offset, nbytes) of ``region`` within a C-contiguous array's buffer."""
    if any(b <= a for a, b in region):
        return 0, 0
    stride = [array.itemsize] * array.ndim
    for i in range(array.ndim - 2, -1, -1):
        stride[i] = stride[i + 1] * array.shape[i + 1]
    first = sum(a * s for (a, _), s in zip(region, stride, strict=True))
    last = sum((b - 1) * s for (_, b), s in zip(region, stride, strict=True))
    return first, last - first + array.itemsize


def check_dense(fqn: str, t: torch.Tensor, src: str) -> None:
    """Refuse a tensor of a dtype zarrckpt cannot store, or one that is not dense."""
    info_for_torch(t.dtype, key=fqn, path=src)
    if t.layout != torch.strided:
        raise UnsupportedValueError(
            f"tensor {fqn!r} of {src!r} has layout {t.layout}; only dense tensors convert"
        )


# ------------------------------------------------------------------ into zarrckpt


@dataclass
class Piece:
    """Some chunks of one array, written from one buffer."""

    #: the array region starting at element ``origin``
    array: np.ndarray
    origin: tuple[int, ...]
    #: the chunks to write from it (None: all of the array's chunks)
    indices: list[tuple[int, ...]] | None = None
    #: ``release(index)`` once chunk ``index`` is on disk (frees the memory behind it)
    release: Callable[[tuple[int, ...]], None] | None = None
    #: wait until the piece is written before the next one is read
    drain: bool = False


@dataclass
class TensorSource:
    """One array to write: its dtype, shape and chunk grid, and its contents."""

    fqn: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    #: ``pieces(entry)`` opens the contents lazily, one piece at a time
    pieces: Callable[[ArrayEntry], Iterator[Piece]]
    #: the chunk grid (None: the builder's row slabs)
    layout: ArrayLayout | None = None
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        self.nbytes = n


def ingest(
    src: str,
    dst: str,
    src_format: str,
    *,
    tree: dict[str, Any],
    record: dict[str, Any] | Callable[[], dict[str, Any]],
    tensors: list[TensorSource],
    pickled: dict[str, Any] | None = None,
    blobs: dict[str, bytes] | None = None,
    overwrite: bool,
    fsync: bool,
    chunk_bytes: int,
    inner_chunk_bytes: int,
    threads: int | None,
    progress: ProgressFn | None,
) -> ConvertResult:
    """Write ``tensors``, ``pickled`` and ``blobs`` as the checkpoint ``dst`` and commit it
    with ``tree`` and the conversion ``record`` (or the function that gives it at commit)."""
    total = sum(t.nbytes for t in tensors)
    tracker = ProgressTracker(progress, total, len(tensors))
    with CheckpointBuilder(
        dst,
        overwrite=overwrite,
        fsync=fsync,
        chunk_bytes=chunk_bytes,
        inner_chunk_bytes=inner_chunk_bytes,
        threads=threads_or_default(threads),
    ) as builder:
        for source in tensors:
            entry = builder.add_tensor(source.fqn, source.dtype, source.shape, layout=source.layout)
            written = _counter(tracker, entry.nbytes)
            for piece in source.pieces(entry):
                builder.write_chunks(
                    entry, piece.array, piece.origin, piece.indices,
                    release=piece.release, written=written,
                )
                if piece.drain:
                    builder.drain()
                del piece
        for fqn, obj in (pickled or {}).items():
            builder.add_pickled(fqn, obj)
        for fqn, data in (blobs or {}).items():
            builder.add_bytes(fqn, data)
        rec = record() if callable(record) else record
        builder.commit(tree, extra={MANIFEST_MEMBER: rec})
    return ConvertResult(src, dst, src_format, "zarrckpt", len(tensors), total)


# ------------------------------------------------------------------ out of zarrckpt


def open_checkpoint(
    src: PathLike, dst: PathLike, storage_options: dict[str, Any] | None = None
) -> tuple[str, str, CheckpointFiles, dict[str, Any]]:
    """The checked source and destination paths (``storage_options`` for whichever
    is an object-store URL), the committed source checkpoint and its conversion
    record (empty when it was not written by a converter)."""
    src_path, dst_path = check_paths(src, dst, storage_options)
    files = CheckpointFiles(src_path)
    record = files.manifest.get(MANIFEST_MEMBER)
    return src_path, dst_path, files, record if isinstance(record, dict) else {}


def _row_bands(entry: ArrayEntry, target: int) -> list[tuple[int, int]]:
    """Row ranges of about ``target`` bytes aligned to the stored (inner) chunks' rows."""
    shape = entry.shape
    if not shape or shape[0] == 0:
        return []
    row_bytes = entry.dtype.numpy_dtype.itemsize
    for s in shape[1:]:
        row_bytes *= s
    layout = entry.layout
    unit = (layout.inner_shape or layout.chunk_shape)[0]
    rows = max(unit, (target // max(1, row_bytes)) // unit * unit)
    return [(r, min(r + rows, shape[0])) for r in range(0, shape[0], rows)]


def _stream_tensor(
    files: CheckpointFiles, entry: ArrayEntry, threads: int, written: Callable[[int], None]
) -> Iterator[np.ndarray]:
    """The C-order contents of a stored tensor, one slab of rows at a time."""
    if entry.nbytes == 0:
        return
    if not entry.shape:
        dest = np.empty((), dtype=entry.dtype.numpy_dtype)
        files.read_many([ReadRequest(entry, dest, ())], threads=1)
        yield dest
        written(dest.nbytes)
        return
    for r0, r1 in _row_bands(entry, _SLAB_BYTES):
        dest = np.empty((r1 - r0, *entry.shape[1:]), dtype=entry.dtype.numpy_dtype)
        files.read_many(
            [ReadRequest(entry, dest, (r0,) + (0,) * (len(entry.shape) - 1))], threads=threads
        )
        yield dest
        written(dest.nbytes)
        del dest


class Streamer:
    """The tensors ``entries`` of ``files``, read in slabs; the reads count as progress.

    ``streamer(entry)`` yields the C-order contents of ``entry``.
    """

    def __init__(
        self,
        files: CheckpointFiles,
        entries: list[ArrayEntry],
        *,
        threads: int | None,
        progress: ProgressFn | None,
    ) -> None:
        self.files = files
        self.entries = entries
        self.total = sum(e.nbytes for e in entries)
        self.tracker = ProgressTracker(progress, self.total, len(entries))
        self.threads = threads_or_default(threads)

    def __call__(self, entry: ArrayEntry) -> Iterator[np.ndarray]:
        return _stream_tensor(
            self.files, entry, self.threads, _counter(self.tracker, entry.nbytes)
        )

    def result(self, src: str, dst: str, dst_format: str) -> ConvertResult:
        return ConvertResult(src, dst, "zarrckpt", dst_format, len(self.entries), self.total)
