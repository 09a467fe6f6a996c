"""Collective save: describe local pieces, agree on a plan, write, commit.

Phases (each ends with an agreement, so a failure anywhere is raised on every
rank and nothing is committed):

1. every rank flattens its state dict and describes its tree and the pieces
   it holds; the descriptions are all-gathered and every rank computes the
   same plan, whose tree is the union of the ranks' trees (keys only some
   ranks have are kept; different values at one key are refused);
2. rank 0 checks the destination and creates the staging (``Store.stage``);
   the other ranks attach to it by its token;
3. every rank writes its share of array metadata and the chunks assigned to
   it, and makes them durable;
4. rank 0 writes the root metadata and the commit marker and publishes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import (
    DistributedSaveError,
    InvalidArgumentError,
    InvalidKeyError,
    UnsupportedValueError,
)
from ..format._dtypes import info_for_torch, tensor_as_numpy
from ..format._flatten import flatten_state_dict, pickle_value
from ..format._layout import choose_layout
from ..format._metadata import ArrayEntry, array_path, check_unique_paths, root_document
from ..format._shard import StoredArray, plan_storage
from ..format._tree_merge import merge_trees
from ..storage._base import Staging, Store
from ..storage._local import open_store
from ._collective import Comm
from ._planning import ArrayPieces, plan_arrays
from ._sharding import LocalView, describe_leaf, is_tensor_leaf
from ._turns import PendingPiece, write_in_turns
from ._writer import ChunkWrite, IndexWrite, WriteResult, crc_table, write_arrays

__all__ = ["SaveOptions", "SaveReport", "LocalState", "prepare_local", "save_collective"]


@dataclass(frozen=True)
class SaveOptions:
    overwrite: bool = False
    allow_pickle: bool = False
    fsync: bool = True
    chunk_bytes: int = 64 << 20
    inner_chunk_bytes: int = 1 << 20
    threads: int = 2
    #: "auto" (the store's choice), "shard" or "pieces" (see zarrckpt.save)
    file_layout: str = "auto"
    #: async_save: most bytes of the caller's tensors copied at once (None: no limit)
    staging_budget: int | None = None

    def shared_files(self, store: Store, path: str) -> bool:
        """Whether tensors are stored as shard files written by every rank."""
        if self.file_layout == "auto":
            return store.shared_files
        if self.file_layout == "shard" and not store.shared_files:
            raise InvalidArgumentError(
                f"file_layout='shard' for checkpoint {path!r}: this store cannot have "
                "several processes write one object; use 'pieces' or 'auto'"
            )
        return self.file_layout == "shard"


@dataclass(frozen=True)
class SaveReport:
    """What a committed save stored: its tensors (all ranks) and this rank's writes."""

    tensors: int
    nbytes: int
    bytes_written: int


def host_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """CPU tensor with plain (non-conjugated, non-negated) bits and the same values."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


@dataclass
class LocalState:
    """Everything one rank contributes to a save, already on the host."""

    tree: dict[str, Any]
    views: dict[str, LocalView]
    #: fqn -> list of host numpy arrays, one per block of views[fqn]
    sources: dict[str, list[np.ndarray]]
    pickled: dict[str, bytes] = field(default_factory=dict)
    #: fqn -> content of the large bytes values (stored as arrays)
    blobs: dict[str, bytes] = field(default_factory=dict)
    #: fqn -> the caller's block tensors, not yet copied (``prepare_local(defer=True)``:
    #: the writer copies each piece just before writing it, within a staging budget)
    deferred: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def tensor_nbytes(self) -> int:
        """Bytes of this rank's tensor data."""
        return sum(
            b.data().numel() * b.data().element_size()
            for view in self.views.values()
            for b in view.blocks
        )

    def summary(self) -> dict[str, Any]:
        """What the other ranks need to know (no tensor data): the tree, each
        tensor's shape, dtype and pieces, the size of each pickled or large
        bytes value (and a digest of the latter, to compare them across ranks)."""
        return {
            "tree": self.tree,
            "tensors": {
                fqn: (
                    view.global_shape,
                    str(view.dtype),
                    [b.region for b in view.blocks],
                    view.replicated,
                )
                for fqn, view in self.views.items()
            },
            "pickled": {fqn: len(data) for fqn, data in self.pickled.items()},
            "blobs": {
                fqn: (len(data), hashlib.sha256(data).hexdigest())
                for fqn, data in self.blobs.items()
            },
        }


def prepare_local(
    state_dict: Any,
    path: str,
    options: SaveOptions,
    *,
    stage: Callable[[torch.Tensor], torch.Tensor] | None = None,
    defer: bool = False,
) -> LocalState:
    """Flatten, validate and stage this rank's state on the host.

    With ``stage`` every tensor piece is copied by it (into a host buffer), so
    the caller may modify its tensors as soon as this returns (``async_save``);
    without it CPU tensors are used in place; with ``defer`` nothing is copied
    yet (the writer copies piece by piece: :mod:`~zarrckpt.parallel._turns`).
    """
    flat = flatten_state_dict(
        state_dict,
        allow_pickle=options.allow_pickle,
        checkpoint=path,
        is_tensor_leaf=is_tensor_leaf,
    )
    views: dict[str, LocalView] = {}
    sources: dict[str, list[np.ndarray]] = {}
    deferred: dict[str, list[torch.Tensor]] = {}
    for fqn, leaf in flat.tensors.items():
        view = describe_leaf(leaf, key=fqn, path=path)
        info_for_torch(view.dtype, key=fqn, path=path)
        data = []
        for block in view.blocks:
            t = block.data()
            if t.layout != torch.strided:
                raise UnsupportedValueError(
                    f"tensor {fqn!r} for checkpoint {path!r} has layout {t.layout}; "
                    "only dense (strided) tensors are stored"
                )
            if t.device.type == "meta":
                raise UnsupportedValueError(
                    f"tensor {fqn!r} for checkpoint {path!r} is on the meta device and has no data"
                )
            if defer:
                deferred.setdefault(fqn, []).append(t)
                continue
            host = stage(t) if stage is not None else host_tensor(t)
            data.append(tensor_as_numpy(host))
        views[fqn] = view
        sources[fqn] = data
    pickled = {}
    for fqn, obj in flat.pickled.items():
        pickled[fqn] = pickle_value(fqn, obj, checkpoint=path)
    return LocalState(flat.tree, views, sources, pickled, dict(flat.blobs), deferred)


def sharding_summary(local: LocalState) -> dict[str, Any]:
    """Manifest fields describing the parallelism at save time (informational):
    ``mesh`` (the first device mesh seen: shape and dimension names) and
    ``sharding`` ({fqn: placements / shard count} for sharded tensors)."""
    mesh = None
    sharding = {}
    for fqn, view in local.views.items():
        if not view.sharding:
            continue
        sharding[fqn] = view.sharding
        if mesh is None and "mesh_shape" in view.sharding:
            mesh = {
                "shape": view.sharding["mesh_shape"],
                "dim_names": view.sharding["mesh_dim_names"],
            }
    return {"mesh": mesh, "sharding": sharding}


def _tensor_holders(tensors: list[dict[str, Any]], path: str) -> dict[str, list[int]]:
    """FQN -> ranks that have the tensor (rank order, FQNs in order of first appearance);
    the ranks having a tensor must agree on its global shape and dtype."""
    holders: dict[str, list[int]] = {}
    for rank, summary in enumerate(tensors):
        for fqn, (shape, dtype, _, _) in summary.items():
            if fqn in holders:
                first = holders[fqn][0]
                shape0, dtype0, _, _ = tensors[first][fqn]
                if tuple(shape) != tuple(shape0) or dtype != dtype0:
                    raise InvalidKeyError(
                        f"ranks disagree on tensor {fqn!r} in {path!r}: rank {first} has global "
                        f"shape {list(shape0)} {dtype0}, rank {rank} has {list(shape)} {dtype}"
                    )
            holders.setdefault(fqn, []).append(rank)
    return holders


@dataclass
class SavePlan:
    """What every rank agreed on: array entries, chunk writers, the merged tree, and
    the rank writing each pickled or large bytes value."""

    entries: list[ArrayEntry]
    writers: dict[str, Any]
    tree: dict[str, Any]
    value_writers: dict[str, int]
    #: fqn -> where each piece goes (one shard file per tensor, or one object per piece)
    stored: dict[str, StoredArray]

    def with_crcs(self, reports: list[dict[str, dict[int, int]]]) -> list[ArrayEntry]:
        """The entries carrying their crc32c tables, from every rank's reports."""
        merged: dict[str, dict[int, int]] = {}
        for report in reports:
            for fqn, table in report.items():
                merged.setdefault(fqn, {}).update(table)
        return [
            dataclasses.replace(
                e, crcs=crc_table(e, self.stored[e.fqn], merged.get(e.fqn, {}))
            )
            for e in self.entries
        ]


def _build_plan(
    summaries: list[dict[str, Any]], path: str, options: SaveOptions, *, shared_files: bool = True
) -> SavePlan:
    """The plan of a save from every rank's summary (the same on every rank).

    The tree is the union of the ranks' trees; a tensor, pickled or bytes value is
    written by a rank that has it (see :func:`~zarrckpt.format._tree_merge.merge_trees`).
    """
    tree = merge_trees(
        [s["tree"] for s in summaries],
        path=path,
        blob_digests=[
            {fqn: f"{n} bytes, sha256 {digest[:16]}" for fqn, (n, digest) in s["blobs"].items()}
            for s in summaries
        ],
    )
    tensors = [s["tensors"] for s in summaries]
    world = len(summaries)
    arrays = []
    dtypes = {}
    for fqn, ranks in _tensor_holders(tensors, path).items():
        shape, dtype_name, _, _ = tensors[ranks[0]][fqn]
        dtypes[fqn] = dtype_name
        info = info_for_torch(getattr(torch, dtype_name.removeprefix("torch.")), key=fqn, path=path)
        arrays.append(
            ArrayPieces(
                fqn,
                tuple(shape),
                info.numpy_dtype.itemsize,
                tuple(
                    tuple(tuple(map(tuple, r)) for r in s[fqn][2]) if fqn in s else ()
                    for s in tensors
                ),
                replicated=all(tensors[r][fqn][3] for r in ranks),
            )
        )
    plans = plan_arrays(
        arrays, world, chunk_bytes=options.chunk_bytes, inner_bytes=options.inner_chunk_bytes
    )
    entries: list[ArrayEntry] = []
    writers: dict[str, Any] = {}
    stored: dict[str, StoredArray] = {}
    for arr, plan in zip(arrays, plans, strict=True):
        dtype_name = dtypes[arr.fqn]
        info = info_for_torch(getattr(torch, dtype_name.removeprefix("torch.")))
        stored[arr.fqn] = plan_storage(
            plan.layout,
            {index: rank for index, (rank, _) in plan.writers.items()},
            shared_files=shared_files,
        )
        entries.append(
            ArrayEntry(
                arr.fqn, array_path(arr.fqn, checkpoint=path), info, stored[arr.fqn].layout
            )
        )
        writers[arr.fqn] = plan.writers
    uint8 = info_for_torch(torch.uint8)
    value_writers: dict[str, int] = {}
    for kind, section in (("pickle", "pickled"), ("bytes", "blobs")):
        for rank, summary in enumerate(summaries):
            for fqn, size in summary[section].items():
                if fqn in value_writers:
                    continue  # the lowest rank holding a value writes it
                value_writers[fqn] = rank
                n = size if kind == "pickle" else size[0]
                layout = choose_layout(
                    (n,), 1, chunk_bytes=options.chunk_bytes, inner_bytes=options.inner_chunk_bytes
                )
                stored[fqn] = plan_storage(
                    layout,
                    {index: rank for index in layout.chunk_indices()},
                    shared_files=shared_files,
                )
                entries.append(
                    ArrayEntry(
                        fqn, array_path(fqn, kind, checkpoint=path), uint8, stored[fqn].layout,
                        kind,
                    )
                )
    check_unique_paths(entries, checkpoint=path)
    return SavePlan(entries, writers, tree, value_writers, stored)


def save_collective(
    local: LocalState,
    path: str,
    options: SaveOptions,
    comm: Comm,
    *,
    extra: dict[str, Any],
    on_staged: Callable[[], None] | None = None,
) -> SaveReport:
    """Phases 1-4 of a save, given this rank's staged (or deferred) state;
    ``on_staged`` as for :func:`_write_share`."""
    summaries = comm.all_gather(local.summary())
    store = open_store(path)
    plan = comm.agree(
        lambda: _build_plan(
            summaries, path, options, shared_files=options.shared_files(store, path)
        ),
        f"planning the save of {path!r}",
    )
    created: list[Staging] = []

    def create_staging() -> str | None:
        if not comm.is_coordinator:
            return None
        store.check_writable(overwrite=options.overwrite)
        created.append(store.stage(overwrite=options.overwrite))
        return created[0].token

    token = comm.broadcast(
        comm.agree(create_staging, f"preparing the checkpoint directory {path!r}")
    )
    assert isinstance(token, str)
    try:

        def write() -> WriteResult:
            # the other ranks attach to the staging rank 0 created (and wait to see it)
            staging = created[0] if created else store.attach(token, rank=comm.rank)
            return _write_share(staging, plan, local, comm, options, on_staged)

        written = comm.agree(
            write,
            f"writing the checkpoint {path!r}",
        )
        reports = comm.gather(written.crcs)

        def finish() -> None:
            if not comm.is_coordinator:
                return
            assert reports is not None
            checkpoint_id = uuid.uuid4().hex
            root = root_document(
                tree=plan.tree,
                entries=plan.with_crcs(reports),
                checkpoint_id=checkpoint_id,
                world_size=comm.world_size,
                extra={**sharding_summary(local), **extra},
            )
            created[0].commit(root, checkpoint_id, overwrite=options.overwrite, fsync=options.fsync)

        comm.agree(finish, f"committing the checkpoint {path!r}")
    except BaseException:
        if comm.is_coordinator and created:
            created[0].abort()
        raise
    tensors = [e for e in plan.entries if e.kind not in ("pickle", "bytes")]
    return SaveReport(len(tensors), sum(e.nbytes for e in tensors), written.nbytes)


def _write_share(
    staging: Staging,
    plan: SavePlan,
    local: LocalState,
    comm: Comm,
    options: SaveOptions,
    on_staged: Callable[[], None] | None = None,
) -> WriteResult:
    """Write this rank's metadata files, pieces and shard indexes, then make them
    durable; return the chunk bytes written and the crc32c of the inner chunks.
    ``on_staged`` is called once nothing of the caller's tensors is needed any more
    (at once, unless the state is deferred: then after the last piece's copy)."""
    entries = plan.entries
    mine = [e for i, e in enumerate(entries) if i % comm.world_size == comm.rank]
    chunks: list[ChunkWrite | IndexWrite] = []
    pending: list[PendingPiece] = []
    for entry in entries:
        stored = plan.stored[entry.fqn]
        if stored.mode == "shard" and stored.index_writer == comm.rank:
            chunks.append(IndexWrite.of(entry, stored))
        if entry.kind in ("pickle", "bytes"):
            if plan.value_writers[entry.fqn] == comm.rank:
                source = local.pickled if entry.kind == "pickle" else local.blobs
                data = np.frombuffer(source[entry.fqn], np.uint8)
                chunks.extend(
                    ChunkWrite.of(entry, stored, idx, data, (0,))
                    for idx in stored.pieces.chunk_indices()
                )
            continue
        for index, (rank, k) in plan.writers[entry.fqn].items():
            if rank != comm.rank:
                continue
            view = local.views[entry.fqn]
            if k >= len(view.blocks):
                raise DistributedSaveError(
                    f"internal error: rank {comm.rank} was asked to write piece {k} of "
                    f"{entry.fqn!r} but holds {len(view.blocks)}"
                )
            origin = tuple(a for a, _ in view.blocks[k].region)
            if entry.fqn in local.deferred:
                pending.append(
                    PendingPiece(entry, stored, index, local.deferred[entry.fqn][k], origin)
                )
                continue
            chunks.append(
                ChunkWrite.of(entry, stored, index, local.sources[entry.fqn][k], origin)
            )
    if pending:
        budget = options.staging_budget or 0
        written = write_in_turns(
            staging, mine, chunks, pending, budget, options, on_staged or (lambda: None)
        )
    else:
        if on_staged is not None:
            on_staged()
        written = write_arrays(
            staging, mine, chunks, threads=options.threads, fsync=options.fsync
        )
    if options.fsync:
        staging.sync()
    return written
