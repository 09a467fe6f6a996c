"""Turn raw measurements into results.json, results.md and PNG charts.

Every figure is a median over the repetitions (min and max kept), and every
figure is also given as a ratio to the raw numpy bound of the same operation
measured in the same run: ``ratio_to_raw = raw median time / system median
time``, i.e. throughput relative to the bound (1.0 = as fast as the bound,
0.5 = half its speed). Targets compare zarrckpt with a reference system the
same way (``speedup = reference median time / zarrckpt median time``).
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from .systems import RAW, SYSTEMS

__all__ = [
    "Target",
    "BoundTarget",
    "TARGETS",
    "BOUND_TARGETS",
    "summarize",
    "evaluate_targets",
    "build_results",
    "write_outputs",
    "OP_LABELS",
]

OP_LABELS = {
    "save_fsync": "save (fsync)",
    "save_nofsync": "save (no fsync)",
    "load_warm": "load (warm cache)",
    "load_cold": "load (cold cache)",
    "load_4to2": "load 4 -> 2 ranks (warm)",
    "load_2to4": "load 2 -> 4 ranks (warm)",
    "async_blocked": "async: caller blocked",
    "async_total": "async: until durable",
}


@dataclass(frozen=True)
class Target:
    """zarrckpt must reach ``speedup >= min_speedup`` against ``reference`` on ``op``."""

    key: str
    text: str
    op: str
    reference: str
    min_speedup: float
    workloads: tuple[str, ...] | None = None  # None: every workload
    system: str = "zarrckpt"


TARGETS: tuple[Target, ...] = (
    Target("save_vs_raw", "save (fsync) >= 0.9x raw numpy write+fsync", "save_fsync", RAW, 0.9),
    Target("save_vs_dcp", "save (fsync) >= 1.5x DCP FileSystemWriter", "save_fsync", "dcp", 1.5),
    Target(
        "load_warm_vs_mmap",
        "warm load >= 1.0x torch.load(mmap=True) + copy",
        "load_warm",
        "torch_mmap",
        1.0,
    ),
    Target("load_warm_vs_dcp", "warm load >= 2x DCP FileSystemReader", "load_warm", "dcp", 2.0),
    Target("load_cold_vs_raw", "cold load >= 0.9x raw numpy read", "load_cold", RAW, 0.9),
    Target(
        "small_save_vs_torch",
        "(b) save (fsync) time <= 2x torch.save (+fsync)",
        "save_fsync",
        "torch_save",
        0.5,
        ("small_tensors",),
    ),
    Target(
        "small_save_nofsync_vs_torch",
        "(b) save (no fsync) time <= 2x torch.save",
        "save_nofsync",
        "torch_save",
        0.5,
        ("small_tensors",),
    ),
    Target(
        "async_blocked_vs_clone",
        "(f) async_save caller blocked <= 1.2x a plain host copy (clone)",
        "async_blocked",
        "host_clone",
        1 / 1.2,
        ("async_save",),
    ),
    Target(
        "async_blocked_vs_copy",
        "(f) async_save caller blocked <= 1.2x a copy into preallocated buffers",
        "async_blocked",
        "host_copy",
        1 / 1.2,
        ("async_save",),
    ),
)


@dataclass(frozen=True)
class BoundTarget:
    """zarrckpt's ``metric`` (from the row's ``metrics``) must be ``<= max_value``;
    the reference system's value is reported beside it."""

    key: str
    text: str
    op: str
    metric: str
    max_value: float
    reference: str = "dcp"
    workloads: tuple[str, ...] | None = None
    system: str = "zarrckpt"


BOUND_TARGETS: tuple[BoundTarget, ...] = (
    BoundTarget(
        "reshard_4to2_read",
        "(e) 4 -> 2 resharding: bytes read <= 1.1x bytes needed (max over ranks)",
        "load_4to2",
        "read_amplification",
        1.1,
        workloads=("reshard",),
    ),
    BoundTarget(
        "reshard_2to4_read",
        "(e) 2 -> 4 resharding: bytes read <= 1.1x bytes needed (max over ranks)",
        "load_2to4",
        "read_amplification",
        1.1,
        workloads=("reshard",),
    ),
)


def summarize(measurement: dict[str, Any], nbytes: int) -> dict[str, Any]:
    """Median / min / max, throughput and peak RSS of one (system, op) series."""
    times = measurement["times_s"]
    out: dict[str, Any] = {
        "system": measurement["system"],
        "op": measurement["op"],
        "n": len(times),
        "times_s": times,
        "warmup_s": measurement.get("warmup_s", []),
        "median_s": statistics.median(times) if times else None,
        "min_s": min(times) if times else None,
        "max_s": max(times) if times else None,
        "error": measurement.get("error"),
        "verified_loads": measurement.get("verified_loads", 0),
        "metrics": measurement.get("metrics") or {},
    }
    out["gbps"] = nbytes / out["median_s"] / 1e9 if times else None
    peak = measurement.get("peak_rss_kb") or []
    extra = measurement.get("extra_rss_kb") or []
    out["peak_rss_mb"] = max(peak) / 1024 if peak else None
    out["extra_rss_mb"] = max(extra) / 1024 if extra else None
    return out


def _ratio(reference: float | None, value: float | None) -> float | None:
    if reference is None or value is None or value <= 0:
        return None
    return reference / value


def build_results(
    worker_outputs: list[dict[str, Any]], meta: dict[str, Any], processes: list[dict[str, Any]]
) -> dict[str, Any]:
    """The results.json document from the workers' outputs."""
    workloads: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for out in worker_outputs:
        info = out["workload"]
        name = info["name"]
        workloads[name] = {**info, "build_s": out.get("build_s")}
        series = [summarize(m, info["nbytes"]) for m in out["measurements"]]
        raw = {s["op"]: s for s in series if s["system"] == RAW}
        for s in series:
            ref = raw.get(s["op"])
            s["workload"] = name
            s["ratio_to_raw"] = _ratio(ref["median_s"] if ref else None, s["median_s"])
            rows.append(s)
    systems = sorted({r["system"] for r in rows}, key=lambda n: list(SYSTEMS).index(n))
    results = {
        "meta": meta,
        "definitions": {
            "median_s": "median wall time of the timed repetitions (warm-up excluded)",
            "gbps": "workload bytes / median_s / 1e9",
            "ratio_to_raw": "median_s of numpy_raw for the same workload and op / median_s "
            "(throughput relative to the raw numpy bound; 1.0 = as fast)",
            "speedup": "median_s of the reference / median_s of zarrckpt",
            "peak_rss_mb": "highest VmHWM during the operation (HWM reset just before it)",
            "extra_rss_mb": "peak_rss_mb minus the RSS at the start of the operation",
        },
        "workloads": workloads,
        "systems": {n: {"label": SYSTEMS[n].label, "note": SYSTEMS[n].note} for n in systems},
        "results": rows,
        "processes": processes,
    }
    results["targets"] = evaluate_targets(results)
    return results


def lookup(results: dict[str, Any], workload: str, system: str, op: str) -> dict[str, Any] | None:
    """The summarized row of (workload, system, op), or None."""
    for r in results["results"]:
        if (r["workload"], r["system"], r["op"]) == (workload, system, op):
            return dict(r)
    return None


def _get(row: dict[str, Any] | None, key: str) -> Any:
    return None if row is None else row[key]


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target on each applicable workload: speedup, threshold, met."""
    out = []
    for target in TARGETS:
        for workload in results["workloads"]:
            if target.workloads is not None and workload not in target.workloads:
                continue
            mine = lookup(results, workload, target.system, target.op)
            ref = lookup(results, workload, target.reference, target.op)
            speedup = _ratio(_get(ref, "median_s"), _get(mine, "median_s"))
            out.append(
                {
                    **asdict(target),
                    "workload": workload,
                    "system_median_s": _get(mine, "median_s"),
                    "reference_median_s": _get(ref, "median_s"),
                    "speedup": speedup,
                    "time_ratio": None if not speedup else 1 / speedup,
                    "met": None if speedup is None else speedup >= target.min_speedup,
                }
            )
    for bound in BOUND_TARGETS:
        for workload in results["workloads"]:
            if bound.workloads is not None and workload not in bound.workloads:
                continue
            mine = lookup(results, workload, bound.system, bound.op)
            ref = lookup(results, workload, bound.reference, bound.op)
            value = None if mine is None else mine["metrics"].get(bound.metric)
            out.append(
                {
                    **asdict(bound),
                    "workload": workload,
                    "value": value,
                    "reference_value": None if ref is None else ref["metrics"].get(bound.metric),
                    "met": None if value is None else value <= bound.max_value,
                }
            )
    return out


# --------------------------------------------------------------------------- output


def _fmt_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if r["median_s"] is None:
        return "failed" if r.get("error") else ""
    ratio = r["ratio_to_raw"]
    return (
        f"{r['median_s']:.3f} s ({r['min_s']:.3f}–{r['max_s']:.3f}) · "
        f"{r['gbps']:.2f} GB/s · {ratio:.2f}x raw"
        if ratio is not None
        else f"{r['median_s']:.3f} s · {r['gbps']:.2f} GB/s"
    )


def _fmt_mb(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def workload_ops(results: dict[str, Any], workload: str) -> list[str]:
    """The operations measured for ``workload``, in :data:`OP_LABELS` order."""
    measured = {r["op"] for r in results["results"] if r["workload"] == workload}
    return [op for op in OP_LABELS if op in measured]


def _bytes_read_lines(results: dict[str, Any], workload: str, ops: list[str]) -> list[str]:
    """Per-rank bytes read vs needed of the resharding loads, if any."""
    lines: list[str] = []
    for op in ops:
        for system in results["systems"]:
            r = lookup(results, workload, system, op)
            if r is None or "bytes_needed" not in r["metrics"]:
                continue
            if not lines:
                lines = [
                    "",
                    "| load | system | bytes read per rank | bytes needed per rank "
                    "| read / needed (max) |",
                    "|---|---|---|---|---|",
                ]
            m = r["metrics"]
            lines.append(
                f"| {OP_LABELS[op]} | {results['systems'][system]['label']} | "
                f"{', '.join(f'{b / 2**20:.1f} MiB' for b in m['bytes_read'])} | "
                f"{', '.join(f'{b / 2**20:.1f} MiB' for b in m['bytes_needed'])} | "
                f"{m['read_amplification']:.3f} |"
            )
    return lines


def _target_line(t: dict[str, Any]) -> str:
    """The table row of an evaluated target (``t["met"]`` is not None)."""
    met = "yes" if t["met"] else "NO"
    if "metric" in t:  # a bound on a measured ratio
        ref = "" if t["reference_value"] is None else f"{t['reference']} {t['reference_value']:.3f}"
        return (
            f"| {t['workload']} | {t['text']} | {t['value']:.3f} | {ref} | {t['value']:.3f} | "
            f"<= {t['max_value']} | {met} |"
        )
    return (
        f"| {t['workload']} | {t['text']} | {t['system_median_s']:.3f} s | "
        f"{t['reference']} {t['reference_median_s']:.3f} s | {t['speedup']:.2f}x | "
        f">= {t['min_speedup']:.2f}x | {met} |"
    )


def markdown(results: dict[str, Any]) -> str:
    """results.md: one table per workload, then the targets."""
    meta = results["meta"]
    lines = [
        "# zarrckpt benchmark results",
        "",
        f"- date: {meta.get('date')}; mode: {meta.get('mode')}; "
        f"warm-up {meta.get('warmup')} + {meta.get('repeats')} timed repetitions (median, min–max)",
        f"- machine: {meta.get('cpu')}, {meta.get('cpus')} CPUs, {meta.get('memory')} RAM; "
        f"data on {meta.get('filesystem')}; load average {meta.get('loadavg_start')} → "
        f"{meta.get('loadavg_end')}",
        f"- versions: {meta.get('versions')}",
        "- cells: median time (min–max) · throughput · ratio to the raw numpy bound of the "
        "same op (1.0 = as fast as the bound). RSS: peak MB above the RSS before the op.",
        "",
    ]
    for workload, info in results["workloads"].items():
        ops = workload_ops(results, workload)
        lines += [
            f"## {workload}: {info['description']}",
            "",
            f"{info['nbytes'] / 1e6:.1f} MB in {info['n_tensors']} tensors.",
            "",
            "| system | " + " | ".join(OP_LABELS[o] for o in ops) + " | peak extra RSS MB |",
            "|---|" + "---|" * (len(ops) + 1),
        ]
        for system in results["systems"]:
            rows = [lookup(results, workload, system, op) for op in ops]
            cells = [_fmt_cell(r) for r in rows]
            if not any(cells):
                continue
            rss = max((r["extra_rss_mb"] or 0 for r in rows if r), default=None)
            label = results["systems"][system]["label"]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt_mb(rss)} |")
        lines += _bytes_read_lines(results, workload, ops)
        lines.append("")
    lines += [
        "## Targets (zarrckpt, medians of this run)",
        "",
        "| workload | target | zarrckpt | reference | result | needed | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        if t["met"] is not None:  # targets whose two sides this run did not measure are left out
            lines.append(_target_line(t))
    errors = [r for r in results["results"] if r.get("error")]
    if errors:
        lines += ["", "## Failures", ""]
        for r in errors:
            last = r["error"].strip().splitlines()[-1]
            lines.append(f"- {r['workload']} / {r['system']} / {r['op']}: {last}")
    lines += ["", "Systems:", ""]
    for name, s in results["systems"].items():
        lines.append(f"- `{name}` ({s['label']}): {s['note']}")
    return "\n".join(lines) + "\n"


def charts(results: dict[str, Any], out_dir: str) -> list[str]:
    """One PNG per workload: throughput and ratio to the raw bound, by op and system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    systems = list(results["systems"])
    for workload, info in results["workloads"].items():
        ops = workload_ops(results, workload)
        fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
        width = 0.8 / max(1, len(systems))
        for k, system in enumerate(systems):
            rows = [lookup(results, workload, system, op) for op in ops]
            xs = [i + (k - (len(systems) - 1) / 2) * width for i in range(len(ops))]
            gbps = [(r["gbps"] or 0) if r else 0 for r in rows]
            ratio = [(r["ratio_to_raw"] or 0) if r else 0 for r in rows]
            label = results["systems"][system]["label"]
            axes[0].bar(xs, gbps, width, label=label)
            axes[1].bar(xs, ratio, width, label=label)
        for ax, title in zip(
            axes, ("throughput (GB/s, median)", "ratio to raw numpy bound"), strict=True
        ):
            ax.set_xticks(range(len(ops)), [OP_LABELS[o] for o in ops], fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{workload}: {info['description']}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{workload}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_json_and_markdown(
    results: dict[str, Any], text: str, out_dir: str, name: str
) -> list[str]:
    """Write ``results`` as ``<name>.json`` and ``text`` as ``<name>.md`` into
    ``out_dir``; return the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(text)
    return paths


def write_outputs(results: dict[str, Any], out_dir: str) -> list[str]:
    """Write results.json, results.md and the charts into ``out_dir``."""
    paths = write_json_and_markdown(results, markdown(results), out_dir, "results")
    return paths + charts(results, out_dir)
