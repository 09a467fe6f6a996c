"""A zarr store wrapper that checks the manifest's crc32c table on every chunk read.

``zarrckpt.open(path)[key]`` hands out a plain ``zarr.Array``; zarr verifies each
chunk's own crc32c but cannot tell a chunk swapped with another one, or copied
from another checkpoint. :class:`BindingStore` sits between zarr and the real
store: every chunk (or inner chunk of a shard) zarr fetches must carry the crc32c
the manifest records for its position (format 3), else the read raises
:class:`~zarrckpt.errors.CorruptCheckpointError`. Imported only when a zarr view is
made (it needs zarr).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from zarr.abc.store import RangeByteRequest
from zarr.storage import WrapperStore

from ..errors import CorruptCheckpointError
from ..format._codec import EMPTY
from ..format._metadata import ArrayEntry
from ..parallel._reader import CheckpointFiles
from ._zarr_array import checked_array

__all__ = ["BindingStore", "zarr_view"]


def zarr_view(files: CheckpointFiles, entry: ArrayEntry) -> Any:
    """A read-only ``zarr.Array`` of ``entry`` whose chunk reads are checked against
    the crc32c table (after the array's metadata and entries are checked)."""
    import zarr

    from .._zarr_dtypes import register_zarr_dtypes

    register_zarr_dtypes()
    metadata = files.check_metadata(entry)
    # zarr-python opens the array's files by path: refuse links and FIFOs first
    files.store.check_entries(entry.path)
    store = BindingStore(files.store.zarr_store(), entry, files.what(entry), metadata)
    try:
        array = zarr.open_array(store, path=entry.path, mode="r", zarr_format=3)
    except Exception as e:  # zarr's own errors on a document it cannot use
        raise CorruptCheckpointError(
            f"checkpoint {files.path!r}: zarr cannot open array {entry.fqn!r} at "
            f"{entry.path!r}: {e}"
        ) from e
    return checked_array(array, files.path, entry.fqn)


class BindingStore(WrapperStore[Any]):
    """``store`` with the reads of ``entry``'s chunks checked against its crc table."""

    def __init__(
        self, store: Any, entry: ArrayEntry, what: str, metadata: bytes | None = None
    ) -> None:
        super().__init__(store)
        self._entry = entry
        self._what = what
        #: the array's zarr.json as checked against the manifest (served from memory:
        #: on an object store, one GET fewer per array opened)
        self._metadata = metadata
        self._crcs = entry.crc_values()
        #: chunk key -> {inner chunk offset: crc table position}, from shard indexes read
        self._positions: dict[str, dict[int, int]] = {}

    def _with_store(self, store: Any) -> BindingStore:
        return type(self)(store, self._entry, self._what, self._metadata)

    def _chunk_index(self, key: str) -> tuple[int, ...] | None:
        prefix = self._entry.path + "/"
        if not key.startswith(prefix):
            return None
        name = key[len(prefix) :]
        layout = self._entry.layout
        parts = name.split(layout.separator)
        if parts[0] != "c" or len(parts) != layout.ndim + 1:
            return None
        try:
            return tuple(int(p) for p in parts[1:])
        except ValueError:
            return None

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if (
            self._metadata is not None
            and byte_range is None
            and key == f"{self._entry.path}/zarr.json"
        ):
            return prototype.buffer.from_bytes(self._metadata)
        buffer = await self._store.get(key, prototype, byte_range)
        chunk = self._chunk_index(key)
        if chunk is not None and (buffer is None or len(buffer) == 0):
            # zarr would read an absent chunk as "never written" (fill values); every
            # chunk of a zarrckpt array is written, so this one is damage
            raise CorruptCheckpointError(
                f"{self._what}: chunk {key!r} is missing or empty"
            )
        index = None if self._crcs is None else chunk
        if buffer is None or index is None:
            return buffer
        data = buffer.as_numpy_array().view(np.uint8)
        layout = self._entry.layout
        base = layout.crc_position(index)
        if layout.inner_shape is None:
            if byte_range is None:
                self._expect(key, data[-4:], base)
            return buffer
        start = getattr(byte_range, "start", None)
        positions: dict[int, int] | None
        if byte_range is None:  # the whole shard: check every inner chunk it holds
            positions = self._parse_index(key, data, base, len(data))
            for offset, position in positions.items():
                end = offset + layout.inner_nbytes + 4
                self._expect(key, data[end - 4 : end], position)
        elif isinstance(byte_range, RangeByteRequest) and start == 0 and (
            byte_range.end == layout.index_nbytes and layout.index_location == "start"
        ):
            self._parse_index(key, data, base, None)
        elif isinstance(byte_range, RangeByteRequest):
            positions = self._positions.get(key)
            if positions is None:
                raw = await self._store.get(
                    key, prototype, RangeByteRequest(0, layout.index_nbytes)
                )
                if raw is not None:
                    positions = self._parse_index(key, raw.as_numpy_array().view(np.uint8),
                                                  base, None)
            if positions is not None and start in positions:
                self._expect(key, data[-4:], positions[start])
        return buffer

    def _parse_index(
        self, key: str, data: np.ndarray, base: int, size: int | None
    ) -> dict[int, int]:
        """Offset -> crc table position of the inner chunks an index lists (at the start,
        or at the end of a whole file of ``size`` bytes)."""
        layout = self._entry.layout
        n = layout.index_nbytes
        raw = data[:n] if layout.index_location == "start" or size is None else data[size - n :]
        table = np.frombuffer(raw[:-4].tobytes(), dtype="<u8").reshape(-1, 2)
        positions = {
            int(off): base + k for k, (off, _) in enumerate(table) if off != EMPTY
        }
        self._positions[key] = positions
        return positions

    def _expect(self, key: str, stored: np.ndarray, position: int) -> None:
        assert self._crcs is not None
        crc = int.from_bytes(stored.tobytes(), "little")
        if position >= len(self._crcs) or crc != int(self._crcs[position]):
            expected = int(self._crcs[position]) if position < len(self._crcs) else None
            raise CorruptCheckpointError(
                f"{self._what}: chunk file {key!r} holds data that the manifest does not "
                f"record at this position (crc32c {crc:08x}, manifest "
                f"{expected if expected is None else format(expected, '08x')} at position "
                f"{position}): the file was swapped with another chunk, copied from another "
                "checkpoint or modified"
            )
