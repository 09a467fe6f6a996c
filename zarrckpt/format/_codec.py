"""Encode chunk files of the zarrckpt layout (zarr v3, uncompressed): pure.

A plain chunk file is the chunk's C-order little-endian bytes followed by their
crc32c (4 bytes, little endian): zarr's ``bytes`` + ``crc32c`` codecs.
A sharded chunk file is zarr's ``sharding_indexed`` format: the inner chunks,
each encoded as a plain chunk, and the index (``(offset, nbytes)`` as
little-endian uint64 per inner chunk in C order, ``2**64-1`` twice for an
inner chunk that lies wholly outside the array) followed by the index's
crc32c, at the start of the file (format 3) or at its end (formats 1 and 2).

:func:`encode_chunk` returns the buffers of a chunk file (views of the
tensor's memory wherever the bytes are contiguous there), which a
:class:`~zarrckpt.storage.Staging` writes with one gathered write; nothing
here touches a file (reading: :mod:`zarrckpt.format._chunk_reader`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import crc32c as _crc32c
import numpy as np

from ._layout import ArrayLayout, Region

__all__ = [
    "encode_chunk",
    "encode_piece",
    "shard_index",
    "crc32c",
    "expected_chunk_size",
    "EMPTY",
]

EMPTY = np.uint64(2**64 - 1)

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


def encode_piece(
    layout: ArrayLayout, index: tuple[int, ...], source: np.ndarray, origin: tuple[int, ...]
) -> tuple[list[Any], list[int]]:
    """Buffers whose concatenation is chunk ``index``'s inner chunks, each followed by
    its crc32c, in C order (those wholly outside the array omitted), without a shard
    index; and those crc32c values. An unsharded chunk is one "inner chunk".

    ``source`` holds (at least) the chunk's region of the array, its element
    ``[0, 0, ...]`` being the array element ``origin``.
    """
    if layout.inner_shape is None:
        block = _block(source, origin, layout.chunk_region(index), layout.chunk_shape)
        view = _as_bytes_view(block)
        crc = crc32c(view)
        return [view, crc.to_bytes(4, "little")], [crc]
    slabs = _row_slabs(layout, layout.chunk_region(index), source, origin)
    if slabs is not None:
        return _encode_row_slabs(layout, index, source, origin, slabs)
    buffers: list[Any] = []
    crcs: list[int] = []
    for inner in layout.inner_indices():
        region = layout.inner_region(index, inner)
        if any(b <= a for a, b in region):
            continue
        view = _as_bytes_view(_block(source, origin, region, layout.inner_shape))
        crc = crc32c(view)
        buffers += [view, crc.to_bytes(4, "little")]
        crcs.append(crc)
    return buffers, crcs


def shard_index(layout: ArrayLayout, index: tuple[int, ...], base: int) -> bytes:
    """Index (and its crc32c) of the sharded chunk ``index`` whose present inner
    chunks are stored back to back from byte ``base`` on, in C order."""
    assert layout.inner_shape is not None
    table = np.full((int(np.prod(layout.inner_grid_shape)), 2), EMPTY, dtype="<u8")
    size = layout.inner_nbytes + 4
    offset = base
    for k, inner in enumerate(layout.inner_indices()):
        if layout.inner_present(index, inner):
            table[k] = (offset, size)
            offset += size
    raw = table.tobytes()
    return raw + _crc_bytes(raw)


def encode_chunk(
    layout: ArrayLayout, index: tuple[int, ...], source: np.ndarray, origin: tuple[int, ...]
) -> tuple[list[Any], list[int]]:
    """Buffers whose concatenation is the encoded chunk file ``index``, and the
    crc32c of its inner chunks in C order (see :func:`encode_piece`).

    A sharded chunk carries its index at the start or the end
    (``layout.index_location``).
    """
    buffers, crcs = encode_piece(layout, index, source, origin)
    if layout.inner_shape is None:
        return buffers, crcs
    if layout.index_location == "start":
        return [shard_index(layout, index, layout.index_nbytes), *buffers], crcs
    return [*buffers, shard_index(layout, index, 0)], crcs


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
) -> tuple[list[Any], list[int]]:
    """:func:`encode_piece` for row-slab inner chunks: slices of one view, same bytes."""
    assert layout.inner_shape is not None
    slab = layout.inner_nbytes
    n_full, rest = divmod(len(slabs), slab)
    buffers: list[Any] = []
    crcs: list[int] = []
    for k in range(n_full):
        view = slabs[k * slab : (k + 1) * slab]
        crc = crc32c(view)
        buffers += [view, crc.to_bytes(4, "little")]
        crcs.append(crc)
    if rest:  # inner chunk cut by the end of the array: zero-padded, like the general path
        region = layout.inner_region(index, (n_full,) + (0,) * (layout.ndim - 1))
        view = _as_bytes_view(_block(source, origin, region, layout.inner_shape))
        crc = crc32c(view)
        buffers += [view, crc.to_bytes(4, "little")]
        crcs.append(crc)
    return buffers, crcs


def expected_chunk_size(layout: ArrayLayout, index: tuple[int, ...]) -> int:
    """Exact size in bytes of the chunk file ``index`` as zarrckpt writes it."""
    if layout.inner_shape is None:
        return layout.chunk_nbytes + 4
    present = 0
    n_inner = 0
    for inner in layout.inner_indices():
        n_inner += 1
        if all(b > a for a, b in layout.inner_region(index, inner)):
            present += 1
    return present * (layout.inner_nbytes + 4) + n_inner * 16 + 4
