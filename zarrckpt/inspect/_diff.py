"""Compare two checkpoints: keys, shapes, dtypes, values (one parallel pass).

Tensors present in both checkpoints with the same shape are compared
element by element over the slabs of the first checkpoint's chunks (the
same region is read from the second, whatever its chunking). Two elements
are *equal* when ``a == b`` or both are NaN, and *close* when equal or
``|a - b| <= atol + rtol * |b|`` (numpy's ``isclose`` with ``equal_nan``);
a tensor is *changed* when at least one element is not close. The relative
difference of an element is ``|a - b| / max(|a|, |b|)`` (0 where equal).
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..format._flatten import bytes_array_fqn, bytes_length, child_nodes
from ..format._metadata import ArrayEntry
from ..storage._base import Store
from ..storage._local import open_store
from ._scan import Progress, Slab, pack, plan_slabs, read_region, run_tasks

__all__ = ["TensorDiff", "DiffReport", "tree_leaves", "compute_diff"]


@dataclass(frozen=True)
class TensorDiff:
    """Element-wise comparison of one tensor present in both checkpoints.

    Attributes
    ----------
    fqn
        Key.
    shape
        Common shape.
    dtype, other_dtype
        Stored dtypes (values are compared after upcasting to float64 or complex128).
    count
        Number of elements compared.
    different
        Number of elements that are not close.
    max_abs, max_rel
        Largest absolute and relative difference (NaN when a NaN faces a number).
    """

    fqn: str
    shape: tuple[int, ...]
    dtype: str
    other_dtype: str
    count: int
    different: int
    max_abs: float
    max_rel: float

    @property
    def changed(self) -> bool:
        """At least one element is not close (or the dtype differs)."""
        return self.different > 0 or self.dtype != self.other_dtype

    def to_dict(self) -> dict[str, Any]:
        return {
            "fqn": self.fqn,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "other_dtype": self.other_dtype,
            "count": self.count,
            "different": self.different,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "changed": self.changed,
        }


@dataclass
class DiffReport:
    """Differences between checkpoint ``a`` (self) and ``b`` (other).

    Attributes
    ----------
    added, removed
        Keys (tensors, plain values and pickled objects) only in ``b`` / only in ``a``.
    shape_changed
        ``{fqn: (shape_a, shape_b)}`` for tensors whose shape differs (not compared further).
    dtype_changed
        ``{fqn: (dtype_a, dtype_b)}``; such tensors are still compared by value.
    kind_changed
        ``{fqn: (kind_a, kind_b)}`` for keys that are a tensor on one side and a
        plain value or pickled object on the other.
    values_changed
        ``{fqn: (value_a, value_b)}`` for plain (JSON) values and pickled objects
        (compared by their stored bytes, which are never unpickled).
    tensors
        :class:`TensorDiff` of every tensor compared, changed or not.
    rtol, atol
        Tolerances used.
    """

    a: str
    b: str
    rtol: float
    atol: float
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    shape_changed: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    dtype_changed: dict[str, tuple[str, str]] = field(default_factory=dict)
    kind_changed: dict[str, tuple[str, str]] = field(default_factory=dict)
    values_changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    tensors: dict[str, TensorDiff] = field(default_factory=dict)

    @property
    def changed(self) -> list[str]:
        """Keys of the compared tensors that changed (values or dtype)."""
        return [k for k, d in self.tensors.items() if d.changed]

    @property
    def identical(self) -> bool:
        """True when no difference at all was found (within the tolerances)."""
        return not (
            self.added
            or self.removed
            or self.shape_changed
            or self.kind_changed
            or self.values_changed
            or self.changed
        )

    def __bool__(self) -> bool:
        """True when the checkpoints differ."""
        return not self.identical

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (for ``--json``)."""
        return {
            "a": self.a,
            "b": self.b,
            "rtol": self.rtol,
            "atol": self.atol,
            "identical": self.identical,
            "added": list(self.added),
            "removed": list(self.removed),
            "shape_changed": {k: [list(x), list(y)] for k, (x, y) in self.shape_changed.items()},
            "dtype_changed": {k: list(v) for k, v in self.dtype_changed.items()},
            "kind_changed": {k: list(v) for k, v in self.kind_changed.items()},
            "values_changed": {k: list(v) for k, v in self.values_changed.items()},
            "changed": self.changed,
            "tensors": {k: d.to_dict() for k, d in self.tensors.items()},
        }


def tree_leaves(tree: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """``{fqn: (kind, payload)}`` for every leaf of a manifest tree.

    ``kind`` is ``"tensor"`` or ``"pickle"`` (payload: the stored FQN),
    ``"bytes"`` (payload: the tree node) or ``"value"`` (payload: the decoded
    plain value).
    """
    out: dict[str, tuple[str, Any]] = {}

    def walk(node: dict[str, Any], fqn: str) -> None:
        if "tensor" in node:
            out[node["tensor"]] = ("tensor", node["tensor"])
        elif "pickle" in node:
            out[node["pickle"]] = ("pickle", node["pickle"])
        elif "bytes" in node:
            out[fqn] = ("bytes", node)
        elif "value" in node:
            out[fqn] = ("value", node["value"])
        elif "float" in node:
            out[fqn] = ("value", float(node["float"]))
        else:
            children = child_nodes(node)
            if not children:
                out[fqn] = ("value", [] if "list" in node or "tuple" in node else {})
                return
            for key, child in children.items():
                walk(child, f"{fqn}.{key}" if fqn else str(key))

    walk(tree, "")
    return out


def _bytes_of(root: Store, node: dict[str, Any], arrays: dict[str, ArrayEntry]) -> Any:
    """(type, content) of a bytes node, its array read from ``root`` when it is one."""
    body = node["bytes"]
    fqn = bytes_array_fqn(node)
    if fqn is None:
        data = base64.b64decode(body.get("base64", ""))
    else:
        entry = arrays[fqn]
        data = read_region(root, entry, tuple((0, s) for s in entry.shape)).tobytes()
    return body.get("bytearray") is True, data


def _shown(kind: str, payload: Any, arrays: dict[str, ArrayEntry]) -> Any:
    """How a leaf appears in ``values_changed``."""
    if kind == "value":
        return payload
    if kind == "bytes":
        body = payload["bytes"]
        name = "bytearray" if body.get("bytearray") is True else "bytes"
        n = bytes_length(payload, lambda fqn: arrays[fqn].nbytes)
        return f"<{name}: {n} bytes>"
    return f"<pickled {kind}>"


def _upcast(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "c":
        return x.astype(np.complex128)
    if x.dtype.kind == "V":  # ml_dtypes
        return x.astype(np.float32).astype(np.float64)
    return x.astype(np.float64)


@dataclass
class _Part:
    count: int = 0
    different: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0

    def merge(self, other: _Part) -> _Part:
        return _Part(
            self.count + other.count,
            self.different + other.different,
            _nanmax(self.max_abs, other.max_abs),
            _nanmax(self.max_rel, other.max_rel),
        )


def _nanmax(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    return max(a, b)


#: elements compared at a time (bounds the float64 temporaries per thread)
BLOCK_ELEMENTS = 1 << 20


def compare_blocks(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> _Part:
    """Differences between two blocks of the same shape."""
    a, b = a.reshape(-1), b.reshape(-1)
    out = _Part()
    for start in range(0, a.size, BLOCK_ELEMENTS):
        stop = start + BLOCK_ELEMENTS
        out = out.merge(_compare(a[start:stop], b[start:stop], rtol, atol))
    return out


def _compare(a: np.ndarray, b: np.ndarray, rtol: float, atol: float) -> _Part:
    if a.size == 0:
        return _Part()
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if a.dtype == b.dtype and a.dtype.kind in "biu":
            equal = a == b
            x, y = a.astype(np.float64), b.astype(np.float64)
        else:
            x, y = _upcast(a), _upcast(b)
            equal = (x == y) | (np.isnan(x) & np.isnan(y))
        diff = np.abs(x - y)
        diff[equal] = 0.0
        close = equal | (diff <= atol + rtol * np.abs(y))
        different = int(close.size - np.count_nonzero(close))
        rel = np.where(equal, 0.0, diff / np.maximum(np.abs(x), np.abs(y)))
        return _Part(int(a.size), different, float(diff.max()), float(rel.max()))


def _diff_task(
    items: list[tuple[Slab, ArrayEntry]], root_a: Store, root_b: Store, rtol: float, atol: float
) -> dict[str, _Part]:
    out: dict[str, _Part] = {}
    for slab, entry_b in items:
        a = read_region(root_a, slab.entry, slab.region)
        b = read_region(root_b, entry_b, slab.region)
        part = compare_blocks(a, b, rtol, atol)
        fqn = slab.entry.fqn
        out[fqn] = out[fqn].merge(part) if fqn in out else part
    return out


def compute_diff(
    root_a: str | Store,
    manifest_a: dict[str, Any],
    arrays_a: dict[str, ArrayEntry],
    pickled_a: dict[str, ArrayEntry],
    root_b: str | Store,
    manifest_b: dict[str, Any],
    arrays_b: dict[str, ArrayEntry],
    pickled_b: dict[str, ArrayEntry],
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    progress: Progress | None = None,
) -> DiffReport:
    """Compare two opened checkpoints (see module doc)."""
    store_a, store_b = open_store(root_a), open_store(root_b)
    report = DiffReport(store_a.path, store_b.path, rtol, atol)
    leaves_a = tree_leaves(manifest_a["tree"])
    leaves_b = tree_leaves(manifest_b["tree"])
    report.removed = [k for k in leaves_a if k not in leaves_b]
    report.added = [k for k in leaves_b if k not in leaves_a]

    compare: list[tuple[ArrayEntry, ArrayEntry]] = []
    pickles: list[tuple[str, ArrayEntry, ArrayEntry]] = []
    for key, (kind_a, payload_a) in leaves_a.items():
        if key not in leaves_b:
            continue
        kind_b, payload_b = leaves_b[key]
        if kind_a != kind_b:
            if "tensor" in (kind_a, kind_b):
                report.kind_changed[key] = (kind_a, kind_b)
            else:
                report.values_changed[key] = (
                    _shown(kind_a, payload_a, pickled_a), _shown(kind_b, payload_b, pickled_b)
                )
            continue
        if kind_a == "value":
            if not _same_value(payload_a, payload_b):
                report.values_changed[key] = (payload_a, payload_b)
        elif kind_a == "pickle":
            pickles.append((key, pickled_a[payload_a], pickled_b[payload_b]))
        elif kind_a == "bytes":
            if _bytes_of(store_a, payload_a, pickled_a) != _bytes_of(store_b, payload_b, pickled_b):
                report.values_changed[key] = (
                    _shown(kind_a, payload_a, pickled_a),
                    _shown(kind_b, payload_b, pickled_b) + " (different content)",
                )
        else:
            ea, eb = arrays_a[payload_a], arrays_b[payload_b]
            if ea.shape != eb.shape:
                report.shape_changed[key] = (ea.shape, eb.shape)
                continue
            if ea.dtype.zarr_name != eb.dtype.zarr_name:
                report.dtype_changed[key] = (ea.dtype.zarr_name, eb.dtype.zarr_name)
            compare.append((ea, eb))

    for key, ea, eb in pickles:
        full = tuple((0, s) for s in ea.shape)
        if ea.shape != eb.shape or not np.array_equal(
            read_region(store_a, ea, full), read_region(store_b, eb, full)
        ):
            report.values_changed[key] = ("<pickled object>", "<pickled object (different bytes)>")

    other = {ea.fqn: eb for ea, eb in compare}
    items = [(s, other[s.entry.fqn]) for s in plan_slabs(ea for ea, _ in compare)]
    groups = pack(items, lambda it: 2 * it[0].nbytes)
    parts = run_tasks(
        _diff_task,
        groups,
        (store_a, store_b, rtol, atol),
        weights=[sum(2 * it[0].nbytes for it in g) for g in groups],
        progress=progress,
        name="zarrckpt-diff",
    )
    merged: dict[str, _Part] = {}
    for part in parts:
        for fqn, p in part.items():
            merged[fqn] = merged[fqn].merge(p) if fqn in merged else p
    for ea, eb in compare:
        p = merged.get(ea.fqn, _Part())
        report.tensors[ea.fqn] = TensorDiff(
            ea.fqn,
            tuple(ea.shape),
            ea.dtype.zarr_name,
            eb.dtype.zarr_name,
            p.count,
            p.different,
            p.max_abs,
            p.max_rel,
        )
    return report


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b
