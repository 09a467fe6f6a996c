"""``torch.distributed.checkpoint`` directories <-> zarrckpt: :func:`from_dcp`, :func:`to_dcp`."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from ...errors import CorruptCheckpointError, UnsupportedValueError
from ...format._dtypes import info_for_torch, tensor_as_numpy
from ...format._layout import DEFAULT_CHUNK_BYTES, DEFAULT_INNER_BYTES, Region
from ...format._metadata import ArrayEntry
from ...parallel._planning import ArrayPieces, plan_arrays
from ...parallel._save import host_tensor
from .._safetensors_io import carried_record
from .._torchsave_source import flatten_loaded
from ..dcp._export import save_streaming
from ..dcp._source import DcpSource
from ..dcp._tree import nonempty, region
from ._builder import ProgressTracker
from ._common import (
    ConvertResult,
    PathLike,
    Piece,
    ProgressFn,
    TensorSource,
    ingest,
    open_checkpoint,
    threads_or_default,
)
from ._remote import check_paths, local_destination, local_source

__all__ = ["from_dcp", "to_dcp"]


def from_dcp(
    src_dir: PathLike,
    dst: PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    fsync: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    inner_chunk_bytes: int = DEFAULT_INNER_BYTES,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ConvertResult:
    """Convert a ``torch.distributed.checkpoint`` directory into a zarrckpt checkpoint.

    Works in one process, without a process group, for checkpoints written
    by any number of ranks (FSDP, FSDP2, TP, ...): each array holds the global
    tensor, and its chunk grid is the grid of the stored pieces (so a
    checkpoint saved by 4 FSDP ranks gets the chunks :func:`zarrckpt.save`
    would have written from those ranks). Pieces are read one at a time
    (``torch.load(weights_only=True)`` of its byte range), written and released.

    DCP's ``.metadata`` file is a pickle. Without ``allow_pickle`` it is read
    with a restricted unpickler that can only construct DCP's metadata
    classes (and torch.Size, dtypes, pathlib paths); a ``.metadata`` that
    refers to anything else raises
    :class:`~zarrckpt.errors.UnsafeCheckpointError`. Non-tensor values are
    loaded with ``torch.load(weights_only=True)``.

    Parameters
    ----------
    src_dir
        A DCP checkpoint directory written with ``FileSystemWriter`` (the
        default of ``dcp.save(..., checkpoint_id=dir)``), or a prefix holding
        such a directory's files (``s3://bucket/dcp``).
    allow_pickle
        Read ``.metadata`` and values with plain pickle, and store values
        that are not JSON with pickle. Only for checkpoints you trust.
    dst, overwrite, fsync, chunk_bytes, inner_chunk_bytes, threads, progress
        As for :func:`from_torch_save`.

    storage_options
        Client options for whichever side is an object-store URL
        (``s3://...``; both, when both are; docs/object-storage.md); None
        takes them from the environment. A DCP checkpoint on an object store
        (every object below the prefix) is downloaded into (as a destination:
        written into, then uploaded from, its ``.metadata`` last) a private
        temporary directory in ``TMPDIR``, which needs room for all of it,
        and removed afterwards.

    Returns
    -------
    ConvertResult
    """
    src_url, dst = check_paths(src_dir, dst, storage_options)
    with local_source(src_url, directory=True, checkpoint=dst, overwrite=overwrite) as src:
        return _from_dir(
            src_url, src, dst, overwrite=overwrite, allow_pickle=allow_pickle, fsync=fsync,
            chunk_bytes=chunk_bytes, inner_chunk_bytes=inner_chunk_bytes, threads=threads,
            progress=progress,
        )


def _from_dir(
    src_url: str,
    src: str,
    dst: str,
    *,
    overwrite: bool,
    allow_pickle: bool,
    fsync: bool,
    chunk_bytes: int,
    inner_chunk_bytes: int,
    threads: int | None,
    progress: ProgressFn | None,
) -> ConvertResult:
    """:func:`from_dcp` of the local directory ``src`` (a copy of ``src_url``)."""
    source = DcpSource(src, allow_pickle=allow_pickle)
    nodes: dict[str, dict[str, Any]] = {}
    value_tensors: dict[str, torch.Tensor] = {}
    pickled: dict[str, Any] = {}
    blobs: dict[str, bytes] = {}
    for key in source.keys:
        if key in source.tensors:
            nodes[key] = {"tensor": key}
            continue
        value = source.read_value(key)
        flat = flatten_loaded({key: value}, allow_pickle=allow_pickle, checkpoint=dst)
        nodes[key] = flat.tree["dict"][0][1]
        value_tensors.update(flat.tensors)
        pickled.update(flat.pickled)
        blobs.update(flat.blobs)
    tree = source.build_tree(nodes.__getitem__)
    tensors: list[TensorSource] = []
    for key, md in source.tensors.items():
        shape = tuple(int(s) for s in md.size)
        info = info_for_torch(md.properties.dtype, key=key, path=src)
        pieces = [r for r in (region(c.offsets, c.sizes) for c in md.chunks) if nonempty(r)]
        plan = plan_arrays(
            [ArrayPieces(key, shape, info.numpy_dtype.itemsize, (tuple(pieces),))],
            1,
            chunk_bytes=chunk_bytes,
            inner_bytes=inner_chunk_bytes,
        )[0]
        by_piece: dict[int, list[tuple[int, ...]]] = {}
        for index, (_, k) in plan.writers.items():
            by_piece.setdefault(k, []).append(index)

        def read(
            entry: ArrayEntry, key: str = key, dtype: torch.dtype = info.torch_dtype,
            pieces: list[Region] = pieces, by_piece: dict[int, list[tuple[int, ...]]] = by_piece,
        ) -> Iterator[Piece]:
            for k, region_k in enumerate(pieces):
                if k not in by_piece:
                    continue
                offsets = tuple(a for a, _ in region_k)
                piece = source.read_piece(key, offsets)
                expected = tuple(b - a for a, b in region_k)
                if tuple(piece.shape) != expected or piece.dtype != dtype:
                    raise CorruptCheckpointError(
                        f"DCP checkpoint {src!r}: piece of {key!r} at {list(offsets)} is a "
                        f"{tuple(piece.shape)} {piece.dtype} tensor; its metadata says "
                        f"{expected} {dtype}"
                    )
                # drained: the piece is released before the next one is read
                yield Piece(tensor_as_numpy(host_tensor(piece)), offsets, by_piece[k], drain=True)
                del piece

        tensors.append(TensorSource(key, info.torch_dtype, shape, read, layout=plan.layout))
    for fqn, t in value_tensors.items():
        tensors.append(TensorSource(fqn, t.dtype, tuple(t.shape), partial(_whole, t)))
    return ingest(
        src_url, dst, "dcp", tree=tree,
        record=lambda: {"source_format": "dcp", **carried_record(source.sidecar_record())},
        tensors=tensors, pickled=pickled, blobs=blobs, overwrite=overwrite, fsync=fsync,
        chunk_bytes=chunk_bytes, inner_chunk_bytes=inner_chunk_bytes, threads=threads,
        progress=progress,
    )


def _whole(t: torch.Tensor, entry: ArrayEntry) -> Iterator[Piece]:
    t = host_tensor(t)
    yield Piece(tensor_as_numpy(t), (0,) * t.dim())


def to_dcp(
    src: PathLike,
    dst_dir: PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    fsync: bool = True,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ConvertResult:
    """Convert a zarrckpt checkpoint into a ``torch.distributed.checkpoint`` directory.

    Written by ``dcp.save`` with DCP's own ``FileSystemWriter`` in this process
    (no process group): ``dcp.load`` reads it into any sharding, on any
    number of ranks. Each stored zarrckpt chunk becomes one DCP piece, read
    from the checkpoint only when DCP's writer asks for it, so memory holds
    about one chunk (chunks follow the shard grid of sharded saves, or are
    row slabs of about 64 MiB).

    DCP stores dict keys as strings and does not record empty dicts; the
    exact zarrckpt tree is kept beside DCP's files in ``zarrckpt_tree.json``
    (ignored by DCP), which :func:`from_dcp` uses while it still matches the
    directory's ``.metadata``.

    Parameters
    ----------
    src
        A committed zarrckpt checkpoint whose root is a dict.
    dst_dir
        The DCP directory to create (replaced atomically with ``overwrite=True``;
        only a DCP or zarrckpt checkpoint or an empty directory is replaced), or
        a prefix (``s3://bucket/dcp``: every file is uploaded, ``.metadata``, DCP's
        commit point, last; with ``overwrite=True`` the old ``.metadata`` is
        deleted first and then the old objects, so the prefix holds no loadable
        DCP checkpoint until the upload ends: not atomic).
    allow_pickle
        Unpickle values the checkpoint stores with pickle (DCP then stores
        them with ``torch.save``).
    overwrite, fsync, threads, progress
        As for :func:`from_torch_save`.

    storage_options
        Client options for whichever side is an object-store URL
        (``s3://...``; both, when both are; docs/object-storage.md); None
        takes them from the environment. A DCP checkpoint on an object store
        (every object below the prefix) is downloaded into (as a destination:
        written into, then uploaded from, its ``.metadata`` last) a private
        temporary directory in ``TMPDIR``, which needs room for all of it,
        and removed afterwards.

    Returns
    -------
    ConvertResult
    """
    src_path, dst, files, record = open_checkpoint(src, dst_dir, storage_options)
    root = files.tree
    while isinstance(root, dict) and "stateful" in root:
        root = root["stateful"]
    if not isinstance(root, dict) or "dict" not in root:
        raise UnsupportedValueError(
            f"checkpoint {src_path!r} stores a {sorted(root)} at its root; a DCP checkpoint "
            "holds a dict"
        )
    total = sum(e.nbytes for e in files.arrays.values())
    tracker = ProgressTracker(progress, total, len(files.arrays))
    for e in files.arrays.values():
        if e.nbytes == 0:
            tracker.tensor_done()

    def on_chunk(nbytes: int, tensor_done: bool) -> None:
        tracker.add_bytes(nbytes)
        if tensor_done:
            tracker.tensor_done()

    with local_destination(
        dst, "DCP checkpoint", overwrite=overwrite, fsync=fsync, directory=True
    ) as out:
        save_streaming(
            files,
            out.path,
            record=carried_record(record),
            overwrite=out.overwrite,
            allow_pickle=allow_pickle,
            fsync=out.fsync,
            threads=threads_or_default(threads),
            progress=on_chunk,
        )
    return ConvertResult(src_path, dst, "zarrckpt", "dcp", len(files.arrays), total)
