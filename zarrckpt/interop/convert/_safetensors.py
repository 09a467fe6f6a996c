"""safetensors files <-> zarrckpt: :func:`from_safetensors` and :func:`to_safetensors`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch

from ...errors import UnsupportedValueError
from ...format._flatten import INLINE_BYTES_MAX
from ...format._layout import DEFAULT_CHUNK_BYTES, DEFAULT_INNER_BYTES
from ...format._metadata import ArrayEntry
from ...parallel._reader import CheckpointFiles
from ...storage._local import is_object_url, open_store
from .._safetensors_io import (
    COMPLEX128_KEY,
    RECORD_KEY,
    RESERVED_PREFIX,
    TREE_KEY,
    SafetensorsEntry,
    SafetensorsReader,
    carried_record,
    read_layout,
    write_safetensors,
)
from .._safetensors_io import NAMES as SAFETENSORS_NAMES
from .._safetensors_remote import Prefetcher, RemoteSafetensorsReader
from .._staged import StagedOutput, check_output_file
from ._common import (
    ConvertResult,
    PathLike,
    Piece,
    ProgressFn,
    Streamer,
    TensorSource,
    c_span,
    ingest,
    open_checkpoint,
    threads_or_default,
)
from ._remote import check_paths, local_destination

__all__ = ["from_safetensors", "to_safetensors"]

_TMP_NAME = "file.safetensors"


def _is_flat(tree: dict[str, Any]) -> bool:
    """A dict of str keys whose values are the tensors stored at those keys."""
    if set(tree) != {"dict"}:
        return False
    return all(
        isinstance(key, str) and set(node) == {"tensor"} and node["tensor"] == key
        for key, node in tree["dict"]
    )


def from_safetensors(
    src_file: PathLike,
    dst: PathLike,
    *,
    overwrite: bool = False,
    fsync: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    inner_chunk_bytes: int = DEFAULT_INNER_BYTES,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ConvertResult:
    """Convert a safetensors file into a zarrckpt checkpoint, streaming.

    A local file is memory-mapped; each chunk is written from the map and its
    pages are released. The tensors become a flat dict keyed by their names
    (in file order), unless the file was written by :func:`to_safetensors`
    from a nested state dict: then its ``"zarrckpt.tree"`` metadata restores
    the nesting and the plain values exactly. Other ``__metadata__`` entries
    are kept in the manifest and written back by :func:`to_safetensors`.

    Parameters
    ----------
    src_file
        A ``.safetensors`` file, local or an object (``s3://bucket/m.safetensors``).
    dst, overwrite, fsync, chunk_bytes, inner_chunk_bytes, threads, progress
        As for :func:`from_torch_save`.

    storage_options
        Client options for whichever side is an object-store URL
        (``s3://...``; both, when both are; docs/object-storage.md); None
        takes them from the environment. A safetensors object is read in
        place by ranged GETs (its header, then each tensor, read ahead within
        256 MiB); no local copy.

    Returns
    -------
    ConvertResult

    Raises
    ------
    zarrckpt.errors.CorruptCheckpointError
        The header is malformed or its zarrckpt metadata does not match the tensors.
    zarrckpt.errors.UnsupportedValueError
        A tensor has a dtype zarrckpt cannot store.
    """
    src_url, dst = check_paths(src_file, dst, storage_options)
    if is_object_url(src_url):
        return _from_remote_safetensors(
            src_url, dst, overwrite=overwrite, fsync=fsync, chunk_bytes=chunk_bytes,
            inner_chunk_bytes=inner_chunk_bytes, threads=threads, progress=progress,
        )
    with SafetensorsReader(src_url) as reader:
        tree, record, complex_names = read_layout(reader)

        def pieces(e: SafetensorsEntry, entry: ArrayEntry) -> Iterator[Piece]:
            array = reader.array(e)
            if e.name in complex_names:
                array = array.view(np.complex128).reshape(e.shape[:-1])

            def release(index: tuple[int, ...]) -> None:
                offset, n = c_span(array, entry.layout.chunk_region(index))
                reader.release(e.begin + offset, n)

            yield Piece(array, (0,) * array.ndim, release=release)

        tensors = _tensor_sources(reader.entries, complex_names, pieces)
        return ingest(
            src_url, dst, "safetensors", tree=tree, record=record, tensors=tensors,
            overwrite=overwrite, fsync=fsync, chunk_bytes=chunk_bytes,
            inner_chunk_bytes=inner_chunk_bytes, threads=threads, progress=progress,
        )


def _tensor_sources(
    entries: dict[str, SafetensorsEntry],
    complex_names: set[str],
    pieces: Callable[[SafetensorsEntry, ArrayEntry], Iterator[Piece]],
) -> list[TensorSource]:
    tensors = []
    for name, e in entries.items():
        if name in complex_names:
            dtype, shape = torch.complex128, tuple(e.shape[:-1])
        else:
            dtype, shape = e.dtype, tuple(e.shape)
        tensors.append(TensorSource(name, dtype, shape, partial(pieces, e)))
    return tensors


def _from_remote_safetensors(
    src_url: str, dst: str, *, overwrite: bool, threads: int | None, **options: Any
) -> ConvertResult:
    """:func:`from_safetensors` of an object: the header by two ranged GETs, the
    tensors read ahead whole (a GET each) while the previous ones are written."""
    # the destination is checked before any tensor is read ahead (the builder
    # checks it again when it starts)
    open_store(dst).check_writable(overwrite=overwrite)
    with RemoteSafetensorsReader(src_url) as reader:
        tree, record, complex_names = read_layout(reader)
        prefetch = Prefetcher(
            reader, list(reader.entries.values()), threads=threads_or_default(threads)
        )

        def pieces(e: SafetensorsEntry, entry: ArrayEntry) -> Iterator[Piece]:
            array = prefetch.take(e)
            if e.name in complex_names:
                array = array.view(np.complex128).reshape(e.shape[:-1])
            yield Piece(array, (0,) * array.ndim)

        try:
            return ingest(
                src_url, dst, "safetensors", tree=tree, record=record,
                tensors=_tensor_sources(reader.entries, complex_names, pieces),
                overwrite=overwrite, threads=threads, **options,
            )
        finally:
            prefetch.close()


def to_safetensors(
    src: PathLike,
    dst_file: PathLike,
    *,
    overwrite: bool = False,
    fsync: bool = True,
    metadata: dict[str, str] | None = None,
    threads: int | None = None,
    progress: ProgressFn | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ConvertResult:
    """Convert a zarrckpt checkpoint into a safetensors file, streaming.

    Tensors are stored under their FQNs (``"model.layer.weight"``), in
    manifest order. What safetensors cannot hold is mapped reversibly, never
    dropped:

    * nesting other than a flat dict of tensors, and plain values (ints,
      floats, strings, ...), go into the ``__metadata__`` entry
      ``"zarrckpt.tree"`` (the checkpoint's JSON tree), which
      :func:`from_safetensors` reads back;
    * ``complex128`` tensors (no safetensors dtype) are stored as ``F64`` with
      a last dimension of 2 (real, imaginary), listed in ``"zarrckpt.complex128"``.

    Values stored with pickle cannot be converted and raise.

    Parameters
    ----------
    src
        A committed zarrckpt checkpoint.
    dst_file
        The file to write (replaced atomically with ``overwrite=True``), local
        or an object (``s3://bucket/m.safetensors``: uploaded whole once written;
        S3 shows a multipart upload only when it completes).
    metadata
        Extra ``__metadata__`` entries (strings); keys starting with
        ``"zarrckpt."`` are reserved.
    overwrite, fsync, threads, progress
        As for :func:`from_torch_save`.

    storage_options
        Client options for whichever side is an object-store URL
        (``s3://...``; both, when both are; docs/object-storage.md); None
        takes them from the environment. A safetensors file on an object store is
        downloaded into (as a destination: written into, then uploaded
        from) a private temporary directory in ``TMPDIR``, which needs room
        for the whole file, and removed afterwards; an existing destination
        object is refused before anything is converted unless ``overwrite``.

    Returns
    -------
    ConvertResult

    Raises
    ------
    zarrckpt.errors.UnsupportedValueError
        The checkpoint stores pickled values, or ``metadata`` is not a dict of strings.
    """
    src_path, dst, files, record = open_checkpoint(src, dst_file, storage_options)
    with local_destination(dst, "safetensors file", overwrite=overwrite, fsync=fsync) as out:
        result = _to_file(
            src_path, files, record, out.path, overwrite=out.overwrite, fsync=out.fsync,
            metadata=metadata, threads=threads, progress=progress,
        )
    return replace(result, dst=dst)


def _to_file(
    src_path: str,
    files: CheckpointFiles,
    record: dict[str, Any],
    dst: str,
    *,
    overwrite: bool,
    fsync: bool,
    metadata: dict[str, str] | None,
    threads: int | None,
    progress: ProgressFn | None,
) -> ConvertResult:
    """:func:`to_safetensors` into the local file ``dst``."""
    if files.pickled:
        raise UnsupportedValueError(
            f"checkpoint {src_path!r} stores pickled values ({sorted(files.pickled)[:5]}); "
            "safetensors holds only tensors and string metadata, so they cannot be converted"
        )
    if files.byte_arrays:
        raise UnsupportedValueError(
            f"checkpoint {src_path!r} stores bytes values larger than {INLINE_BYTES_MAX} bytes "
            f"({sorted(files.byte_arrays)[:5]}); safetensors holds only tensors and string "
            "metadata, so they cannot be converted (convert to torch.save or DCP instead)"
        )
    check_output_file(dst, overwrite, "safetensors file")
    header_md: dict[str, str] = {}
    kept = record.get("safetensors_metadata")
    if isinstance(kept, dict):
        header_md.update({str(k): str(v) for k, v in kept.items()})
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str) or k.startswith(RESERVED_PREFIX):
            raise UnsupportedValueError(
                f"safetensors metadata must map str to str and not use the reserved prefix "
                f"{RESERVED_PREFIX!r}; got {k!r}: {v!r}"
            )
        header_md[k] = v
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    entries = list(files.arrays.values())
    complex_names = []
    for e in entries:
        dtype, shape = e.dtype.torch_dtype, e.shape
        if dtype == torch.complex128:
            dtype, shape = torch.float64, (*shape, 2)
            complex_names.append(e.fqn)
        elif dtype not in SAFETENSORS_NAMES:
            raise UnsupportedValueError(
                f"tensor {e.fqn!r} of {src_path!r} has dtype {dtype}, which safetensors cannot hold"
            )
        tensors.append((e.fqn, dtype, shape))
    if complex_names:
        header_md[COMPLEX128_KEY] = json.dumps(complex_names)
    carried = carried_record(record)
    carried.pop("safetensors_metadata", None)  # written as the file's own metadata
    if carried:
        header_md[RECORD_KEY] = json.dumps(carried, ensure_ascii=False, separators=(",", ":"))
    if not _is_flat(files.tree):
        header_md[TREE_KEY] = json.dumps(files.tree, ensure_ascii=False, separators=(",", ":"))
    stream = Streamer(files, entries, threads=threads, progress=progress)
    with StagedOutput(dst) as staged:
        write_safetensors(staged.path(_TMP_NAME), tensors, header_md, lambda i: stream(entries[i]))
        staged.publish_file(_TMP_NAME, fsync=fsync)
    return stream.result(src_path, dst, "safetensors")
