"""Measure single-process workloads against several systems (run as a subprocess).

``python -m benchmarks._worker SPEC.json`` builds each workload in turn (the async
workload is measured by :func:`benchmarks.async_save.run`), then for each
operation runs ``repeats`` timed rounds (preceded by ``warmup`` untimed rounds
for the first save and the first load operation); in every round each system
runs once, in an order rotated from round to round, so that noise from the
shared machine falls on all systems alike. Results go to ``spec["output"]``.

Operations
----------
save_fsync, save_nofsync
    Save to a fresh path (``os.sync()`` runs before the clock starts, so no
    system inherits another's dirty pages; outputs of many files are deleted
    only after the run, see :class:`_Trash`).
load_warm
    Load a checkpoint written (with fsync) before the load rounds; its files
    are read once beforehand so they sit in the page cache.
load_cold
    The same, after evicting every file of the checkpoint from the page cache
    (fdatasync + ``POSIX_FADV_DONTNEED``).

Before every load the target tensors are zeroed, and after it their crc32c is
compared with the saved data's: a load that does not deliver fails loudly.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import resource
import sys
import time
import traceback
import uuid
from typing import Any

import torch

from . import _measure
from .systems import SYSTEMS, System
from .workloads import WORKLOADS, Workload

__all__ = ["OPS", "SAVE_OPS", "LOAD_OPS", "TRASH", "prepare_workload", "run", "main"]

#: directory (under the data directory) of outputs deleted only after the run
TRASH = ".trash"

SAVE_OPS = ("save_fsync", "save_nofsync")
LOAD_OPS = ("load_warm", "load_cold")
OPS = SAVE_OPS + LOAD_OPS


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Series:
    """Timings and memory of one (system, op)."""

    def __init__(self, system: str, op: str) -> None:
        self.system = system
        self.op = op
        self.warmup_s: list[float] = []
        self.times_s: list[float] = []
        self.peak_rss_kb: list[int] = []
        self.extra_rss_kb: list[int] = []
        self.verified = 0
        self.error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "op": self.op,
            "times_s": self.times_s,
            "warmup_s": self.warmup_s,
            "peak_rss_kb": self.peak_rss_kb,
            "extra_rss_kb": self.extra_rss_kb,
            "verified_loads": self.verified,
            "error": self.error,
        }


class _Trash:
    """Disposes of save outputs without slowing the next saves down.

    Deleting thousands of inodes makes the next thousands of file creations on
    ext4 slow for about 30 s (the inode allocator skips recently deleted
    inodes one by one: ``recently_deleted`` in ``find_inode_bit``), which would
    charge one system's clean-up to the next system's save. Outputs of more
    than ``max_files`` files therefore have their files truncated (freeing
    the disk space) and are moved to ``<data_dir>/.trash``, which the parent
    process deletes once, after the whole run. Outputs of few files are
    deleted at once.
    """

    def __init__(self, trash_dir: str, max_files: int = 64) -> None:
        self.trash_dir = trash_dir
        self.max_files = max_files
        self.count = 0

    def discard(self, path: str) -> None:
        if not os.path.exists(path):
            return
        files = _measure.files_under(path)
        if len(files) <= self.max_files:
            _measure.remove(path)
            return
        for f in files:
            os.truncate(f, 0)
        os.makedirs(self.trash_dir, exist_ok=True)
        self.count += 1
        target = f"{uuid.uuid4().hex[:12]}-{os.path.basename(path)}"
        os.rename(path, os.path.join(self.trash_dir, target))


def _rotate(items: list[System], k: int) -> list[System]:
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def _zero(wl: Workload) -> None:
    with torch.no_grad():
        for t in wl.flat.values():
            t.zero_()


def _verify(wl: Workload, loaded: Any, reference: dict[str, int], what: str) -> None:
    got = _measure.checksums(loaded if loaded is not None else wl.flat)
    bad = [k for k, v in reference.items() if got.get(k) != v]
    if bad:
        raise AssertionError(
            f"{what}: loaded data differs from the saved data for {len(bad)} tensor(s), "
            f"e.g. {bad[:3]}"
        )


def _timed(series: _Series, warm: bool, fn: Any, *args: Any) -> Any:
    gc.collect()
    with _measure.PeakRSS() as rss:
        t0 = time.perf_counter()
        result = fn(*args)
        elapsed = time.perf_counter() - t0
    (series.warmup_s if warm else series.times_s).append(elapsed)
    if not warm:
        series.peak_rss_kb.append(rss.peak_kb)
        series.extra_rss_kb.append(rss.extra_kb)
    return result, elapsed


def prepare_workload(spec: dict[str, Any]) -> tuple[Workload, float, dict[str, int], str]:
    """Build ``spec["workload"]``; return it, its build time, the checksums of its
    tensors and its (created) data directory."""
    name = spec["workload"]
    t0 = time.perf_counter()
    wl = WORKLOADS[name].build(spec["size"])
    build_s = time.perf_counter() - t0
    reference = _measure.checksums(wl.flat)
    # long-lived objects (modules, the workload) move to the permanent generation so
    # that the gc.collect() before each timed operation is cheap
    gc.collect()
    gc.freeze()
    data = os.path.join(spec["data_dir"], name)
    os.makedirs(data, exist_ok=True)
    return wl, build_s, reference, data


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the measurements described by ``spec``; return the JSON-able result."""
    name = spec["workload"]
    systems = [SYSTEMS[s] for s in spec["systems"] if "single" in SYSTEMS[s].kinds]
    for system in systems:
        for module in system.modules:
            importlib.import_module(module)
    t0 = time.perf_counter()
    wl, build_s, reference, data = prepare_workload(spec)
    options: dict[str, dict[str, Any]] = spec.get("options", {})
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])
    _log(
        f"[{name}] {wl.description}: {wl.nbytes / 1e6:.1f} MB, {wl.n_tensors} tensors "
        f"(built in {build_s:.1f}s)"
    )
    series: dict[tuple[str, str], _Series] = {}
    trash = _Trash(os.path.join(spec["data_dir"], TRASH))

    save_ops = [o for o in spec["ops"] if o in SAVE_OPS]
    for op in save_ops:
        savers = [s for s in systems if s.save is not None]
        for s in savers:
            series[s.name, op] = _Series(s.name, op)
        # the warm-up rounds run before the first save op only: later ones find every
        # code path and buffer already warm
        warm = warmup if op == save_ops[0] else 0
        for rnd in range(warm + repeats):
            for system in _rotate(savers, rnd):
                ser = series[system.name, op]
                if ser.error:
                    continue
                path = os.path.join(data, f"{system.name}.{op}.{rnd}")
                _measure.remove(path)
                os.sync()
                try:
                    _, dt = _timed(
                        ser,
                        rnd < warm,
                        system.save,
                        wl,
                        path,
                        op == "save_fsync",
                        options.get(system.name, {}),
                    )
                    _log(f"[{name}] {op} {rnd + 1}/{warm + repeats} {system.name}: {dt:.3f}s")
                except Exception:
                    ser.error = traceback.format_exc(limit=3)
                    _log(f"[{name}] {op} {system.name} FAILED:\n{ser.error}")
                trash.discard(path)
                os.sync()

    load_ops = [o for o in spec["ops"] if o in LOAD_OPS]
    loaders = [s for s in systems if s.load is not None]
    fixtures: dict[str, str] = {}
    if load_ops:
        for source in dict.fromkeys(s.source for s in loaders):
            path = os.path.join(data, f"{source}.fixture")
            _measure.remove(path)
            try:
                SYSTEMS[source].save(wl, path, True, options.get(source, {}))  # type: ignore[misc]
                fixtures[source] = path
            except Exception:
                _log(f"[{name}] fixture of {source} FAILED:\n{traceback.format_exc(limit=3)}")
        os.sync()
    for op in load_ops:
        warm = warmup if op == load_ops[0] else 0
        for s in loaders:
            series[s.name, op] = _Series(s.name, op)
            if s.source not in fixtures:
                series[s.name, op].error = f"no checkpoint: saving with {s.source} failed"
        for rnd in range(warm + repeats):
            for system in _rotate(loaders, rnd):
                ser = series[system.name, op]
                if ser.error:
                    continue
                path = fixtures[system.source]
                files = _measure.files_under(path)
                _zero(wl)
                if op == "load_cold":
                    _measure.evict(files)
                else:
                    _measure.prewarm(files)
                try:
                    loaded, dt = _timed(
                        ser, rnd < warm, system.load, wl, path, options.get(system.name, {})
                    )
                    _verify(wl, loaded, reference, f"{system.name} {op}")
                    ser.verified += 1
                    del loaded
                    _log(f"[{name}] {op} {rnd + 1}/{warm + repeats} {system.name}: {dt:.3f}s")
                except Exception:
                    ser.error = traceback.format_exc(limit=3)
                    _log(f"[{name}] {op} {system.name} FAILED:\n{ser.error}")
    for path in fixtures.values():
        trash.discard(path)

    _log(f"[{name}] done in {time.perf_counter() - t0:.1f}s")
    return {
        "workload": wl.info(),
        "build_s": build_s,
        "systems": [s.name for s in systems],
        "measurements": [s.to_json() for s in series.values()],
        "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the workloads of the spec file ``argv[0]`` one after the other."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    from . import async_save

    results = []
    for name in spec["workloads"]:
        measure = async_save.run if WORKLOADS[name].kind == "async" else run
        results.append(measure({**spec, "workload": name}))
        gc.unfreeze()  # let the finished workload's objects go
        gc.collect()
    with open(spec["output"], "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
