"""Chunk layout of one array: pure planning, no I/O.

An array is cut by a regular grid of *chunks* (``chunk_shape``); each chunk is
one file (one object). A chunk larger than ``inner_target_bytes`` uses zarr's
``sharding_indexed`` codec: it is cut into *inner chunks* (``inner_shape``,
which divides ``chunk_shape``), each carrying its own crc32c, so a reader can
fetch and verify only the inner chunks it needs. Inner chunks are row slabs
(split along dimension 0 first) so they are contiguous in C order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "ArrayLayout",
    "choose_layout",
    "split_rows",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_INNER_BYTES",
]

Shape = tuple[int, ...]
Region = tuple[tuple[int, int], ...]  # (start, stop) per dimension

#: target size of one chunk file when the caller does not impose a shard shape
DEFAULT_CHUNK_BYTES = 64 << 20
#: chunks larger than this are stored with the sharding codec and inner chunks of about this size
DEFAULT_INNER_BYTES = 1 << 20
#: blocks read independently from a shard file (dask chunks, DCP pieces) hold about this much
READ_BLOCK_BYTES = 64 << 20


def _prod(values: Sequence[int]) -> int:
    return math.prod(values) if values else 1


def _largest_divisor_at_most(n: int, limit: int) -> int:
    """Largest divisor of ``n`` that is <= ``limit`` (at least 1)."""
    if limit >= n:
        return n
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for cand in (d, n // d):
                if best < cand <= limit:
                    best = cand
    return best


def split_rows(shape: Shape, itemsize: int, target_bytes: int) -> Shape:
    """Chunk shape that cuts ``shape`` along dim 0 into pieces of about ``target_bytes``."""
    if not shape:
        return ()
    row_bytes = _prod(shape[1:]) * itemsize
    rows = max(1, target_bytes // max(1, row_bytes))
    return (max(1, min(shape[0], rows)),) + tuple(max(1, s) for s in shape[1:])


def choose_inner_shape(chunk_shape: Shape, itemsize: int, target_bytes: int) -> Shape | None:
    """Inner chunk shape for a chunk, or None when the chunk should not be sharded.

    Row slabs are preferred: dimension 0 is cut first, by the largest divisor of
    the chunk's extent that keeps an inner chunk within ``target_bytes``; only if
    a single row is still too large is dimension 1 cut, and so on. When no
    divisor gives inner chunks of at least ``target_bytes / 64`` (awkward prime
    extents), the chunk stays unsharded.
    """
    nbytes = _prod(chunk_shape) * itemsize
    if not chunk_shape or nbytes <= target_bytes:
        return None
    inner = list(chunk_shape)
    for dim in range(len(inner)):
        rest = _prod(inner[dim + 1 :]) * itemsize
        limit = max(1, target_bytes // rest) if rest else inner[dim]
        inner[dim] = _largest_divisor_at_most(chunk_shape[dim], limit)
        if _prod(inner) * itemsize <= target_bytes:
            break
    if _prod(inner) * itemsize * 64 < target_bytes or tuple(inner) == tuple(chunk_shape):
        return None
    return tuple(inner)


@dataclass(frozen=True)
class ArrayLayout:
    """Regular chunk grid (and optional inner grid) of one array."""

    shape: Shape
    chunk_shape: Shape
    inner_shape: Shape | None
    itemsize: int
    #: chunk key separator: ``/`` (format 1 and 2) or ``.`` (format 3)
    separator: str = "/"
    #: where a sharded chunk keeps its index: ``end`` (format 1 and 2) or ``start`` (format 3)
    index_location: str = "end"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __post_init__(self) -> None:
        # derived grids, computed once (layouts are immutable and consulted per chunk)
        grid = tuple(-(-s // c) for s, c in zip(self.shape, self.chunk_shape, strict=True))
        inner = (
            tuple(1 for _ in self.shape)
            if self.inner_shape is None
            else tuple(c // i for c, i in zip(self.chunk_shape, self.inner_shape, strict=True))
        )
        object.__setattr__(self, "_grid", grid)
        object.__setattr__(self, "_inner_grid", inner)

    @property
    def grid_shape(self) -> Shape:
        """Number of chunks along each dimension."""
        return self._grid  # type: ignore[attr-defined,no-any-return]

    @property
    def inner_grid_shape(self) -> Shape:
        """Number of inner chunks per chunk along each dimension."""
        return self._inner_grid  # type: ignore[attr-defined,no-any-return]

    @property
    def chunk_nbytes(self) -> int:
        return _prod(self.chunk_shape) * self.itemsize

    @property
    def inner_nbytes(self) -> int:
        return _prod(self.inner_shape or self.chunk_shape) * self.itemsize

    def chunk_indices(self) -> Iterator[Shape]:
        """Every chunk index of the grid (none for arrays with a zero dimension)."""
        return itertools.product(*(range(g) for g in self.grid_shape))

    def chunk_region(self, index: Shape) -> Region:
        """Part of the array covered by chunk ``index``, clipped to the array bounds."""
        return tuple(
            (i * c, min((i + 1) * c, s))
            for i, c, s in zip(index, self.chunk_shape, self.shape, strict=True)
        )

    def chunk_key(self, index: Shape) -> str:
        """Store key of chunk ``index`` relative to the array (zarr's default chunk key
        encoding with :attr:`separator`: ``c/0/1`` or ``c.0.1``; ``c`` for a 0-d array)."""
        return self.separator.join(["c", *map(str, index)])

    def read_block_shape(self, target_bytes: int | None = None) -> Shape:
        """Shape of the blocks to read independently (dask chunks, DCP pieces): the
        chunk shape, or for a sharded chunk whole inner chunks grouped along
        dimension 0 up to about ``target_bytes`` (default :data:`READ_BLOCK_BYTES`;
        never past the chunk)."""
        if self.inner_shape is None or not self.shape:
            return self.chunk_shape
        target = READ_BLOCK_BYTES if target_bytes is None else target_bytes
        k = max(1, target // max(1, self.inner_nbytes))
        rows = min(self.chunk_shape[0], self.inner_shape[0] * k)
        return (rows, *self.inner_shape[1:])

    def block_regions(self, target_bytes: int | None = None) -> list[Region]:
        """Regions of the :meth:`read_block_shape` grid, clipped to the array (none for
        an array with a zero dimension)."""
        block = self.read_block_shape(target_bytes) if self.shape else ()
        ranges = [range(0, s, b) for s, b in zip(self.shape, block, strict=True)]
        return [
            tuple((a, min(a + b, s)) for a, b, s in zip(starts, block, self.shape, strict=True))
            for starts in itertools.product(*ranges)
        ]

    @property
    def index_nbytes(self) -> int:
        """Size of a sharded chunk's index (16 bytes per inner chunk and a crc32c)."""
        return _prod(self.inner_grid_shape) * 16 + 4

    def inner_present(self, chunk_index: Shape, inner_index: Shape) -> bool:
        """Whether an inner chunk lies (at least partly) inside the array."""
        return all(b > a for a, b in self.inner_region(chunk_index, inner_index))

    @property
    def crc_table_size(self) -> int:
        """Entries of the manifest's crc32c table: one per inner chunk position of
        every chunk (one per chunk when the array is not sharded)."""
        return _prod(self.grid_shape) * _prod(self.inner_grid_shape)

    def crc_position(self, chunk_index: Shape, inner_index: Shape | None = None) -> int:
        """Position of an inner chunk (or of a plain chunk) in the crc32c table: chunks
        in C order, and within a chunk its inner chunks in C order."""
        chunk = 0
        for i, g in zip(chunk_index, self.grid_shape, strict=True):
            chunk = chunk * g + i
        inner = 0
        if inner_index is not None:
            for i, g in zip(inner_index, self.inner_grid_shape, strict=True):
                inner = inner * g + i
        return chunk * _prod(self.inner_grid_shape) + inner

    def inner_indices(self) -> Iterator[Shape]:
        """Every inner chunk index within one chunk, in C order (the index order)."""
        return itertools.product(*(range(g) for g in self.inner_grid_shape))

    def inner_region(self, chunk_index: Shape, inner_index: Shape) -> Region:
        """Array region of one inner chunk, clipped to the array (may be empty)."""
        inner = self.inner_shape or self.chunk_shape
        return tuple(
            (
                min(ci * c + ii * n, s),
                min(ci * c + (ii + 1) * n, s),
            )
            for ci, ii, c, n, s in zip(
                chunk_index, inner_index, self.chunk_shape, inner, self.shape, strict=True
            )
        )

    def chunks_overlapping(self, region: Region) -> Iterator[Shape]:
        """Chunk indices whose region intersects ``region`` (a (start, stop) per dim)."""
        if any(stop <= start for start, stop in region):
            return iter(())
        ranges = [
            range(start // c, -(-stop // c))
            for (start, stop), c in zip(region, self.chunk_shape, strict=True)
        ]
        return itertools.product(*ranges)

    def to_json_codecs(self, zarr_name: str) -> list[dict[str, object]]:
        """The zarr v3 ``codecs`` list for this layout."""
        endian: dict[str, object] = (
            {"name": "bytes"}
            if self.itemsize == 1
            else {"name": "bytes", "configuration": {"endian": "little"}}
        )
        plain: list[dict[str, object]] = [endian, {"name": "crc32c"}]
        if self.inner_shape is None:
            return plain
        return [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": list(self.inner_shape),
                    "codecs": plain,
                    "index_codecs": [
                        {"name": "bytes", "configuration": {"endian": "little"}},
                        {"name": "crc32c"},
                    ],
                    "index_location": self.index_location,
                },
            }
        ]


def choose_layout(
    shape: Shape,
    itemsize: int,
    *,
    chunk_shape: Shape | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    inner_bytes: int = DEFAULT_INNER_BYTES,
) -> ArrayLayout:
    """Pick the layout of an array.

    Parameters
    ----------
    shape
        Global shape of the tensor.
    itemsize
        Bytes per element.
    chunk_shape
        Imposed chunk shape (the per-rank shard shape in distributed saves);
        by default row slabs of about ``chunk_bytes``.
    chunk_bytes, inner_bytes
        Size targets for chunk files and inner chunks.
    """
    if chunk_shape is None:
        chunk_shape = split_rows(shape, itemsize, chunk_bytes)
    chunk_shape = tuple(max(1, c) for c in chunk_shape)
    inner = choose_inner_shape(chunk_shape, itemsize, inner_bytes)
    return ArrayLayout(tuple(shape), chunk_shape, inner, itemsize)


def layout_from_codecs(
    shape: Shape,
    chunk_shape: Shape,
    codecs: list[dict[str, object]],
    itemsize: int,
    separator: str = "/",
) -> ArrayLayout:
    """Rebuild the layout from a zarr.json ``codecs`` list written by zarrckpt."""
    inner: Shape | None = None
    index_location = "end"
    if codecs and codecs[0].get("name") == "sharding_indexed":
        config = codecs[0]["configuration"]
        if not isinstance(config, dict):
            raise TypeError(f"sharding_indexed configuration is {type(config).__name__}")
        inner = tuple(config["chunk_shape"])
        index_location = str(config.get("index_location", "end"))
    return ArrayLayout(
        tuple(shape), tuple(chunk_shape), inner, itemsize, separator, index_location
    )
