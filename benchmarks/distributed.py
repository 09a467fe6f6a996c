"""Measure the distributed workloads (d) and (e) on gloo process groups.

Run by ``python -m benchmarks`` as ``python -m benchmarks.distributed SPEC.json``
(one subprocess that spawns the process groups with
:func:`zarrckpt.testing.run_distributed`).

(d) ``fsdp2_2ranks`` / ``fsdp2_4ranks``
    FSDP2-style state (fp32 DTensors ``Shard(0)`` on a 1-D mesh, the last one
    with uneven shards) saved and loaded by every rank with zarrckpt, DCP
    (``FileSystemWriter`` / ``FileSystemReader``) and the raw bound (each rank
    writes its shards to one file with ``ndarray.tofile`` [+ fsync] and reads
    them back with ``readinto``). Same operations, rounds, rotation and
    warm/cold cache control as the single-process runner; times are rank 0's
    wall clock between barriers, peak RSS the highest of any rank, every load
    verified bit-exact on every rank.
(e) ``reshard``
    Checkpoints saved by 4 ranks loaded by 2 (a 2-rank sub-mesh of the same
    4 processes) and checkpoints saved by 2 loaded by 4, with zarrckpt
    (``load(stats=...)``) and DCP (bytes its reader slices from its files):
    time (warm cache) and bytes read vs bytes needed per rank.

All of them run in one group of 4 processes (2 if only ``fsdp2_2ranks`` is
asked for): work on 2 ranks uses a 2-rank sub-mesh of ranks 0 and 1 while
ranks 2 and 3 wait at a barrier, blocked in gloo without using CPU.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from . import _measure
from ._worker import TRASH, _Trash
from .systems import read_raw_into, write_raw
from .workloads import WORKLOADS, ShardedWorkload

__all__ = ["run", "main"]

SAVE_OPS = ("save_fsync", "save_nofsync")
LOAD_OPS = ("load_warm", "load_cold")
RESHARD_OPS = ("load_4to2", "load_2to4")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- state


def _global_tensor(index: int, shape: tuple[int, int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + index)
    return torch.rand(shape, generator=gen)


def _rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows of ``rank`` under ``Shard(0)`` (torch.chunk: ceil(n / k) per rank)."""
    per = -(-rows // world)
    start = min(rows, rank * per)
    return start, min(rows, start + per)


def _state(mesh: Any, shapes: tuple[tuple[int, int], ...], fill: bool) -> dict[str, Any]:
    """``{layers.i.weight: DTensor}`` sharded on dim 0 of ``mesh`` (zeros unless ``fill``)."""
    from torch.distributed.tensor import DTensor, Shard

    rank, world = mesh.get_local_rank(), mesh.size()
    state = {}
    for i, (rows, cols) in enumerate(shapes):
        start, stop = _rows(rows, rank, world)
        if fill:
            local = _global_tensor(i, (rows, cols))[start:stop].clone()
        else:
            local = torch.zeros((stop - start, cols))
        state[f"layers.{i}.weight"] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=(rows, cols), stride=(cols, 1)
        )
    return state


def _locals(state: dict[str, Any]) -> list[torch.Tensor]:
    return [t.to_local() for t in state.values()]


def _equal(target: dict[str, Any], expected: list[torch.Tensor]) -> bool:
    return all(torch.equal(t, e) for t, e in zip(_locals(target), expected, strict=True))


# --------------------------------------------------------------------------- systems


def _raw_file(path: str, rank: int) -> str:
    """The raw bound's file of ``rank`` in the directory ``path``."""
    return os.path.join(path, f"rank{rank}.bin")


def _save_fn(system: str, state: dict[str, Any], path: str, fsync: bool, group: Any) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import zarrckpt

    if system == "zarrckpt":
        zarrckpt.save(state, path, fsync=fsync, process_group=group)
    elif system == "dcp":
        dcp.save(
            state,
            storage_writer=dcp.FileSystemWriter(path, sync_files=fsync),
            process_group=group,
        )
    elif system == "numpy_raw":
        os.makedirs(path, exist_ok=True)
        write_raw(_locals(state), _raw_file(path, dist.get_rank(group)), fsync)
    else:
        raise ValueError(f"system {system!r} has no distributed save")


def _load_fn(
    system: str, state: dict[str, Any], path: str, group: Any, counters: dict[str, int]
) -> None:
    """Load ``path`` into ``state``; ``counters["bytes_read"]`` gets the bytes the library
    reports reading (zarrckpt, DCP)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import zarrckpt

    if system == "zarrckpt":
        stats: dict[str, int] = {}
        zarrckpt.load(state, path, process_group=group, stats=stats)
        counters["bytes_read"] = stats["bytes_read"]
    elif system == "dcp":
        reader = dcp.FileSystemReader(path)
        read = 0
        original = reader._slice_file

        def counting(file: Any, info: Any) -> Any:
            nonlocal read
            read += info.length
            return original(file, info)

        reader._slice_file = counting  # type: ignore[method-assign]
        dcp.load(state, storage_reader=reader, process_group=group)
        counters["bytes_read"] = read
    elif system == "numpy_raw":
        read_raw_into(_locals(state), _raw_file(path, dist.get_rank(group)))
    else:
        raise ValueError(f"system {system!r} has no distributed load")


# --------------------------------------------------------------------------- timing


class _Series:
    """Timings, memory and metrics of one (system, op) on this rank."""

    def __init__(self, system: str, op: str) -> None:
        self.data = _measure.empty_series(system, op)

    def add(self, warm: bool, seconds: float, rss: _measure.PeakRSS) -> None:
        if warm:
            self.data["warmup_s"].append(seconds)
        else:
            self.data["times_s"].append(seconds)
            self.data["peak_rss_kb"].append(rss.peak_kb)
            self.data["extra_rss_kb"].append(rss.extra_kb)


def _timed(series: _Series, warm: bool, group: Any, fn: Callable[[], None]) -> float:
    """Run ``fn`` between two barriers of ``group``; record and return rank-local wall time."""
    import torch.distributed as dist

    dist.barrier(group)
    with _measure.PeakRSS() as rss:
        t0 = time.perf_counter()
        fn()
        dist.barrier(group)
        seconds = time.perf_counter() - t0
    series.add(warm, seconds, rss)
    return seconds


def _rotate(items: list[str], k: int) -> list[str]:
    k %= max(1, len(items))
    return items[k:] + items[:k]


def _on_rank0(group: Any, fn: Callable[[], None]) -> None:
    """Run ``fn`` on the group's first rank, then wait for it on all ranks."""
    import torch.distributed as dist

    if dist.get_rank(group) == 0:
        fn()
    dist.barrier(group)


def _cache(path: str, cold: bool) -> None:
    files = _measure.files_under(path)
    if cold:
        _measure.evict(files)
    else:
        _measure.prewarm(files)


def _load_round(
    ser: _Series,
    warm: bool,
    system: str,
    path: str,
    target: dict[str, Any],
    expected: list[torch.Tensor],
    group: Any,
) -> None:
    """One timed load of ``path`` into the zeroed ``target``, checked against ``expected``
    (cold when the series' op is ``load_cold``: the files are evicted first)."""
    op = ser.data["op"]
    for t in _locals(target):
        t.zero_()
    _on_rank0(group, functools.partial(_cache, path, op == "load_cold"))
    counters: dict[str, int] = {}
    _timed(ser, warm, group, functools.partial(_load_fn, system, target, path, group, counters))
    if not _equal(target, expected):
        raise AssertionError(f"{system} {op}: loaded data differs from the saved data")
    ser.data["verified_loads"] += 1
    if "bytes_read" in counters:
        ser.data["metrics"]["bytes_read"] = counters["bytes_read"]


# --------------------------------------------------------------------------- (d)


def _fsdp_rounds(
    wl: ShardedWorkload, spec: dict[str, Any], root: str, mesh: Any
) -> list[dict[str, Any]]:
    """Every (system, op) series of an FSDP2 workload, as measured on this rank."""
    group = mesh.get_group()
    systems = list(spec["systems"])
    # many-file outputs are set aside, not deleted, until the run ends (see _Trash)
    trash = _Trash(os.path.join(spec["data_dir"], TRASH))
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])
    state = _state(mesh, wl.shapes, fill=True)
    expected = [t.clone() for t in _locals(state)]
    target = _state(mesh, wl.shapes, fill=False)
    series: dict[tuple[str, str], _Series] = {}
    save_ops = [o for o in spec["ops"] if o in SAVE_OPS]
    for op in save_ops:
        warm = warmup if op == save_ops[0] else 0
        for rnd in range(warm + repeats):
            for system in _rotate(systems, rnd):
                ser = series.setdefault((system, op), _Series(system, op))
                path = os.path.join(root, f"{system}.{op}.{rnd}")
                _on_rank0(group, os.sync)
                save = functools.partial(_save_fn, system, state, path, op == "save_fsync", group)
                _timed(ser, rnd < warm, group, save)
                _on_rank0(group, functools.partial(trash.discard, path))
    load_ops = [o for o in spec["ops"] if o in LOAD_OPS]
    fixtures = {s: os.path.join(root, f"{s}.fixture") for s in systems}
    if load_ops:
        for system, path in fixtures.items():
            _save_fn(system, state, path, True, group)
    for op in load_ops:
        warm = warmup if op == load_ops[0] else 0
        for rnd in range(warm + repeats):
            for system in _rotate(systems, rnd):
                ser = series.setdefault((system, op), _Series(system, op))
                _load_round(ser, rnd < warm, system, fixtures[system], target, expected, group)
    for path in fixtures.values():
        _on_rank0(group, functools.partial(trash.discard, path))
    return [s.data for s in series.values()]


# --------------------------------------------------------------------------- (e)


def _reshard_rounds(
    wl: ShardedWorkload, spec: dict[str, Any], root: str, mesh4: Any, mesh2: Any
) -> list[dict[str, Any]]:
    """Resharding loads 4 -> 2 (ranks 0 and 1 only) and 2 -> 4, as seen by this rank."""
    import torch.distributed as dist

    systems = [s for s in spec["systems"] if s in ("zarrckpt", "dcp")]
    warmup, repeats = int(spec["warmup"]), int(spec["repeats"])
    rank = dist.get_rank()
    in2 = mesh2.get_coordinate() is not None
    group4, group2 = mesh4.get_group(), mesh2.get_group() if in2 else None
    paths = {(s, ws): os.path.join(root, f"{s}.ws{ws}") for s in systems for ws in (2, 4)}
    state4 = _state(mesh4, wl.shapes, fill=True)
    for s in systems:
        _save_fn(s, state4, paths[s, 4], True, group4)
    if in2:
        state2 = _state(mesh2, wl.shapes, fill=True)
        for s in systems:
            _save_fn(s, state2, paths[s, 2], True, group2)
        del state2
    del state4
    dist.barrier()
    series: dict[tuple[str, str], _Series] = {}
    for op in [o for o in spec["ops"] if o in RESHARD_OPS]:
        source, mesh, group = (4, mesh2, group2) if op == "load_4to2" else (2, mesh4, group4)
        if group is not None:
            target = _state(mesh, wl.shapes, fill=False)
            expected = [t.clone() for t in _locals(_state(mesh, wl.shapes, fill=True))]
            needed = sum(t.numel() * 4 for t in expected)
            for rnd in range(warmup + repeats):
                for system in _rotate(systems, rnd):
                    ser = series.setdefault((system, op), _Series(system, op))
                    path = paths[system, source]
                    _load_round(ser, rnd < warmup, system, path, target, expected, group)
                    ser.data["metrics"]["bytes_needed"] = needed
        dist.barrier()
    if rank == 0:
        trash = _Trash(os.path.join(spec["data_dir"], TRASH))
        for path in paths.values():
            trash.discard(path)
    dist.barrier()
    return [s.data for s in series.values()]


# --------------------------------------------------------------------------- groups


def _group_worker(rank: int, world_size: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Body of one process of the group: the workloads of ``spec["workloads"]``.

    A workload on fewer ranks than the group runs on a sub-mesh of the first
    ranks; the others wait at a barrier (blocked in gloo, using no CPU).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint  # noqa: F401  (imports stay out of the timings)
    from torch.distributed.device_mesh import DeviceMesh

    import zarrckpt  # noqa: F401

    root = spec["root"]
    out: dict[str, Any] = {}
    meshes = {n: DeviceMesh("cpu", torch.arange(n)) for n in sorted({2, world_size})}
    gc.collect()
    gc.freeze()  # as in the single-process worker: collections stay out of the timings
    for name in spec["workloads"]:
        wl = WORKLOADS[name].build(spec["size"])
        if rank == 0:
            os.makedirs(os.path.join(root, name), exist_ok=True)
        dist.barrier()
        t0 = time.perf_counter()
        if name == "reshard":
            out[name] = _reshard_rounds(wl, spec, os.path.join(root, name), meshes[4], meshes[2])
        else:
            mesh = meshes[wl.world_sizes[0]]
            in_mesh = mesh.get_coordinate() is not None
            out[name] = _fsdp_rounds(wl, spec, os.path.join(root, name), mesh) if in_mesh else []
        dist.barrier()
        if rank == 0:
            _log(f"[{name}] done in {time.perf_counter() - t0:.1f}s")
    out["_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def _merge_ranks(name: str, per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One series per (system, op) from the ranks that ran it: the first such
    rank's times (rank 0 of the group), the highest RSS of any rank, loads
    verified on every rank, bytes read and needed per rank."""
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rank_out in per_rank:
        for series in rank_out[name]:
            by_key.setdefault((series["system"], series["op"]), []).append(series)
    merged = []
    for ranks in by_key.values():
        entry = dict(ranks[0])
        for key in ("peak_rss_kb", "extra_rss_kb"):
            entry[key] = [max(v) for v in zip(*(s[key] for s in ranks), strict=True)]
        entry["verified_loads"] = min(s["verified_loads"] for s in ranks)
        metrics: dict[str, Any] = {}
        if "bytes_read" in entry["metrics"]:
            metrics["bytes_read"] = [s["metrics"]["bytes_read"] for s in ranks]
        if "bytes_needed" in entry["metrics"]:
            metrics["bytes_needed"] = [s["metrics"]["bytes_needed"] for s in ranks]
            metrics["read_amplification"] = max(
                r / n for r, n in zip(metrics["bytes_read"], metrics["bytes_needed"], strict=True)
            )
        entry["metrics"] = metrics
        merged.append(entry)
    return merged


def run(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Measure ``spec["workloads"]``; return one output per workload (runner schema)."""
    from zarrckpt.testing import run_distributed

    systems = [s for s in spec["systems"] if s in ("zarrckpt", "dcp", "numpy_raw")]
    names = spec["workloads"]
    world_size = max(max(WORKLOADS[n].build(spec["size"]).world_sizes) for n in names)
    root = os.path.join(spec["data_dir"], "distributed")
    os.makedirs(root, exist_ok=True)
    group_spec = {**spec, "systems": systems, "root": root}
    try:
        per_rank = run_distributed(_group_worker, world_size, group_spec, timeout=3600)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return [
        {
            "workload": WORKLOADS[name].build(spec["size"]).info(),
            "build_s": None,  # every rank builds its own shards
            "systems": systems,
            "measurements": _merge_ranks(name, per_rank),
            # lifetime peak of the group's processes (all distributed workloads)
            "self_maxrss_kb": max(r["_maxrss_kb"] for r in per_rank),
        }
        for name in names
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the distributed workloads of the spec file ``argv[0]``."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    outputs = run(spec)
    with open(spec["output"], "w") as f:
        json.dump(outputs, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
