"""zarr.json documents and the zarrckpt manifest (pure: dicts in, dicts out)."""

from __future__ import annotations

import base64
import binascii
import datetime
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorruptCheckpointError, InvalidKeyError, ZarrCkptError
from ._dtypes import DTypeInfo, info_for_zarr
from ._fqn import fqn_to_path
from ._layout import ArrayLayout, layout_from_codecs
from ._layout_check import check_layout
from ._marker import FORMAT_NAME, FORMAT_VERSION

#: group holding the arrays of pickled objects (``~`` never starts an encoded FQN)
PICKLE_GROUP = "~pickle"
#: group holding the arrays of large ``bytes`` values
BYTES_GROUP = "~bytes"

__all__ = [
    "PICKLE_GROUP",
    "BYTES_GROUP",
    "array_path",
    "ArrayEntry",
    "array_document",
    "dimension_names",
    "group_document",
    "root_document",
    "parse_entry",
    "consolidated_metadata",
    "group_paths",
]


@dataclass(frozen=True)
class ArrayEntry:
    """One stored array: its FQN, path, storage dtype and layout."""

    fqn: str
    path: str
    dtype: DTypeInfo
    layout: ArrayLayout
    kind: str = "tensor"  # or "pickle", "bytes"
    #: the crc32c table (format 3): little-endian uint32 per position
    #: (:meth:`ArrayLayout.crc_position`), None for older formats
    crcs: bytes | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    def crc_values(self) -> np.ndarray | None:
        """The crc32c table as uint32 values (format 3), or None."""
        return None if self.crcs is None else np.frombuffer(self.crcs, dtype="<u4")

    @property
    def nbytes(self) -> int:
        n = self.layout.itemsize
        for s in self.layout.shape:
            n *= s
        return n

    def manifest_entry(self) -> dict[str, Any]:
        record = {
            "path": self.path,
            "kind": self.kind,
            "dtype": self.dtype.zarr_name,
            "shape": list(self.layout.shape),
            "chunk_shape": list(self.layout.chunk_shape),
            "inner_chunk_shape": (
                None if self.layout.inner_shape is None else list(self.layout.inner_shape)
            ),
        }
        if self.layout.separator != "/":
            record["chunk_key_separator"] = self.layout.separator
        if self.layout.inner_shape is not None and self.layout.index_location != "end":
            record["index_location"] = self.layout.index_location
        if self.crcs is not None:
            record["crc32c"] = base64.b64encode(self.crcs).decode("ascii")
        return record


def dimension_names(path: str, ndim: int) -> list[str]:
    """``dimension_names`` of the array at ``path``: ``<name>:dim_<i>``, where
    ``<name>`` is the last component of the path.

    Unique per array (``:`` never occurs in an array path), so xarray never
    aligns dimensions of different tensors.
    """
    name = path.rsplit("/", 1)[-1]
    return [f"{name}:dim_{i}" for i in range(ndim)]


def array_document(entry: ArrayEntry) -> dict[str, Any]:
    """The zarr v3 ``zarr.json`` of an array."""
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(entry.layout.shape),
        "data_type": entry.dtype.zarr_name,
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": list(entry.layout.chunk_shape)},
        },
        "chunk_key_encoding": {
            "name": "default",
            "configuration": {"separator": entry.layout.separator},
        },
        "fill_value": entry.dtype.fill_value,
        "codecs": entry.layout.to_json_codecs(entry.dtype.zarr_name),
        "attributes": {FORMAT_NAME: {"fqn": entry.fqn, "kind": entry.kind}},
        "dimension_names": dimension_names(entry.path, len(entry.layout.shape)),
        "storage_transformers": [],
    }


def group_document(attributes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The zarr v3 ``zarr.json`` of a group."""
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


def root_document(
    *,
    tree: dict[str, Any],
    entries: list[ArrayEntry],
    checkpoint_id: str,
    world_size: int = 1,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The root group's ``zarr.json`` holding the manifest."""
    import torch

    from .._version import __version__

    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "zarrckpt_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "world_size": world_size,
        "tree": tree,
        "arrays": {e.fqn: e.manifest_entry() for e in entries if e.kind == "tensor"},
        "pickled": {e.fqn: e.manifest_entry() for e in entries if e.kind == "pickle"},
    }
    blobs = {e.fqn: e.manifest_entry() for e in entries if e.kind == "bytes"}
    if blobs:
        manifest["bytes"] = blobs
    if extra:
        manifest.update(extra)
    document = group_document({FORMAT_NAME: manifest})
    document["consolidated_metadata"] = consolidated_metadata(entries)
    return document


def group_paths(entries: list[ArrayEntry]) -> list[str]:
    """Groups holding the arrays (the parents of split array paths, ``~pickle``,
    ``~bytes``), outermost first, each once."""
    groups: dict[str, None] = {}
    for e in entries:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            groups.setdefault("/".join(parts[:i]), None)
    return list(groups)


def consolidated_metadata(entries: list[ArrayEntry]) -> dict[str, Any]:
    """zarr-python's ``consolidated_metadata`` member of the root ``zarr.json``: every
    group's and array's ``zarr.json`` document by path, so ``zarr.open_group`` reads
    one document (the ``~commit`` group, written after the root, is not listed)."""
    metadata: dict[str, Any] = {g: group_document() for g in group_paths(entries)}
    for e in entries:
        metadata[e.path] = array_document(e)
    return {"kind": "inline", "must_understand": False, "metadata": metadata}


def check_unique_paths(entries: list[ArrayEntry], *, checkpoint: str) -> None:
    """Refuse two entries that would share one array path."""
    seen: dict[str, str] = {}
    for e in entries:
        if e.path in seen:
            raise InvalidKeyError(
                f"keys {seen[e.path]!r} and {e.fqn!r} map to the same array path {e.path!r} "
                f"in checkpoint {checkpoint!r}"
            )
        seen[e.path] = e.fqn


def parse_entry(
    fqn: str, raw: dict[str, Any], *, checkpoint: str, format_version: Any = None
) -> ArrayEntry:
    """Rebuild an :class:`ArrayEntry` from its manifest record (of a checkpoint of
    ``format_version``: from version 3 on the crc32c table is required)."""
    try:
        dtype = info_for_zarr(raw["dtype"], key=fqn, path=checkpoint)
        inner = raw.get("inner_chunk_shape")
        check_layout(fqn, raw["shape"], raw["chunk_shape"], inner, dtype.itemsize,
                     checkpoint=checkpoint)
        separator = raw.get("chunk_key_separator", "/")
        index_location = raw.get("index_location", "end")
        if separator not in ("/", ".") or index_location not in ("start", "end"):
            raise ValueError(
                f"chunk_key_separator {separator!r}, index_location {index_location!r}"
            )
        layout = ArrayLayout(
            tuple(raw["shape"]),
            tuple(raw["chunk_shape"]),
            None if inner is None else tuple(inner),
            dtype.itemsize,
            separator,
            index_location,
        )
        kind = raw.get("kind", "tensor")
        path = raw["path"]
        crcs = _parse_crcs(raw.get("crc32c"), layout)
        if crcs is None and isinstance(format_version, int) and format_version >= 3:
            raise ValueError("no crc32c table, which format version 3 requires")
    except (KeyError, TypeError, ValueError, ZeroDivisionError, binascii.Error) as e:
        raise CorruptCheckpointError(
            f"checkpoint {checkpoint!r}: manifest record of {fqn!r} is malformed ({e!r})"
        ) from None
    # the path is derived from the FQN, never trusted: a crafted manifest must
    # not make a reader open files outside the checkpoint
    try:
        expected = array_path(fqn, kind)
    except ZarrCkptError:
        expected = None
    if kind not in ("tensor", "pickle", "bytes") or path != expected:
        raise CorruptCheckpointError(
            f"checkpoint {checkpoint!r}: manifest record of {fqn!r} has path {path!r} and kind "
            f"{kind!r}; expected kind 'tensor', 'pickle' or 'bytes' and path {expected!r}"
        )
    return ArrayEntry(fqn, path, dtype, layout, kind, crcs)


def _parse_crcs(text: Any, layout: ArrayLayout) -> bytes | None:
    """The crc32c table from its base64 text, checked against the layout's size."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"crc32c is {type(text).__name__}, expected base64 text")
    expected = 4 * layout.crc_table_size
    if len(text) != 4 * (-(-expected // 3)):  # refuse before decoding a huge claim
        raise ValueError(f"crc32c table has {len(text)} base64 characters for {expected} bytes")
    table = base64.b64decode(text, validate=True)
    if len(table) != expected:
        raise ValueError(f"crc32c table has {len(table)} bytes, expected {expected}")
    return table


def array_path(fqn: str, kind: str = "tensor", *, checkpoint: str = "?") -> str:
    """Array path of a stored FQN: tensors at the root, pickled objects under ``~pickle/``,
    large bytes values under ``~bytes/``."""
    path = fqn_to_path(fqn, checkpoint=checkpoint)
    if kind == "tensor":
        return path
    return (BYTES_GROUP if kind == "bytes" else PICKLE_GROUP) + "/" + path


#: zarr.json members that must equal what :func:`array_document` writes
_DECODING_KEYS = ("zarr_format", "node_type", "chunk_key_encoding", "codecs")


def check_array_document(entry: ArrayEntry, document: Any, *, checkpoint: str) -> None:
    """Check that an array's ``zarr.json`` agrees with the manifest."""
    try:
        dtype = info_for_zarr(document["data_type"], key=entry.fqn, path=checkpoint)
        layout = layout_from_codecs(
            tuple(document["shape"]),
            tuple(document["chunk_grid"]["configuration"]["chunk_shape"]),
            document["codecs"],
            dtype.itemsize,
            document["chunk_key_encoding"]["configuration"]["separator"],
        )
        # codecs and chunk key encoding decide how zarr / tensorstore decode the
        # chunks: they must be exactly those zarrckpt wrote (crc32c included)
        expected = array_document(entry)
        ok = (
            dtype == entry.dtype
            and layout == entry.layout
            and all(document.get(k) == expected[k] for k in _DECODING_KEYS)
        )
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise CorruptCheckpointError(
            f"checkpoint {checkpoint!r}: zarr.json of array {entry.fqn!r} "
            f"(at {entry.path!r}) is malformed ({e!r})"
        ) from None
    if not ok:
        raise CorruptCheckpointError(
            f"checkpoint {checkpoint!r}: zarr.json of array {entry.fqn!r} (at {entry.path!r}) "
            f"disagrees with the manifest: expected shape {list(entry.shape)}, dtype "
            f"{entry.dtype.zarr_name}, chunks {list(entry.layout.chunk_shape)}"
        )
