"""Measure workload (f): how long ``async_save`` blocks the caller.

Run by ``python -m benchmarks`` inside its single-process worker
(:mod:`benchmarks._worker`, which dispatches workloads of kind ``"async"`` here).

For each round, in an order rotated from round to round:

``zarrckpt``
    ``fut = zarrckpt.async_save(sd, path)``: the time until it returns is
    ``async_blocked`` (what the training loop waits for), the time until
    ``fut.result()`` returns is ``async_total`` (durable on disk, fsync on).
``dcp``
    The same with ``dcp.async_save(sd, storage_writer=FileSystemWriter(path))``.
``host_clone`` / ``host_copy``
    The baselines: a plain host copy of every tensor (``t.clone()``), and a
    copy into buffers allocated once beforehand (``buffer.copy_(t)``).

The first ``warmup`` rounds are not timed (they also fill zarrckpt's reusable
staging buffers, as the first checkpoint of a training run does). The output
of the last round of each library is loaded back and checked bit-exact.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from . import _measure
from ._worker import TRASH, _Trash, prepare_workload
from .systems import SYSTEMS
from .workloads import Workload, flatten_tensors

__all__ = ["ASYNC_OPS", "run"]

ASYNC_OPS = ("async_blocked", "async_total")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _zarrckpt_async(wl: Workload, path: str) -> Future[Any]:
    import zarrckpt

    return zarrckpt.async_save(wl.state_dict, path)


def _dcp_async(wl: Workload, path: str) -> Future[Any]:
    import torch.distributed.checkpoint as dcp

    return dcp.async_save(  # type: ignore[return-value]
        wl.state_dict, storage_writer=dcp.FileSystemWriter(path, sync_files=True)
    )


_LIBRARIES: dict[str, Callable[[Workload, str], Future[Any]]] = {
    "zarrckpt": _zarrckpt_async,
    "dcp": _dcp_async,
}


def _check_saved(system: str, wl: Workload, path: str, reference: dict[str, int]) -> None:
    """Load ``path`` into zeroed copies of the workload's tensors; compare checksums."""
    import torch.distributed.checkpoint as dcp

    import zarrckpt

    target = _zeroed_like(wl.state_dict)
    if system == "zarrckpt":
        zarrckpt.load(target, path)
    else:
        dcp.load(target, storage_reader=dcp.FileSystemReader(path))
    got = _measure.checksums(flatten_tensors(target))
    bad = [k for k, v in reference.items() if got.get(k) != v]
    if bad:
        raise AssertionError(
            f"async_save with {system}: {len(bad)} tensor(s) differ, e.g. {bad[:3]}"
        )


def _zeroed_like(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    if isinstance(tree, dict):
        return {k: _zeroed_like(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_zeroed_like(v) for v in tree]
    return tree


def _measure_once(
    system: str, wl: Workload, path: str, buffers: dict[str, torch.Tensor]
) -> tuple[float, float]:
    """(seconds the caller is blocked, seconds until the save is durable) of one round."""
    start = time.perf_counter()
    if system in _LIBRARIES:
        future = _LIBRARIES[system](wl, path)
        blocked = time.perf_counter() - start
        future.result()
        return blocked, time.perf_counter() - start
    if system == "host_clone":
        copies = {fqn: t.clone() for fqn, t in wl.flat.items()}
        blocked = time.perf_counter() - start
        del copies
        return blocked, blocked
    if system == "host_copy":
        for fqn, t in wl.flat.items():
            buffers[fqn].copy_(t)
        blocked = time.perf_counter() - start
        return blocked, blocked
    raise ValueError(f"system {system!r} has no async measurement")


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one async workload (``spec["workload"]``); return the runner schema."""
    import torch.distributed.checkpoint  # noqa: F401  (imports stay out of the timings)

    import zarrckpt  # noqa: F401

    name = spec["workload"]
    systems = [s for s in spec["systems"] if "async" in SYSTEMS[s].kinds]
    wl, build_s, reference, data = prepare_workload(spec)
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])
    trash = _Trash(os.path.join(spec["data_dir"], TRASH))
    _log(f"[{name}] {wl.description}: {wl.nbytes / 1e6:.1f} MB")
    buffers = {k: torch.empty_like(t) for k, t in wl.flat.items()} if "host_copy" in systems else {}
    series: dict[tuple[str, str], dict[str, Any]] = {}
    last: dict[str, str] = {}
    for rnd in range(warmup + repeats):
        warm = rnd < warmup
        for k in range(len(systems)):
            system = systems[(k + rnd) % len(systems)]
            path = os.path.join(data, f"{system}.{rnd}")
            ops = [op for op in ASYNC_OPS if op in spec["ops"]]
            if system not in _LIBRARIES:  # a copy is done when it returns: no separate total
                ops = [op for op in ops if op == "async_blocked"]
            if not ops or any(series[system, op]["error"] for op in ops if (system, op) in series):
                continue
            os.sync()
            gc.collect()
            try:
                with _measure.PeakRSS() as rss:
                    blocked, total = _measure_once(system, wl, path, buffers)
            except Exception:
                error = traceback.format_exc(limit=3)
                _log(f"[{name}] {system} FAILED:\n{error}")
                for op in ops:
                    record = series.setdefault((system, op), _measure.empty_series(system, op))
                    record["error"] = error
                continue
            seconds_by_op = {"async_blocked": blocked, "async_total": total}
            for op in ops:
                seconds = seconds_by_op[op]
                s = series.setdefault((system, op), _measure.empty_series(system, op))
                if warm:
                    s["warmup_s"].append(seconds)
                else:
                    s["times_s"].append(seconds)
                    s["peak_rss_kb"].append(rss.peak_kb)
                    s["extra_rss_kb"].append(rss.extra_kb)
            _log(
                f"[{name}] round {rnd + 1}/{warmup + repeats} {system}: blocked {blocked:.3f}s, "
                f"total {total:.3f}s"
            )
            if system in _LIBRARIES:
                if system in last:
                    trash.discard(last[system])
                last[system] = path
    for system, path in last.items():
        try:
            _check_saved(system, wl, path, reference)
        except Exception:
            error = traceback.format_exc(limit=3)
            for op in ASYNC_OPS:
                if (system, op) in series:
                    series[system, op]["error"] = error
        else:
            for op in ASYNC_OPS:
                if (system, op) in series:
                    series[system, op]["verified_loads"] = 1
        trash.discard(path)
    return {
        "workload": wl.info(),
        "build_s": build_s,
        "systems": systems,
        "measurements": list(series.values()),
        "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
