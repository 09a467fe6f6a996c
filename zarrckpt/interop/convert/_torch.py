"""``torch.save`` files <-> zarrckpt: :func:`from_torch_save` and :func:`to_torch_save`."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from ...errors import CorruptCheckpointError
from ...format._dtypes import tensor_as_numpy
from ...format._layout import DEFAULT_CHUNK_BYTES, DEFAULT_INNER_BYTES
from ...format._metadata import ArrayEntry
from ...parallel._reader import CheckpointFiles
from ...parallel._save import host_tensor
from .._staged import check_output_file
from .._torchsave_source import (
    container_extras,
    find_ties,
    flatten_loaded,
    load_torch_file,
    refuse_modules,
    region_span,
    restore_containers,
    verify_records,
)
from .._torchsave_writer import StorageStub, TensorStub, TorchSaveWriter, decode_for_pickle
from ._common import (
    ConvertResult,
    PathLike,
    Piece,
    ProgressFn,
    Streamer,
    TensorSource,
    check_dense,
    ingest,
    open_checkpoint,
)
from ._remote import check_paths, local_destination, local_source

__all__ = ["from_torch_save", "to_torch_save"]


def from_torch_save(
    src_file: PathLike,
    dst: PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    fsync: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    inner_chunk_bytes: int = DEFAULT_INNER_BYTES,
    threads: int | None = None,
    verify: bool = True,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ConvertResult:
    """Convert a ``torch.save`` file into a zarrckpt checkpoint, streaming.

    The file is opened with ``torch.load(mmap=True, weights_only=True)``: only
    its small pickle record is unpickled (by PyTorch's allow-list
    unpickler), tensors stay in the file and are copied chunk by chunk, and
    each chunk's pages are released once written. Tied tensors (the same view
    of one storage under several keys), ``OrderedDict`` containers and dict
    attributes such as ``state_dict()._metadata`` are recorded so that
    :func:`to_torch_save` gives them back.

    Parameters
    ----------
    src_file
        A ``torch.save`` file (zip format; the legacy pre-1.6 format is read
        whole into memory), local or an object (``s3://bucket/model.pt``).
    dst
        The checkpoint directory to create.
    overwrite, fsync, chunk_bytes, inner_chunk_bytes, threads
        As for :func:`zarrckpt.save`.
    allow_pickle
        Unpickle the file with plain pickle when the allow-list refuses it, and
        store values that are neither tensors nor JSON values with pickle.
        Only for files you trust.
    verify
        Check the zip CRC-32 of every tensor record of the file before converting it.
    progress
        ``progress(bytes_done, bytes_total, tensors_done, tensors_total)``,
        called from the calling thread.

    storage_options
        Client options for whichever side is an object-store URL
        (``s3://...``; both, when both are; docs/object-storage.md); None
        takes them from the environment. A torch.save file on an object store is
        downloaded into (as a destination: written into, then uploaded
        from) a private temporary directory in ``TMPDIR``, which needs room
        for the whole file, and removed afterwards; an existing destination
        object is refused before anything is converted unless ``overwrite``.

    Returns
    -------
    ConvertResult

    Raises
    ------
    zarrckpt.errors.UnsafeCheckpointError
        The file needs plain unpickling, or holds non-JSON values, and
        ``allow_pickle`` is False.
    zarrckpt.errors.UnsupportedValueError
        The file holds a whole module object, or a tensor zarrckpt cannot store.
    zarrckpt.errors.CorruptCheckpointError
        The file is unreadable or fails its CRC-32 checks.
    zarrckpt.errors.CheckpointExistsError
        ``dst`` exists and ``overwrite`` is False.
    """
    src_url, dst = check_paths(src_file, dst, storage_options)
    with local_source(src_url, checkpoint=dst, overwrite=overwrite) as src:
        return _from_file(
            src_url, src, dst, overwrite=overwrite, allow_pickle=allow_pickle, fsync=fsync,
            chunk_bytes=chunk_bytes, inner_chunk_bytes=inner_chunk_bytes, threads=threads,
            verify=verify, progress=progress,
        )


def _from_file(
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
    verify: bool,
    progress: ProgressFn | None,
) -> ConvertResult:
    """:func:`from_torch_save` of the local file ``src`` (a copy of ``src_url``)."""
    loaded = load_torch_file(src, allow_pickle=allow_pickle)
    refuse_modules(loaded.obj, src)
    flat = flatten_loaded(loaded.obj, allow_pickle=allow_pickle, checkpoint=dst)
    record: dict[str, Any] = {"source_format": "torch.save"}
    record.update(container_extras(loaded.obj, checkpoint=dst))
    ties = find_ties(flat.tensors)
    if ties:
        record["tied"] = ties
    for fqn, t in flat.tensors.items():
        check_dense(fqn, t, src)
    mappings = loaded.mappings
    if verify and mappings is not None:
        verify_records(src, flat.tensors.values(), mappings)

    def pieces(tensor: torch.Tensor, entry: ArrayEntry) -> Iterator[Piece]:
        t = host_tensor(tensor)
        release = None
        if mappings is not None and t.data_ptr() == tensor.data_ptr():  # no copy made

            def release(index: tuple[int, ...]) -> None:
                mappings.release(*region_span(t, entry.layout.chunk_region(index)))

        yield Piece(tensor_as_numpy(t), (0,) * t.dim(), release=release)

    tensors = [
        TensorSource(fqn, t.dtype, tuple(t.shape), partial(pieces, t))
        for fqn, t in flat.tensors.items()
    ]
    return ingest(
        src_url, dst, "torch", tree=flat.tree, record=record, tensors=tensors,
        pickled=flat.pickled, blobs=flat.blobs, overwrite=overwrite, fsync=fsync,
        chunk_bytes=chunk_bytes, inner_chunk_bytes=inner_chunk_bytes, threads=threads,
        progress=progress,
    )


def to_torch_save(
    src: PathLike,
    dst_file: PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    fsync: bool = True,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ConvertResult:
    """Convert a zarrckpt checkpoint into a ``torch.save`` file, streaming.

    ``torch.save`` itself needs every tensor in memory at once (it pickles the
    object, then copies each storage from memory into the zip archive). This
    converter writes the same file format without that: the archive is laid
    out by PyTorch's own writer with an empty record of the right size for
    each tensor, then each tensor is read from the checkpoint in slabs of
    about 64 MiB, written into its record and released; the records'
    CRC-32s are filled in last. ``torch.load(path, weights_only=True)`` (and
    ``mmap=True``) reads the result.

    Parameters
    ----------
    src
        A committed zarrckpt checkpoint.
    dst_file
        The file to write (replaced atomically with ``overwrite=True``), local
        or an object (``s3://bucket/model.pt``: uploaded whole once written;
        S3 shows a multipart upload only when it completes).
    allow_pickle
        Unpickle values the checkpoint stores with pickle (they are written
        into the file's pickle). Without it such values raise
        :class:`~zarrckpt.errors.UnsafeCheckpointError`.
    overwrite, fsync, threads, progress
        As for :func:`from_torch_save`.

    storage_options
        Client options for whichever side is an object-store URL
        (``s3://...``; both, when both are; docs/object-storage.md); None
        takes them from the environment. A torch.save file on an object store is
        downloaded into (as a destination: written into, then uploaded
        from) a private temporary directory in ``TMPDIR``, which needs room
        for the whole file, and removed afterwards; an existing destination
        object is refused before anything is converted unless ``overwrite``.

    Returns
    -------
    ConvertResult
    """
    src_path, dst, files, record = open_checkpoint(src, dst_file, storage_options)
    with local_destination(dst, "torch.save file", overwrite=overwrite, fsync=fsync) as out:
        result = _to_file(
            src_path, files, record, out.path, dst, overwrite=out.overwrite, fsync=out.fsync,
            allow_pickle=allow_pickle, threads=threads, progress=progress,
        )
    return replace(result, dst=dst)


def _to_file(
    src_path: str,
    files: CheckpointFiles,
    record: dict[str, Any],
    dst: str,
    dst_url: str,
    *,
    overwrite: bool,
    fsync: bool,
    allow_pickle: bool,
    threads: int | None,
    progress: ProgressFn | None,
) -> ConvertResult:
    """:func:`to_torch_save` into the local file ``dst`` (uploaded to ``dst_url``)."""
    check_output_file(dst, overwrite, "torch.save file")
    kept = record.get("safetensors_metadata")
    if isinstance(kept, dict) and set(kept) - {"format"}:  # "format": "pt" is boilerplate
        warnings.warn(
            f"checkpoint {src_path!r} keeps the safetensors metadata "
            f"{sorted(record['safetensors_metadata'])} of the file it came from; a torch.save "
            f"file has no place for it, so {dst_url!r} does not hold it",
            UserWarning,
            stacklevel=3,
        )
    tied = record.get("tied")
    ties: dict[str, Any] = tied if isinstance(tied, dict) else {}
    stubs: dict[str, TensorStub] = {}
    first_fqn: dict[int, str] = {}

    def stub_for(fqn: str) -> TensorStub:
        if fqn in stubs:
            return stubs[fqn]
        entry = files.arrays[fqn]
        target = ties.get(fqn)
        if (
            isinstance(target, str)
            and target != fqn
            and target in files.arrays
            and target not in ties
            and files.arrays[target].shape == entry.shape
            and files.arrays[target].dtype == entry.dtype
        ):
            stubs[fqn] = stub_for(target)
            return stubs[fqn]
        numel = 1
        for s in entry.shape:
            numel *= s
        stub = TensorStub(StorageStub(entry.dtype.torch_dtype, numel), entry.shape)
        stubs[fqn] = stub
        first_fqn[id(stub.storage)] = fqn
        return stub

    def resolve(kind: str, fqn: str) -> Any:
        if kind == "pickle":
            return files.read_pickled(fqn, allow_pickle=allow_pickle)
        if kind == "bytes":
            return files.read_bytes(fqn)
        if fqn not in files.arrays:
            raise CorruptCheckpointError(
                f"checkpoint {src_path!r}: the tree refers to tensor {fqn!r}, which has no array"
            )
        return stub_for(fqn)

    obj = restore_containers(decode_for_pickle(files.tree, resolve), record)
    with TorchSaveWriter(dst, overwrite=overwrite, fsync=fsync) as writer:
        order = writer.layout(obj)
        by_storage = {id(s): files.arrays[first_fqn[id(s)]] for s in order}
        stream = Streamer(
            files, [by_storage[id(s)] for s in order], threads=threads, progress=progress
        )
        writer.fill(order, lambda stub: stream(by_storage[id(stub)]))
        writer.publish()
    return stream.result(src_path, dst, "torch")
