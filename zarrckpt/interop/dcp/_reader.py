"""The DCP storage reader :class:`ZarrStorageReader` (see the package docstring)."""

from __future__ import annotations

import io
import os
import uuid
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ...errors import (
    CorruptCheckpointError,
    MissingKeysError,
    ShapeMismatchError,
    UnsafeCheckpointError,
    ZarrCkptError,
)
from ...format._dtypes import numpy_as_tensor, tensor_as_numpy
from ...format._metadata import ArrayEntry
from ...parallel._reader import CheckpointFiles, ReadRequest
from ...parallel._writer import default_threads
from ...storage._files import is_dir
from ...storage._local import is_object_url, open_store
from ...storage._object_config import check_world_size
from ...storage._paths import check_path
from .._torchsave_writer import decode_for_pickle
from ._tree import STORAGE_TAG, DcpLeaf, dcp_leaves

__all__ = ["ZarrStorageReader"]

PathLike = str | os.PathLike[str]


class ZarrStorageReader(StorageReader):
    """DCP storage reader for zarrckpt checkpoints.

    ``dcp.load(state_dict, storage_reader=ZarrStorageReader(path))`` loads a
    checkpoint written by ``zarrckpt.save``, ``zarrckpt.async_save`` or
    :class:`ZarrStorageWriter`, into any target DCP accepts (plain tensors,
    DTensors of any mesh, FSDP1 ShardedTensors). Each rank reads only the
    stored chunks, and within large chunks only the inner chunks, that overlap
    its pieces; every byte read is checked against its crc32c.

    Parameters
    ----------
    path
        Checkpoint directory (``dcp.load(..., checkpoint_id=other)`` replaces it),
        or an object-store URL (``s3://bucket/prefix``): each rank then reads
        only the byte ranges it needs, with ranged GETs.
    storage_options
        Client options for an object-store URL (endpoint, region, credentials,
        retries), as for ``zarrckpt.load``; None takes them from the
        environment. Refused for a local path; ignored by :meth:`reset` to a
        local path.
    allow_pickle
        Allow reading values the checkpoint stores with pickle. Without it,
        asking for one raises :class:`~zarrckpt.errors.UnsafeCheckpointError`;
        tensors and JSON values never involve pickle.
    threads
        Size of the I/O thread pool.

    Attributes
    ----------
    bytes_read : int
        Bytes this rank read from storage during the last load.

    Notes
    -----
    Keys follow DCP's flattening: a list of plain values is one key (loaded as a
    whole), a list holding tensors or dicts one key per element, a tuple is
    always one key (loaded as a whole, tensors inside it included). Dict keys
    are strings in DCP: an ``int`` key stored by ``zarrckpt.save`` is offered
    as its decimal string.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        storage_options: dict[str, Any] | None = None,
        allow_pickle: bool = False,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.storage_options = storage_options
        self.path = check_path(path, storage_options=storage_options)
        self.allow_pickle = allow_pickle
        self.threads = threads or default_threads()
        self.load_id = uuid.uuid4().hex
        self.bytes_read = 0
        self.is_coordinator = False
        self.rank: int | None = None
        self._files: CheckpointFiles | None = None
        self._leaves: dict[str, DcpLeaf] = {}

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint path (DCP uses it in its logs)."""
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        """True when ``checkpoint_id`` is a local zarrckpt checkpoint directory,
        or an object-store URL holding a zarrckpt checkpoint (client options from
        the environment)."""
        path = os.fspath(checkpoint_id)
        if is_object_url(path):
            try:
                return open_store(check_path(path)).looks_like_checkpoint()
            except (ZarrCkptError, OSError):
                return False
        return "://" not in path and is_dir(path) and open_store(path).looks_like_checkpoint()

    def reset(self, checkpoint_id: PathLike | None = None) -> None:
        """Start a new load, from ``checkpoint_id`` when given."""
        if checkpoint_id:
            p = os.fspath(checkpoint_id)
            options = self.storage_options if is_object_url(p) else None
            self.path = check_path(p, storage_options=options)
        self.load_id = uuid.uuid4().hex
        self._files = None
        self._leaves = {}

    def _open(self) -> CheckpointFiles:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        check_world_size(self.path, world, "dcp.load with ZarrStorageReader")
        files = CheckpointFiles(self.path)
        self._leaves = {leaf.key: leaf for leaf in dcp_leaves(files.tree, checkpoint=self.path)}
        self._files = files
        self.bytes_read = 0
        return files

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """DCP metadata of the checkpoint, built from its JSON manifest.

        Raises
        ------
        zarrckpt.errors.CheckpointNotFoundError, IncompleteCheckpointError, CorruptCheckpointError
            No committed, intact checkpoint at ``path``.
        """
        files = self._open()  # raises what the path is when it is no zarrckpt checkpoint
        if kwargs.get("rank") is not None:  # DCP's fallback after a failed global read
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r} is a zarrckpt checkpoint: it has one global "
                "manifest and no per-rank metadata"
            )
        state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        for key, leaf in self._leaves.items():
            if "tensor" not in leaf.node:
                state[key] = BytesStorageMetadata()
                continue
            entry = self._entry(files, leaf)
            layout = entry.layout
            chunks = []
            for region in layout.block_regions():
                chunks.append(
                    ChunkStorageMetadata(
                        offsets=torch.Size([a for a, _ in region]),
                        sizes=torch.Size([b - a for a, b in region]),
                    )
                )
            state[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=entry.dtype.torch_dtype),
                size=torch.Size(entry.shape),
                chunks=chunks,
            )
        return Metadata(
            state_dict_metadata=state,
            planner_data={key: leaf.path for key, leaf in self._leaves.items()},
            storage_data={
                "format": STORAGE_TAG,
                "checkpoint_id": files.manifest.get("checkpoint_id"),
            },
            storage_meta=StorageMeta(checkpoint_id=self.path, load_id=self.load_id),
        )

    def _entry(self, files: CheckpointFiles, leaf: DcpLeaf) -> ArrayEntry:
        try:
            return files.arrays[leaf.node["tensor"]]
        except KeyError:
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r}: the tree refers to tensor {leaf.node['tensor']!r}, "
                "which has no record in manifest.arrays"
            ) from None

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        """Record this rank's role (the checkpoint was opened by :meth:`read_metadata`)."""
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        if self._files is None:
            self._open()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Unchanged: every rank reads its own items."""
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Unchanged: reads need no coordination."""
        return plans

    # ------------------------------------------------------------------ reading
    def _leaf(self, item: ReadItem) -> DcpLeaf:
        fqn = item.storage_index.fqn
        leaf = self._leaves.get(fqn)
        if leaf is None:
            raise MissingKeysError(f"checkpoint {self.path!r} has no key {fqn!r}", [fqn])
        return leaf

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every item of ``plan`` and hand it to ``planner``.

        Tensor items are read region by region (the stored chunk at
        ``storage_index.offset``, from ``storage_offsets``, ``lengths`` long)
        into ``planner.resolve_tensor(item)``, then ``planner.commit_tensor``
        is called; ``BYTE_IO`` items get the stored value, ``torch.save``'d,
        through ``planner.load_bytes``.

        Raises
        ------
        zarrckpt.errors.CorruptCheckpointError
            A chunk is missing, truncated or fails its checksum.
        zarrckpt.errors.UnsafeCheckpointError
            A requested value is pickled and ``allow_pickle`` is False.
        """
        files = self._files if self._files is not None else self._open()
        requests: list[ReadRequest] = []
        commits: list[tuple[ReadItem, torch.Tensor, np.ndarray | None, torch.dtype]] = []
        values: list[ReadItem] = []
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                values.append(item)
                continue
            leaf = self._leaf(item)
            if "tensor" not in leaf.node:
                raise CorruptCheckpointError(
                    f"checkpoint {self.path!r}: key {leaf.key!r} holds a value, not a tensor"
                )
            entry = self._entry(files, leaf)
            offsets = tuple(int(o) for o in item.storage_offsets)
            lengths = tuple(int(n) for n in item.lengths)
            chunk = item.storage_index.offset
            chunk_origin = (0,) * len(offsets) if chunk is None else tuple(int(c) for c in chunk)
            origin = tuple(c + o for c, o in zip(chunk_origin, offsets, strict=False))
            if len(chunk_origin) != len(offsets) or len(origin) != len(entry.shape) or any(
                o < 0 or o + n > s for o, n, s in zip(origin, lengths, entry.shape, strict=True)
            ):
                raise ShapeMismatchError(
                    f"checkpoint {self.path!r}, key {leaf.key!r}: requested region at "
                    f"{list(origin)} of size {list(lengths)} lies outside the stored shape "
                    f"{list(entry.shape)}"
                )
            target = planner.resolve_tensor(item).detach()
            if tuple(target.shape) != lengths:
                raise ShapeMismatchError(
                    f"checkpoint {self.path!r}, key {leaf.key!r}: planner resolved a "
                    f"{tuple(target.shape)} tensor for a {lengths} region"
                )
            torch_dtype = entry.dtype.torch_dtype
            direct = (
                target.device.type == "cpu"
                and target.dtype == torch_dtype
                and not target.is_conj()
                and not target.is_neg()
            )
            dest = tensor_as_numpy(target) if direct else np.empty(lengths, entry.dtype.numpy_dtype)
            requests.append(ReadRequest(entry, dest, origin))
            commits.append((item, target, None if direct else dest, torch_dtype))
        files.read_many(requests, threads=self.threads)
        for item, target, scratch, torch_dtype in commits:
            if scratch is not None:
                with torch.no_grad():
                    target.copy_(numpy_as_tensor(scratch, torch_dtype))
            planner.commit_tensor(item, target)
        for item in values:
            buffer = io.BytesIO()
            torch.save(self._value(files, self._leaf(item)), buffer)
            buffer.seek(0)
            planner.load_bytes(item, buffer)
        self.bytes_read = files.bytes_read
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _value(self, files: CheckpointFiles, leaf: DcpLeaf) -> Any:
        def resolve(kind: str, fqn: str) -> Any:
            if kind == "pickle":
                return files.read_pickled(fqn, allow_pickle=self.allow_pickle)
            if kind == "bytes":
                return files.read_bytes(fqn)
            return files.read_tensor(fqn, threads=self.threads)

        try:
            return decode_for_pickle(leaf.node, resolve)  # torch.save'd for DCP
        except KeyError as e:
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r}, key {leaf.key!r}: the tree refers to {e}, "
                "which the manifest does not hold"
            ) from None
        except ValueError as e:
            if isinstance(e, (CorruptCheckpointError, UnsafeCheckpointError)):
                raise
            raise CorruptCheckpointError(
                f"checkpoint {self.path!r}, key {leaf.key!r}: {e}"
            ) from None
