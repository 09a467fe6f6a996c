"""Pieces held by all ranks -> chunk grid and one writer per chunk (pure, no I/O).

Rules (docs/format.md, "Distributed layout"):

* Whole tensors held by every rank (plain tensors, fully replicated DTensors)
  are cut into row slabs of about ``chunk_bytes``; the chunks are spread over
  the ranks, least-loaded rank first, so replicas are written once and the
  write load is shared.
* Sharded tensors: when the distinct pieces of all ranks form a regular grid
  (each piece exactly one cell, edge cells clipped, as ``torch.chunk`` and
  DTensor ``Shard`` produce), the chunk shape is the piece shape.
* Otherwise (strided or nested sharding) the chunk grid is the finest common
  regular grid: along each dimension, the gcd of all piece boundaries. Every
  chunk then lies inside exactly one piece.
* Each chunk gets one writer: among the ranks holding the piece that contains
  it, the least loaded so far. Never two writers in one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import UnsupportedValueError
from ..format._layout import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_INNER_BYTES,
    ArrayLayout,
    Region,
    choose_layout,
)

__all__ = ["ArrayPieces", "ArrayPlan", "plan_arrays", "regular_chunk_shape"]


@dataclass(frozen=True)
class ArrayPieces:
    """Pieces of one global tensor held by each rank.

    ``pieces[rank]`` lists the regions that rank holds (empty regions omitted).
    ``replicated`` marks a tensor that every rank holds whole.
    """

    fqn: str
    shape: tuple[int, ...]
    itemsize: int
    pieces: tuple[tuple[Region, ...], ...]
    replicated: bool = False


@dataclass
class ArrayPlan:
    """Layout of one array and the writer of each of its chunks."""

    fqn: str
    layout: ArrayLayout
    #: chunk index -> (writer rank, index of the piece in that rank's list)
    writers: dict[tuple[int, ...], tuple[int, int]] = field(default_factory=dict)


def _volume(region: Region) -> int:
    return math.prod(b - a for a, b in region) if region else 1


def regular_chunk_shape(
    shape: tuple[int, ...], regions: Sequence[Region]
) -> tuple[int, ...] | None:
    """Chunk shape if ``regions`` are exactly the cells of a regular grid over ``shape``."""
    if not regions:
        return None
    chunk = []
    for dim, size in enumerate(shape):
        starts = sorted({r[dim][0] for r in regions})
        step = starts[1] - starts[0] if len(starts) > 1 else size
        if starts[0] != 0 or step <= 0:
            return None
        if starts != list(range(0, size, step)):
            return None
        chunk.append(step)
    cells = {tuple((a, b) for a, b in r) for r in regions}
    for region in cells:
        for dim, (a, b) in enumerate(region):
            if a % chunk[dim] or b != min(a + chunk[dim], shape[dim]):
                return None
    expected = math.prod(-(-s // c) for s, c in zip(shape, chunk, strict=True))
    if len(cells) != expected:
        return None
    return tuple(chunk)


def _common_grid(shape: tuple[int, ...], regions: Sequence[Region]) -> tuple[int, ...]:
    chunk = []
    for dim, size in enumerate(shape):
        g = 0
        for r in regions:
            for bound in r[dim]:
                if 0 < bound < size:
                    g = math.gcd(g, bound)
        chunk.append(g or max(1, size))
    return tuple(chunk)


def _contains(outer: Region, inner: Region) -> bool:
    return all(oa <= ia and ib <= ob for (oa, ob), (ia, ib) in zip(outer, inner, strict=True))


def plan_arrays(
    arrays: Sequence[ArrayPieces],
    world_size: int,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    inner_bytes: int = DEFAULT_INNER_BYTES,
) -> list[ArrayPlan]:
    """Plan every array; the result is the same on every rank given the same input.

    Raises
    ------
    UnsupportedValueError
        The pieces overlap inconsistently or leave part of a tensor uncovered.
    """
    load = [0] * world_size
    plans = []
    for arr in arrays:
        plans.append(_plan_one(arr, world_size, load, chunk_bytes, inner_bytes))
    return plans


def _least_loaded(ranks: Sequence[int], load: list[int]) -> int:
    return min(ranks, key=lambda r: (load[r], r))


def _plan_one(
    arr: ArrayPieces, world_size: int, load: list[int], chunk_bytes: int, inner_bytes: int
) -> ArrayPlan:
    shape = arr.shape
    full: Region = tuple((0, s) for s in shape)
    holders = [r for r in range(world_size) if arr.pieces[r]]
    if arr.replicated or all(len(arr.pieces[r]) == 1 and arr.pieces[r][0] == full for r in holders):
        layout = choose_layout(
            shape, arr.itemsize, chunk_bytes=chunk_bytes, inner_bytes=inner_bytes
        )
        plan = ArrayPlan(arr.fqn, layout)
        if not holders:
            if _volume(full):
                raise UnsupportedValueError(f"no rank holds any part of tensor {arr.fqn!r}")
            return plan
        for index in layout.chunk_indices():
            rank = _least_loaded(holders, load)
            plan.writers[index] = (rank, 0)
            load[rank] += layout.chunk_nbytes
        return plan

    distinct: dict[Region, list[tuple[int, int]]] = {}
    for rank in range(world_size):
        for k, region in enumerate(arr.pieces[rank]):
            distinct.setdefault(tuple(region), []).append((rank, k))
    regions = list(distinct)
    chunk_shape = regular_chunk_shape(shape, regions) or _common_grid(shape, regions)
    layout = choose_layout(shape, arr.itemsize, chunk_shape=chunk_shape, inner_bytes=inner_bytes)
    plan = ArrayPlan(arr.fqn, layout)
    covered = 0
    for index in layout.chunk_indices():
        cell = layout.chunk_region(index)
        owners = [h for region, hs in distinct.items() if _contains(region, cell) for h in hs]
        if not owners:
            raise UnsupportedValueError(
                f"tensor {arr.fqn!r}: no rank holds the region {cell} as part of one piece "
                f"(pieces: {regions[:8]}{' ...' if len(regions) > 8 else ''}); the shards "
                "overlap or leave gaps"
            )
        rank, k = min(owners, key=lambda h: (load[h[0]], h[0]))
        plan.writers[index] = (rank, k)
        load[rank] += layout.chunk_nbytes
        covered += _volume(cell)
    if covered != _volume(full):  # pragma: no cover - grid cells tile the array
        raise UnsupportedValueError(f"tensor {arr.fqn!r}: chunk grid does not tile the array")
    return plan
