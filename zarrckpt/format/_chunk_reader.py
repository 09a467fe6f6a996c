"""Read and verify chunk files of the zarrckpt layout through an injected range reader.

:class:`ChunkReader` decodes chunk files (see :mod:`zarrckpt.format._codec`)
read from a :class:`ChunkSource`: anything with ``open_reader(key)`` returning
a :class:`RangeReader` (``size``, ``readv_into(buffers, offset)``, ``close()``),
for instance a :class:`zarrckpt.storage.Store`. Reads are scattered straight
into the destination's memory whenever the bytes are contiguous there, so a
chunk costs no extra copy; every checksum is verified. Nothing here opens a
file itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import CorruptCheckpointError, StorageError
from ._codec import EMPTY, _as_bytes_view, _row_slabs, _slices, crc32c
from ._layout import ArrayLayout, Region

__all__ = ["ChunkReader", "ChunkSource", "RangeReader"]

#: at most this many buffers per vectored read (IOV_MAX is 1024 on Linux)
_IOV_MAX = 512
#: consecutive inner chunks are read with one preadv of about this many bytes, and each
#: checksum is verified right after, while the bytes are still in the CPU cache
_READ_GROUP_BYTES = 1 << 20


class RangeReader(Protocol):
    """One stored object open for positional reads (see :class:`zarrckpt.storage.RangeReader`;
    its ``read_group_bytes``, when it has one, sizes the reads of consecutive ranges)."""

    @property
    def size(self) -> int: ...

    def readv_into(self, buffers: list[memoryview], offset: int) -> int: ...

    def close(self) -> None: ...


class ChunkSource(Protocol):
    """Where chunk files are read from (a :class:`zarrckpt.storage.Store`)."""

    def open_reader(self, key: str) -> RangeReader: ...

    def location(self, key: str) -> str: ...


@dataclass
class ChunkReader:
    """Reads regions of one array's chunk files, verifying every checksum.

    Parameters
    ----------
    source
        Where the chunk files are (a :class:`zarrckpt.storage.Store`).
    array_key
        Key of the array in ``source`` (``/``-separated; holds ``zarr.json`` and ``c/...``).
    layout
        The array's layout.
    what
        Description used in error messages (key and checkpoint path).
    crcs
        The manifest's crc32c table of the array (format 3; see
        :meth:`ArrayLayout.crc_position`): every inner chunk read must carry the
        crc32c recorded for its position, so a chunk file swapped with another one
        or copied from another checkpoint is reported. None: not checked.
    """

    source: ChunkSource
    array_key: str
    layout: ArrayLayout
    what: str
    bytes_read: int = 0
    crcs: np.ndarray | None = None

    def _open(self, index: tuple[int, ...]) -> RangeReader:
        key = f"{self.array_key}/{self.layout.chunk_key(index)}"
        try:
            return self.source.open_reader(key)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{self.what}: chunk {self.layout.chunk_key(index)!r} is missing "
                f"(expected file {self.source.location(key)!r})"
            ) from None
        except OSError as e:
            raise self._io_error(index, e) from e

    def _io_error(self, index: tuple[int, ...], e: OSError) -> Exception:
        key = f"{self.array_key}/{self.layout.chunk_key(index)}"
        where = f"chunk {self.layout.chunk_key(index)!r}, file {self.source.location(key)!r}"
        return StorageError.wrap(e, f"{self.what}: reading {where}")

    def _pread_exact(
        self, reader: RangeReader, buffers: list[Any], offset: int, index: tuple[int, ...]
    ) -> None:
        expected = sum(len(b) for b in buffers)
        got = 0
        views = [memoryview(b).cast("B") for b in buffers]
        while views:
            batch = views[:_IOV_MAX]
            try:
                n = reader.readv_into(batch, offset + got)
            except OSError as e:
                raise self._io_error(index, e) from e
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

    def _check(
        self, data: Any, stored: Any, index: tuple[int, ...], part: str, position: int = -1
    ) -> None:
        if crc32c(data).to_bytes(4, "little") != bytes(stored):
            raise CorruptCheckpointError(
                f"{self.what}: checksum mismatch in chunk {self.layout.chunk_key(index)!r}"
                f"{part} (crc32c {bytes(stored).hex()} stored, "
                f"{crc32c(data).to_bytes(4, 'little').hex()} computed)"
            )
        if self.crcs is not None and position >= 0:
            expected = int(self.crcs[position])
            if int.from_bytes(bytes(stored), "little") != expected:
                raise CorruptCheckpointError(
                    f"{self.what}: chunk {self.layout.chunk_key(index)!r}{part} holds data "
                    f"that the manifest does not record at this position (crc32c "
                    f"{bytes(stored).hex()}, manifest {expected.to_bytes(4, 'little').hex()} "
                    f"at position {position}): the file was swapped with another chunk, "
                    "copied from another checkpoint or modified"
                )

    def _check_plain_size(self, reader: RangeReader, index: tuple[int, ...]) -> None:
        """A plain chunk file is exactly the chunk's bytes and its crc32c.

        Checked after the chunk was read: an object store's reader learns the
        size from the GET's reply, so the check costs no request of its own (a
        truncated chunk fails the read itself)."""
        size = reader.size
        expected = self.layout.chunk_nbytes + 4
        if size != expected:
            raise CorruptCheckpointError(
                f"{self.what}: chunk {self.layout.chunk_key(index)!r} has {size} bytes, "
                f"expected {expected} ({'truncated' if size < expected else 'trailing data'})"
            )

    def _read_index(self, reader: RangeReader, index: tuple[int, ...]) -> np.ndarray:
        n_inner = int(np.prod(self.layout.inner_grid_shape))
        index_len = n_inner * 16 + 4
        raw = bytearray(index_len)
        at_start = self.layout.index_location == "start"
        if at_start:  # read first: an object store's reader learns the size from the GET
            self._read_index_bytes(reader, raw, 0, index)
        size = reader.size
        if size < index_len:
            raise CorruptCheckpointError(
                f"{self.what}: chunk {self.layout.chunk_key(index)!r} is truncated "
                f"({size} bytes, shorter than its {index_len}-byte shard index)"
            )
        if not at_start:
            self._pread_exact(reader, [raw], size - index_len, index)
        self._check(memoryview(raw)[:-4], raw[-4:], index, " (shard index)")
        table = np.frombuffer(bytes(raw[:-4]), dtype="<u8").reshape(n_inner, 2)
        data_end = size if at_start else size - index_len
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

    def _read_index_bytes(
        self, reader: RangeReader, raw: bytearray, offset: int, index: tuple[int, ...]
    ) -> None:
        """``raw`` from ``offset``; a short file is reported by the size check after."""
        try:
            self._pread_exact(reader, [raw], offset, index)
        except CorruptCheckpointError:
            if reader.size >= len(raw):
                raise

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
        reader = self._open(index)
        try:
            view = _as_bytes_view(dest)
            crc = bytearray(4)
            self._pread_exact(reader, [view, crc], 0, index)
            self._check_plain_size(reader, index)
            self._check(view, crc, index, "", self.layout.crc_position(index))
        finally:
            reader.close()

    def _read_chunk_into(
        self, index: tuple[int, ...], dest: np.ndarray, dest_origin: tuple[int, ...], need: Region
    ) -> None:
        layout = self.layout
        reader = self._open(index)
        try:
            if layout.inner_shape is None:
                parts = [
                    (layout.crc_position(index), layout.chunk_region(index), 0,
                     layout.chunk_shape)
                ]
            else:
                table = self._read_index(reader, index)
                region = layout.chunk_region(index)
                first, slabs = self._needed_row_slabs(region, need, dest, dest_origin)
                if slabs is not None:
                    self._read_row_slabs(
                        reader, index, table, slabs, dest, dest_origin, need, first
                    )
                    return
                parts = []
                base = layout.crc_position(index)
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
                    parts.append((base + k, region, off, layout.inner_shape))
            for position, region, offset, full_shape in parts:
                self._read_part(
                    reader, index, region, offset, full_shape, dest, dest_origin, need, position
                )
            if layout.inner_shape is None:
                self._check_plain_size(reader, index)
        finally:
            reader.close()

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

    def _needed_row_slabs(
        self, region: Region, need: Region, dest: np.ndarray, dest_origin: tuple[int, ...]
    ) -> tuple[int, memoryview | None]:
        """(first inner chunk, bytes of ``dest`` to fill) when the needed part of the
        chunk at ``region`` is whole row slabs from an inner-chunk boundary on (all
        of every dimension but the first; the last slab may be cut), C-contiguous in
        ``dest``: the rows a rank of another mesh reads. Else (0, None)."""
        layout = self.layout
        inner = layout.inner_shape
        sub = _intersect(region, need)
        if inner is None or any(b <= a for a, b in sub):
            return 0, None
        offset = sub[0][0] - region[0][0]
        if offset % inner[0]:
            return 0, None
        slabs = _row_slabs(layout, sub, dest, dest_origin)
        return offset // inner[0], slabs

    def _read_row_slabs(
        self,
        reader: RangeReader,
        index: tuple[int, ...],
        table: np.ndarray,
        slabs: memoryview,
        dest: np.ndarray,
        dest_origin: tuple[int, ...],
        need: Region,
        first: int = 0,
    ) -> None:
        """Read row-slab inner chunks ``first, first + 1, ...`` of a chunk straight into
        ``slabs`` (see :func:`_row_slabs`): runs of inner chunks stored back to back are
        read with one ``preadv`` of about ``reader.read_group_bytes`` (one ranged GET on
        an object store) and verified right after;
        a last slab cut short (the end of the array or of the needed rows) goes through
        a scratch buffer."""
        layout = self.layout
        slab = layout.inner_nbytes
        n_full, rest = divmod(len(slabs), slab)
        n_needed = n_full + (1 if rest else 0)
        if first + n_needed > len(table):
            raise CorruptCheckpointError(
                f"{self.what}: chunk {layout.chunk_key(index)!r} has {len(table)} inner "
                f"chunks in its index, rows up to inner chunk {first + n_needed} are needed"
            )
        rows = table[first : first + n_needed]
        offs = rows[:, 0]
        bad = (offs == EMPTY) | (rows[:, 1] != slab + 4)
        if bad.any():
            self._inner_error(index, first + int(np.argmax(bad)), table)
        offsets = [int(x) for x in offs[:n_full]]
        base = layout.crc_position(index) + first
        group_bytes = getattr(reader, "read_group_bytes", _READ_GROUP_BYTES)
        per_group = max(1, min(_IOV_MAX // 2, group_bytes // max(1, slab)))
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
            self._pread_exact(reader, buffers, offsets[k], index)
            for j in range(k, end):
                i = j - k
                self._check(
                    buffers[2 * i], crc_view[4 * i : 4 * i + 4], index, "", base + j
                )
            k = end
        if rest:  # inner chunk cut by the end of the array: through a scratch buffer
            inner = (first + n_full,) + (0,) * (layout.ndim - 1)
            region = layout.inner_region(index, inner)
            self._read_part(
                reader, index, region, int(offs[n_full]), layout.inner_shape or (), dest,
                dest_origin, need, base + n_full,
            )

    def _read_part(
        self,
        reader: RangeReader,
        index: tuple[int, ...],
        region: Region,
        offset: int,
        full_shape: tuple[int, ...],
        dest: np.ndarray,
        dest_origin: tuple[int, ...],
        need: Region,
        position: int = -1,
    ) -> None:
        part_shape = tuple(b - a for a, b in region)
        overlap = _intersect(region, need)
        crc = bytearray(4)
        if overlap == region and part_shape == full_shape:
            target = dest[_slices(region, dest_origin)]
            if target.flags.c_contiguous:
                view = _as_bytes_view(target)
                self._pread_exact(reader, [view, crc], offset, index)
                self._check(view, crc, index, "", position)
                return
        scratch = np.empty(full_shape, dtype=dest.dtype)
        view = _as_bytes_view(scratch)
        self._pread_exact(reader, [view, crc], offset, index)
        self._check(view, crc, index, "", position)
        origin = tuple(a for a, _ in region)
        dest[_slices(overlap, dest_origin)] = scratch[_slices(overlap, origin)]


def _intersect(a: Region, b: Region) -> Region:
    return tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
