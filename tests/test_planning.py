"""Pure planning logic, without processes: which indices a DTensor rank holds,
chunk grids, one writer per chunk, layouts."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

from zarrckpt.errors import UnsupportedValueError
from zarrckpt.format._layout import choose_inner_shape, choose_layout
from zarrckpt.parallel._planning import ArrayPieces, plan_arrays, regular_chunk_shape
from zarrckpt.parallel._sharding import _chunk_range, _split_indices, dtensor_runs, index_runs


@dataclass
class FakeMesh:
    """What dtensor_runs asks of a DeviceMesh: its shape and this rank's coordinate."""

    shape: tuple[int, ...]
    coordinate: list[int] | None

    def get_coordinate(self) -> list[int] | None:
        return self.coordinate

    def size(self, mesh_dim: int) -> int:
        return self.shape[mesh_dim]


@pytest.mark.parametrize("n", range(0, 23))
@pytest.mark.parametrize("parts", range(1, 8))
def test_chunk_range_cuts_like_torch_chunk(n: int, parts: int) -> None:
    pieces = list(torch.chunk(torch.arange(n), parts)) if n else []
    for index in range(parts):
        lo, hi = _chunk_range(0, n, parts, index)
        expected = pieces[index].tolist() if index < len(pieces) else []
        assert list(range(lo, hi)) == expected


_placement = st.sampled_from(["R", "S0", "S1", "SS0", "SS1"])


def _make(code: str) -> object:
    if code == "R":
        return Replicate()
    if code.startswith("SS"):
        return _StridedShard(int(code[2]), split_factor=2)
    return Shard(int(code[1]))


def _cuts(placements: list, dim: int) -> list:
    return [
        (mesh_dim, p)
        for mesh_dim, p in enumerate(placements)
        if isinstance(p, (Shard, _StridedShard)) and p.dim == dim
    ]


@settings(max_examples=200, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 17), st.integers(0, 9)),
    mesh_shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    codes=st.lists(_placement, min_size=3, max_size=3),
)
def test_runs_partition_every_dimension(shape, mesh_shape, codes) -> None:
    """Over all ranks of the mesh, the held indices of each dimension cover it
    exactly as often as the mesh dims that do not cut it replicate it, and a
    dimension cut only by Shard placements is one contiguous run per rank."""
    placements = [_make(c) for c in codes[: len(mesh_shape)]]
    counts = [[0] * size for size in shape]
    for coordinate in itertools.product(*(range(m) for m in mesh_shape)):
        runs = dtensor_runs(shape, FakeMesh(mesh_shape, list(coordinate)), placements)
        assert runs is not None
        for dim, dim_runs in enumerate(runs):
            if not any(isinstance(p, _StridedShard) for _, p in _cuts(placements, dim)):
                assert len(dim_runs) <= 1
            held = 0
            for local, start, length in dim_runs:
                assert local == held  # runs tile the local tensor in order
                held += length
                for g in range(start, start + length):
                    counts[dim][g] += 1
    for dim, size in enumerate(shape):
        cut_by = {mesh_dim for mesh_dim, _ in _cuts(placements, dim)}
        copies = math.prod(m for d, m in enumerate(mesh_shape) if d not in cut_by)
        assert counts[dim] == [copies] * size


@settings(max_examples=200, deadline=None)
@given(
    shape=st.tuples(st.integers(0, 17), st.integers(0, 9)),
    mesh_shape=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    codes=st.lists(st.sampled_from(["R", "S0", "S1"]), min_size=3, max_size=3),
    data=st.data(),
)
def test_shard_arithmetic_matches_dtensor_split_rules(shape, mesh_shape, codes, data) -> None:
    """The arithmetic path gives exactly the indices DTensor's own split rules
    give when applied to arange (Shard, nested Shard, Replicate)."""
    placements = [_make(c) for c in codes[: len(mesh_shape)]]
    coordinate = [data.draw(st.integers(0, m - 1)) for m in mesh_shape]
    mesh = FakeMesh(mesh_shape, coordinate)
    runs = dtensor_runs(shape, mesh, placements)
    assert runs is not None
    for dim, size in enumerate(shape):
        reference = _split_indices(size, mesh, coordinate, _cuts(placements, dim))
        assert runs[dim] == index_runs(reference)


def test_a_rank_outside_the_mesh_holds_nothing() -> None:
    assert dtensor_runs((4, 4), FakeMesh((2,), None), [Shard(0)]) is None


def _shard_regions(shape: tuple[int, int], world: int) -> tuple[tuple, ...]:
    out = []
    for r in range(world):
        lo, hi = _chunk_range(0, shape[0], world, r)
        out.append((((lo, hi), (0, shape[1])),) if hi > lo else ())
    return tuple(out)


@pytest.mark.parametrize("rows,world", [(16, 4), (13, 4), (3, 4), (7, 2)])
def test_regular_shards_become_the_chunks(rows: int, world: int) -> None:
    shape = (rows, 5)
    pieces = _shard_regions(shape, world)
    (plan,) = plan_arrays([ArrayPieces("w", shape, 4, pieces)], world)
    assert plan.layout.chunk_shape == (-(-rows // world), 5)
    for index, (rank, k) in plan.writers.items():
        # the writer holds exactly this chunk as its piece k
        assert pieces[rank][k] == plan.layout.chunk_region(index)
    assert len(plan.writers) == len({p for ps in pieces for p in ps})


def test_replicas_are_written_once_and_spread_over_ranks() -> None:
    full = (((0, 64), (0, 4)),)
    arrays = [ArrayPieces(f"t{i}", (64, 4), 4, (full,) * 4, replicated=True) for i in range(8)]
    plans = plan_arrays(arrays, 4, chunk_bytes=256)
    writers = [w for p in plans for w in p.writers.values()]
    assert len(writers) == sum(math.prod(p.layout.grid_shape) for p in plans)
    per_rank = [sum(1 for r, _ in writers if r == rank) for rank in range(4)]
    assert max(per_rank) - min(per_rank) <= 1


def test_strided_pieces_use_the_finest_common_grid() -> None:
    # rank 0 holds rows [0, 2) and [4, 6); rank 1 holds [2, 4) and [6, 8)
    pieces = (
        (((0, 2), (0, 3)), ((4, 6), (0, 3))),
        (((2, 4), (0, 3)), ((6, 8), (0, 3))),
    )
    (plan,) = plan_arrays([ArrayPieces("w", (8, 3), 4, pieces)], 2)
    assert plan.layout.chunk_shape == (2, 3)
    for index, (rank, k) in plan.writers.items():
        cell = plan.layout.chunk_region(index)
        (a, b), _ = pieces[rank][k]
        assert a <= cell[0][0] and cell[0][1] <= b


def test_gaps_are_refused() -> None:
    pieces = ((((0, 2), (0, 3)),), (((4, 8), (0, 3)),))  # rows 2..4 held by nobody
    with pytest.raises(UnsupportedValueError, match="no rank holds"):
        plan_arrays([ArrayPieces("w", (8, 3), 4, pieces)], 2)


def test_regular_chunk_shape_refuses_irregular_cells() -> None:
    assert regular_chunk_shape((8,), [((0, 4),), ((4, 8),)]) == (4,)
    assert regular_chunk_shape((8,), [((0, 3),), ((3, 8),)]) is None
    assert regular_chunk_shape((8,), [((0, 2),), ((4, 6),)]) is None


@pytest.mark.parametrize(
    "chunk,itemsize,target",
    [((4096, 1024), 4, 1 << 20), ((1000, 3), 8, 4096), ((7, 1 << 20), 1, 1 << 20), ((65,), 4, 16)],
)
def test_inner_chunks_are_row_slabs_that_divide_the_chunk(chunk, itemsize, target) -> None:
    inner = choose_inner_shape(chunk, itemsize, target)
    if inner is None:
        return
    assert all(c % i == 0 for c, i in zip(chunk, inner, strict=True))
    assert math.prod(inner) * itemsize <= target
    cut = [d for d, (c, i) in enumerate(zip(chunk, inner, strict=True)) if c != i]
    assert cut == list(range(len(cut)))  # leading dimensions are cut first


def test_small_arrays_are_one_plain_chunk() -> None:
    layout = choose_layout((4096,), 4)
    assert layout.chunk_shape == (4096,) and layout.inner_shape is None
    assert list(layout.chunk_indices()) == [(0,)]
    assert list(itertools.islice(choose_layout((0, 3), 4).chunk_indices(), 1)) == []
