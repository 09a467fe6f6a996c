"""The coordinator's side of a DCP save: chunk plan of every array, and the root document.

:func:`plan_dcp_arrays` turns every rank's ``SavePlan`` (DCP's write items,
already deduplicated by its planner) into the arrays' chunk grids and the
writer of each chunk, with the planning ``zarrckpt.save`` uses;
:func:`build_root` checks the ranks' write results and rebuilds the
state-dict tree from DCP's metadata and flattening mappings.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from ...errors import DistributedSaveError, InvalidKeyError, UnsupportedValueError
from ...format._dtypes import info_for_torch
from ...format._fqn import fqn_to_path
from ...format._layout import Region
from ...format._metadata import ArrayEntry, check_unique_paths, parse_entry, root_document
from ...format._shard import StoredArray, plan_storage
from ...parallel._planning import ArrayPieces, plan_arrays
from ...parallel._writer import crc_table
from ._tree import nonempty, region, tree_from_leaves

__all__ = ["Writers", "build_root", "plan_dcp_arrays"]

#: per array: chunk index -> (writer rank, offsets of the piece it is written from)
Writers = dict[str, dict[tuple[int, ...], tuple[int, tuple[int, ...]]]]


def _tree_tensors(node: Any) -> Iterator[str]:
    """FQNs of the tensor nodes of a tree, in tree order."""
    if isinstance(node, dict):
        if "tensor" in node:
            yield node["tensor"]
            return
        for value in node.values():
            yield from _tree_tensors(value)
    elif isinstance(node, list):
        for value in node:
            yield from _tree_tensors(value)


def plan_dcp_arrays(
    plans: list[SavePlan],
    path: str,
    *,
    chunk_bytes: int,
    inner_bytes: int,
    shared_files: bool = True,
) -> tuple[list[ArrayEntry], Writers, dict[str, StoredArray]]:
    """Array entries, per array piece index -> (writer rank, offsets of the DCP
    piece it is written from), and where each piece is stored (one object per
    piece without ``shared_files``: object stores)."""
    world = len(plans)
    described: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    pieces: dict[str, list[list[Region]]] = {}
    for rank, plan in enumerate(plans):
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                continue
            data = item.tensor_data
            if data is None:
                raise UnsupportedValueError(
                    f"write item {item.index.fqn!r} for checkpoint {path!r} is a "
                    "tensor item without tensor data"
                )
            fqn = item.index.fqn
            shape = tuple(int(s) for s in data.size)
            dtype = data.properties.dtype
            if fqn not in described:
                described[fqn] = (shape, dtype)
                pieces[fqn] = [[] for _ in range(world)]
            elif described[fqn] != (shape, dtype):
                shape0, dtype0 = described[fqn]
                raise InvalidKeyError(
                    f"ranks disagree on tensor {fqn!r} in {path!r}: global shape "
                    f"{list(shape0)} {dtype0} and {list(shape)} {dtype}"
                )
            region_ = region(data.chunk.offsets, data.chunk.sizes)
            if nonempty(region_):
                pieces[fqn][rank].append(region_)
    arrays = []
    infos = {}
    for fqn, (shape, dtype) in described.items():
        infos[fqn] = info_for_torch(dtype, key=fqn, path=path)
        arrays.append(
            ArrayPieces(
                fqn,
                shape,
                infos[fqn].numpy_dtype.itemsize,
                tuple(tuple(rank_pieces) for rank_pieces in pieces[fqn]),
            )
        )
    planned = plan_arrays(
        arrays, world, chunk_bytes=chunk_bytes, inner_bytes=inner_bytes
    )
    entries: list[ArrayEntry] = []
    writers: Writers = {}
    stored: dict[str, StoredArray] = {}
    seen: dict[str, str] = {}
    for arr, array_plan in zip(arrays, planned, strict=True):
        apath = fqn_to_path(arr.fqn, checkpoint=path)
        stored[arr.fqn] = plan_storage(
            array_plan.layout,
            {index: rank for index, (rank, _) in array_plan.writers.items()},
            shared_files=shared_files,
        )
        entry = ArrayEntry(arr.fqn, apath, infos[arr.fqn], stored[arr.fqn].layout)
        if entry.path in seen:
            raise InvalidKeyError(
                f"keys {seen[entry.path]!r} and {entry.fqn!r} map to the same array path "
                f"{entry.path!r} in checkpoint {path!r}"
            )
        seen[entry.path] = entry.fqn
        entries.append(entry)
        writers[arr.fqn] = {
            index: (rank, tuple(a for a, _ in arr.pieces[rank][k]))
            for index, (rank, k) in array_plan.writers.items()
        }
    return entries, writers, stored


def build_root(
    path: str,
    planned: dict[str, ArrayEntry],
    stored: dict[str, StoredArray],
    metadata: Metadata,
    results: list[list[WriteResult]],
) -> tuple[dict[str, Any], str]:
    """The root document (tree + manifest) of a DCP save, and its checkpoint id.

    ``planned`` are the arrays of the global plan and ``stored`` where their
    pieces went; ``results`` every rank's write results (checked: every inner
    chunk's crc32c reported, every leaf has a value).
    """
    values: dict[str, dict[str, Any]] = {}
    extra: dict[str, ArrayEntry] = {}
    value_arrays: list[ArrayEntry] = []  # pickled objects and large bytes values
    crcs: dict[str, dict[int, int]] = {fqn: {} for fqn in planned}
    for rank_results in results:
        for result in rank_results:
            data = result.storage_data
            fqn = result.index.fqn
            if not isinstance(data, dict):
                raise DistributedSaveError(
                    f"write result of {fqn!r} was not made by ZarrStorageWriter"
                )
            if data.get("kind") == "bytes":
                values[fqn] = data["node"]
                for afqn, raw in data["arrays"].items():
                    if afqn in planned or afqn in extra:
                        raise InvalidKeyError(
                            f"two tensors of the state dict for checkpoint {path!r} "
                            f"have the key {afqn!r}"
                        )
                    extra[afqn] = parse_entry(afqn, raw, checkpoint=path)
                for pfqn, raw in data["pickled"].items():
                    value_arrays.append(parse_entry(pfqn, raw, checkpoint=path))
                for bfqn, raw in data.get("bytes", {}).items():
                    value_arrays.append(parse_entry(bfqn, raw, checkpoint=path))
            elif fqn in crcs:
                crcs[fqn].update((int(p), int(c)) for p, c in data["crcs"])
    planned = {
        fqn: dataclasses.replace(entry, crcs=crc_table(entry, stored[fqn], crcs[fqn]))
        for fqn, entry in planned.items()
    }
    sdm = metadata.state_dict_metadata
    mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    order = [k for k in mappings if k in sdm] + [k for k in sdm if k not in mappings]
    leaves = []
    for key in order:
        if isinstance(sdm[key], TensorStorageMetadata):
            if key not in planned:
                raise DistributedSaveError(f"tensor {key!r} has no planned array")
            node: dict[str, Any] = {"tensor": key}
        elif key in values:
            node = values[key]
        else:
            raise DistributedSaveError(
                f"checkpoint {path!r}: no rank wrote the value at key {key!r}"
            )
        leaves.append((key, tuple(mappings.get(key, (key,))), node))
    tree = tree_from_leaves(leaves, checkpoint=path)
    arrays = {**planned, **extra}
    entries = [arrays[fqn] for fqn in dict.fromkeys(_tree_tensors(tree))] + value_arrays
    check_unique_paths(entries, checkpoint=path)
    checkpoint_id = uuid.uuid4().hex
    root = root_document(
        tree=tree, entries=entries, checkpoint_id=checkpoint_id, world_size=len(results)
    )
    return root, checkpoint_id
