"""``zarrckpt plot``: per-tensor L2 norms and value histograms as a PNG (matplotlib).

Uses matplotlib's object API with the Agg canvas (no pyplot, no global
backend change, no display needed).
"""

from __future__ import annotations

import math
import os
from typing import Any

from ._scan import Progress

__all__ = ["plot_checkpoint"]


def _shift(progress: Progress | None, offset: int, grand_total: int) -> Progress | None:
    if progress is None:
        return None

    def update(done: int, total: int) -> None:
        progress(offset + done, grand_total)

    return update


def plot_checkpoint(
    ckpt: Any,
    output: str | os.PathLike[str],
    *,
    pattern: str | None = None,
    bins: int = 80,
    max_hist: int = 12,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write a PNG with the L2 norm of every selected tensor (bar chart, checkpoint
    order) and value histograms of the ``max_hist`` largest ones.

    Returns ``{"tensors": n, "histograms": [fqn, ...]}``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ._checkpoint import _finite_range

    keys = ckpt.select(pattern)
    entries = [ckpt._files.arrays[k] for k in keys]
    data_bytes = sum(e.nbytes for e in entries)
    # the histogram pass reads (at most) the same bytes again
    grand = 2 * data_bytes
    stats = ckpt.stats(pattern, progress=_shift(progress, 0, grand))

    candidates = [s for s in stats.values() if s.count > 1]
    candidates.sort(key=lambda s: -s.count)
    chosen = {s.fqn for s in candidates[:max_hist]}
    ranges: dict[str, tuple[float, float]] = {}
    for fqn in keys:
        if fqn not in chosen:
            continue
        s = stats[fqn]
        lo, hi = s.min, s.max
        if s.nan or s.inf:
            lo, hi = _finite_range(ckpt._files, ckpt.path, ckpt._files.arrays[fqn])
        if lo is not None and hi is not None:
            ranges[fqn] = (float(lo), float(hi))
    hists = ckpt.histograms(
        pattern, bins=bins, ranges=ranges, progress=_shift(progress, data_bytes, grand)
    ) if ranges else {}
    hist_keys = [k for k in keys if k in hists]

    n_hist = len(hist_keys)
    ncols = max(1, min(4, n_hist))
    nrows = math.ceil(n_hist / ncols) if n_hist else 0
    fig = Figure(figsize=(12, 3.6 + 2.4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1 + nrows, ncols, height_ratios=[1.5] + [1] * nrows)

    ax = fig.add_subplot(grid[0, :])
    norms = [stats[k].norm for k in keys]
    finite = [v for v in norms if math.isfinite(v)]
    ax.bar(range(len(keys)), [v if math.isfinite(v) else 0.0 for v in norms],
           color="#4477aa", width=0.8)
    positive = [v for v in finite if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_ylabel("L2 norm")
    ax.set_title(f"{ckpt.path}: L2 norm per tensor ({len(keys)} tensors)", fontsize=10)
    if len(keys) <= 64:
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([_short(k, 40) for k in keys], rotation=90, fontsize=6)
    else:
        ax.set_xlabel("tensor index (checkpoint order)")
    ax.margins(x=0.005)
    for i, v in enumerate(norms):
        if not math.isfinite(v):
            ax.annotate("nan" if math.isnan(v) else "inf", (i, 0), fontsize=6, color="red",
                        ha="center", va="bottom")

    for i, fqn in enumerate(hist_keys):
        counts, edges = hists[fqn]
        hax = fig.add_subplot(grid[1 + i // ncols, i % ncols])
        hax.stairs(counts, edges, fill=True, color="#66aa55")
        if counts.max() >= 50:
            hax.set_yscale("log")
            hax.set_ylim(bottom=0.7)
        s = stats[fqn]
        hax.set_title(f"{_short(fqn, 36)}\n{s.dtype}[{','.join(map(str, s.shape))}]",
                      fontsize=7)
        hax.tick_params(which="both", labelsize=6)
    fig.savefig(os.fspath(output), dpi=110)
    return {"tensors": len(keys), "histograms": hist_keys}


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]
