"""Encode and decode chunk files of the zarrckpt layout (zarr v3, uncompressed).

A plain chunk file is the chunk's C-order little-endian bytes followed by their
crc32c (4 bytes, little endian): zarr's ``bytes`` + ``crc32c`` codecs.
A sharded chunk file is zarr's ``sharding_indexed`` format: the inner chunks,
each encoded as a plain chunk, then the index (``(offset, nbytes)`` as
little-endian uint64 per inner chunk in C order, ``2**64-1`` twice for an
inner chunk that lies wholly outside the array) and the index's crc32c.

Writes are gathered (``os.writev``) straight from the tensor's memory and
reads are scattered (``os.preadv``) straight into the destination's memory
whenever the bytes are contiguous there, so a chunk costs no extra copy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c
import numpy as np

from ..errors import CorruptCheckpointError
from ._layout import ArrayLayout, Region

__all__ = ["encode_chunk", "write_file", "ChunkReader", "crc32c"]

EMPTY = np.uint64(2**64 - 1)
_IOV_MAX = 512
#: consecutive inner chunks are read with one preadv of about this many bytes, and each
#: checksum is verified right after, while the bytes are still in the CPU cache
_READ_GROUP_BYTES = 1 << 20
#: with ``writeback=True`` the kernel is asked to start writing a file back after every
#: this many bytes, so that the disk works while the next bytes are being copied
_WRITEBACK_BYTES = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Any:
    name = ctypes.util.find_library("c")
    func = getattr(ctypes.CDLL(name, use_errno=True), "sync_file_range", None) if name else None
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        func.restype = ctypes.c_int
    return func


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` back to disk (no wait).

    A hint only (``sync_file_range(SYNC_FILE_RANGE_WRITE)``): durability still
    comes from fsync/syncfs; where the call is missing nothing happens.
    """
    if _SYNC_FILE_RANGE is not None and nbytes > 0:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


_crc32c_impl: Callable[..., int]
try:  # SIMD (VPCLMULQDQ) crc32c: 2-4x faster than the SSE4.2 one where the CPU has it
    from fastcrc import crc32 as _fastcrc32

    _crc32c_impl = _fastcrc32.iscsi
except ImportError:  # pragma: no cover - fastcrc is a dependency; crc32c is the fallback
    _crc32c_impl = _crc32c.crc32c


def crc32c(data: Any) -> int:
    """crc32c (Castagnoli) of a buffer (the GIL is released while it runs)."""
    return int(_crc32c_impl(data))


def _crc_bytes(data: Any) -> bytes:
    return crc32c(data).to_bytes(4, "little")


def _as_bytes_view(array: np.ndarray) -> memoryview:
    """Flat uint8 memoryview of a C-contiguous array (works for ml_dtypes too)."""
    return array.reshape(-1).view(np.uint8).data


def _slices(region: Region, origin: tuple[int, ...]) -> tuple[Any, ...]:
    # the trailing Ellipsis keeps 0-d results arrays (views), not numpy scalars
    return (*(slice(a - o, b - o) for (a, b), o in zip(region, origin, strict=True)), Ellipsis)


def _block(
    source: np.ndarray, origin: tuple[int, ...], region: Region, full_shape: tuple[int, ...]
) -> np.ndarray:
    """Data of ``region`` (global coordinates) from ``source`` (placed at ``origin``),
    padded with zeros to ``full_shape``; C-contiguous, zero-copy when possible."""
    data = source[_slices(region, origin)]
    if data.shape == full_shape:
        return data if data.flags.c_contiguous else np.ascontiguousarray(data)
    padded = np.zeros(full_shape, dtype=source.dtype)
    padded[tuple(slice(0, s) for s in data.shape)] = data
    return padded


def encode_chunk(
    layout: ArrayLayout, index: tuple[int, ...], source: np.ndarray, origin: tuple[int, ...]
) -> list[Any]:
    """Buffers whose concatenation is the encoded chunk ``index``.

    ``source`` holds (at least) the chunk's region of the array, its element
    ``[0, 0, ...]`` being the array element ``origin``.
    """
    if layout.inner_shape is None:
        block = _block(source, origin, layout.chunk_region(index), layout.chunk_shape)
        view = _as_bytes_view(block)
        return [view, _crc_bytes(view)]
    slabs = _row_slabs(layout, layout.chunk_region(index), source, origin)
    if slabs is not None:
        return _encode_row_slabs(layout, index, source, origin, slabs)
    buffers: list[Any] = []
    inner_indices = list(layout.inner_indices())
    table = np.empty((len(inner_indices), 2), dtype="<u8")
    offset = 0
    for k, inner in enumerate(inner_indices):
        region = layout.inner_region(index, inner)
        if any(b <= a for a, b in region):
            table[k] = (EMPTY, EMPTY)
            continue
        view = _as_bytes_view(_block(source, origin, region, layout.inner_shape))
        buffers += [view, _crc_bytes(view)]
        table[k] = (offset, len(view) + 4)
        offset += len(view) + 4
    index_bytes = table.tobytes()
    buffers += [index_bytes, _crc_bytes(index_bytes)]
    return buffers


def _row_slabs(
    layout: ArrayLayout, region: Region, array: np.ndarray, origin: tuple[int, ...]
) -> memoryview | None:
    """Bytes of ``region`` in ``array`` when its inner chunks are consecutive slices of them.

    That is the case when inner chunks are row slabs of the chunk (they span
    every dimension but the first), the chunk is not clipped by the array
    bounds in those dimensions, and ``array`` holds the region C-contiguously:
    inner chunk ``k`` is then bytes ``[k * inner_nbytes, (k + 1) * inner_nbytes)``
    of the region (the last one may be cut short by the end of the array).
    Returns None otherwise (the general, per-inner-chunk path applies).
    """
    inner = layout.inner_shape
    if inner is None or inner[1:] != layout.chunk_shape[1:]:
        return None
    if any(b - a != c for (a, b), c in zip(region[1:], layout.chunk_shape[1:], strict=True)):
        return None
    block = array[_slices(region, origin)]
    if not block.flags.c_contiguous:
        return None
    return _as_bytes_view(block)


def _encode_row_slabs(
    layout: ArrayLayout,
    index: tuple[int, ...],
    source: np.ndarray,
    origin: tuple[int, ...],
    slabs: memoryview,
) -> list[Any]:
    """:func:`encode_chunk` for row-slab inner chunks: slices of one view, same bytes."""
    assert layout.inner_shape is not None
    slab = layout.inner_nbytes
    n_inner = layout.inner_grid_shape[0]
    n_full, rest = divmod(len(slabs), slab)
    table = np.full((n_inner, 2), EMPTY, dtype="<u8")
    buffers: list[Any] = []
    offset = 0
    for k in range(n_full):
        view = slabs[k * slab : (k + 1) * slab]
        buffers += [view, _crc_bytes(view)]
        table[k] = (offset, slab + 4)
        offset += slab + 4
    if rest:  # inner chunk cut by the end of the array: zero-padded, like the general path
        region = layout.inner_region(index, (n_full,) + (0,) * (layout.ndim - 1))
        view = _as_bytes_view(_block(source, origin, region, layout.inner_shape))
        buffers += [view, _crc_bytes(view)]
        table[n_full] = (offset, slab + 4)
    index_bytes = table.tobytes()
    buffers += [index_bytes, _crc_bytes(index_bytes)]
    return buffers


def write_file(
    path: str, buffers: list[Any], *, fsync: bool = False, writeback: bool = False
) -> int:
    """Write ``buffers`` to a new file at ``path``; return the bytes written.

    With ``writeback`` the kernel starts writing the file to disk while it is
    being written (see :func:`start_writeback`), so that a later fsync/syncfs
    has little left to wait for.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    total = 0
    flushed = 0
    try:
        pending = [memoryview(b).cast("B") for b in buffers if len(b)]
        while pending:
            batch = pending[:_IOV_MAX]
            written = os.writev(fd, batch)
            total += written
            if writeback and total - flushed >= _WRITEBACK_BYTES:
                start_writeback(fd, flushed, total - flushed)
                flushed = total
            # drop what was fully written, trim a partially written buffer
            while batch and written >= len(batch[0]):
                written -= len(batch[0])
                batch.pop(0)
                pending.pop(0)
            if written:
                pending[0] = pending[0][written:]
        if writeback:
            start_writeback(fd, flushed, total - flushed)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return total


@dataclass
class ChunkReader:
    """Reads regions of one array's chunk files, verifying every checksum.

    Parameters
    ----------
    array_dir
        Directory of the array (holds ``zarr.json`` and ``c/...``).
    layout
        The array's layout.
    what
        Description used in error messages (key and checkpoint path).
    """

    array_dir: str
    layout: ArrayLayout
    what: str
    bytes_read: int = 0

    def _chunk_path(self, index: tuple[int, ...]) -> str:
        return f"{self.array_dir}/{self.layout.chunk_key(index)}"

    def _open(self, index: tuple[int, ...]) -> int:
        path = self._chunk_path(index)
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{self.what}: chunk {self.layout.chunk_key(index)!r} is missing "
                f"(expected file {path!r})"
            ) from None

    def _pread_exact(
        self, fd: int, buffers: list[Any], offset: int, index: tuple[int, ...]
    ) -> None:
        expected = sum(len(b) for b in buffers)
        got = 0
        views = [memoryview(b).cast("B") for b in buffers]
        while views:
            batch = views[:_IOV_MAX]
            n = os.preadv(fd, batch, offset + got)
            if n == 0:
                raise CorruptCheckpointError(
                    f"{self.what}: chunk {self.layout.chunk_key(index)!r} is truncated "
                    f"(read {got} of {expected} bytes at offset {offset})"
                )
            got += n
            while batch and n >= len(batch[0]):
                n -= len(batch[0])
                batch.pop(0)
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        self.bytes_read += expected

    def _check(self, data: Any, stored: Any, index: tuple[int, ...], part: str) -> None:
        if crc32c(data).to_bytes(4, "little") != bytes(stored):
            raise CorruptCheckpointError(
                f"{self.what}: checksum mismatch in chunk {self.layout.chunk_key(index)!r}"
                f"{part} (crc32c {bytes(stored).hex()} stored, "
                f"{crc32c(data).to_bytes(4, 'little').hex()} computed)"
            )

    def _check_plain_size(self, fd: int, index: tuple[int, ...]) -> None:
        """A plain chunk file is exactly the chunk's bytes and its crc32c."""
        size = os.fstat(fd).st_size
        expected = self.layout.chunk_nbytes + 4
        if size != expected:
            raise CorruptCheckpointError(
                f"{self.what}: chunk {self.layout.chunk_key(index)!r} has {size} bytes, "
                f"expected {expected} ({'truncated' if size < expected else 'trailing data'})"
            )

    def _read_index(self, fd: int, index: tuple[int, ...]) -> np.ndarray:
        n_inner = int(np.prod(self.layout.inner_grid_shape))
        size = os.fstat(fd).st_size
        index_len = n_inner * 16 + 4
        if size < index_len:
            raise CorruptCheckpointError(
                f"{self.what}: chunk {self.layout.chunk_key(index)!r} is truncated "
                f"({size} bytes, shorter than its {index_len}-byte shard index)"
            )
        raw = bytearray(index_len)
        self._pread_exact(fd, [raw], size - index_len, index)
        self._check(memoryview(raw)[:-4], raw[-4:], index, " (shard index)")
        table = np.frombuffer(bytes(raw[:-4]), dtype="<u8").reshape(n_inner, 2)
        data_end = size - index_len
        present = ~((table[:, 0] == EMPTY) & (table[:, 1] == EMPTY))
        offs, sizes = table[:, 0], table[:, 1]
        end = np.uint64(data_end)
        # offset + nbytes > data_end, computed without uint64 wrap-around
        bad = present & ((sizes > end) | (offs > end - np.minimum(sizes, end)))
        if bad.any():
            k = int(np.argmax(bad))
            off, nbytes = int(table[k][0]), int(table[k][1])
            raise CorruptCheckpointError(
                f"{self.what}: chunk {self.layout.chunk_key(index)!r} is truncated or its "
                f"index is damaged (inner chunk {k} ends at {off + nbytes}, "
                f"data ends at {data_end})"
            )
        return table

    def read_into(self, dest: np.ndarray, dest_origin: tuple[int, ...]) -> None:
        """Fill ``dest`` (placed at array element ``dest_origin``) from the chunks."""
        layout = self.layout
        if (
            layout.inner_shape is None
            and dest.shape == layout.shape == layout.chunk_shape
            and dest.flags.c_contiguous
            and not any(dest_origin)
        ):  # the common small tensor: one plain chunk straight into dest
            self._read_whole(dest)
            return
        region: Region = tuple(
            (o, o + s) for o, s in zip(dest_origin, dest.shape, strict=True)
        )
        for index in self.layout.chunks_overlapping(region):
            self._read_chunk_into(index, dest, dest_origin, region)

    def _read_whole(self, dest: np.ndarray) -> None:
        """Read an array stored as one plain chunk into the C-contiguous ``dest``."""
        index = (0,) * self.layout.ndim
        fd = self._open(index)
        try:
            self._check_plain_size(fd, index)
            view = _as_bytes_view(dest)
            crc = bytearray(4)
            self._pread_exact(fd, [view, crc], 0, index)
            self._check(view, crc, index, "")
        finally:
            os.close(fd)

    def _read_chunk_into(
        self, index: tuple[int, ...], dest: np.ndarray, dest_origin: tuple[int, ...], need: Region
    ) -> None:
        layout = self.layout
        fd = self._open(index)
        try:
            if layout.inner_shape is None:
                self._check_plain_size(fd, index)
                parts = [(index, layout.chunk_region(index), 0, layout.chunk_shape)]
            else:
                table = self._read_index(fd, index)
                region = layout.chunk_region(index)
                slabs = (
                    _row_slabs(layout, region, dest, dest_origin)
                    if _intersect(region, need) == region
                    else None
                )
                if slabs is not None:
                    self._read_row_slabs(fd, index, table, slabs, dest, dest_origin, need)
                    return
                parts = []
                for k, inner in enumerate(layout.inner_indices()):
                    region = layout.inner_region(index, inner)
                    if any(b <= a for a, b in _intersect(region, need)):
                        continue
                    off, nbytes = (int(x) for x in table[k])
                    if table[k][0] == EMPTY:
                        raise CorruptCheckpointError(
                            f"{self.what}: inner chunk {inner} of chunk "
                            f"{layout.chunk_key(index)!r} is missing"
                        )
                    if nbytes != layout.inner_nbytes + 4:
                        raise CorruptCheckpointError(
                            f"{self.what}: inner chunk {inner} of chunk "
                            f"{layout.chunk_key(index)!r} has {nbytes} bytes, expected "
                            f"{layout.inner_nbytes + 4}"
                        )
                    parts.append((index, region, off, layout.inner_shape))
            for _, region, offset, full_shape in parts:
                self._read_part(fd, index, region, offset, full_shape, dest, dest_origin, need)
        finally:
            os.close(fd)

    def _inner_error(self, index: tuple[int, ...], k: int, table: np.ndarray) -> None:
        """Raise the error for inner chunk ``k`` (missing or of the wrong size)."""
        inner = (k,) + (0,) * (self.layout.ndim - 1)
        key = self.layout.chunk_key(index)
        if table[k][0] == EMPTY:
            raise CorruptCheckpointError(
                f"{self.what}: inner chunk {inner} of chunk {key!r} is missing"
            )
        raise CorruptCheckpointError(
            f"{self.what}: inner chunk {inner} of chunk {key!r} has {int(table[k][1])} bytes, "
            f"expected {self.layout.inner_nbytes + 4}"
        )

    def _read_row_slabs(
        self,
        fd: int,
        index: tuple[int, ...],
        table: np.ndarray,
        slabs: memoryview,
        dest: np.ndarray,
        dest_origin: tuple[int, ...],
        need: Region,
    ) -> None:
        """Read a whole chunk of row-slab inner chunks straight into ``slabs`` (see
        :func:`_row_slabs`): runs of inner chunks stored back to back are read with one
        ``preadv`` of about ``_READ_GROUP_BYTES`` and verified right after."""
        layout = self.layout
        slab = layout.inner_nbytes
        n_full, rest = divmod(len(slabs), slab)
        n_needed = n_full + (1 if rest else 0)
        offs = table[:n_needed, 0]
        bad = (offs == EMPTY) | (table[:n_needed, 1] != slab + 4)
        if bad.any():
            self._inner_error(index, int(np.argmax(bad)), table)
        offsets = [int(x) for x in offs[:n_full]]
        per_group = max(1, min(_IOV_MAX // 2, _READ_GROUP_BYTES // max(1, slab)))
        crcs = bytearray(4 * per_group)
        crc_view = memoryview(crcs)
        k = 0
        while k < n_full:
            end = k + 1
            while (
                end < n_full
                and end - k < per_group
                and offsets[end] == offsets[end - 1] + slab + 4
            ):
                end += 1
            buffers: list[Any] = []
            for j in range(k, end):
                i = j - k
                buffers += [slabs[j * slab : (j + 1) * slab], crc_view[4 * i : 4 * i + 4]]
            self._pread_exact(fd, buffers, offsets[k], index)
            for j in range(k, end):
                i = j - k
                self._check(buffers[2 * i], crc_view[4 * i : 4 * i + 4], index, "")
            k = end
        if rest:  # inner chunk cut by the end of the array: through a scratch buffer
            inner = (n_full,) + (0,) * (layout.ndim - 1)
            region = layout.inner_region(index, inner)
            self._read_part(
                fd, index, region, int(offs[n_full]), layout.inner_shape or (), dest,
                dest_origin, need,
            )

    def _read_part(
        self,
        fd: int,
        index: tuple[int, ...],
        region: Region,
        offset: int,
        full_shape: tuple[int, ...],
        dest: np.ndarray,
        dest_origin: tuple[int, ...],
        need: Region,
    ) -> None:
        part_shape = tuple(b - a for a, b in region)
        overlap = _intersect(region, need)
        crc = bytearray(4)
        if overlap == region and part_shape == full_shape:
            target = dest[_slices(region, dest_origin)]
            if target.flags.c_contiguous:
                view = _as_bytes_view(target)
                self._pread_exact(fd, [view, crc], offset, index)
                self._check(view, crc, index, "")
                return
        scratch = np.empty(full_shape, dtype=dest.dtype)
        view = _as_bytes_view(scratch)
        self._pread_exact(fd, [view, crc], offset, index)
        self._check(view, crc, index, "")
        origin = tuple(a for a, _ in region)
        dest[_slices(overlap, dest_origin)] = scratch[_slices(overlap, origin)]


def _intersect(a: Region, b: Region) -> Region:
    return tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
