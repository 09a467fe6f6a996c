"""Where each written piece of an array goes (format 3): pure planning, no I/O.

A save cuts every array into *pieces* (the planner's write units: a rank's
shard, or a row slab of a replicated tensor), each written by one rank, each
possibly cut into *inner chunks* (row slabs of about 1 MiB) so that a reader
fetches only what it needs. :func:`plan_storage` maps pieces to the files of
the zarr array:

* ``"shard"`` (shared POSIX storage): the whole array is one zarr chunk stored
  with the ``sharding_indexed`` codec, index at the start. Its inner chunks are
  the pieces' inner chunks (or the pieces themselves). Every piece has a
  planned byte offset in that one file; the ranks write their pieces there in
  place, and the rank writing the first piece writes the index, which depends
  on the plan only. A piece whose writer differs from the writer of the bytes
  just before it starts at a multiple of :data:`PAGE_BYTES`, so no two writers
  ever share a page. An array of one piece without inner chunks is a plain
  chunk (one file, no index).
* ``"pieces"`` (object stores: no two writers in one object): every piece is
  its own zarr chunk (one object), sharded by itself when it has inner chunks.

Either way chunk keys use the ``.`` separator, so an array is its directory,
its ``zarr.json`` and its chunk file(s), and every inner chunk has a position
in the manifest's crc32c table (:meth:`ArrayLayout.crc_position`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ._codec import EMPTY, crc32c
from ._layout import ArrayLayout, Shape

__all__ = ["PAGE_BYTES", "StoredArray", "plan_storage", "PieceTarget"]

#: pieces of different writers never share a page of this size in a shard file
PAGE_BYTES = 4096


@dataclass(frozen=True)
class PieceTarget:
    """Where one piece is written: chunk ``chunk`` (its key below the array is
    ``key``), at byte ``offset`` (shard files; None: the piece is the whole chunk
    file), its inner chunks at crc table ``positions`` (in storage order)."""

    key: str
    chunk: Shape
    offset: int | None
    positions: tuple[int, ...]


def _align(offset: int) -> int:
    return -(-offset // PAGE_BYTES) * PAGE_BYTES


@dataclass(frozen=True)
class StoredArray:
    """How the pieces of one array are stored.

    ``pieces`` is the write-unit grid (``chunk_shape`` a piece, ``inner_shape``
    its inner chunks or None), ``layout`` the zarr layout (what ``zarr.json``
    says), ``mode`` ``"shard"``, ``"plain"`` or ``"pieces"``; in ``"shard"``
    mode ``offsets`` gives each piece's byte offset in the shard file and
    ``index_writer`` the rank writing its index.
    """

    pieces: ArrayLayout
    layout: ArrayLayout
    mode: str
    offsets: Mapping[Shape, int]
    index_writer: int = 0

    @property
    def shard_size(self) -> int:
        """Size of the shard file (``"shard"`` mode)."""
        ends = [self.offsets[p] + self.piece_nbytes(p) for p in self.offsets]
        return max([self.layout.index_nbytes, *ends])

    def piece_inner(self, piece: Shape) -> list[Shape]:
        """Inner chunks of ``piece`` (indices within the piece) that lie inside the
        array, in storage (C) order."""
        if self.pieces.inner_shape is None:
            return [tuple(0 for _ in piece)]
        return [
            inner
            for inner in self.pieces.inner_indices()
            if self.pieces.inner_present(piece, inner)
        ]

    def piece_nbytes(self, piece: Shape) -> int:
        """Encoded size of a piece's inner chunks (each with its crc32c), without any index."""
        return len(self.piece_inner(piece)) * (self.pieces.inner_nbytes + 4)

    def _shard_inner(self, piece: Shape, inner: Shape) -> Shape:
        """Index in the shard's inner grid of inner chunk ``inner`` of ``piece``."""
        per_piece = self.pieces.inner_grid_shape
        return tuple(p * n + i for p, n, i in zip(piece, per_piece, inner, strict=True))

    def target(self, piece: Shape) -> PieceTarget:
        """Where piece ``piece`` is written."""
        layout = self.layout
        if self.mode == "shard":
            chunk = tuple(0 for _ in piece)
            positions = tuple(
                layout.crc_position(chunk, self._shard_inner(piece, inner))
                for inner in self.piece_inner(piece)
            )
            return PieceTarget(layout.chunk_key(chunk), chunk, self.offsets[piece], positions)
        if layout.inner_shape is None:
            return PieceTarget(layout.chunk_key(piece), piece, None, (layout.crc_position(piece),))
        positions = tuple(
            layout.crc_position(piece, inner) for inner in self.piece_inner(piece)
        )
        return PieceTarget(layout.chunk_key(piece), piece, None, positions)

    def index_bytes(self) -> bytes:
        """The shard index (``"shard"`` mode): ``(offset, nbytes)`` per inner chunk of
        the shard in C order (``2**64 - 1`` twice for one outside the array), little
        endian uint64, followed by its crc32c."""
        layout = self.layout
        table = np.full((int(np.prod(layout.inner_grid_shape)), 2), EMPTY, dtype="<u8")
        size = self.pieces.inner_nbytes + 4
        chunk = tuple(0 for _ in layout.shape)
        for piece, offset in self.offsets.items():
            for k, inner in enumerate(self.piece_inner(piece)):
                pos = layout.crc_position(chunk, self._shard_inner(piece, inner))
                table[pos] = (offset + k * size, size)
        raw = table.tobytes()
        return raw + crc32c(raw).to_bytes(4, "little")


def _pieces_layout(pieces: ArrayLayout) -> ArrayLayout:
    return ArrayLayout(
        pieces.shape, pieces.chunk_shape, pieces.inner_shape, pieces.itemsize, ".", "start"
    )


def plan_storage(
    pieces: ArrayLayout, writers: Mapping[Shape, int] | None = None, *, shared_files: bool = True
) -> StoredArray:
    """Plan the files of one array.

    Parameters
    ----------
    pieces
        The write-unit grid (see :class:`StoredArray`).
    writers
        Writer rank of each piece (default: rank 0 writes everything). Every rank
        must pass the same mapping: the offsets depend on it.
    shared_files
        Whether several ranks may write one file (POSIX storage): ``"shard"``
        mode; otherwise ``"pieces"``.
    """
    writers = writers or {}
    grid = list(pieces.chunk_indices())
    empty = any(s == 0 for s in pieces.shape)
    if not shared_files or empty or (len(grid) == 1 and pieces.inner_shape is None):
        mode = "pieces" if not shared_files else "plain"
        return StoredArray(pieces, _pieces_layout(pieces), mode, {})
    inner = pieces.inner_shape or pieces.chunk_shape
    shard_shape = tuple(-(-s // i) * i for s, i in zip(pieces.shape, inner, strict=True))
    layout = ArrayLayout(pieces.shape, shard_shape, inner, pieces.itemsize, ".", "start")
    probe = StoredArray(pieces, layout, "shard", {})
    offsets: dict[Shape, int] = {}
    used = [p for p in grid if probe.piece_inner(p) and _inside(pieces, p)]
    index_writer = writers.get(used[0], 0) if used else 0
    position = layout.index_nbytes
    last_writer = index_writer
    for piece in used:
        writer = writers.get(piece, 0)
        if writer != last_writer:
            position = _align(position)
        offsets[piece] = position
        position += probe.piece_nbytes(piece)
        last_writer = writer
    return StoredArray(pieces, layout, "shard", offsets, index_writer)


def _inside(pieces: ArrayLayout, piece: Shape) -> bool:
    return all(b > a for a, b in pieces.chunk_region(piece))


def storage_positions(stored: StoredArray) -> list[int]:
    """Every crc table position that a complete save fills (for checks and tests)."""
    return sorted(
        itertools.chain.from_iterable(
            stored.target(p).positions
            for p in stored.pieces.chunk_indices()
            if _inside(stored.pieces, p)
        )
    )
