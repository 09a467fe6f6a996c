"""What part of each global tensor this rank holds (no communication, no I/O).

A leaf is a plain ``torch.Tensor`` (the whole tensor, on every rank that
saves it), a ``DTensor`` (any placements: ``Shard``, ``_StridedShard``,
``Replicate``; ``Partial`` is refused) or an FSDP1 ``ShardedTensor``. Each
is described as a list of :class:`Block`: rectangular regions of the global
tensor together with the local tensor slice that holds them.

For a DTensor the global indices held along every dimension are runs of
consecutive indices. A dimension cut only by ``Shard`` placements (left to
right over the mesh dimensions, as DTensor does; ``torch.chunk`` bounds)
holds one run, computed arithmetically; a dimension with a ``_StridedShard``
is resolved by applying the placements' own split rules to ``arange(size)``,
where it shows up as several runs, each run one block.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnsupportedValueError
from ..format._layout import Region

__all__ = ["Block", "LocalView", "describe_leaf", "is_tensor_leaf", "index_runs", "dtensor_runs"]


@dataclass(frozen=True)
class Block:
    """A rectangular region of the global tensor held in ``tensor[local]``."""

    region: Region
    tensor: torch.Tensor
    local: tuple[slice, ...]

    def data(self) -> torch.Tensor:
        return self.tensor[self.local] if self.local else self.tensor


@dataclass
class LocalView:
    """This rank's view of one global tensor."""

    global_shape: tuple[int, ...]
    dtype: torch.dtype
    blocks: list[Block]
    #: a plain tensor: every saving rank holds all of it
    replicated: bool
    kind: str  # "tensor", "dtensor", "sharded_tensor"
    #: JSON description of the sharding at save time (for inspection)
    sharding: dict[str, Any] = field(default_factory=dict)


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def _sharded_tensor_type() -> Any:
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor
    except ImportError:  # pragma: no cover
        return None
    return ShardedTensor


def is_tensor_leaf(value: Any) -> bool:
    """True for torch.Tensor, DTensor and ShardedTensor leaves."""
    if isinstance(value, torch.Tensor):
        return True
    st = _sharded_tensor_type()
    return st is not None and isinstance(value, st)


def index_runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """Split global indices (in local order) into runs ``(local_start, global_start, length)``."""
    runs: list[tuple[int, int, int]] = []
    for local, g in enumerate(indices):
        if runs and runs[-1][1] + runs[-1][2] == g and runs[-1][0] + runs[-1][2] == local:
            ls, gs, n = runs[-1]
            runs[-1] = (ls, gs, n + 1)
        else:
            runs.append((local, g, 1))
    return runs


Run = tuple[int, int, int]  # (local_start, global_start, length)


def _blocks_from_runs(tensor: torch.Tensor, runs: list[list[Run]]) -> list[Block]:
    if any(not r for r in runs):
        return []
    blocks = []
    for combo in itertools.product(*runs):
        region = tuple((gs, gs + n) for _, gs, n in combo)
        local = tuple(slice(ls, ls + n) for ls, _, n in combo)
        blocks.append(Block(region, tensor, local))
    return blocks


def _chunk_range(start: int, stop: int, parts: int, index: int) -> tuple[int, int]:
    """Piece ``index`` of ``range(start, stop)`` cut like ``torch.chunk`` (ceil(n / parts)
    per piece; trailing pieces may be short or empty), as DTensor's ``Shard`` cuts."""
    size = -(-(stop - start) // parts) if stop > start else 0
    lo = min(stop, start + index * size)
    return lo, min(stop, lo + size)


def dtensor_runs(
    global_shape: tuple[int, ...], mesh: Any, placements: Any
) -> list[list[Run]] | None:
    """Runs of global indices this rank holds along each dimension (None: not in the mesh).

    A dimension cut only by ``Shard`` placements (any nesting) holds one
    contiguous range, computed arithmetically; a dimension with a
    ``_StridedShard`` is resolved by applying the placements' own split rules
    to ``arange(size)``, where it shows up as several runs.
    """
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    runs: list[list[Run]] = []
    for dim, size in enumerate(global_shape):
        cuts = [
            (mesh_dim, p)
            for mesh_dim, p in enumerate(placements)
            if isinstance(p, (Shard, _StridedShard)) and p.dim == dim
        ]
        if any(isinstance(p, _StridedShard) for _, p in cuts):
            runs.append(index_runs(_split_indices(size, mesh, coordinate, cuts)))
            continue
        lo, hi = 0, size
        for mesh_dim, _ in cuts:
            lo, hi = _chunk_range(lo, hi, mesh.size(mesh_dim), coordinate[mesh_dim])
        runs.append([(0, lo, hi - lo)] if hi > lo else [])
    return runs


def _split_indices(size: int, mesh: Any, coordinate: list[int], cuts: list[Any]) -> list[int]:
    """Global indices held along one dimension, by DTensor's own split rules."""
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    idx = torch.arange(size)
    for mesh_dim, placement in cuts:
        along0: Any
        if isinstance(placement, _StridedShard):
            along0 = _StridedShard(0, split_factor=placement.split_factor)
        else:
            along0 = Shard(0)
        pieces, _ = along0._split_tensor(
            idx, mesh.size(mesh_dim), with_padding=False, contiguous=False
        )
        idx = pieces[coordinate[mesh_dim]]
    return [int(i) for i in idx.tolist()]


def describe_leaf(value: Any, *, key: str, path: str) -> LocalView:
    """Describe the part of ``value`` this rank holds.

    Raises
    ------
    UnsupportedValueError
        A DTensor with a ``Partial`` placement (reduce it first).
    """
    dtensor = _dtensor_type()
    sharded = _sharded_tensor_type()
    if dtensor is not None and isinstance(value, dtensor):
        placements = tuple(value.placements)
        for p in placements:
            if p.is_partial():
                raise UnsupportedValueError(
                    f"DTensor {key!r} for checkpoint {path!r} has a Partial placement "
                    f"({placements}); reduce it (e.g. .redistribute(placements=[Replicate()])) "
                    "before saving"
                )
        local = value._local_tensor
        shape = tuple(value.shape)
        runs = dtensor_runs(shape, value.device_mesh, placements)
        blocks: list[Block] = []
        if runs is not None:
            expected = tuple(sum(n for _, _, n in r) for r in runs)
            if tuple(local.shape) != expected:
                raise UnsupportedValueError(
                    f"DTensor {key!r} for checkpoint {path!r}: local tensor has shape "
                    f"{tuple(local.shape)}, but placements {placements} on mesh "
                    f"{tuple(value.device_mesh.shape)} give {expected}"
                )
            blocks = _blocks_from_runs(local, runs)
        return LocalView(
            shape,
            value.dtype,
            blocks,
            replicated=False,
            kind="dtensor",
            sharding={
                "mesh_shape": list(value.device_mesh.shape),
                "mesh_dim_names": list(value.device_mesh.mesh_dim_names or []),
                "placements": [str(p) for p in placements],
            },
        )
    if sharded is not None and isinstance(value, sharded):
        shape = tuple(value.size())
        blocks = []
        for shard in value.local_shards():
            offsets = tuple(shard.metadata.shard_offsets)
            sizes = tuple(shard.metadata.shard_sizes)
            if any(s == 0 for s in sizes):
                continue
            region = tuple((o, o + s) for o, s in zip(offsets, sizes, strict=True))
            blocks.append(Block(region, shard.tensor, ()))
        return LocalView(
            shape,
            value.dtype,
            blocks,
            replicated=False,
            kind="sharded_tensor",
            sharding={"shards": len(value.metadata().shards_metadata)},
        )
    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape)
        region = tuple((0, s) for s in shape)
        blocks = [] if any(s == 0 for s in shape) else [Block(region, value, ())]
        return LocalView(shape, value.dtype, blocks, replicated=True, kind="tensor")
    raise UnsupportedValueError(
        f"value at {key!r} for checkpoint {path!r} is not a tensor ({type(value).__name__})"
    )
