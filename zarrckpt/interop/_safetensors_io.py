"""The safetensors file format, read through a memory map and written slab by slab.

A safetensors file is an 8-byte little-endian header length ``N``, a UTF-8
JSON header of ``N`` bytes (``{name: {"dtype", "shape", "data_offsets"}}``
plus an optional ``"__metadata__"`` object of string values), then the data
buffer; each tensor is C-order little-endian bytes at ``data_offsets``
(relative to the buffer). Both directions are implemented here directly (the
format is that small) so that a conversion never holds more than one slab:
``safetensors.torch.save_file`` needs every tensor in memory at once, and
``safe_open(...).get_tensor`` copies a whole tensor out of its own map.
Files written here load with the ``safetensors`` package.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedValueError
from ..format._dtypes import BY_TORCH
from ..storage._files import PositionalFile, file_size, is_file, open_read

__all__ = [
    "DTYPES",
    "MAX_HEADER",
    "SafetensorsEntry",
    "SafetensorsHeader",
    "SafetensorsReader",
    "carried_record",
    "parse_header",
    "read_layout",
    "write_safetensors",
]

#: safetensors dtype name <-> torch dtype (those zarrckpt stores)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

#: safetensors ``__metadata__`` keys used by zarrckpt (prefix reserved)
TREE_KEY = "zarrckpt.tree"
COMPLEX128_KEY = "zarrckpt.complex128"
RECORD_KEY = "zarrckpt.convert"
RESERVED_PREFIX = "zarrckpt."

#: the safetensors package refuses headers larger than this
MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def parse_header(
    path: str, size: int, read: Callable[[int, int], bytes]
) -> tuple[dict[str, str], dict[str, SafetensorsEntry]]:
    """``(__metadata__, {name: entry})`` of the safetensors file ``path`` of ``size``
    bytes, whose bytes ``read(offset, n)`` returns (fewer at its end).

    Raises
    ------
    CorruptCheckpointError
        The header is malformed or offsets are inconsistent.
    UnsupportedValueError
        A dtype zarrckpt does not convert.
    """

    def corrupt(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"safetensors file {path!r}: {what}")

    head = read(0, 8)
    if len(head) < 8:
        raise corrupt("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        raise corrupt(f"header length {n} exceeds the file ({size} bytes)")
    raw = read(8, n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise corrupt(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise corrupt("__metadata__ is not an object of strings")
    base = 8 + n
    entries: dict[str, SafetensorsEntry] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype_name = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"header record of {name!r} is malformed: {info!r}") from None
        if dtype_name not in DTYPES:
            raise UnsupportedValueError(
                f"tensor {name!r} of safetensors file {path!r} has dtype {dtype_name!r}; "
                f"zarrckpt converts {sorted(DTYPES)}"
            )
        dtype = DTYPES[dtype_name]
        expected = BY_TORCH[dtype].numpy_dtype.itemsize
        for s in shape:
            expected *= s
        if any(s < 0 for s in shape) or end - begin != expected or begin < 0:
            raise corrupt(
                f"tensor {name!r} ({dtype_name} {list(shape)}) has data_offsets "
                f"[{begin}, {end}], expected {expected} bytes"
            )
        if base + end > size:
            raise corrupt(f"tensor {name!r} ends past the end of the file")
        entries[name] = SafetensorsEntry(name, dtype, shape, base + begin, base + end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:], strict=False):
        if begin1 < end0:
            raise corrupt(f"tensors {name0!r} and {name1!r} overlap")
    return metadata, entries


class SafetensorsReader:
    """A safetensors file opened for reading through a read-only memory map.

    Parameters
    ----------
    path
        The file.

    Raises
    ------
    CheckpointNotFoundError
        No file at ``path``.
    CorruptCheckpointError
        The header is malformed, a dtype is unknown, or offsets are inconsistent.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        if not is_file(path):
            raise CheckpointNotFoundError(f"no safetensors file at {path!r}")
        size = file_size(path)
        with open_read(path) as f:

            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            self.metadata, self.entries = parse_header(path, size, read)
        self._size = size
        self._file = open_read(path)  # closed by close()
        self._map: mmap.mmap | None = (
            mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        )

    def close(self) -> None:
        if self._map is not None:
            # views still alive: the map then goes with them
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def array(self, entry: SafetensorsEntry) -> np.ndarray:
        """Zero-copy numpy view of a tensor's bytes in the map (its zarrckpt numpy dtype)."""
        dtype = BY_TORCH[entry.dtype].numpy_dtype
        if entry.nbytes == 0 or self._map is None:
            return np.zeros(entry.shape, dtype=dtype)
        flat = np.frombuffer(self._map, dtype=np.uint8, count=entry.nbytes, offset=entry.begin)
        return flat.view(dtype).reshape(entry.shape)

    def release(self, begin: int, nbytes: int) -> None:
        """Drop the resident pages of the file range ``[begin, begin + nbytes)``."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = min((begin + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE, self._size)
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def write_safetensors(
    path: str,
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
    metadata: dict[str, str],
    source: Callable[[int], Iterator[np.ndarray]],
    *,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write a safetensors file to ``path`` (an open new file), streaming each tensor.

    ``tensors`` lists (name, dtype, shape) in file order; ``source(i)`` yields
    the C-order bytes of tensor ``i`` in order.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    sizes = []
    for name, dtype, shape in tensors:
        if dtype not in NAMES:
            raise UnsupportedValueError(
                f"tensor {name!r} has dtype {dtype}, which safetensors cannot hold"
            )
        n = BY_TORCH[dtype].numpy_dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {
            "dtype": NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        sizes.append(n)
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER:
        raise UnsupportedValueError(
            f"the safetensors header for {path!r} would be {len(raw)} bytes, more than the "
            f"{MAX_HEADER} the format allows"
        )
    with PositionalFile(path, create=True) as fd:
        fd.pwrite_all(struct.pack("<Q", len(raw)) + raw, 0)
        pos = 8 + len(raw)
        for i, size in enumerate(sizes):
            written = 0
            for part in source(i):
                data = part.reshape(-1).view(np.uint8)
                fd.pwrite_all(data, pos + written)
                written += data.nbytes
                if progress is not None:
                    progress(data.nbytes)
            if written != size:
                raise UnsupportedValueError(
                    f"internal error: tensor {tensors[i][0]!r} got {written} of {size} bytes"
                )
            pos += size
        fd.truncate(pos)


# ------------------------------------------------------------------ zarrckpt mapping


def carried_record(record: dict[str, Any]) -> dict[str, Any]:
    """The parts of a manifest's conversion record another format must carry along."""
    keys = ("tied", "ordered_dicts", "attributes", "safetensors_metadata")
    return {k: v for k, v in record.items() if k in keys}


class SafetensorsHeader(Protocol):
    """A parsed safetensors header: a local or a remote reader."""

    path: str
    metadata: dict[str, str]
    entries: dict[str, SafetensorsEntry]


def read_layout(
    reader: SafetensorsHeader,
) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
    """(tree, manifest record, names of complex128 tensors stored as float64 pairs)."""
    metadata = dict(reader.metadata)
    complex_names: set[str] = set()
    if COMPLEX128_KEY in metadata:
        try:
            names = json.loads(metadata[COMPLEX128_KEY])
            complex_names = {str(n) for n in names}
        except (ValueError, TypeError):
            raise CorruptCheckpointError(
                f"safetensors file {reader.path!r}: metadata {COMPLEX128_KEY!r} is not a JSON list"
            ) from None
        for name in complex_names:
            e = reader.entries.get(name)
            if e is None or e.dtype != torch.float64 or not e.shape or e.shape[-1] != 2:
                raise CorruptCheckpointError(
                    f"safetensors file {reader.path!r}: {name!r} is listed in "
                    f"{COMPLEX128_KEY!r} but is not a float64 tensor with a last dimension of 2"
                )
    if TREE_KEY in metadata:
        try:
            tree = json.loads(metadata[TREE_KEY])
        except ValueError:
            raise CorruptCheckpointError(
                f"safetensors file {reader.path!r}: metadata {TREE_KEY!r} is not JSON"
            ) from None
        refs = _tree_refs(tree)
        if refs is None or refs != set(reader.entries):
            raise CorruptCheckpointError(
                f"safetensors file {reader.path!r}: its {TREE_KEY!r} metadata does not name "
                "exactly the tensors of the file (edited after zarrckpt wrote it?)"
            )
    else:
        tree = {"dict": [[name, {"tensor": name}] for name in reader.entries]}
    kept = {k: v for k, v in metadata.items() if not k.startswith(RESERVED_PREFIX)}
    record: dict[str, Any] = {"source_format": "safetensors"}
    if RECORD_KEY in metadata:
        try:
            carried = json.loads(metadata[RECORD_KEY])
        except ValueError:
            carried = None
        if not isinstance(carried, dict):
            raise CorruptCheckpointError(
                f"safetensors file {reader.path!r}: metadata {RECORD_KEY!r} is not a JSON object"
            )
        record.update(carried_record(carried))
    if kept:
        record["safetensors_metadata"] = kept
    return tree, record, complex_names


def _tree_refs(tree: Any) -> set[str] | None:
    """Tensor FQNs of a tree (None if it is not a tree of JSON nodes without pickles)."""
    out: set[str] = set()

    def visit(node: Any) -> bool:
        if not isinstance(node, dict) or len(node) != 1:
            return False
        (kind, value), = node.items()
        if kind == "tensor":
            if not isinstance(value, str) or value in out:
                return False
            out.add(value)
            return True
        if kind in ("value", "float"):
            return True
        if kind == "bytes":  # only inline bytes: a file holds no bytes arrays
            return isinstance(value, dict) and isinstance(value.get("base64"), str)
        if kind == "stateful":
            return visit(value)
        if kind in ("list", "tuple"):
            return isinstance(value, list) and all(visit(v) for v in value)
        if kind == "dict":
            return isinstance(value, list) and all(
                isinstance(item, list) and len(item) == 2 and visit(item[1]) for item in value
            )
        return False

    return out if visit(tree) else None
