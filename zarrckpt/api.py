"""Public entry points: ``save``, ``load`` and ``async_save``."""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ._load_result import LoadResult
from .errors import (
    IncompleteCheckpointError,
    InvalidArgumentError,
    MissingKeysError,
    ShapeMismatchError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from .format._layout import DEFAULT_CHUNK_BYTES, DEFAULT_INNER_BYTES
from .parallel import _async
from .parallel._collective import Comm
from .parallel._load import LoadPlan
from .parallel._log import Operation
from .parallel._reader import CheckpointFiles
from .parallel._save import SaveOptions, prepare_local, save_collective
from .parallel._staging import HostStager
from .parallel._writer import default_threads
from .storage._local import open_store
from .storage._object_config import check_world_size
from .storage._paths import check_path

__all__ = ["save", "load", "async_save"]

PathLike = str | os.PathLike[str]

#: the opener of single-file sources (torch.save, safetensors), an interop plug-in
#: imported by name on first use: the api layer does not import the interop layer
#: (docs: the layers contract in pyproject.toml)
_FILE_SOURCE_OPENER = "zarrckpt.interop._file_source:open_file_source"


def _file_source_opener() -> Any:
    module, _, name = _FILE_SOURCE_OPENER.partition(":")
    return getattr(importlib.import_module(module), name)


def save_options(
    overwrite: bool,
    allow_pickle: bool,
    fsync: bool,
    chunk_bytes: int,
    inner_chunk_bytes: int,
    threads: int | None,
    file_layout: str = "auto",
) -> SaveOptions:
    if file_layout not in ("auto", "shard", "pieces"):
        raise InvalidArgumentError(
            f"file_layout={file_layout!r}: expected 'auto', 'shard' or 'pieces'"
        )
    return SaveOptions(
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        fsync=fsync,
        chunk_bytes=chunk_bytes,
        inner_chunk_bytes=inner_chunk_bytes,
        threads=threads or default_threads(),
        file_layout=file_layout,
    )


def save(
    state_dict: Any,
    path: PathLike,
    *,
    process_group: Any = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    fsync: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    inner_chunk_bytes: int = DEFAULT_INNER_BYTES,
    threads: int | None = None,
    file_layout: str = "auto",
) -> None:
    """Save a state dict as a zarrckpt checkpoint (collective when distributed).

    Every global tensor becomes one zarr array. With torch.distributed
    initialized, every rank of ``process_group`` must call ``save`` with its
    own state dict; each rank writes the chunks of the pieces it holds, no
    tensor data is gathered, and rank 0 commits once all ranks succeeded.

    Parameters
    ----------
    state_dict
        Nested dicts / lists / tuples whose leaves are tensors (``torch.Tensor``,
        ``DTensor``, FSDP1 ``ShardedTensor``), JSON values (int, float, str,
        bool, None) or objects with ``state_dict()`` / ``load_state_dict()``.
    path
        Checkpoint directory to create (on a filesystem all ranks share).
    process_group
        Group of the ranks taking part; default: the default group when
        torch.distributed is initialized, else this process alone.
    overwrite
        Replace an existing checkpoint at ``path``. On a local path the
        replacement is atomic: the path holds the old checkpoint until the new
        one is committed. On an object store it is not: the old checkpoint is
        deleted (its commit marker first) before the new one is written
        (docs/object-storage.md).
    storage_options
        Object-store client options for ``s3://`` and ``az://`` URLs
        (endpoint, region, account, credentials, retries:
        docs/object-storage.md); must be None for local paths. A
        ``memory://`` URL serves one process only: with several ranks it
        raises :class:`~zarrckpt.errors.InvalidPathError`.
    allow_pickle
        Store leaves that are neither tensors nor JSON values with pickle.
        Without it such leaves raise :class:`~zarrckpt.errors.UnsafeCheckpointError`.
    fsync
        Make the data durable before the commit marker is written.
    chunk_bytes, inner_chunk_bytes
        Size targets of chunk files (for unsharded tensors) and of the inner
        chunks of large chunks.
    threads
        Size of each rank's I/O thread pool (default: up to 8, at least 2).
    file_layout
        ``"shard"``: each tensor's data is one shard file that every rank writes
        its pieces into at planned offsets (files independent of the world size);
        ``"pieces"``: one chunk file per piece (for filesystems where processes
        on different hosts must not write one file, such as NFS without page
        alignment guarantees); ``"auto"``: ``"shard"`` on local/POSIX storage.
        Both are plain zarr v3 (docs/format.md).

    Raises
    ------
    zarrckpt.errors.CheckpointExistsError
        ``path`` exists and ``overwrite`` is False; nothing is written.
    zarrckpt.errors.UnsafeCheckpointError
        A leaf would need pickle and ``allow_pickle`` is False.
    zarrckpt.errors.InvalidKeyError
        A key is empty, not a str/int, or two keys flatten to the same FQN.
    zarrckpt.errors.UnsupportedValueError
        A tensor has an unsupported dtype, layout or placement.
    zarrckpt.errors.DistributedSaveError
        Another rank failed; nothing was committed.
    """
    options = save_options(
        overwrite, allow_pickle, fsync, chunk_bytes, inner_chunk_bytes, threads, file_layout
    )
    save_with_extra(state_dict, path, options, process_group, storage_options, extra={})


def save_with_extra(
    state_dict: Any,
    path: PathLike,
    options: SaveOptions,
    process_group: Any,
    storage_options: dict[str, Any] | None,
    *,
    extra: dict[str, Any],
) -> None:
    """:func:`save` with ``extra`` members in the manifest (JSON; the checkpoint
    manager stores the step and its metrics there). Not public API."""
    path = check_path(path, storage_options=storage_options)
    comm = Comm.from_group(process_group)
    check_world_size(path, comm.world_size, "save")
    op = Operation("save", path, comm)
    local = comm.agree(
        lambda: prepare_local(state_dict, path, options), f"preparing the save of {path!r}"
    )
    op.saved(save_collective(local, path, options, comm, extra=extra))


# --------------------------------------------------------------------------- async

_STAGER = HostStager()


def async_save(
    state_dict: Any,
    path: PathLike,
    *,
    process_group: Any = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    fsync: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    inner_chunk_bytes: int = DEFAULT_INNER_BYTES,
    threads: int | None = None,
    file_layout: str = "auto",
    staging_budget_bytes: int | None = None,
) -> Future[None]:
    """Save in the background; return once the state is copied to host memory.

    The caller may modify its tensors as soon as this returns: the checkpoint
    holds the values at call time. Host staging buffers are reused across calls
    (pinned when the tensors live on an accelerator). With
    ``staging_budget_bytes``, a rank whose state is larger than the budget does
    not copy it before returning: the background save copies its pieces in
    turns, at most the budget (plus one piece) at a time, writing and freeing
    each batch before copying the next, so host memory never doubles. The
    caller must then not modify its tensors until ``future.staged`` resolves
    (as with DCP's ``AsyncSaveResponse.staging_completion``); ``future.staged``
    is already resolved when the state was copied before returning. Async saves of a process
    run one at a time in call order; a save to a path therefore never overlaps
    another save to the same path. Collective when distributed (every rank
    calls it); the background part uses its own gloo group.

    Pending saves are never dropped: the interpreter waits for them before it
    exits, and so does ``torch.distributed.destroy_process_group()`` (wrapped
    for that when the first distributed async save is submitted). A save that
    failed without anybody calling ``result()`` or ``exception()`` on its
    future is reported on stderr at exit and the process exits with status 1.

    Parameters
    ----------
    state_dict, path, process_group, overwrite, storage_options, allow_pickle,
    fsync, chunk_bytes, inner_chunk_bytes, threads, file_layout
        As for :func:`save`.
    staging_budget_bytes
        Most bytes of this rank's tensors copied to host memory at once (see
        above); None (default): the whole state is copied before returning.

    Returns
    -------
    concurrent.futures.Future
        Resolves to None when the checkpoint is committed; ``result()``
        raises the save's error otherwise. It cannot be cancelled. Its
        ``staged`` attribute is a future that resolves once the caller's tensors
        are no longer read.
    """
    options = save_options(
        overwrite, allow_pickle, fsync, chunk_bytes, inner_chunk_bytes, threads, file_layout
    )
    if staging_budget_bytes is not None:
        if type(staging_budget_bytes) is not int or staging_budget_bytes <= 0:
            raise InvalidArgumentError(
                f"staging_budget_bytes={staging_budget_bytes!r} for checkpoint {path!r}: "
                "expected a positive number of bytes or None"
            )
        options = dataclasses.replace(options, staging_budget=staging_budget_bytes)
    return async_save_with_extra(
        state_dict, path, options, process_group, storage_options, extra={}
    )


def async_save_with_extra(
    state_dict: Any,
    path: PathLike,
    options: SaveOptions,
    process_group: Any,
    storage_options: dict[str, Any] | None,
    *,
    extra: dict[str, Any],
) -> Future[None]:
    """:func:`async_save` with ``extra`` members in the manifest. Not public API."""
    path = check_path(path, storage_options=storage_options)
    comm = Comm.from_group(process_group)
    check_world_size(path, comm.world_size, "async_save")
    op = Operation("async_save", path, comm)
    background = op.watch(_async.background_comm(comm))
    budget = options.staging_budget

    def prepare() -> tuple[Any, Any]:
        """(a lease of the staged state, None), or (None, the deferred state) when
        this rank's state exceeds the staging budget (copied in turns later)."""
        if budget is not None:
            deferred = prepare_local(state_dict, path, options, defer=True)
            if deferred.tensor_nbytes > budget:
                return None, deferred
        staged = _STAGER.stage(lambda copy: prepare_local(state_dict, path, options, stage=copy))
        return staged, None

    lease, deferred = comm.agree(prepare, f"staging the async save of {path!r}")

    def run(mark_staged: Callable[[], None]) -> None:
        try:
            local = deferred if lease is None else lease.state
            op.saved(
                save_collective(
                    local, path, options, background, extra=extra, on_staged=mark_staged
                )
            )
        except BaseException as e:
            op.failed(e)
            _async.raise_if_group_destroyed(background, path, e)
            raise
        finally:
            if lease is not None:
                lease.release()

    op.returned()
    return _async.submit(run, path, distributed=comm.distributed, staged=lease is not None)


# --------------------------------------------------------------------------- load


def _check_same_version(comm: Comm, path: str, version: str | None) -> None:
    """Raise on every rank if ranks opened different versions of ``path`` (it was
    replaced while they opened it): they would load parts of two checkpoints.
    (Ranks that load different paths, e.g. one file each, are not compared.)"""
    if not comm.distributed:
        return
    groups: dict[str, set[str]] = {}
    for where, seen in comm.all_gather((str(path), version)):
        groups.setdefault(where, set()).add(str(seen))
    # decided from the same gathered list on every rank: all raise, or none
    mixed = {where: sorted(seen) for where, seen in groups.items() if len(seen) > 1}
    if mixed:
        where, seen = next(iter(mixed.items()))
        raise IncompleteCheckpointError(
            f"{where!r} was replaced while the ranks opened it: they see {len(seen)} "
            f"versions ({', '.join(seen[:3])}{', ...' if len(seen) > 3 else ''}; rank "
            f"{comm.rank} has {version}), so the load would mix them; nothing was loaded, "
            "try again"
        )


def load(
    state_dict: Any,
    path: PathLike,
    *,
    process_group: Any = None,
    strict: bool = True,
    storage_options: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    threads: int | None = None,
    stats: dict[str, int] | None = None,
) -> LoadResult:
    """Load a checkpoint into ``state_dict`` in place (collective when distributed).

    Tensors of ``state_dict`` are filled in place, the same objects afterwards
    (DTensor and ShardedTensor local shards included; dtypes are cast as by
    :meth:`torch.Tensor.copy_`). Each rank reads only the chunks, and within
    large chunks only the inner chunks, that intersect the pieces it holds, so
    any mesh or world size can load a checkpoint written by any other.
    Meta-device tensors are materialized: replaced in the target's containers
    by loaded CPU tensors of the target's dtype (DTensors keep their mesh and
    placements, parameters stay parameters with their ``requires_grad``), and
    assigned into ``nn.Module`` targets as ``load_state_dict(assign=True)``
    does; no meta tensor is left in the target. Plain values, and lists and
    tuples holding only plain values, are replaced by the stored ones (a stored
    list keeps its length); dicts are always matched key by key. Objects with
    ``load_state_dict`` receive their state; an optimizer's per-parameter state
    follows the checkpoint as in :meth:`torch.optim.Optimizer.load_state_dict`
    (a parameter the checkpoint holds no state for ends up without state).

    Parameters
    ----------
    state_dict
        The target: its keys choose what is loaded. Stored keys it lacks are
        not loaded (listed in ``unexpected_keys``).
    path
        Checkpoint directory, or a ``torch.save`` or safetensors file; or an
        object-store URL of either (``s3://bucket/model.safetensors``: read by
        ranged GETs, each rank its own rows; docs/object-storage.md).
    process_group
        Group of the ranks taking part (default: the default group if initialized).
    strict
        Raise :class:`~zarrckpt.errors.MissingKeysError` when a key of
        ``state_dict`` (a tensor, a plain value or a list or tuple of plain
        values) is not in the checkpoint. That is all ``strict`` checks: stored keys the
        target lacks never raise, and shape mismatches always do. With
        ``strict=False`` missing keys keep their values and are listed in
        ``missing_keys``, except meta-device tensors, which have no values to
        keep: they always raise.
    storage_options
        Object-store client options for ``s3://`` / ``az://`` URLs (docs/object-storage.md);
        must be None for local paths.
    allow_pickle
        Allow loading a checkpoint that holds pickled objects (never for
        checkpoints from untrusted sources).
    threads
        Size of the I/O thread pool.
    stats
        If given, filled with ``bytes_read`` (from storage, by this rank) and
        ``bytes_needed`` (bytes of the pieces this rank loads).

    Returns
    -------
    LoadResult
        ``missing_keys``: keys of the target the checkpoint lacks (skipped,
        ``strict=False`` only); ``unexpected_keys``: keys of the checkpoint the
        target did not ask for.

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError, IncompleteCheckpointError, CorruptCheckpointError
        The path holds no committed, intact checkpoint. A damaged chunk found
        while reading may leave the tensors read straight into the target
        partly filled; nothing else (plain values, optimizer state, modules)
        has been modified.
    zarrckpt.errors.MissingKeysError, ShapeMismatchError
        The target does not match; nothing has been modified.
    zarrckpt.errors.UnsafeCheckpointError
        The checkpoint holds pickled objects and ``allow_pickle`` is False.
    """
    path = check_path(path, storage_options=storage_options)
    comm = Comm.from_group(process_group)
    check_world_size(path, comm.world_size, "load")
    op = Operation("load", path, comm)

    def plan() -> tuple[CheckpointFiles, LoadPlan]:
        # a single file (torch.save / safetensors) is read through a memory map
        store = open_store(path)
        files = (
            # a local path, or the URL with its storage_options
            _file_source_opener()(store.path, allow_pickle=allow_pickle)
            if store.kind() == "file"
            else CheckpointFiles(store)
        )
        if files.pickled and not allow_pickle:
            raise UnsafeCheckpointError(
                f"checkpoint {path!r} holds pickled Python objects (keys "
                f"{sorted(files.pickled)[:5]}); loading them could run arbitrary code. "
                "Pass allow_pickle=True only for checkpoints you trust"
            )
        load_plan = LoadPlan(files, allow_pickle=allow_pickle)
        if load_plan.walk(state_dict, files.tree, "", top=True) is not state_dict:
            raise UnsupportedValueError(
                f"load fills the target in place, but its root, a {type(state_dict).__name__}, "
                f"cannot be changed in place to receive checkpoint {path!r}; pass a dict"
            )
        if load_plan.meta_missing:
            meta = load_plan.meta_missing
            raise MissingKeysError(
                f"checkpoint {path!r} lacks {len(meta)} key(s) whose target tensors are on "
                f"the meta device: {meta[:20]}{' ...' if len(meta) > 20 else ''}; a meta "
                "tensor holds no values, so it cannot be skipped (also not with "
                "strict=False). Materialize it first (e.g. Module.to_empty) or leave it "
                "out of the target",
                meta,
            )
        if load_plan.mismatched:
            raise ShapeMismatchError(
                f"checkpoint {path!r} does not match the target state dict: "
                + "; ".join(load_plan.mismatched)
            )
        if load_plan.missing and strict:
            missing = load_plan.missing
            raise MissingKeysError(
                f"checkpoint {path!r} lacks {len(missing)} key(s) of the target state dict: "
                f"{missing[:20]}{' ...' if len(missing) > 20 else ''} "
                "(pass strict=False to skip them)",
                missing,
            )
        return files, load_plan

    files, load_plan = comm.agree(plan, f"planning the load of {path!r}")
    _check_same_version(comm, path, getattr(files, "version", None))
    comm.agree(
        lambda: files.read_many(load_plan.requests, threads=threads or default_threads()),
        f"reading the checkpoint {path!r}",
    )
    load_plan.apply()
    op.loaded(load_plan.requests, files.bytes_read)
    if stats is not None:
        stats["bytes_read"] = files.bytes_read
        stats["bytes_needed"] = load_plan.bytes_needed
    return LoadResult(missing_keys=list(load_plan.missing), unexpected_keys=load_plan.unexpected())
