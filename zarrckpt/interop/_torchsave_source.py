"""Read ``torch.save`` files lazily: memory-mapped tensors, safe unpickling, zip checks.

``torch.load(path, mmap=True, weights_only=True)`` unpickles only the small
``data.pkl`` record (with PyTorch's allow-list unpickler) and maps the tensor
storages straight from the file: nothing is read until it is touched. The
converters and the online load (:class:`TorchSaveFile`) read the tensors
through that map.
"""

from __future__ import annotations

import json
import pickle
import struct
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from ..format._dtypes import DTypeInfo, info_for_torch, tensor_as_numpy
from ..format._flatten import FlatState, encode_key, flatten_state_dict, is_stateful
from ..storage._files import file_version, is_file, is_zip_file, open_read
from ._pages import FileMappings

__all__ = [
    "LoadedFile",
    "load_torch_file",
    "find_ties",
    "container_extras",
    "restore_containers",
    "verify_records",
    "TorchSaveFile",
    "region_span",
]


@dataclass
class LoadedFile:
    """A loaded ``torch.save`` file."""

    obj: Any
    #: tensors are mapped from the file (zip format); False for the legacy format
    mmapped: bool
    #: where the file is mapped (to release pages and find records); None if not mapped
    mappings: FileMappings | None
    #: loaded with plain pickle (``allow_pickle=True`` and the allow-list refused it)
    unsafe: bool


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.lower().startswith("weights only load failed"):
            return line
    return text.splitlines()[0] if text else type(e).__name__


def bytes_allowed() -> Any:
    """Context in which ``torch.load(weights_only=True)`` also accepts ``b""``.

    Pickle protocol 2 (``torch.save``'s) writes ``b""`` as a call of the global
    ``bytes``, which the weights-only unpickler refuses by default; ``bytes``
    builds data only, so allowing it runs no code.
    """
    return torch.serialization.safe_globals([bytes])


def load_torch_file(path: str, *, allow_pickle: bool) -> LoadedFile:
    """``torch.load`` with ``mmap=True`` and ``weights_only=True`` (the safe default).

    Raises
    ------
    CheckpointNotFoundError
        ``path`` is not a file.
    UnsafeCheckpointError
        The file holds objects PyTorch's weights-only unpickler refuses and
        ``allow_pickle`` is False.
    CorruptCheckpointError
        The file is not a readable ``torch.save`` file.
    """
    if not is_file(path):
        raise CheckpointNotFoundError(f"no torch.save file at {path!r}")
    mmapped = is_zip_file(path)
    unsafe = False

    def load(weights_only: bool) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            with bytes_allowed():
                return torch.load(
                    path, map_location="cpu", mmap=mmapped, weights_only=weights_only
                )

    try:
        obj = load(True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"torch.save file {path!r} holds objects that torch.load(weights_only=True) "
                f"refuses ({_first_line(e)}); unpickling them could run arbitrary code. "
                "Pass allow_pickle=True only for files you trust"
            ) from None
        unsafe = True
        try:
            obj = load(False)
        except Exception as e2:
            raise CorruptCheckpointError(
                f"cannot read torch.save file {path!r}: {type(e2).__name__}: {_first_line(e2)}"
            ) from e2
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CorruptCheckpointError(
            f"cannot read torch.save file {path!r}: {type(e).__name__}: {_first_line(e)}"
        ) from e
    return LoadedFile(obj, mmapped, FileMappings(path) if mmapped else None, unsafe)


def flatten_loaded(obj: Any, *, allow_pickle: bool, checkpoint: str) -> FlatState:
    """Flatten a loaded object; tensors are plain ``torch.Tensor`` leaves."""
    return flatten_state_dict(
        obj,
        allow_pickle=allow_pickle,
        checkpoint=checkpoint,
        is_tensor_leaf=lambda v: isinstance(v, torch.Tensor),
    )


def refuse_modules(obj: Any, path: str) -> None:
    """Refuse whole ``nn.Module`` / optimizer objects (``torch.save(model)``).

    zarrckpt would store them through their ``state_dict()``, so a round trip
    would give back a state dict instead of the object: refuse rather than
    change the file's meaning silently.
    """

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            return
        if is_stateful(value):
            raise UnsupportedValueError(
                f"torch.save file {path!r} holds a whole {type(value).__name__} object at "
                f"{where or '<root>'!r}, not a state dict. Load it, then save its state_dict() "
                "(zarrckpt stores state dicts, not pickled modules)"
            )
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}" if where else str(k))
        elif type(value) in (list, tuple):
            for i, v in enumerate(value):
                walk(v, f"{where}.{i}" if where else str(i))

    walk(obj, "")


# --------------------------------------------------------------------- tensors


def region_span(tensor: torch.Tensor, region: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """(address, nbytes) of the memory holding ``region`` of ``tensor`` (strides >= 0)."""
    region = list(region)
    if any(b <= a for a, b in region):
        return tensor.data_ptr(), 0
    stride = tensor.stride()
    first = sum(a * s for (a, _), s in zip(region, stride, strict=True))
    last = sum((b - 1) * s for (_, b), s in zip(region, stride, strict=True))
    item = tensor.element_size()
    return tensor.data_ptr() + first * item, (last - first + 1) * item


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def find_ties(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{fqn: first fqn}`` for tensors that are the same view of the same storage.

    ``torch.save`` keeps such aliases (tied weights) as one storage; the
    converters record them so that ``to_torch_save`` writes them once again.
    """
    first: dict[tuple[Any, ...], str] = {}
    ties: dict[str, str] = {}
    for fqn, t in tensors.items():
        if t.device.type != "cpu" or t.untyped_storage().data_ptr() == 0:
            continue
        key = _storage_key(t)
        if key in first:
            ties[fqn] = first[key]
        else:
            first[key] = fqn
    return ties


# --------------------------------------------------------------- containers


def _path_key(path: list[Any]) -> str:
    return json.dumps(path, separators=(",", ":"))


def container_extras(obj: Any, *, checkpoint: str) -> dict[str, Any]:
    """What the state-dict tree does not say about a loaded object's containers.

    Returns ``{"ordered_dicts": [path, ...], "attributes": [[path, {...}], ...]}``
    (empty members omitted): the paths of ``OrderedDict`` containers and the
    instance attributes of dicts (``state_dict()._metadata``, which
    ``load_state_dict`` uses for versioned modules). A path is a list of
    steps: a dict key as the tree encodes it (``"name"`` or ``{"int": n}``) or
    a bare integer for a list/tuple position.

    Raises
    ------
    UnsupportedValueError
        An attribute holds something other than JSON values.
    """
    ordered: list[list[Any]] = []
    attributes: list[list[Any]] = []

    def walk(value: Any, path: list[Any]) -> None:
        if isinstance(value, torch.Tensor) or is_stateful(value):
            return
        if isinstance(value, dict):
            if isinstance(value, OrderedDict):
                ordered.append(path)
            attrs = getattr(value, "__dict__", None)
            if attrs:
                attributes.append([path, _encode_attrs(attrs, path, checkpoint)])
            for k, v in value.items():
                walk(v, [*path, encode_key(k, fqn=str(k), checkpoint=checkpoint)])
        elif type(value) in (list, tuple):
            for i, v in enumerate(value):
                walk(v, [*path, i])

    walk(obj, [])
    out: dict[str, Any] = {}
    if ordered:
        out["ordered_dicts"] = ordered
    if attributes:
        out["attributes"] = attributes
    return out


def _encode_attrs(attrs: dict[str, Any], path: list[Any], checkpoint: str) -> dict[str, Any]:
    try:
        flat = flatten_loaded(dict(attrs), allow_pickle=False, checkpoint=checkpoint)
    except UnsafeCheckpointError as e:
        raise UnsupportedValueError(
            f"the dict at {path} of the state dict for {checkpoint!r} has attributes that are "
            f"not JSON values ({e}); they cannot be converted"
        ) from None
    if flat.tensors:
        raise UnsupportedValueError(
            f"the dict at {path} of the state dict for {checkpoint!r} holds tensors in its "
            f"attributes {sorted(attrs)}; they cannot be converted"
        )
    return {"tree": flat.tree, **container_extras(dict(attrs), checkpoint=checkpoint)}


def restore_containers(obj: Any, extras: dict[str, Any]) -> Any:
    """Inverse of :func:`container_extras` on a rebuilt object (returns the new object)."""
    from ..format._flatten import decode_plain

    ordered = {_path_key(p) for p in extras.get("ordered_dicts", [])}
    attrs = {_path_key(p): a for p, a in extras.get("attributes", [])}
    if not ordered and not attrs:
        return obj

    def resolve(kind: str, fqn: str) -> Any:
        raise CorruptCheckpointError(f"attribute tree refers to a {kind} {fqn!r}")

    def rebuild(value: Any, path: list[Any]) -> Any:
        if isinstance(value, dict):
            items = [
                (k, rebuild(v, [*path, k if isinstance(k, str) else {"int": k}]))
                for k, v in value.items()
            ]
            key = _path_key(path)
            new: dict[Any, Any] = OrderedDict(items) if key in ordered else dict(items)
            if key in attrs:
                record = attrs[key]
                values = restore_containers(decode_plain(record["tree"], resolve), record)
                for name, v in values.items():
                    setattr(new, name, v)
            return new
        if type(value) is list:
            return [rebuild(v, [*path, i]) for i, v in enumerate(value)]
        if type(value) is tuple:
            return tuple(rebuild(v, [*path, i]) for i, v in enumerate(value))
        return value

    return rebuild(obj, [])


# ----------------------------------------------------------------- zip checks


@dataclass(frozen=True)
class ZipRecord:
    name: str
    data_offset: int
    size: int
    crc: int


def zip_records(path: str) -> dict[int, ZipRecord]:
    """Stored records of a zip file keyed by the file offset of their data."""
    out: dict[int, ZipRecord] = {}
    with open_read(path) as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise CorruptCheckpointError(
                    f"torch.save file {path!r}: bad local header of record {info.filename!r}"
                )
            n, m = struct.unpack("<HH", header[26:30])
            offset = info.header_offset + 30 + n + m
            out[offset] = ZipRecord(info.filename, offset, info.file_size, info.CRC)
    return out


def verify_records(
    path: str,
    tensors: Iterable[torch.Tensor],
    mappings: FileMappings,
    *,
    slab: int = 64 << 20,
) -> int:
    """Check the zip CRC-32 of every storage record behind ``tensors``; return bytes checked.

    Records written without a CRC (``torch.serialization.set_crc32_options(False)``,
    recorded as 0) are not checked. Pages are released as they are checked.

    Raises
    ------
    CorruptCheckpointError
        A record's bytes do not match its CRC-32.
    """
    records = zip_records(path)
    checked = 0
    seen: set[int] = set()
    for t in tensors:
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address in seen or storage.nbytes() == 0:
            continue
        seen.add(address)
        offset = mappings.file_offset(address)
        record = records.get(offset) if offset is not None else None
        if record is None or record.crc == 0 or record.size != storage.nbytes():
            continue
        data = tensor_as_numpy(torch.empty(0, dtype=torch.uint8).set_(storage))
        crc = 0
        for start in range(0, record.size, slab):
            part = data[start : start + slab]
            crc = zlib.crc32(part.data, crc)
            mappings.release(address + start, part.nbytes)
        if crc != record.crc:
            raise CorruptCheckpointError(
                f"torch.save file {path!r}: record {record.name!r} fails its CRC-32 check "
                f"({crc:08x} computed, {record.crc:08x} recorded): the file is damaged"
            )
        checked += record.size
    return checked


# ---------------------------------------------------------------- online load


@dataclass(frozen=True)
class FileEntry:
    """One tensor of a file source (what :class:`~zarrckpt.parallel._load.LoadPlan` needs)."""

    fqn: str
    dtype: DTypeInfo
    shape: tuple[int, ...]
    tensor: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


class FileSource:
    """Base of the file sources of :func:`zarrckpt.load`: a loaded tree plus tensors.

    Has the attributes and methods of :class:`~zarrckpt.parallel._reader.CheckpointFiles`
    that loading uses (``path``, ``tree``, ``arrays``, ``pickled``,
    ``read_pickled``, ``read_bytes``, ``read_into``, ``read_many``, ``bytes_read``).
    """

    path: str
    tree: dict[str, Any]
    arrays: dict[str, FileEntry]
    pickled: dict[str, Any]

    def __init__(self, path: str, flat: FlatState, *, unsafe: bool) -> None:
        self.path = path
        self.tree = flat.tree
        self.arrays = {}
        for fqn, t in flat.tensors.items():
            info = info_for_torch(t.dtype, key=fqn, path=path)
            if t.layout != torch.strided:
                raise UnsupportedValueError(
                    f"tensor {fqn!r} of {path!r} has layout {t.layout}; only dense tensors load"
                )
            self.arrays[fqn] = FileEntry(fqn, info, tuple(t.shape), t)
        self._objects = dict(flat.pickled)
        self._blobs = dict(flat.blobs)
        #: values that needed plain pickle to load (only with allow_pickle=True)
        self.pickled = dict(flat.pickled) if unsafe else {}
        self.bytes_read = 0
        #: which version of the file this is (ranks of one load must agree)
        self.version: str | None = file_version(path) if is_file(path) else None

    def read_pickled(self, fqn: str, *, allow_pickle: bool) -> Any:
        """A non-JSON value of the file (already unpickled by ``torch.load``)."""
        if fqn in self.pickled and not allow_pickle:
            raise UnsafeCheckpointError(
                f"{self.path!r}: key {fqn!r} holds a pickled Python object; pass "
                "allow_pickle=True only for files you trust"
            )
        return self._objects[fqn]

    def read_bytes(self, fqn: str) -> bytes:
        """A large bytes value of the file."""
        return self._blobs[fqn]

    def read_into(self, request: Any) -> int:
        """Copy the requested region of a tensor into ``request.dest``."""
        entry: FileEntry = request.entry
        src = tensor_as_numpy(entry.tensor)
        index = tuple(
            slice(o, o + s) for o, s in zip(request.origin, request.dest.shape, strict=True)
        )
        np.copyto(request.dest, src[index + (Ellipsis,)], casting="no")
        return int(request.dest.nbytes)

    def read_many(self, requests: Iterable[Any], *, threads: int) -> int:
        """Fill every request (``threads`` is accepted for interface compatibility)."""
        del threads
        total = sum(self.read_into(r) for r in requests)
        self.bytes_read += total
        return total


class TorchSaveFile(FileSource):
    """A ``torch.save`` file as a source for :func:`zarrckpt.load`.

    Every rank maps the file (``torch.load(mmap=True, weights_only=True)``)
    and copies only the slices its target tensors hold: no rank reads whole
    tensors it does not need and nothing is broadcast.

    Parameters
    ----------
    path
        A ``torch.save`` file on a filesystem every rank can read.
    allow_pickle
        Fall back to plain unpickling when the allow-list refuses the file.
    """

    def __init__(self, path: str, *, allow_pickle: bool) -> None:
        loaded = load_torch_file(path, allow_pickle=allow_pickle)
        flat = flatten_loaded(loaded.obj, allow_pickle=True, checkpoint=path)
        super().__init__(path, flat, unsafe=loaded.unsafe)
