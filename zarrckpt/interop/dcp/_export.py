"""Write a zarrckpt checkpoint as a ``torch.distributed.checkpoint`` (DCP) directory.

:func:`save_streaming` runs ``dcp.save`` with DCP's own ``FileSystemWriter``
and a planner that plans one DCP chunk per stored zarrckpt chunk and reads
each chunk from the zarrckpt checkpoint only when the writer asks for it
(``resolve_data``), with one writer thread: at most one or two chunks are in
memory at a time, whatever the size of the checkpoint. The directory is
written under a temporary name beside the destination and renamed into place.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ...errors import CheckpointExistsError, UnsupportedValueError
from ...format._codec import crc32c
from ...format._dtypes import numpy_as_tensor
from ...parallel._reader import CheckpointFiles, ReadRequest
from ...storage._files import is_dir, is_link, lexists, list_dir, read_bytes, write_bytes
from ...storage._local import open_store
from ...storage._paths import make_parents
from .._staged import StagedOutput
from .._torchsave_writer import decode_for_pickle
from ._source import METADATA_FILE, SIDECAR, is_dcp_dir
from ._tree import _is_terminal, _key_str, dcp_leaves, unwrap

__all__ = ["check_dcp_writable", "save_streaming"]




def check_dcp_writable(path: str, *, overwrite: bool) -> None:
    """Refuse to replace anything but a DCP or zarrckpt checkpoint or an empty directory."""
    if not lexists(path):
        make_parents(path)
        return
    if not overwrite:
        raise CheckpointExistsError(
            f"{path!r} already exists; pass overwrite=True to replace it (atomically)"
        )
    if not is_dir(path) or is_link(path):
        raise CheckpointExistsError(f"refusing to overwrite {path!r}: it is not a directory")
    if list_dir(path) and not (is_dcp_dir(path) or open_store(path).looks_like_checkpoint()):
        raise CheckpointExistsError(
            f"refusing to overwrite {path!r}: it is a non-empty directory that is not a "
            "DCP or zarrckpt checkpoint"
        )


class _Value:
    """A non-tensor DCP leaf; its value is built when the writer asks for it."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


def _skeleton(node: dict[str, Any], path: tuple[Any, ...], files: CheckpointFiles) -> Any:
    """The object DCP's flattening turns into exactly the keys of :func:`dcp_leaves`."""
    node = unwrap(node)
    if "dict" in node:
        return {_key_str(k): _skeleton(c, (*path, _key_str(k)), files) for k, c in node["dict"]}
    if "list" in node and not _is_terminal(node):
        return [_skeleton(c, (*path, i), files) for i, c in enumerate(node["list"])]
    if "tensor" in node:
        entry = files.arrays[node["tensor"]]
        return torch.empty(entry.shape, dtype=entry.dtype.torch_dtype, device="meta")
    return _Value(".".join(map(str, path)))


def save_streaming(
    files: CheckpointFiles,
    dst: str,
    *,
    overwrite: bool,
    allow_pickle: bool,
    fsync: bool,
    threads: int,
    record: dict[str, Any] | None = None,
    progress: Callable[[int, bool], None] | None = None,
) -> None:
    """Write the zarrckpt checkpoint ``files`` as a DCP checkpoint directory ``dst``.

    ``record`` (tied tensors, container types) is kept in the sidecar file;
    ``progress(nbytes, tensor_done)`` is called after each chunk is handed to DCP.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )

    check_dcp_writable(dst, overwrite=overwrite)
    leaves = {leaf.key: leaf for leaf in dcp_leaves(files.tree, checkpoint=files.path)}
    state = _skeleton(files.tree, (), files)
    path = files.path

    def resolve(kind: str, fqn: str) -> Any:
        if kind == "pickle":
            return files.read_pickled(fqn, allow_pickle=allow_pickle)
        if kind == "bytes":
            return files.read_bytes(fqn)
        return files.read_tensor(fqn, threads=threads)

    class StreamingPlanner(DefaultSavePlanner):
        """One write item per stored chunk; data read only in ``resolve_data``."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=True, flatten_sharded_tensors=False)
            self.chunks_left: dict[str, int] = {}

        def create_local_plan(self) -> SavePlan:
            items: list[WriteItem] = []
            for key, obj in self.state_dict.items():
                leaf = leaves.get(key)
                if leaf is None:
                    raise UnsupportedValueError(
                        f"internal error: DCP key {key!r} of {path!r} has no stored value"
                    )
                if not isinstance(obj, torch.Tensor):
                    items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
                    continue
                entry = files.arrays[leaf.node["tensor"]]
                properties = TensorProperties(dtype=entry.dtype.torch_dtype)
                size = torch.Size(entry.shape)
                regions = entry.layout.block_regions()
                if not regions:  # a tensor with a zero dimension: one empty piece
                    regions = [tuple((0, s) for s in entry.shape)]
                kind = WriteItemType.TENSOR if len(regions) == 1 else WriteItemType.SHARD
                self.chunks_left[key] = len(regions)
                for region in regions:
                    offsets = torch.Size([a for a, _ in region])
                    items.append(
                        WriteItem(
                            index=MetadataIndex(key, offsets),
                            type=kind,
                            tensor_data=TensorWriteData(
                                chunk=ChunkStorageMetadata(
                                    offsets=offsets, sizes=torch.Size([b - a for a, b in region])
                                ),
                                properties=properties,
                                size=size,
                            ),
                        )
                    )
            self.plan = SavePlan(items, planner_data=self.mappings)
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
            key = write_item.index.fqn
            leaf = leaves[key]
            if write_item.type == WriteItemType.BYTE_IO:
                buffer = io.BytesIO()
                torch.save(decode_for_pickle(leaf.node, resolve), buffer)
                return buffer
            entry = files.arrays[leaf.node["tensor"]]
            assert write_item.tensor_data is not None
            chunk = write_item.tensor_data.chunk
            dest = np.empty(tuple(int(s) for s in chunk.sizes), dtype=entry.dtype.numpy_dtype)
            files.read_many(
                [ReadRequest(entry, dest, tuple(int(o) for o in chunk.offsets))], threads=threads
            )
            self.chunks_left[key] -= 1
            if progress is not None:
                progress(dest.nbytes, self.chunks_left[key] == 0)
            return numpy_as_tensor(dest, entry.dtype.torch_dtype)

    with StagedOutput(dst) as staged:
        writer = FileSystemWriter(
            staged.dir, single_file_per_rank=True, sync_files=fsync, thread_count=1,
            overwrite=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, storage_writer=writer, planner=StreamingPlanner(), no_dist=True)
        metadata_crc = crc32c(read_bytes(staged.path(METADATA_FILE)))
        sidecar: dict[str, Any] = {"metadata_crc32c": metadata_crc, "tree": files.tree}
        if record:
            sidecar["convert"] = record
        text = json.dumps(sidecar, ensure_ascii=False)
        write_bytes(staged.path(SIDECAR), text.encode("utf-8"), fsync=fsync)
        staged.publish_dir(overwrite=overwrite, fsync=fsync)
