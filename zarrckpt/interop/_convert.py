"""Streaming converters between zarrckpt and ``torch.save`` files, DCP directories
and safetensors files.

Every converter reads its source one tensor (or one chunk, or one stored
piece) at a time, writes it, and releases it, so a conversion needs about the
largest tensor's memory (often only a chunk's), never the whole checkpoint.
Writing a zarrckpt checkpoint follows the same protocol as
:func:`zarrckpt.save`: a hidden staging directory, crc32c on every chunk, a
commit marker, an atomic publish. Writing a file or a DCP directory goes
through a temporary name that is renamed into place once complete.

See ``docs/convert.md`` for what each format can hold and how the
conversions map what it cannot.

``zarrckpt convert SRC DST`` on the command line converts between any two of
the four formats (through a temporary zarrckpt checkpoint when neither side is
one).
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsupportedValueError,
)
from ..format._dtypes import info_for_torch, tensor_as_numpy
from ..format._flatten import INLINE_BYTES_MAX
from ..format._layout import DEFAULT_CHUNK_BYTES, DEFAULT_INNER_BYTES
from ..format._metadata import ArrayEntry
from ..parallel._planning import ArrayPieces, plan_arrays
from ..parallel._reader import CheckpointFiles, ReadRequest
from ..parallel._save import host_tensor
from ..parallel._writer import default_threads
from ..storage._paths import check_path, make_parents
from ..storage._storage import check_writable, is_checkpoint_dir, new_staging_dir, remove_tree
from ._convert_sink import CheckpointBuilder, ProgressFn, ProgressTracker
from ._dcp_io import DcpSource, is_dcp_dir, save_streaming
from ._formats import FORMATS
from ._safetensors_io import (
    COMPLEX128_KEY,
    RECORD_KEY,
    RESERVED_PREFIX,
    TREE_KEY,
    SafetensorsReader,
    carried_record,
    read_layout,
    write_safetensors,
)
from ._safetensors_io import NAMES as SAFETENSORS_NAMES
from ._torchsave_source import (
    container_extras,
    find_ties,
    flatten_loaded,
    load_torch_file,
    refuse_modules,
    region_span,
    restore_containers,
    verify_records,
)
from ._torchsave_writer import StorageStub, TensorStub, TorchSaveWriter, decode_for_pickle

__all__ = [
    "FORMATS",
    "ConvertResult",
    "ProgressFn",
    "convert",
    "detect_format",
    "from_dcp",
    "from_safetensors",
    "from_torch_save",
    "to_dcp",
    "to_safetensors",
    "to_torch_save",
]

PathLike = str | os.PathLike[str]

#: manifest member where converters record what the tree alone does not say
MANIFEST_MEMBER = "convert"
#: bytes read from a zarrckpt checkpoint per slab when writing a file
_SLAB_BYTES = 64 << 20

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl")


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion did."""

    src: str
    dst: str
    src_format: str
    dst_format: str
    #: tensors converted
    tensors: int
    #: tensor bytes converted
    nbytes: int


# ------------------------------------------------------------------ helpers


def _threads(threads: int | None) -> int:
    return threads or default_threads()


def _counter(tracker: ProgressTracker, total: int) -> Callable[[int], None]:
    """Counts one tensor's written bytes; marks the tensor done at ``total``."""
    if total == 0:
        tracker.tensor_done()
        return lambda n: None
    done = [0]

    def written(n: int) -> None:
        tracker.add_bytes(n)
        done[0] += n
        if done[0] == total:
            tracker.tensor_done()

    return written


def _c_span(array: np.ndarray, region: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """(byte offset, nbytes) of ``region`` within a C-contiguous array's buffer."""
    if any(b <= a for a, b in region):
        return 0, 0
    stride = [array.itemsize] * array.ndim
    for i in range(array.ndim - 2, -1, -1):
        stride[i] = stride[i + 1] * array.shape[i + 1]
    first = sum(a * s for (a, _), s in zip(region, stride, strict=True))
    last = sum((b - 1) * s for (_, b), s in zip(region, stride, strict=True))
    return first, last - first + array.itemsize


def _row_bands(entry: ArrayEntry, target: int) -> list[tuple[int, int]]:
    """Row ranges of about ``target`` bytes aligned to the stored (inner) chunks' rows."""
    shape = entry.shape
    if not shape or shape[0] == 0:
        return []
    row_bytes = entry.dtype.numpy_dtype.itemsize
    for s in shape[1:]:
        row_bytes *= s
    layout = entry.layout
    unit = (layout.inner_shape or layout.chunk_shape)[0]
    rows = max(unit, (target // max(1, row_bytes)) // unit * unit)
    return [(r, min(r + rows, shape[0])) for r in range(0, shape[0], rows)]


def _stream_tensor(
    files: CheckpointFiles, entry: ArrayEntry, threads: int, written: Callable[[int], None]
) -> Iterator[np.ndarray]:
    """The C-order contents of a stored tensor, one slab of rows at a time."""
    if entry.nbytes == 0:
        return
    if not entry.shape:
        dest = np.empty((), dtype=entry.dtype.numpy_dtype)
        files.read_many([ReadRequest(entry, dest, ())], threads=1)
        yield dest
        written(dest.nbytes)
        return
    for r0, r1 in _row_bands(entry, _SLAB_BYTES):
        dest = np.empty((r1 - r0, *entry.shape[1:]), dtype=entry.dtype.numpy_dtype)
        files.read_many(
            [ReadRequest(entry, dest, (r0,) + (0,) * (len(entry.shape) - 1))], threads=threads
        )
        yield dest
        written(dest.nbytes)
        del dest


def _conversion_record(files: CheckpointFiles) -> dict[str, Any]:
    record = files.manifest.get(MANIFEST_MEMBER)
    return record if isinstance(record, dict) else {}


def _check_output_file(path: str, overwrite: bool, what: str) -> None:
    if os.path.isdir(path):
        raise CheckpointExistsError(f"cannot write {what} {path!r}: it is a directory")
    check_writable(path, overwrite=overwrite)


# ------------------------------------------------------------------ torch.save


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
        whole into memory).
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
    src, dst = check_path(src_file, role="source"), check_path(dst, role="destination")
    loaded = load_torch_file(src, allow_pickle=allow_pickle)
    refuse_modules(loaded.obj, src)
    flat = flatten_loaded(loaded.obj, allow_pickle=allow_pickle, checkpoint=dst)
    record: dict[str, Any] = {"source_format": "torch.save"}
    record.update(container_extras(loaded.obj, checkpoint=dst))
    ties = find_ties(flat.tensors)
    if ties:
        record["tied"] = ties
    total = 0
    for fqn, t in flat.tensors.items():
        info_for_torch(t.dtype, key=fqn, path=src)
        if t.layout != torch.strided:
            raise UnsupportedValueError(
                f"tensor {fqn!r} of {src!r} has layout {t.layout}; only dense tensors convert"
            )
        total += t.numel() * t.element_size()
    mappings = loaded.mappings
    if verify and mappings is not None:
        verify_records(src, flat.tensors.values(), mappings)
    tracker = ProgressTracker(progress, total, len(flat.tensors))
    with CheckpointBuilder(
        dst,
        overwrite=overwrite,
        fsync=fsync,
        chunk_bytes=chunk_bytes,
        inner_chunk_bytes=inner_chunk_bytes,
        threads=_threads(threads),
    ) as builder:
        for fqn, tensor in flat.tensors.items():
            t = host_tensor(tensor)
            entry = builder.add_tensor(fqn, t.dtype, tuple(t.shape))
            release = None
            if mappings is not None and t.data_ptr() == tensor.data_ptr():  # no copy made

                def release(
                    index: tuple[int, ...], t: torch.Tensor = t, entry: ArrayEntry = entry
                ) -> None:
                    mappings.release(*region_span(t, entry.layout.chunk_region(index)))

            builder.write_chunks(
                entry,
                tensor_as_numpy(t),
                (0,) * t.dim(),
                release=release,
                written=_counter(tracker, entry.nbytes),
            )
        for fqn, obj in flat.pickled.items():
            builder.add_pickled(fqn, obj)
        for fqn, data in flat.blobs.items():
            builder.add_bytes(fqn, data)
        builder.commit(flat.tree, extra={MANIFEST_MEMBER: record})
    return ConvertResult(src, dst, "torch", "zarrckpt", len(flat.tensors), total)


def to_torch_save(
    src: PathLike,
    dst_file: PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    fsync: bool = True,
    threads: int | None = None,
    progress: ProgressFn | None = None,
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
        The file to write (replaced atomically with ``overwrite=True``).
    allow_pickle
        Unpickle values the checkpoint stores with pickle (they are written
        into the file's pickle). Without it such values raise
        :class:`~zarrckpt.errors.UnsafeCheckpointError`.
    overwrite, fsync, threads, progress
        As for :func:`from_torch_save`.

    Returns
    -------
    ConvertResult
    """
    src_path, dst = check_path(src, role="source"), check_path(dst_file, role="destination")
    files = CheckpointFiles(src_path)
    record = _conversion_record(files)
    _check_output_file(dst, overwrite, "torch.save file")
    kept = record.get("safetensors_metadata")
    if isinstance(kept, dict) and set(kept) - {"format"}:  # "format": "pt" is boilerplate
        warnings.warn(
            f"checkpoint {src_path!r} keeps the safetensors metadata "
            f"{sorted(record['safetensors_metadata'])} of the file it came from; a torch.save "
            f"file has no place for it, so {dst!r} does not hold it",
            UserWarning,
            stacklevel=2,
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
    n_threads = _threads(threads)
    with TorchSaveWriter(dst, overwrite=overwrite, fsync=fsync) as writer:
        order = writer.layout(obj)
        entries = [files.arrays[first_fqn[id(s)]] for s in order]
        total = sum(e.nbytes for e in entries)
        tracker = ProgressTracker(progress, total, len(entries))
        by_storage = {id(s): e for s, e in zip(order, entries, strict=True)}

        def source(stub: StorageStub) -> Iterator[np.ndarray]:
            entry = by_storage[id(stub)]
            return _stream_tensor(files, entry, n_threads, _counter(tracker, entry.nbytes))

        writer.fill(order, source)
        writer.publish()
    return ConvertResult(src_path, dst, "zarrckpt", "torch", len(entries), total)


# ------------------------------------------------------------------ safetensors


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
) -> ConvertResult:
    """Convert a safetensors file into a zarrckpt checkpoint, streaming.

    The file is memory-mapped; each chunk is written from the map and its
    pages are released. The tensors become a flat dict keyed by their names
    (in file order), unless the file was written by :func:`to_safetensors`
    from a nested state dict: then its ``"zarrckpt.tree"`` metadata restores
    the nesting and the plain values exactly. Other ``__metadata__`` entries
    are kept in the manifest and written back by :func:`to_safetensors`.

    Parameters
    ----------
    src_file
        A ``.safetensors`` file.
    dst, overwrite, fsync, chunk_bytes, inner_chunk_bytes, threads, progress
        As for :func:`from_torch_save`.

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
    src, dst = check_path(src_file, role="source"), check_path(dst, role="destination")
    with SafetensorsReader(src) as reader:
        tree, record, complex_names = read_layout(reader)
        total = sum(e.nbytes for e in reader.entries.values())
        tracker = ProgressTracker(progress, total, len(reader.entries))
        with CheckpointBuilder(
            dst,
            overwrite=overwrite,
            fsync=fsync,
            chunk_bytes=chunk_bytes,
            inner_chunk_bytes=inner_chunk_bytes,
            threads=_threads(threads),
        ) as builder:
            for name, e in reader.entries.items():
                array = reader.array(e)
                dtype = e.dtype
                if name in complex_names:
                    array = array.view(np.complex128).reshape(e.shape[:-1])
                    dtype = torch.complex128
                entry = builder.add_tensor(name, dtype, tuple(array.shape))

                def release(
                    index: tuple[int, ...], array: np.ndarray = array, entry: ArrayEntry = entry,
                    begin: int = e.begin,
                ) -> None:
                    offset, n = _c_span(array, entry.layout.chunk_region(index))
                    reader.release(begin + offset, n)

                builder.write_chunks(
                    entry,
                    array,
                    (0,) * array.ndim,
                    release=release,
                    written=_counter(tracker, entry.nbytes),
                )
                del array
            builder.commit(tree, extra={MANIFEST_MEMBER: record})
    return ConvertResult(src, dst, "safetensors", "zarrckpt", len(reader.entries), total)


def to_safetensors(
    src: PathLike,
    dst_file: PathLike,
    *,
    overwrite: bool = False,
    fsync: bool = True,
    metadata: dict[str, str] | None = None,
    threads: int | None = None,
    progress: ProgressFn | None = None,
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
        The file to write (replaced atomically with ``overwrite=True``).
    metadata
        Extra ``__metadata__`` entries (strings); keys starting with
        ``"zarrckpt."`` are reserved.
    overwrite, fsync, threads, progress
        As for :func:`from_torch_save`.

    Returns
    -------
    ConvertResult

    Raises
    ------
    zarrckpt.errors.UnsupportedValueError
        The checkpoint stores pickled values, or ``metadata`` is not a dict of strings.
    """
    src_path, dst = check_path(src, role="source"), check_path(dst_file, role="destination")
    files = CheckpointFiles(src_path)
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
    _check_output_file(dst, overwrite, "safetensors file")
    record = _conversion_record(files)
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
    total = sum(e.nbytes for e in entries)
    tracker = ProgressTracker(progress, total, len(entries))
    n_threads = _threads(threads)
    staging = new_staging_dir(dst)
    try:
        tmp = os.path.join(staging, "file.safetensors")

        def source(i: int) -> Iterator[np.ndarray]:
            entry = entries[i]
            return _stream_tensor(files, entry, n_threads, _counter(tracker, entry.nbytes))

        write_safetensors(tmp, tensors, header_md, source)
        _publish_file(tmp, dst, fsync=fsync)
    finally:
        remove_tree(staging)
    return ConvertResult(src_path, dst, "zarrckpt", "safetensors", len(entries), total)


def _publish_file(tmp: str, dst: str, *, fsync: bool) -> None:
    from ..storage._storage import _fsync_path

    if fsync:
        _fsync_path(tmp)
    os.replace(tmp, dst)
    if fsync:
        _fsync_path(os.path.dirname(os.path.abspath(dst)))


# ------------------------------------------------------------------ DCP


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
        default of ``dcp.save(..., checkpoint_id=dir)``).
    allow_pickle
        Read ``.metadata`` and values with plain pickle, and store values
        that are not JSON with pickle. Only for checkpoints you trust.
    dst, overwrite, fsync, chunk_bytes, inner_chunk_bytes, threads, progress
        As for :func:`from_torch_save`.

    Returns
    -------
    ConvertResult
    """
    src, dst = check_path(src_dir, role="source"), check_path(dst, role="destination")
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
    plans = []
    total = 0
    for key, md in source.tensors.items():
        shape = tuple(int(s) for s in md.size)
        info = info_for_torch(md.properties.dtype, key=key, path=src)
        pieces = []
        for chunk in md.chunks:
            region = tuple(
                (int(o), int(o) + int(s)) for o, s in zip(chunk.offsets, chunk.sizes, strict=True)
            )
            if all(b > a for a, b in region):
                pieces.append(region)
        plan = plan_arrays(
            [ArrayPieces(key, shape, info.numpy_dtype.itemsize, (tuple(pieces),))],
            1,
            chunk_bytes=chunk_bytes,
            inner_bytes=inner_chunk_bytes,
        )[0]
        plans.append((key, md, info, shape, pieces, plan))
        total += info.numpy_dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    total += sum(t.numel() * t.element_size() for t in value_tensors.values())
    tracker = ProgressTracker(progress, total, len(plans) + len(value_tensors))
    with CheckpointBuilder(
        dst,
        overwrite=overwrite,
        fsync=fsync,
        chunk_bytes=chunk_bytes,
        inner_chunk_bytes=inner_chunk_bytes,
        threads=_threads(threads),
    ) as builder:
        for key, _md, info, shape, pieces, plan in plans:
            entry = builder.add_tensor(key, info.torch_dtype, shape, layout=plan.layout)
            counter = _counter(tracker, entry.nbytes)
            by_piece: dict[int, list[tuple[int, ...]]] = {}
            for index, (_, k) in plan.writers.items():
                by_piece.setdefault(k, []).append(index)
            for k, region in enumerate(pieces):
                if k not in by_piece:
                    continue
                offsets = tuple(a for a, _ in region)
                piece = source.read_piece(key, offsets)
                expected = tuple(b - a for a, b in region)
                if tuple(piece.shape) != expected or piece.dtype != info.torch_dtype:
                    raise CorruptCheckpointError(
                        f"DCP checkpoint {src!r}: piece of {key!r} at {list(offsets)} is a "
                        f"{tuple(piece.shape)} {piece.dtype} tensor; its metadata says "
                        f"{expected} {info.torch_dtype}"
                    )
                builder.write_chunks(
                    entry, tensor_as_numpy(host_tensor(piece)), offsets, by_piece[k],
                    written=counter,
                )
                builder.drain()  # the piece is released before the next one is read
                del piece
        for fqn, t in value_tensors.items():
            t = host_tensor(t)
            entry = builder.add_tensor(fqn, t.dtype, tuple(t.shape))
            builder.write_chunks(
                entry, tensor_as_numpy(t), (0,) * t.dim(), written=_counter(tracker, entry.nbytes)
            )
        for fqn, obj in pickled.items():
            builder.add_pickled(fqn, obj)
        for fqn, data in blobs.items():
            builder.add_bytes(fqn, data)
        record = {"source_format": "dcp", **carried_record(source.sidecar_record())}
        builder.commit(tree, extra={MANIFEST_MEMBER: record})
    return ConvertResult(src, dst, "dcp", "zarrckpt", len(plans) + len(value_tensors), total)


def to_dcp(
    src: PathLike,
    dst_dir: PathLike,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    fsync: bool = True,
    threads: int | None = None,
    progress: ProgressFn | None = None,
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
        only a DCP or zarrckpt checkpoint or an empty directory is replaced).
    allow_pickle
        Unpickle values the checkpoint stores with pickle (DCP then stores
        them with ``torch.save``).
    overwrite, fsync, threads, progress
        As for :func:`from_torch_save`.

    Returns
    -------
    ConvertResult
    """
    src_path, dst = check_path(src, role="source"), check_path(dst_dir, role="destination")
    files = CheckpointFiles(src_path)
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

    save_streaming(
        files,
        dst,
        record=carried_record(_conversion_record(files)),
        overwrite=overwrite,
        allow_pickle=allow_pickle,
        fsync=fsync,
        threads=_threads(threads),
        progress=on_chunk,
    )
    return ConvertResult(src_path, dst, "zarrckpt", "dcp", len(files.arrays), total)


# ------------------------------------------------------------------ any pair


def _looks_like_safetensors(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) < 9:
            return False
        (n,) = struct.unpack("<Q", head[:8])
        return head[8:9] == b"{" and 8 + n <= os.path.getsize(path)
    except OSError:
        return False


def detect_format(path: PathLike, *, role: str = "source", src_format: str | None = None) -> str:
    """The format of ``path``: ``"torch"``, ``"dcp"``, ``"safetensors"`` or ``"zarrckpt"``.

    A source is recognized by its content: a zarrckpt checkpoint directory
    (``zarr.json`` with a zarrckpt manifest, or a commit marker), a DCP
    directory (``.metadata``), a zip or legacy ``torch.save`` file, a
    safetensors file. A destination (``role="destination"``) by its name: a
    ``.safetensors`` file, a ``.pt``/``.pth``/``.bin``/``.ckpt`` file, an
    existing checkpoint directory by its content; any other path is a
    zarrckpt checkpoint, or a DCP directory when the source is a zarrckpt
    checkpoint.

    Raises
    ------
    zarrckpt.errors.CheckpointNotFoundError
        A source that does not exist or is of no known format.
    """
    p = os.fspath(path)
    lower = p.lower().rstrip("/")
    if role == "destination":
        if lower.endswith(".safetensors"):
            return "safetensors"
        if lower.endswith(_TORCH_SUFFIXES):
            return "torch"
        if os.path.isdir(p):
            if is_checkpoint_dir(p):
                return "zarrckpt"
            if is_dcp_dir(p):
                return "dcp"
        return "dcp" if src_format == "zarrckpt" else "zarrckpt"
    if os.path.isdir(p):
        if is_checkpoint_dir(p):
            return "zarrckpt"
        if is_dcp_dir(p):
            return "dcp"
        raise CheckpointNotFoundError(
            f"{p!r} is a directory but neither a zarrckpt checkpoint nor a DCP checkpoint "
            "(no zarr.json manifest, no .metadata)"
        )
    if not os.path.isfile(p):
        raise CheckpointNotFoundError(f"no file or directory at {p!r}")
    if lower.endswith(".safetensors"):
        return "safetensors"
    if zipfile.is_zipfile(p) or lower.endswith(_TORCH_SUFFIXES):
        return "torch"
    if _looks_like_safetensors(p):
        return "safetensors"
    raise CheckpointNotFoundError(
        f"cannot tell the format of {p!r}: not a zip torch.save file, not a safetensors file "
        "(pass src_format / --from)"
    )


def _accepts(func: Callable[..., Any]) -> set[str]:
    import inspect

    return {
        name
        for name, p in inspect.signature(func).parameters.items()
        if p.kind == p.KEYWORD_ONLY and name != "progress"
    }


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    src_format: str | None = None,
    dst_format: str | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> ConvertResult:
    """Convert between any two formats (see :data:`FORMATS`), inferring them from the paths.

    A conversion between two formats other than zarrckpt goes through a
    temporary zarrckpt checkpoint (created beside ``dst``, removed afterwards),
    so it streams as well; its progress counts both passes.

    Parameters
    ----------
    src, dst
        Source and destination paths.
    src_format, dst_format
        Override :func:`detect_format`.
    progress
        As for :func:`from_torch_save`.
    options
        Keyword options of the converters used (e.g. ``overwrite``,
        ``allow_pickle``, ``fsync``, ``chunk_bytes``, ``threads``, ``verify``,
        ``metadata``), each passed to those that accept it; an option that
        none of them accepts raises.

    Returns
    -------
    ConvertResult
        With the formats actually used.

    Raises
    ------
    ValueError
        Unknown format names, an option that does not apply, or ``src`` and
        ``dst`` of the same format.
    """
    s, d = check_path(src, role="source"), check_path(dst, role="destination")
    sf = src_format or detect_format(s)
    df = dst_format or detect_format(d, role="destination", src_format=sf)
    for name in (sf, df):
        if name not in FORMATS:
            raise ValueError(f"unknown format {name!r}; expected one of {FORMATS}")
    if sf == df:
        raise ValueError(
            f"{s!r} and {d!r} are both {sf}; nothing to convert (pass dst_format / --to)"
        )
    from_funcs: dict[str, Callable[..., ConvertResult]] = {
        "torch": from_torch_save,
        "dcp": from_dcp,
        "safetensors": from_safetensors,
    }
    to_funcs: dict[str, Callable[..., ConvertResult]] = {
        "torch": to_torch_save,
        "dcp": to_dcp,
        "safetensors": to_safetensors,
    }
    steps: list[Callable[..., ConvertResult]] = []
    if sf != "zarrckpt":
        steps.append(from_funcs[sf])
    if df != "zarrckpt":
        steps.append(to_funcs[df])
    accepted = set().union(*(_accepts(f) for f in steps))
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"options {sorted(unknown)} do not apply to {sf} -> {df}")

    def pick(func: Callable[..., Any]) -> dict[str, Any]:
        names = _accepts(func)
        return {k: v for k, v in options.items() if k in names}

    if len(steps) == 1:
        return steps[0](s, d, progress=progress, **pick(steps[0]))
    # two passes through a temporary zarrckpt checkpoint beside the destination
    make_parents(d)
    tmp_parent = new_staging_dir(d)
    try:
        tmp = os.path.join(tmp_parent, "ckpt")

        def phase1(bd: int, bt: int, td: int, tt: int) -> None:
            if progress is not None:
                progress(bd, 2 * bt, td, 2 * tt)

        def phase2(bd: int, bt: int, td: int, tt: int) -> None:
            if progress is not None:
                progress(bt + bd, 2 * bt, tt + td, 2 * tt)

        first_options = pick(steps[0])
        first_options.update(overwrite=False, fsync=False)
        first = steps[0](s, tmp, progress=phase1, **first_options)
        steps[1](tmp, d, progress=phase2, **pick(steps[1]))
        return ConvertResult(s, d, sf, df, first.tensors, first.nbytes)
    finally:
        remove_tree(tmp_parent)
