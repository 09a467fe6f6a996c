"""The DCP storage writer :class:`ZarrStorageWriter` (see the package docstring)."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import uuid
import weakref
from typing import Any

import numpy as np
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ...errors import (
    DistributedSaveError,
    UnsupportedValueError,
    ZarrCkptError,
)
from ...format._dtypes import info_for_torch
from ...format._layout import DEFAULT_CHUNK_BYTES, DEFAULT_INNER_BYTES, ArrayLayout
from ...format._metadata import ArrayEntry, parse_entry
from ...format._shard import StoredArray
from ...parallel._writer import (
    ChunkWrite,
    IndexWrite,
    crc_table,
    default_threads,
    write_arrays,
)
from ...storage._base import Staging
from ...storage._files import is_dir, lexists
from ...storage._inplace import (
    commit_in_place,
)
from ...storage._local import is_object_url, open_store
from ...storage._object_config import check_world_size
from ...storage._paths import check_path
from ._tree import STORAGE_TAG
from ._values import encode_byte_value, resolve_tensor
from ._write_plan import build_root, plan_dcp_arrays
from ._writer_staging import (
    abort_quietly,
    attach_staging,
    checked_path,
    open_staging,
    parse_target,
    pieces_json,
    target_json,
)

__all__ = ["ZarrStorageWriter"]

PathLike = str | os.PathLike[str]


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
        Or an object-store URL (``s3://bucket/prefix``): the save follows the
        object-store commit protocol of ``zarrckpt.save`` (one object per chunk
        piece, commit marker last; a prefix holding objects that are not a
        zarrckpt checkpoint is refused; docs/object-storage.md).
    storage_options
        Client options for an object-store URL (endpoint, region, credentials,
        retries), as for ``zarrckpt.save``; None takes them from the
        environment. Refused for a local path; ignored by :meth:`reset` to a
        local path.
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
        storage_options: dict[str, Any] | None = None,
        overwrite: bool = False,
        allow_pickle: bool = False,
        fsync: bool = True,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        inner_chunk_bytes: int = DEFAULT_INNER_BYTES,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        self.storage_options = storage_options
        self.path = check_path(path, storage_options=storage_options)
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
        self._object_staging: Staging | None = None
        self._mode = "new"
        self._cleanup: weakref.finalize | None = None
        self._entries: dict[str, ArrayEntry] = {}
        self._stored: dict[str, StoredArray] = {}

    # ------------------------------------------------------------------ identity
    @property
    def checkpoint_id(self) -> str:
        """The checkpoint path (DCP uses it in its logs)."""
        return self.path

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: PathLike) -> bool:
        """True for a local path whose nearest existing ancestor is a directory
        (missing parents are created, as by ``FileSystemWriter``), and for an
        object-store URL of a supported scheme (``s3://bucket/prefix``)."""
        path = os.fspath(checkpoint_id)
        if is_object_url(path):
            try:
                check_path(path)
            except ZarrCkptError:
                return False
            return True
        if "://" in path or not path:
            return False
        ancestor = os.path.dirname(os.path.abspath(path))
        while not lexists(ancestor):
            ancestor = os.path.dirname(ancestor)
        return is_dir(ancestor)

    def reset(self, checkpoint_id: PathLike | None = None) -> None:
        """Start a new save, at ``checkpoint_id`` when given."""
        if checkpoint_id:
            self.path = checked_path(checkpoint_id, self.storage_options)
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
        check_world_size(self.path, _world_size(), "dcp.save with ZarrStorageWriter")
        self._discard_staging()
        self._entries = {}
        self._stored = {}

    def _discard_staging(self) -> None:
        if self._cleanup is not None:
            self._cleanup()  # removes the staging directory (once)
            self._cleanup = None
        self._staging = None
        self._object_staging = None

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
        store = open_store(self.path)
        entries, writers, stored = plan_dcp_arrays(
            plans,
            self.path,
            chunk_bytes=self.chunk_bytes,
            inner_bytes=self.inner_chunk_bytes,
            shared_files=store.shared_files,
        )
        self._discard_staging()
        self._mode, self._staging, staging = open_staging(
            self.path, store, entries, overwrite=self.overwrite
        )
        if self._mode == "object":
            self._object_staging = staging
        # DCP has no abort hook: a save that fails after this point (on any rank)
        # never reaches finish(); the staging (a directory, or the objects written
        # below an object-store prefix) then goes with the writer (or the
        # interpreter), or at the writer's next save, whichever comes first
        self._cleanup = weakref.finalize(self, abort_quietly, staging)
        self._entries = {e.fqn: e for e in entries}
        self._stored = stored
        try:
            out = []
            for rank, plan in enumerate(plans):
                metadata = [e.fqn for i, e in enumerate(entries) if i % world == rank]
                chunks: dict[str, list[list[Any]]] = {}
                for entry in entries:
                    mine = [
                        [list(index), list(offsets), target_json(stored[entry.fqn], index)]
                        for index, (writer, offsets) in writers[entry.fqn].items()
                        if writer == rank
                    ]
                    if mine:
                        chunks[entry.fqn] = mine
                indexes = {
                    fqn: base64.b64encode(a.index_bytes()).decode("ascii")
                    for fqn, a in stored.items()
                    if a.mode == "shard" and a.index_writer == rank
                }
                share = {
                    STORAGE_TAG: {
                        "staging": self._staging,
                        "rank": rank,
                        "arrays": {
                            fqn: self._entries[fqn].manifest_entry()
                            for fqn in dict.fromkeys([*metadata, *chunks, *indexes])
                        },
                        "pieces": {fqn: pieces_json(stored[fqn]) for fqn in chunks},
                        "metadata": metadata,
                        "chunks": chunks,
                        "indexes": indexes,
                    }
                }
                out.append(dataclasses.replace(plan, storage_data=share))
            return out
        except BaseException:
            self._discard_staging()
            raise

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
        share = plan.storage_data.get(STORAGE_TAG) if isinstance(plan.storage_data, dict) else None
        if share is None:
            raise DistributedSaveError(
                f"ZarrStorageWriter({self.path!r}).write_data got a plan that "
                "ZarrStorageWriter.prepare_global_plan did not prepare"
            )
        staging = attach_staging(self.path, share["staging"], share["rank"])
        shared_files = open_store(self.path).shared_files
        entries = {
            fqn: parse_entry(fqn, raw, checkpoint=self.path) for fqn, raw in share["arrays"].items()
        }
        items = {
            (item.index.fqn, tuple(int(o) for o in item.tensor_data.chunk.offsets)): item
            for item in plan.items
            if item.tensor_data is not None
        }
        sources: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}
        written: dict[tuple[str, tuple[int, ...]], list[ChunkWrite]] = {key: [] for key in items}
        chunk_writes: list[ChunkWrite | IndexWrite] = [
            IndexWrite(entries[fqn], base64.b64decode(data))
            for fqn, data in share["indexes"].items()
        ]
        for fqn, assigned in share["chunks"].items():
            entry = entries[fqn]
            chunk_shape, inner_shape = share["pieces"][fqn]
            pieces = ArrayLayout(
                entry.shape,
                tuple(chunk_shape),
                None if inner_shape is None else tuple(inner_shape),
                entry.layout.itemsize,
            )
            for index, offsets, target in assigned:
                key = (fqn, tuple(offsets))
                if key not in items:
                    raise DistributedSaveError(
                        f"internal error: rank {share['rank']} was asked to write chunk {index} "
                        f"of {fqn!r} from a piece at {offsets} that its plan does not hold"
                    )
                if key not in sources:
                    sources[key] = resolve_tensor(items[key], planner, self.path)
                write = ChunkWrite(
                    entry, pieces, tuple(index), sources[key], tuple(offsets), parse_target(target)
                )
                chunk_writes.append(write)
                written[key].append(write)
        metadata = [entries[fqn] for fqn in share["metadata"]]
        stored: dict[str, StoredArray] = {}
        byte_items: list[tuple[Any, dict[str, Any], list[ArrayEntry], int]] = []
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
            node, extra, extra_writes, extra_stored = encode_byte_value(
                item.index.fqn,
                raw,
                allow_pickle=self.allow_pickle,
                path=self.path,
                chunk_bytes=self.chunk_bytes,
                inner_bytes=self.inner_chunk_bytes,
                shared_files=shared_files,
            )
            metadata.extend(extra)
            chunk_writes.extend(extra_writes)
            stored.update(extra_stored)
            byte_items.append((item, node, extra, len(raw)))
        done = write_arrays(staging, metadata, chunk_writes, threads=self.threads, fsync=self.fsync)
        results = [
            WriteResult(
                index=items[key].index,
                # an empty shard (e.g. uneven TP) writes nothing and may concern an
                # array this rank has no record of
                size_in_bytes=sum(w.nbytes for w in writes),
                storage_data={
                    "kind": "tensor",
                    "chunks": [list(w.index) for w in writes],
                    "crcs": [
                        [p, done.crcs[key[0]][p]] for w in writes for p in w.target.positions
                    ],
                },
            )
            for key, writes in written.items()
        ]
        for item, node, extra, size in byte_items:
            extra = [
                dataclasses.replace(
                    e, crcs=crc_table(e, stored[e.fqn], done.crcs.get(e.fqn, {}))
                )
                for e in extra
            ]
            results.append(
                WriteResult(
                    index=item.index,
                    size_in_bytes=size,
                    storage_data={
                        "kind": "bytes",
                        "node": node,
                        "arrays": {e.fqn: e.manifest_entry() for e in extra if e.kind == "tensor"},
                        "pickled": {e.fqn: e.manifest_entry() for e in extra if e.kind == "pickle"},
                        "bytes": {e.fqn: e.manifest_entry() for e in extra if e.kind == "bytes"},
                    },
                )
            )
        if self.fsync:
            staging.sync()
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

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
            if self._cleanup is not None:  # committed: nothing left to remove
                self._cleanup.detach()
                self._cleanup = None
        finally:
            # after a successful publish the staging path no longer exists
            self._discard_staging()

    def _commit(self, staging: str, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        root, checkpoint_id = build_root(
            self.path, self._entries, self._stored, metadata, results
        )
        if self._mode == "object":
            if self._object_staging is None:
                raise DistributedSaveError(
                    f"ZarrStorageWriter({self.path!r}).finish: the object-store staging "
                    "of this save is gone"
                )
            self._object_staging.commit(
                root, checkpoint_id, overwrite=self.overwrite, fsync=self.fsync
            )
        elif self._mode == "in place":
            commit_in_place(staging, self.path, root, checkpoint_id, fsync=self.fsync)
        else:
            overwrite = self.overwrite or self._mode == "replace"
            open_store(self.path).attach(staging).commit(
                root, checkpoint_id, overwrite=overwrite, fsync=self.fsync
            )


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1
