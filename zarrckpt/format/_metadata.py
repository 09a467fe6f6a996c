"""zarr.json documents and the zarrckpt manifest (pure: dicts in, dicts out)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

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
#: the format version of checkpoints without the version-2 node forms

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
]


@dataclass(frozen=True)
class ArrayEntry:
    """One stored array: its FQN, path, storage dtype and layout."""

    fqn: str
    path: str
    dtype: DTypeInfo
    layout: ArrayLayout
    kind: str = "tensor"  # or "pickle", "bytes"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def nbytes(self) -> int:
        n = self.layout.itemsize
        for s in self.layout.shape:
            n *= s
        return n

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "dtype": self.dtype.zarr_name,
            "shape": list(self.layout.shape),
            "chunk_shape": list(self.layout.chunk_shape),
            "inner_chunk_shape": (
                None if self.layout.inner_shape is None else list(self.layout.inner_shape)
            ),
        }


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
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
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
    return group_document({FORMAT_NAME: manifest})


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


def parse_entry(fqn: str, raw: dict[str, Any], *, checkpoint: str) -> ArrayEntry:
    """Rebuild an :class:`ArrayEntry` from its manifest record."""
    try:
        dtype = info_for_zarr(raw["dtype"], key=fqn, path=checkpoint)
        inner = raw.get("inner_chunk_shape")
        check_layout(fqn, raw["shape"], raw["chunk_shape"], inner, dtype.itemsize,
                     checkpoint=checkpoint)
        layout = ArrayLayout(
            tuple(raw["shape"]),
            tuple(raw["chunk_shape"]),
            None if inner is None else tuple(inner),
            dtype.itemsize,
        )
        kind = raw.get("kind", "tensor")
        path = raw["path"]
    except (KeyError, TypeError, ValueError) as e:
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
    return ArrayEntry(fqn, path, dtype, layout, kind)


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
        )
        # codecs and chunk key encoding decide how zarr / tensorstore decode the
        # chunks: they must be exactly those zarrckpt wrote (crc32c included)
        expected = array_document(entry)
        ok = (
            dtype == entry.dtype
            and layout == entry.layout
            and all(document.get(k) == expected[k] for k in _DECODING_KEYS)
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
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
