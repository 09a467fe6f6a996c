"""Command line: run workloads in subprocesses, write results.json / results.md / charts.

Usage::

    python -m benchmarks                 # full set (~2 GB workload; < 10 min)
    python -m benchmarks --quick         # small sizes (< 60 s)
    python -m benchmarks --only b --out bench-out/b
    python -m benchmarks --quick --tiny  # seconds; used by the test suite
    python -m benchmarks --only d2,d4,e  # the distributed workloads only
    python -m benchmarks --only g        # (g) files at scale: files_at_scale.json / .md
    python -m benchmarks --only s3       # (s3) loopback S3 server: object_store.json / .md
                                         # (only when asked: python -m benchmarks.object_store)

Workloads are measured in subprocesses (one per workload in the full run, one
for all of them with ``--quick``; ``--isolate system`` gives each (workload,
system) pair its own process); the parent records each child's peak RSS
through ``os.wait4``, and the worker the peak RSS of every operation.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import files_at_scale, object_store, report
from ._worker import OPS, TRASH
from .async_save import ASYNC_OPS
from .distributed import RESHARD_OPS
from .systems import SYSTEMS
from .workloads import WORKLOADS, resolve_workload

__all__ = ["main", "MODES", "RUNNERS", "ALL_OPS"]

#: every operation a runner measures
ALL_OPS = OPS + RESHARD_OPS + ASYNC_OPS

#: mode -> (workload size, warm-up rounds, timed repetitions)
MODES = {"full": ("full", 1, 3), "quick": ("quick", 1, 2), "tiny": ("tiny", 1, 2)}

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _spawn(
    spec: dict[str, Any], workdir: str, module: str = "benchmarks._worker"
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run one worker subprocess (``python -m module SPEC``); return its outputs
    (one per workload) and its record."""
    tag = f"{'+'.join(spec['workloads'])}-{'+'.join(spec['systems'])}"[:80]
    spec_path = os.path.join(workdir, f"{tag}.spec.json")
    spec["output"] = os.path.join(workdir, f"{tag}.out.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", module, spec_path], env=env)
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    record = {
        "workloads": spec["workloads"],
        "systems": spec["systems"],
        "returncode": proc.returncode,
        "wall_s": time.perf_counter() - t0,
        "ru_maxrss_mb": usage.ru_maxrss / 1024,
    }
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker for {tag} failed with exit code {proc.returncode}")
    with open(spec["output"]) as f:
        return json.load(f), record


Runner = Callable[[dict[str, Any], str, str], Iterable[tuple[list[dict[str, Any]], dict[str, Any]]]]


def run_single(
    spec: dict[str, Any], isolate: str, workdir: str
) -> Iterator[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Runner of single-process workloads (``spec["workloads"]``).

    ``isolate``: ``"run"`` one subprocess for all of them, ``"workload"`` one
    per workload, ``"system"`` one per (workload, system).
    """
    if isolate == "run":
        yield _spawn(spec, workdir)
    elif isolate == "workload":
        for w in spec["workloads"]:
            yield _spawn({**spec, "workloads": [w]}, workdir)
    else:
        for w in spec["workloads"]:
            for s in spec["systems"]:
                if WORKLOADS[w].kind in SYSTEMS[s].kinds:
                    yield _spawn({**spec, "workloads": [w], "systems": [s]}, workdir)


def run_distributed(
    spec: dict[str, Any], isolate: str, workdir: str
) -> Iterator[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """Runner of distributed workloads: one subprocess (:mod:`benchmarks.distributed`)
    that spawns the gloo process groups; ``isolate`` does not apply."""
    yield _spawn(spec, workdir, "benchmarks.distributed")


#: workload kind -> runner (the single-process worker also runs the async workload)
RUNNERS: dict[str, Runner] = {
    "single": run_single,
    "async": run_single,
    "distributed": run_distributed,
}


def _merge(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge worker outputs of the same workload (``--isolate system``)."""
    merged: dict[str, dict[str, Any]] = {}
    for out in outputs:
        name = out["workload"]["name"]
        if name not in merged:
            merged[name] = {**out, "measurements": list(out["measurements"])}
        else:
            merged[name]["measurements"] += out["measurements"]
    return list(merged.values())


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    return "unknown"


def _filesystem(path: str) -> str:
    path = os.path.realpath(path)
    best = ("", "unknown", "")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype, opts, *_ = line.split()
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                best = (mnt, f"{fstype} ({dev})", opts)
    return f"{best[1]} mounted at {best[0]} [{best[2]}]"


def _versions() -> str:
    names = ["torch", "numpy", "zarr", "zarrckpt", "tensorstore", "safetensors"]
    found = []
    for n in names:
        try:
            found.append(f"{n} {importlib.metadata.version(n)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{n} ?")
    return f"python {platform.python_version()}, " + ", ".join(found)


def _parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``system.key=value`` items -> {system: {key: int or str}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, _, value = item.partition("=")
        system, _, name = key.partition(".")
        if not name or system not in SYSTEMS:
            raise SystemExit(f"--opt expects SYSTEM.KEY=VALUE, got {item!r}")
        out.setdefault(system, {})[name] = int(value) if value.lstrip("-").isdigit() else value
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 3 repetitions (< 60 s)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for tests (seconds)")
    p.add_argument("--out", default="bench-out", help="output directory (default bench-out/)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        help="workload name or alias (a, b, c, d2, d4, e, f, g); repeatable or comma-separated",
    )
    p.add_argument("--systems", default="", help="comma-separated subset of systems")
    p.add_argument("--ops", default="", help=f"comma-separated subset of {', '.join(ALL_OPS)}")
    p.add_argument("--repeats", type=int, help="timed repetitions (default by mode)")
    p.add_argument("--warmup", type=int, help="warm-up rounds (default 1)")
    p.add_argument("--data-dir", help="where checkpoints are written (default OUT/_data)")
    p.add_argument("--keep-data", action="store_true", help="keep the data directory")
    p.add_argument(
        "--isolate",
        choices=("run", "workload", "system"),
        help="one subprocess for all workloads (default with --quick), per workload "
        "(default otherwise) or per (workload, system)",
    )
    p.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="SYSTEM.KEY=VALUE",
        help="option for a system, e.g. zarrckpt.threads=4 (repeatable)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    only = [w for item in args.only for w in item.split(",") if w]
    # (g) files at scale is not a timing workload: run after the others, own outputs
    g_names = (files_at_scale.ALIAS, files_at_scale.NAME)
    s3_names = ("s3", "object_store")  # not part of the default set: runs only when asked
    timed = [w for w in only if w not in g_names + s3_names]
    if timed or not only:
        _run_timed(args, mode, timed)
    if any(w in s3_names for w in only):
        results_s3 = object_store.run(mode)
        out_dir = os.path.abspath(args.out)
        for path in object_store.write(results_s3, out_dir):
            _log(f"wrote {path}")
        print(object_store.markdown(results_s3))
    if not only or any(w in g_names for w in only):
        out_dir = os.path.abspath(args.out)
        results = files_at_scale.run(mode, os.path.abspath(args.data_dir or out_dir))
        for path in files_at_scale.write(results, out_dir):
            _log(f"wrote {path}")
        print(files_at_scale.markdown(results))
    return 0


def _run_timed(args: argparse.Namespace, mode: str, only: list[str]) -> None:
    """The timing workloads: results.json / results.md / charts."""
    size, warmup, repeats = MODES[mode]
    warmup = warmup if args.warmup is None else args.warmup
    repeats = repeats if args.repeats is None else args.repeats
    workloads = [resolve_workload(w) for w in only] or list(WORKLOADS)
    systems = [s for s in args.systems.split(",") if s] or list(SYSTEMS)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; known: {list(SYSTEMS)}")
    ops = [o for o in args.ops.split(",") if o] or list(ALL_OPS)
    isolate = args.isolate or ("workload" if mode == "full" else "run")
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    data_dir = os.path.abspath(args.data_dir or os.path.join(out_dir, "_data"))
    os.makedirs(data_dir, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "warmup": warmup,
        "repeats": repeats,
        "workloads": workloads,
        "systems": systems,
        "ops": ops,
        "isolate": isolate,
        "options": _parse_options(args.opt),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory": _memory(),
        "kernel": platform.release(),
        "filesystem": _filesystem(data_dir),
        "versions": _versions(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    t0 = time.perf_counter()
    outputs: list[dict[str, Any]] = []
    processes: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="specs-", dir=data_dir) as workdir:
            by_runner: dict[Runner, list[str]] = {}
            for w in workloads:
                by_runner.setdefault(RUNNERS[WORKLOADS[w].kind], []).append(w)
            for runner, members in by_runner.items():
                kinds = {WORKLOADS[w].kind for w in members}
                spec = {
                    "workloads": members,
                    "size": size,
                    "systems": [s for s in systems if kinds & set(SYSTEMS[s].kinds)],
                    "ops": ops,
                    "warmup": warmup,
                    "repeats": repeats,
                    "data_dir": data_dir,
                    "options": meta["options"],
                }
                for outs, record in runner(spec, isolate, workdir):
                    outputs.extend(outs)
                    processes.append(record)
                    _log(
                        f"[{'+'.join(record['workloads'])}] process done in "
                        f"{record['wall_s']:.1f}s, peak RSS {record['ru_maxrss_mb']:.0f} MB"
                    )
    finally:
        shutil.rmtree(os.path.join(data_dir, TRASH), ignore_errors=True)
        if not args.keep_data and args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["total_s"] = time.perf_counter() - t0
    results = report.build_results(_merge(outputs), meta, processes)
    for path in report.write_outputs(results, out_dir):
        _log(f"wrote {path}")
    print(report.markdown(results))
