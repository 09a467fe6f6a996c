"""The values a rank writes in a DCP save: its tensor pieces and its other leaves.

:func:`resolve_tensor` asks DCP's planner for a tensor piece and checks it
against the plan; :func:`encode_byte_value` turns a ``BYTE_IO`` item (a
non-tensor leaf, ``torch.save``'d by DCP) back into a tree node, plus the
arrays holding the tensors, pickled objects and large bytes values inside it.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.planner import SavePlanner, WriteItem

from ...errors import UnsafeCheckpointError, UnsupportedValueError
from ...format._dtypes import info_for_torch, tensor_as_numpy
from ...format._flatten import flatten_state_dict, pickle_value
from ...format._fqn import fqn_to_path
from ...format._layout import choose_layout
from ...format._metadata import ArrayEntry, array_path
from ...format._shard import StoredArray, plan_storage
from ...parallel._save import host_tensor
from ...parallel._writer import ChunkWrite, IndexWrite
from .._torchsave_source import bytes_allowed

__all__ = ["encode_byte_value", "resolve_tensor"]


def resolve_tensor(item: WriteItem, planner: SavePlanner, path: str) -> np.ndarray:
    """The piece of a tensor item, resolved by the planner and checked against the plan."""
    data = planner.resolve_data(item)
    fqn = item.index.fqn
    if not isinstance(data, torch.Tensor):
        raise UnsupportedValueError(
            f"planner resolved tensor item {fqn!r} for checkpoint {path!r} to a "
            f"{type(data).__name__}, expected a tensor"
        )
    assert item.tensor_data is not None
    expected = tuple(int(s) for s in item.tensor_data.chunk.sizes)
    dtype = item.tensor_data.properties.dtype
    if tuple(data.shape) != expected or data.dtype != dtype:
        raise UnsupportedValueError(
            f"planner resolved item {fqn!r} at {list(item.index.offset or ())} for checkpoint "
            f"{path!r} to a {tuple(data.shape)} {data.dtype} tensor; its plan says "
            f"{expected} {dtype}"
        )
    if data.layout != torch.strided:
        raise UnsupportedValueError(
            f"tensor {fqn!r} for checkpoint {path!r} has layout {data.layout}; "
            "only dense (strided) tensors are stored"
        )
    return tensor_as_numpy(host_tensor(data))


def encode_byte_value(
    fqn: str,
    raw: bytes,
    *,
    allow_pickle: bool,
    path: str,
    chunk_bytes: int,
    inner_bytes: int,
    shared_files: bool = True,
) -> tuple[
    dict[str, Any], list[ArrayEntry], list[ChunkWrite | IndexWrite], dict[str, StoredArray]
]:
    """Tree node of a ``torch.save``'d leaf, plus the arrays holding its tensors/pickles,
    their writes (all by this rank) and where their pieces are stored."""
    try:
        with bytes_allowed():
            value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"value at key {fqn!r} for checkpoint {path!r} can only be stored with "
                f"pickle ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                "Store tensors, JSON values (int, float, str, bool, None, lists, dicts) or "
                "objects with state_dict()/load_state_dict(); or pass "
                "ZarrStorageWriter(..., allow_pickle=True)"
            ) from None
        value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
    flat = flatten_state_dict(
        {fqn: value},
        allow_pickle=allow_pickle,
        checkpoint=path,
        is_tensor_leaf=lambda v: isinstance(v, torch.Tensor),
    )
    node = flat.tree["dict"][0][1]
    entries: list[ArrayEntry] = []
    writes: list[ChunkWrite | IndexWrite] = []
    stored: dict[str, StoredArray] = {}

    def add(entry: ArrayEntry, layout: Any, source: np.ndarray, origin: tuple[int, ...]) -> None:
        stored[entry.fqn] = plan = plan_storage(layout, shared_files=shared_files)
        entry = dataclasses.replace(entry, layout=plan.layout)
        entries.append(entry)
        if plan.mode == "shard":
            writes.append(IndexWrite.of(entry, plan))
        writes.extend(ChunkWrite.of(entry, plan, i, source, origin) for i in layout.chunk_indices())

    for tfqn, tensor in flat.tensors.items():
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise UnsupportedValueError(
                f"value at key {fqn!r} for checkpoint {path!r} holds a "
                f"{type(tensor).__name__} at {tfqn!r} inside a container DCP does not "
                "flatten (a tuple); use a list or dict for distributed tensors"
            )
        info = info_for_torch(tensor.dtype, key=tfqn, path=path)
        source = tensor_as_numpy(host_tensor(tensor))
        layout = choose_layout(
            tuple(tensor.shape),
            info.numpy_dtype.itemsize,
            chunk_bytes=chunk_bytes,
            inner_bytes=inner_bytes,
        )
        entry = ArrayEntry(tfqn, fqn_to_path(tfqn, checkpoint=path), info, layout)
        add(entry, layout, source, (0,) * len(layout.shape))
    uint8 = info_for_torch(torch.uint8)
    values = [
        ("pickle", pfqn, pickle_value(pfqn, obj, checkpoint=path))
        for pfqn, obj in flat.pickled.items()
    ] + [("bytes", bfqn, blob) for bfqn, blob in flat.blobs.items()]
    for kind, vfqn, raw_value in values:
        data = np.frombuffer(raw_value, np.uint8)
        layout = choose_layout(
            (data.size,), 1, chunk_bytes=chunk_bytes, inner_bytes=inner_bytes
        )
        apath = array_path(vfqn, kind, checkpoint=path)
        add(ArrayEntry(vfqn, apath, uint8, layout, kind), layout, data, (0,))
    return node, entries, writes, stored
