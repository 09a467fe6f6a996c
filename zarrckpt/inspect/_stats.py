"""Per-tensor statistics in one parallel pass over the stored chunks.

Each slab (see :mod:`zarrckpt.inspect._scan`) is reduced to a :class:`Moments`
record (count, mean and centred sum of squares, sum of squares, min, max,
nan/inf/zero counts), computed in float64; records are merged with Chan's
parallel update, which is exact up to rounding whatever the order, so the
result does not depend on the chunking or on the scheduler.

Semantics follow numpy on the whole tensor: ``min``, ``max``, ``mean``,
``std`` (population, ``ddof=0``) and ``norm`` (L2) are NaN when the tensor
holds a NaN; ``nan`` and ``inf`` count the non-finite values. bfloat16 and
float8 values are upcast per slab to float32 (exact) for min/max and to
float64 for the sums; integers and booleans are summed in float64 with
exact min/max; complex tensors report the statistics of their magnitudes
(``abs``) with nan/inf counted on either component.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..format._metadata import ArrayEntry
from ..storage._base import Store
from ..storage._local import open_store
from ._scan import Progress, Slab, pack, plan_slabs, read_region, run_tasks

__all__ = ["TensorStats", "Moments", "moments_of", "compute_stats", "histograms"]


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one stored tensor.

    Attributes
    ----------
    fqn, dtype, shape
        Key, stored dtype name and global shape.
    count
        Number of elements.
    min, max
        Extremes (``int`` for integer and bool tensors); None when empty.
    mean, std
        Mean and population standard deviation (``ddof=0``); None when empty.
    norm
        L2 norm (square root of the sum of squares).
    nan, inf, zeros
        Number of NaN, infinite (either sign) and zero elements.
    """

    fqn: str
    dtype: str
    shape: tuple[int, ...]
    count: int
    min: float | int | None
    max: float | int | None
    mean: float | None
    std: float | None
    norm: float
    nan: int
    inf: int
    zeros: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON-serialisable apart from non-finite floats)."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out


@dataclass
class Moments:
    """Mergeable partial statistics of part of a tensor."""

    n: int = 0
    mean: float = 0.0
    #: plain float64 sum, used for the mean when a part's mean is infinite
    total: float = 0.0
    m2: float = 0.0
    sumsq: float = 0.0
    vmin: Any = None
    vmax: Any = None
    nan: int = 0
    inf: int = 0
    zeros: int = 0

    def merge(self, other: Moments) -> Moments:
        """Combine two disjoint parts (Chan et al.'s parallel variance update)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        total = self.total + other.total
        with np.errstate(invalid="ignore", over="ignore"):
            if math.isfinite(self.mean) and math.isfinite(other.mean):
                mean = self.mean + delta * (other.n / n)
            else:  # inf + (-inf) is NaN, as numpy's mean
                mean = total / n
            m2 = self.m2 + other.m2 + delta * delta * (self.n * other.n / n)
        return Moments(
            n,
            mean,
            total,
            m2,
            self.sumsq + other.sumsq,
            _extreme(self.vmin, other.vmin, min),
            _extreme(self.vmax, other.vmax, max),
            self.nan + other.nan,
            self.inf + other.inf,
            self.zeros + other.zeros,
        )


def _extreme(a: Any, b: Any, pick: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, float) and math.isnan(a):
        return a
    if isinstance(b, float) and math.isnan(b):
        return b
    return pick(a, b)


def _as_numeric(x: np.ndarray) -> np.ndarray:
    """View/upcast to a dtype numpy reduces natively (bf16/fp8/f16 -> float32, bool -> uint8)."""
    if x.dtype.kind == "V" or x.dtype == np.float16:  # ml_dtypes: bfloat16, float8_*
        return x.astype(np.float32)
    if x.dtype == np.bool_:
        return x.view(np.uint8)
    return x


#: elements reduced at a time (bounds the float64 work array to 8 MiB per thread)
BLOCK_ELEMENTS = 1 << 20
_local = threading.local()


def _work_buffer(n: int) -> np.ndarray:
    """A per-thread float64 scratch array of at least ``n`` elements, reused across
    calls so that its pages are faulted in once per thread, not once per block."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < n:
        buf = _local.buf = np.empty(max(n, BLOCK_ELEMENTS), dtype=np.float64)
    return buf[:n]


def moments_of(x: np.ndarray) -> Moments:
    """Partial statistics of one block of values (any supported dtype)."""
    flat = x.reshape(-1)
    out = Moments()
    for start in range(0, flat.size, BLOCK_ELEMENTS):
        out = out.merge(_moments_block(flat[start : start + BLOCK_ELEMENTS], x.dtype))
    return out


def _moments_block(raw: np.ndarray, stored: np.dtype[Any]) -> Moments:
    n = int(raw.size)
    flat = _as_numeric(raw)
    nan = inf = 0
    if flat.dtype.kind == "c":
        zeros = n - int(np.count_nonzero(flat))
        if not np.isfinite(flat.sum()):
            nan = int(np.count_nonzero(np.isnan(flat.real) | np.isnan(flat.imag)))
            inf = int(np.count_nonzero(np.isinf(flat.real) | np.isinf(flat.imag)))
        flat = np.abs(flat)
    else:
        zeros = n - int(np.count_nonzero(flat))
    is_float = flat.dtype.kind == "f"
    vmin, vmax = flat.min().item(), flat.max().item()
    total = float(np.sum(flat, dtype=np.float64))
    mean = total / n
    work = _work_buffer(n)
    with np.errstate(invalid="ignore", over="ignore"):
        np.subtract(flat, mean, out=work, dtype=np.float64)
        m2 = _sum_squares(work)
        if math.isfinite(total):
            sumsq = m2 + n * mean * mean
        else:
            if is_float and stored.kind != "c":
                nan = int(np.count_nonzero(np.isnan(flat)))
                inf = int(np.count_nonzero(np.isinf(flat)))
            np.multiply(flat, flat, out=work, dtype=np.float64)
            sumsq = float(work.sum())
    if is_float:
        vmin, vmax = float(vmin), float(vmax)
    else:
        vmin, vmax = int(vmin), int(vmax)
    return Moments(n, mean, total, m2, sumsq, vmin, vmax, nan, inf, zeros)


def _sum_squares(work: np.ndarray) -> float:
    """Sum of squares of ``work`` (overwritten), single-threaded and pairwise-summed."""
    np.square(work, out=work)
    return float(work.sum())


def finalize(entry: ArrayEntry, m: Moments) -> TensorStats:
    """Turn merged moments into the reported statistics."""
    empty = m.n == 0
    std = None if empty else (float("nan") if math.isnan(m.m2) else math.sqrt(m.m2 / m.n))
    norm = float("nan") if math.isnan(m.sumsq) else math.sqrt(m.sumsq)
    return TensorStats(
        fqn=entry.fqn,
        dtype=entry.dtype.zarr_name,
        shape=tuple(entry.shape),
        count=m.n,
        min=None if empty else m.vmin,
        max=None if empty else m.vmax,
        mean=None if empty else float(m.mean),
        std=std,
        norm=norm,
        nan=m.nan,
        inf=m.inf,
        zeros=m.zeros,
    )


def _stats_task(slabs: list[Slab], root: Store) -> dict[str, Moments]:
    out: dict[str, Moments] = {}
    for slab in slabs:
        block = read_region(root, slab.entry, slab.region)
        m = moments_of(block)
        del block
        prev = out.get(slab.entry.fqn)
        out[slab.entry.fqn] = m if prev is None else prev.merge(m)
    return out


def compute_stats(
    root: str | Store, entries: list[ArrayEntry], *, progress: Progress | None = None
) -> dict[str, TensorStats]:
    """Statistics of every entry, in one pass over their chunks (see module doc)."""
    slabs = plan_slabs(entries)
    groups = pack(slabs, lambda s: s.nbytes)
    parts = run_tasks(
        _stats_task,
        groups,
        (open_store(root),),
        weights=[sum(s.nbytes for s in g) for g in groups],
        progress=progress,
        name="zarrckpt-stats",
    )
    merged: dict[str, Moments] = {}
    for part in parts:
        for fqn, m in part.items():
            merged[fqn] = merged[fqn].merge(m) if fqn in merged else m
    return {e.fqn: finalize(e, merged.get(e.fqn, Moments())) for e in entries}


# ---------------------------------------------------------------- histograms


def _hist_task(
    slabs: list[Slab], root: Store, ranges: dict[str, tuple[float, float]], bins: int
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for slab in slabs:
        lo, hi = ranges[slab.entry.fqn]
        block = read_region(root, slab.entry, slab.region).reshape(-1)
        for start in range(0, block.size, BLOCK_ELEMENTS):
            values = _as_numeric(block[start : start + BLOCK_ELEMENTS])
            if values.dtype.kind == "c":
                values = np.abs(values)
            values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
            counts, _ = np.histogram(values, bins=bins, range=(lo, hi))
            fqn = slab.entry.fqn
            out[fqn] = out[fqn] + counts if fqn in out else counts
    return out


def histograms(
    root: str | Store,
    entries: list[ArrayEntry],
    ranges: dict[str, tuple[float, float]],
    *,
    bins: int = 100,
    progress: Progress | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Histogram of the finite values of each entry over ``ranges[fqn]``.

    Returns ``{fqn: (counts, bin_edges)}`` as :func:`numpy.histogram` does.
    """
    slabs = plan_slabs(entries)
    groups = pack(slabs, lambda s: s.nbytes)
    parts = run_tasks(
        _hist_task,
        groups,
        (open_store(root), ranges, bins),
        weights=[sum(s.nbytes for s in g) for g in groups],
        progress=progress,
        name="zarrckpt-hist",
    )
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for e in entries:
        counts = np.zeros(bins, dtype=np.int64)
        for part in parts:
            if e.fqn in part:
                counts += part[e.fqn]
        lo, hi = ranges[e.fqn]
        out[e.fqn] = (counts, np.histogram_bin_edges([], bins=bins, range=(lo, hi)))
    return out
