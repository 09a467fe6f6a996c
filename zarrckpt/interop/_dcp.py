"""``torch.distributed.checkpoint`` storage plug-ins that read and write zarrckpt checkpoints.

``dcp.save(sd, storage_writer=ZarrStorageWriter(path))`` (and ``dcp.async_save``)
writes exactly the checkpoint ``zarrckpt.save`` writes: one zarr v3 array per
global tensor, chunk grid = shard grid, crc32c on every chunk, JSON metadata,
commit marker, atomic publish. ``dcp.load(sd, storage_reader=ZarrStorageReader(path))``
loads any zarrckpt checkpoint, whoever wrote it, reading only the (inner)
chunks each rank needs. DCP's ``.metadata`` pickle is never written nor read.

How the DCP hooks map onto zarrckpt:

* :meth:`ZarrStorageWriter.prepare_global_plan` (coordinator) turns every
  rank's ``WriteItem`` (already deduplicated by DCP's planner) into
  :class:`~zarrckpt.parallel._planning.ArrayPieces`, plans the chunk grids and the
  writer of each chunk with :func:`~zarrckpt.parallel._planning.plan_arrays` (the same
  planning ``zarrckpt.save`` uses), creates the staging directory and puts each
  rank's share (staging path, array records, chunk assignments) into its
  plan's ``storage_data``.
* :meth:`ZarrStorageWriter.write_data` (every rank) resolves its items with
  ``planner.resolve_data`` and writes its array metadata and chunks into the
  staging directory; a ``BYTE_IO`` item (a non-tensor leaf, ``torch.save``'d by
  DCP) is loaded back with ``torch.load(weights_only=True)`` and stored as JSON
  tree nodes (tensors inside it, e.g. in a tuple, become arrays; other objects
  need ``allow_pickle=True``).
* :meth:`ZarrStorageWriter.finish` (coordinator) rebuilds the state-dict tree
  from DCP's metadata and flattening mappings, writes the root ``zarr.json``
  with the manifest and the commit marker, and publishes atomically.
* :meth:`ZarrStorageReader.read_metadata` builds DCP's ``Metadata`` from the
  manifest: a ``TensorStorageMetadata`` per array listing its stored chunks,
  ``BytesStorageMetadata`` for every other leaf *at the keys DCP's flattening
  produces* (e.g. one key for a list of plain values, one per element of a
  list holding tensors; see :mod:`zarrckpt.interop._dcp_tree`).
* :meth:`ZarrStorageReader.read_data` reads each requested region of a stored
  chunk with zarrckpt's verified reader, straight into the target when
  possible, and serves ``BYTE_IO`` items by ``torch.save``-ing the stored
  JSON value for ``planner.load_bytes``.

Like DCP's ``FileSystemWriter``, the writer creates missing parent
directories, writes into an existing directory and keeps the files already
there (committed in place, commit marker last: :mod:`zarrckpt.storage._inplace`),
and with ``overwrite=False`` refuses an existing checkpoint with DCP's words
("Checkpoint already exists"). Differences: ``overwrite`` defaults to False
(like ``zarrckpt.save``; FileSystemWriter overwrites by default); replacing
a checkpoint that has its directory to itself is atomic (the old checkpoint
stays readable until the new one is committed); a directory holding a DCP
checkpoint is refused rather than mixed with it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ..errors import (
    CorruptCheckpointError,
    DistributedSaveError,
    InvalidKeyError,
    MissingKeysError,
    ShapeMismatchError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from ..format._dtypes import info_for_torch, numpy_as_tensor, tensor_as_numpy
from ..format._flatten import flatten_state_dict, pickle_value
from ..format._fqn import fqn_to_path
from ..format._layout import DEFAULT_CHUNK_BYTES, DEFAULT_INNER_BYTES, Region, choose_layout
from ..format._metadata import (
    ArrayEntry,
    array_path,
    check_unique_paths,
    parse_entry,
    root_document,
)
from ..parallel._planning import ArrayPieces, plan_arrays
from ..parallel._reader import CheckpointFiles, ReadRequest
from ..parallel._save import host_tensor
from ..parallel._writer import ChunkWrite, default_threads, write_arrays
from ..storage._inplace import (
    check_collisions,
    choose_target,
    commit_in_place,
    new_inner_staging_dir,
)
from ..storage._paths import check_path, wait_visible
from ..storage._storage import (
    COMMIT_GROUP,
    ROOT_METADATA,
    commit,
    is_checkpoint_dir,
    new_staging_dir,
    remove_tree,
    sync_tree,
)
from ._dcp_tree import DcpLeaf, dcp_leaves, tree_from_leaves
from ._torchsave_source import bytes_allowed
from ._torchsave_writer import decode_for_pickle

__all__ = ["ZarrStorageWriter", "ZarrStorageReader"]

PathLike = str | os.PathLike[str]
_STORAGE_TAG = "zarrckpt"


def _region(offsets: Any, sizes: Any) -> Region:
    return tuple((int(o), int(o) + int(s)) for o, s in zip(offsets, sizes, strict=True))


def _nonempty(region: Region) -> bool:
    return all(b > a for a, b in region)


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


class ZarrStorageWriter(StorageWriter):
    """DCP storage writer producing a zarrckpt checkpoint.

    Use it wherever DCP takes a ``storage_writer``; every rank passes its own
    instance (with the same arguments)::

        dcp.save(state_dict, storage_writer=ZarrStorageWriter(path))
        fut = dcp.async_save(state_dict, storage_writer=ZarrStorageWriter(path))

    The result is the checkpoint :func:`zarrckpt.save` would write for the same
    state dict: ``zarrckpt.load``, ``zarrckpt.open``, zarr, dask, tensorstore and
    :class:`ZarrStorageReader` read it.

    Parameters
    ----------
    path
        Checkpoint directory (on a filesystem all ranks share); missing parent
        directories are created. It may exist and hold other files, which are
        kept, as with ``FileSystemWriter``.
        ``dcp.save(..., checkpoint_id=other)`` replaces it (:meth:`reset`).
    overwrite
        Replace an existing committed checkpoint at ``path``. Default False,
        as for ``zarrckpt.save`` (DCP's ``FileSystemWriter`` overwrites by
        default); the refusal says "Checkpoint already exists", as
        ``FileSystemWriter``'s does. Atomic when the checkpoint has its
        directory to itself (the old one stays intact until the new one is
        committed); in a directory holding other files the old checkpoint
        is removed just before the new one is moved in, so the directory
        holds the old checkpoint, the new one, or (after a crash) none.
    allow_pickle
        Store leaves that are neither tensors nor JSON values with pickle
        (as ``zarrckpt.save(..., allow_pickle=True)``). Without it such
        leaves make the save fail with :class:`~zarrckpt.errors.UnsafeCheckpointError`
        (raised by DCP inside a ``CheckpointException``).
    fsync
        Make the data durable before the commit marker is written.
    chunk_bytes, inner_chunk_bytes
        Size targets of chunk files for unsharded tensors, and of the inner
        chunks of large chunks (as for ``zarrckpt.save``).
    threads
        Size of each rank's I/O thread pool (default: up to 8, at least 2).

    Notes
    -----
    * A writer instance serves one save at a time (like ``FileSystemWriter``).
    * DCP's experimental ``use_collectives=False`` and the planner's
      ``enable_plan_caching=True`` are not supported (the chunk plan and the
      staging directory are decided by the coordinator for every save).
    * If a save fails after planning, its hidden staging directory (beside
      ``path``, never loadable) is removed by ``finish`` or, when DCP aborts
      before ``finish`` (a rank failed to write), at the writer's next save,
      when the writer is garbage-collected, or at interpreter exit.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        overwrite: bool = False,
        allow_pickle: bool = False,
        fsync: bool = True,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        inner_chunk_bytes: int = DEFAULT_INNER_BYTES,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.path = check_path(path)
        self.overwrite = overwrite
        self.allow_pickle = allow_pickle
        self.fsync = fsync
        self.chunk_bytes = chunk_bytes
        self.inner_chunk_bytes = inner_chunk_bytes
        self.threads = threads or default_threads()
        self.save_id = uuid.uuid4().hex
        self.is_coordinator = False
        self.rank: int | None = None
        self._staging: str | None = None
        self._mode = "new"
        self._cleanup: weakref.finalize | None = None
        self._entries: dict[str, ArrayEntry] = {}

    # ------------------------------------------------------------------ identity
    @property
    def checkpoint_id(self) -> str:
        """The checkpoint path (DCP uses it in its logs)."""
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        """True for a local path whose nearest existing ancestor is a directory
        (missing parents are created, as by ``FileSystemWriter``)."""
        path = os.fspath(checkpoint_id)
        if "://" in path or not path:
            return False
        ancestor = os.path.dirname(os.path.abspath(path))
        while not os.path.lexists(ancestor):
            ancestor = os.path.dirname(ancestor)
        return os.path.isdir(ancestor)

    def reset(self, checkpoint_id: PathLike | None = None) -> None:
        """Start a new save, at ``checkpoint_id`` when given."""
        if checkpoint_id:
            self.path = check_path(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    def storage_meta(self) -> StorageMeta | None:
        """Checkpoint path and save id, passed by DCP to the planner."""
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    # ------------------------------------------------------------------ set up
    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Record this rank's role; drop the staging left by an aborted earlier save.

        Raises
        ------
        UnsupportedValueError
            DCP's ``use_collectives=False`` with several ranks.
        """
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank")
        if not kwargs.get("use_collectives", True) and _world_size() > 1:
            raise UnsupportedValueError(
                f"ZarrStorageWriter({self.path!r}) needs rank coordination: "
                "dcp.save(..., use_collectives=False) is not supported"
            )
        self._discard_staging()
        self._entries = {}

    def _discard_staging(self) -> None:
        if self._cleanup is not None:
            self._cleanup()  # removes the staging directory (once)
            self._cleanup = None
        self._staging = None

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Check the dtypes of this rank's tensors early; the plan is unchanged."""
        for item in plan.items:
            if item.tensor_data is not None:
                dtype = item.tensor_data.properties.dtype
                info_for_torch(dtype, key=item.index.fqn, path=self.path)
        return plan

    # ------------------------------------------------------------------ global plan
    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Plan every array's chunk grid and chunk writers; create the staging directory.

        Returns the plans with ``storage_data`` set to each rank's share
        (JSON-able: staging path, array records, chunk assignments).

        Raises
        ------
        zarrckpt.errors.CheckpointExistsError
            ``path`` holds a committed checkpoint and ``overwrite`` is False
            (the message starts with ``FileSystemWriter``'s "Checkpoint already
            exists and self.overwrite=False."); it holds a DCP checkpoint; or
            an array would replace a file there that is not part of a checkpoint.
        zarrckpt.errors.InvalidKeyError, UnsupportedValueError
            Keys that map to the same array, ranks that disagree on a tensor,
            unsupported dtypes, pieces that overlap or leave gaps.
        """
        if any(not plan.usable for plan in plans):
            raise UnsupportedValueError(
                f"ZarrStorageWriter({self.path!r}) does not support DCP save-plan caching "
                "(DefaultSavePlanner(enable_plan_caching=True))"
            )
        world = len(plans)
        entries, writers = self._plan_arrays(plans)
        self._mode = choose_target(self.path, overwrite=self.overwrite)
        self._discard_staging()
        if self._mode == "in place":
            names = {e.path.split("/")[0] for e in entries} | {ROOT_METADATA, COMMIT_GROUP}
            check_collisions(self.path, names)
            self._staging = new_inner_staging_dir(self.path)
        else:
            self._staging = new_staging_dir(self.path)
        # DCP has no abort hook: a save that fails after this point (on any rank)
        # never reaches finish(); the directory then goes with the writer (or the
        # interpreter), or at the writer's next save, whichever comes first
        self._cleanup = weakref.finalize(self, remove_tree, self._staging)
        self._entries = {e.fqn: e for e in entries}
        try:
            out = []
            for rank, plan in enumerate(plans):
                metadata = [e.fqn for i, e in enumerate(entries) if i % world == rank]
                chunks: dict[str, list[list[list[int]]]] = {}
                for entry in entries:
                    mine = [
                        [list(index), list(offsets)]
                        for index, (writer, offsets) in writers[entry.fqn].items()
                        if writer == rank
                    ]
                    if mine:
                        chunks[entry.fqn] = mine
                share = {
                    _STORAGE_TAG: {
                        "staging": self._staging,
                        "rank": rank,
                        "arrays": {
                            fqn: self._entries[fqn].manifest_entry()
                            for fqn in dict.fromkeys([*metadata, *chunks])
                        },
                        "metadata": metadata,
                        "chunks": chunks,
                    }
                }
                out.append(dataclasses.replace(plan, storage_data=share))
            return out
        except BaseException:
            self._discard_staging()
            raise

    def _plan_arrays(
        self, plans: list[SavePlan]
    ) -> tuple[list[ArrayEntry], dict[str, dict[tuple[int, ...], tuple[int, tuple[int, ...]]]]]:
        """Array entries and, per array, chunk index -> (writer rank, piece offsets)."""
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
                        f"write item {item.index.fqn!r} for checkpoint {self.path!r} is a "
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
                        f"ranks disagree on tensor {fqn!r} in {self.path!r}: global shape "
                        f"{list(shape0)} {dtype0} and {list(shape)} {dtype}"
                    )
                region = _region(data.chunk.offsets, data.chunk.sizes)
                if _nonempty(region):
                    pieces[fqn][rank].append(region)
        arrays = []
        infos = {}
        for fqn, (shape, dtype) in described.items():
            infos[fqn] = info_for_torch(dtype, key=fqn, path=self.path)
            arrays.append(
                ArrayPieces(
                    fqn,
                    shape,
                    infos[fqn].numpy_dtype.itemsize,
                    tuple(tuple(rank_pieces) for rank_pieces in pieces[fqn]),
                )
            )
        planned = plan_arrays(
            arrays, world, chunk_bytes=self.chunk_bytes, inner_bytes=self.inner_chunk_bytes
        )
        entries: list[ArrayEntry] = []
        writers: dict[str, dict[tuple[int, ...], tuple[int, tuple[int, ...]]]] = {}
        seen: dict[str, str] = {}
        for arr, array_plan in zip(arrays, planned, strict=True):
            path = fqn_to_path(arr.fqn, checkpoint=self.path)
            entry = ArrayEntry(arr.fqn, path, infos[arr.fqn], array_plan.layout)
            if entry.path in seen:
                raise InvalidKeyError(
                    f"keys {seen[entry.path]!r} and {entry.fqn!r} map to the same array path "
                    f"{entry.path!r} in checkpoint {self.path!r}"
                )
            seen[entry.path] = entry.fqn
            entries.append(entry)
            writers[arr.fqn] = {
                index: (rank, tuple(a for a, _ in arr.pieces[rank][k]))
                for index, (rank, k) in array_plan.writers.items()
            }
        return entries, writers

    # ------------------------------------------------------------------ writing
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's array metadata and assigned chunks into the staging directory.

        Returns a completed future of one ``WriteResult`` per item, whose
        ``storage_data`` is JSON-able: the chunks written for tensor items; the
        tree node (and any arrays written for it) for ``BYTE_IO`` items.

        Raises
        ------
        zarrckpt.errors.UnsafeCheckpointError
            A non-tensor leaf needs pickle and ``allow_pickle`` is False.
        """
        share = plan.storage_data.get(_STORAGE_TAG) if isinstance(plan.storage_data, dict) else None
        if share is None:
            raise DistributedSaveError(
                f"ZarrStorageWriter({self.path!r}).write_data got a plan that "
                "ZarrStorageWriter.prepare_global_plan did not prepare"
            )
        staging = share["staging"]
        wait_visible(staging, rank=share["rank"])
        entries = {
            fqn: parse_entry(fqn, raw, checkpoint=self.path) for fqn, raw in share["arrays"].items()
        }
        items = {
            (item.index.fqn, tuple(int(o) for o in item.tensor_data.chunk.offsets)): item
            for item in plan.items
            if item.tensor_data is not None
        }
        sources: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}
        written: dict[tuple[str, tuple[int, ...]], list[list[int]]] = {key: [] for key in items}
        chunk_writes: list[ChunkWrite] = []
        for fqn, assigned in share["chunks"].items():
            entry = entries[fqn]
            for index, offsets in assigned:
                key = (fqn, tuple(offsets))
                if key not in items:
                    raise DistributedSaveError(
                        f"internal error: rank {share['rank']} was asked to write chunk {index} "
                        f"of {fqn!r} from a piece at {offsets} that its plan does not hold"
                    )
                if key not in sources:
                    sources[key] = self._resolve_tensor(items[key], planner)
                chunk_writes.append(ChunkWrite(entry, tuple(index), sources[key], tuple(offsets)))
                written[key].append(index)
        results = [
            WriteResult(
                index=items[key].index,
                # an empty shard (e.g. uneven TP) writes nothing and may concern an
                # array this rank has no record of
                size_in_bytes=len(chunks) * entries[key[0]].layout.chunk_nbytes if chunks else 0,
                storage_data={"kind": "tensor", "chunks": chunks},
            )
            for key, chunks in written.items()
        ]
        metadata = [entries[fqn] for fqn in share["metadata"]]
        for item in plan.items:
            if item.type != WriteItemType.BYTE_IO:
                continue
            data: Any = planner.resolve_data(item)
            if isinstance(data, io.BytesIO):
                raw = data.getvalue()
            elif hasattr(data, "read"):
                data.seek(0)
                raw = bytes(data.read())
            else:
                raise UnsupportedValueError(
                    f"planner resolved byte item {item.index.fqn!r} for checkpoint "
                    f"{self.path!r} to a {type(data).__name__}, expected a BytesIO"
                )
            node, extra, extra_writes = self._encode_value(item.index.fqn, raw)
            metadata.extend(extra)
            chunk_writes.extend(extra_writes)
            results.append(
                WriteResult(
                    index=item.index,
                    size_in_bytes=len(raw),
                    storage_data={
                        "kind": "bytes",
                        "node": node,
                        "arrays": {e.fqn: e.manifest_entry() for e in extra if e.kind == "tensor"},
                        "pickled": {e.fqn: e.manifest_entry() for e in extra if e.kind == "pickle"},
                        "bytes": {e.fqn: e.manifest_entry() for e in extra if e.kind == "bytes"},
                    },
                )
            )
        write_arrays(staging, metadata, chunk_writes, threads=self.threads, fsync=self.fsync)
        if self.fsync:
            sync_tree(staging)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _resolve_tensor(self, item: WriteItem, planner: SavePlanner) -> np.ndarray:
        data = planner.resolve_data(item)
        fqn = item.index.fqn
        if not isinstance(data, torch.Tensor):
            raise UnsupportedValueError(
                f"planner resolved tensor item {fqn!r} for checkpoint {self.path!r} to a "
                f"{type(data).__name__}, expected a tensor"
            )
        assert item.tensor_data is not None
        expected = tuple(int(s) for s in item.tensor_data.chunk.sizes)
        dtype = item.tensor_data.properties.dtype
        if tuple(data.shape) != expected or data.dtype != dtype:
            raise UnsupportedValueError(
                f"planner resolved item {fqn!r} at {list(item.index.offset or ())} for checkpoint "
                f"{self.path!r} to a {tuple(data.shape)} {data.dtype} tensor; its plan says "
                f"{expected} {dtype}"
            )
        if data.layout != torch.strided:
            raise UnsupportedValueError(
                f"tensor {fqn!r} for checkpoint {self.path!r} has layout {data.layout}; "
                "only dense (strided) tensors are stored"
            )
        return tensor_as_numpy(host_tensor(data))

    def _encode_value(
        self, fqn: str, raw: bytes
    ) -> tuple[dict[str, Any], list[ArrayEntry], list[ChunkWrite]]:
        """Tree node of a ``torch.save``'d leaf, plus the arrays holding its tensors/pickles."""
        try:
            with bytes_allowed():
                value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:
            if not self.allow_pickle:
                raise UnsafeCheckpointError(
                    f"value at key {fqn!r} for checkpoint {self.path!r} can only be stored with "
                    f"pickle ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                    "Store tensors, JSON values (int, float, str, bool, None, lists, dicts) or "
                    "objects with state_dict()/load_state_dict(); or pass "
                    "ZarrStorageWriter(..., allow_pickle=True)"
                ) from None
            value = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
        flat = flatten_state_dict(
            {fqn: value},
            allow_pickle=self.allow_pickle,
            checkpoint=self.path,
            is_tensor_leaf=lambda v: isinstance(v, torch.Tensor),
        )
        node = flat.tree["dict"][0][1]
        entries: list[ArrayEntry] = []
        writes: list[ChunkWrite] = []
        for tfqn, tensor in flat.tensors.items():
            if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
                raise UnsupportedValueError(
                    f"value at key {fqn!r} for checkpoint {self.path!r} holds a "
                    f"{type(tensor).__name__} at {tfqn!r} inside a container DCP does not "
                    "flatten (a tuple); use a list or dict for distributed tensors"
                )
            info = info_for_torch(tensor.dtype, key=tfqn, path=self.path)
            source = tensor_as_numpy(host_tensor(tensor))
            layout = choose_layout(
                tuple(tensor.shape),
                info.numpy_dtype.itemsize,
                chunk_bytes=self.chunk_bytes,
                inner_bytes=self.inner_chunk_bytes,
            )
            entry = ArrayEntry(tfqn, fqn_to_path(tfqn, checkpoint=self.path), info, layout)
            entries.append(entry)
            origin = (0,) * len(layout.shape)
            writes.extend(ChunkWrite(entry, idx, source, origin) for idx in layout.chunk_indices())
        uint8 = info_for_torch(torch.uint8)
        values = [
            ("pickle", pfqn, pickle_value(pfqn, obj, checkpoint=self.path))
            for pfqn, obj in flat.pickled.items()
        ] + [("bytes", bfqn, blob) for bfqn, blob in flat.blobs.items()]
        for kind, vfqn, raw_value in values:
            data = np.frombuffer(raw_value, np.uint8)
            layout = choose_layout(
                (data.size,), 1, chunk_bytes=self.chunk_bytes, inner_bytes=self.inner_chunk_bytes
            )
            path = array_path(vfqn, kind, checkpoint=self.path)
            entry = ArrayEntry(vfqn, path, uint8, layout, kind)
            entries.append(entry)
            writes.extend(ChunkWrite(entry, idx, data, (0,)) for idx in layout.chunk_indices())
        return node, entries, writes

    # ------------------------------------------------------------------ commit
    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Write the root ``zarr.json`` (tree + manifest) and the commit marker, then publish.

        Raises
        ------
        zarrckpt.errors.DistributedSaveError
            A rank did not write all its chunks, or a leaf has no result.
        zarrckpt.errors.InvalidKeyError
            Two leaves collide (same path, or a path through another leaf).
        zarrckpt.errors.CheckpointExistsError
            ``path`` appeared meanwhile and ``overwrite`` is False.
        """
        staging = self._staging
        if staging is None:
            raise DistributedSaveError(
                f"ZarrStorageWriter({self.path!r}).finish called without a prepared save "
                "(prepare_global_plan runs on the coordinator first)"
            )
        try:
            self._commit(staging, metadata, results)
        finally:
            # after a successful publish the staging path no longer exists
            self._discard_staging()

    def _commit(self, staging: str, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        values: dict[str, dict[str, Any]] = {}
        extra: dict[str, ArrayEntry] = {}
        value_arrays: list[ArrayEntry] = []  # pickled objects and large bytes values
        written = dict.fromkeys(self._entries, 0)
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
                        if afqn in self._entries or afqn in extra:
                            raise InvalidKeyError(
                                f"two tensors of the state dict for checkpoint {self.path!r} "
                                f"have the key {afqn!r}"
                            )
                        extra[afqn] = parse_entry(afqn, raw, checkpoint=self.path)
                    for pfqn, raw in data["pickled"].items():
                        value_arrays.append(parse_entry(pfqn, raw, checkpoint=self.path))
                    for bfqn, raw in data.get("bytes", {}).items():
                        value_arrays.append(parse_entry(bfqn, raw, checkpoint=self.path))
                else:
                    written[fqn] = written.get(fqn, 0) + len(data["chunks"])
        for fqn, entry in self._entries.items():
            expected = sum(1 for _ in entry.layout.chunk_indices())
            if written[fqn] != expected:
                raise DistributedSaveError(
                    f"checkpoint {self.path!r}: {written[fqn]} of the {expected} chunks of "
                    f"{fqn!r} were written"
                )
        sdm = metadata.state_dict_metadata
        mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
        order = [k for k in mappings if k in sdm] + [k for k in sdm if k not in mappings]
        leaves = []
        for key in order:
            if isinstance(sdm[key], TensorStorageMetadata):
                if key not in self._entries:
                    raise DistributedSaveError(f"tensor {key!r} has no planned array")
                node: dict[str, Any] = {"tensor": key}
            elif key in values:
                node = values[key]
            else:
                raise DistributedSaveError(
                    f"checkpoint {self.path!r}: no rank wrote the value at key {key!r}"
                )
            leaves.append((key, tuple(mappings.get(key, (key,))), node))
        tree = tree_from_leaves(leaves, checkpoint=self.path)
        arrays = {**self._entries, **extra}
        entries = [arrays[fqn] for fqn in dict.fromkeys(_tree_tensors(tree))] + value_arrays
        check_unique_paths(entries, checkpoint=self.path)
        checkpoint_id = uuid.uuid4().hex
        root = root_document(
            tree=tree, entries=entries, checkpoint_id=checkpoint_id, world_size=len(results)
        )
        if self._mode == "in place":
            commit_in_place(staging, self.path, root, checkpoint_id, fsync=self.fsync)
        else:
            overwrite = self.overwrite or self._mode == "replace"
            commit(staging, self.path, root, checkpoint_id, overwrite=overwrite, fsync=self.fsync)


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


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
        Checkpoint directory (``dcp.load(..., checkpoint_id=other)`` replaces it).
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
        self, path: PathLike, *, allow_pickle: bool = False, threads: int | None = None
    ) -> None:
        super().__init__()
        self.path = check_path(path)
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
        """True when ``checkpoint_id`` is a local zarrckpt checkpoint directory."""
        path = os.fspath(checkpoint_id)
        return "://" not in path and os.path.isdir(path) and is_checkpoint_dir(path)

    def reset(self, checkpoint_id: PathLike | None = None) -> None:
        """Start a new load, from ``checkpoint_id`` when given."""
        if checkpoint_id:
            self.path = check_path(checkpoint_id)
        self.load_id = uuid.uuid4().hex
        self._files = None
        self._leaves = {}

    def _open(self) -> CheckpointFiles:
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
            for index in layout.chunk_indices():
                region = layout.chunk_region(index)
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
                "format": _STORAGE_TAG,
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
