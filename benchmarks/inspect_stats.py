"""Benchmark ``Checkpoint.stats`` on a large checkpoint against a numpy loop over torch.load.

Writes a checkpoint of ``--size-gib`` GiB (default 4: 4096x4096 float32
matrices plus some bfloat16 ones, as in a transformer) with ``zarrckpt.save``
and the same tensors with ``torch.save``, then measures, each in a fresh
process:

- ``zarrckpt``: ``zarrckpt.open(path).stats()`` (dask threaded scheduler,
  one pass over the chunks);
- ``numpy``: ``torch.load`` then, tensor by tensor, numpy's min, max, mean,
  std, norm, nan/inf/zero counts, single-threaded (BLAS limited to 1 thread).

For each: wall time and CPU time of the work (imports excluded), CPU/wall
(about the number of cores kept busy) and the process's peak RSS (imports
included). The statistics of the two are compared. The files live in a
temporary directory (``--dir``) removed at the end unless ``--keep``.

Timings on a shared machine are noisy: compare the two rows of one run.

Usage::

    python benchmarks/inspect_stats.py [--size-gib 4] [--dir DIR] [--keep] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

_MAKE = r"""
import sys, torch, zarrckpt
size_gib, ckpt, pt = float(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.manual_seed(0)
n = 4096
big_f32 = n * n * 4
total = int(size_gib * (1 << 30))
sd = {}
i = 0
while total > 0:
    if i % 8 == 7:   # one matrix in 8 is bfloat16
        t = torch.randn(n, n).bfloat16()
    else:
        t = torch.randn(n, n) * (1 + i % 5)
    sd[f"layers.{i}.weight"] = t
    sd[f"layers.{i}.bias"] = torch.randn(n)
    total -= t.numel() * t.element_size()
    i += 1
sd["layers.0.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), 0.0])
zarrckpt.save(sd, ckpt, fsync=False)
torch.save(sd, pt)
print(sum(t.numel() * t.element_size() for t in sd.values()), len(sd))
"""

_ZARRCKPT = r"""
import json, resource, sys, threading, time
import zarrckpt
from zarrckpt.inspect import _stats
spans = []
task = _stats._stats_task
def timed_task(*args):  # records when each dask task runs, and on which thread
    t = time.perf_counter()
    try:
        return task(*args)
    finally:
        spans.append((t, time.perf_counter(), threading.get_ident()))
_stats._stats_task = timed_task
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
stats = zarrckpt.open(sys.argv[1]).stats()
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
out = {k: [s.min, s.max, s.mean, s.std, s.norm, s.nan, s.inf, s.zeros] for k, s in stats.items()}
print(json.dumps({"wall": t1 - t0, "cpu": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
                  "maxrss_kib": r1.ru_maxrss, "tasks": len(spans),
                  "threads": len({s[2] for s in spans}),
                  "concurrency": sum(b - a for a, b, _ in spans) / (t1 - t0), "stats": out}))
"""

_NUMPY = r"""
import json, resource, sys, time
import numpy as np
import torch
torch.set_num_threads(1)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
sd = torch.load(sys.argv[1], weights_only=True)
out = {}
with np.errstate(invalid="ignore", over="ignore"):
    for k, t in sd.items():
        a = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        flat = a.reshape(-1)
        out[k] = [float(a.min()), float(a.max()), float(a.mean(dtype=np.float64)),
                  float(a.std(dtype=np.float64)), float(np.linalg.norm(flat.astype(np.float64))),
                  int(np.isnan(a).sum()), int(np.isinf(a).sum()), int(a.size - np.count_nonzero(a))]
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": t1 - t0, "cpu": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
                  "maxrss_kib": r1.ru_maxrss, "stats": out}))
"""


def _run(code: str, *args: str, single_thread: bool = False) -> dict[str, Any]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if single_thread:
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _max_rel_diff(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> float:
    worst = 0.0
    for k, va in a.items():
        for x, y in zip(va, b[k], strict=True):
            if x is None or y is None or x != x or y != y or x == y:
                continue
            worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    root = tempfile.mkdtemp(prefix="zarrckpt-bench-inspect-", dir=args.dir)
    ckpt, pt = os.path.join(root, "ckpt"), os.path.join(root, "ckpt.pt")
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _MAKE, str(args.size_gib), ckpt, pt],
            capture_output=True,
            text=True,
            check=False,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
        )
        if proc.returncode != 0:
            raise SystemExit(f"writing the checkpoint failed:\n{proc.stderr[-4000:]}")
        nbytes, ntensors = map(int, proc.stdout.split())
        print(
            f"wrote {nbytes / 2**30:.2f} GiB in {ntensors} tensors "
            f"(zarrckpt + torch.save) in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )

        load_before = os.getloadavg()[0]
        ours = _run(_ZARRCKPT, ckpt)
        base = _run(_NUMPY, pt, single_thread=True)
        print(
            f"machine: {os.cpu_count()} cores, 1-min load average {load_before:.1f} before "
            f"and {os.getloadavg()[0]:.1f} after the measurements (other jobs compete)"
        )
        rows = [("zarrckpt stats (dask)", ours), ("numpy loop over torch.load", base)]
        print(
            f"\n{'':28} {'wall s':>8} {'cpu s':>8} {'cpu/wall':>9} {'peak RSS MiB':>13}"
            f" {'GiB/s':>7}"
        )
        for name, r in rows:
            print(
                f"{name:28} {r['wall']:8.2f} {r['cpu']:8.2f} {r['cpu'] / r['wall']:9.2f} "
                f"{r['maxrss_kib'] / 1024:13.0f} {nbytes / 2**30 / r['wall']:7.2f}"
            )
        print(
            f"\nzarrckpt: {ours['tasks']} dask tasks on {ours['threads']} threads, "
            f"{ours['concurrency']:.2f} running on average (task time / wall time)"
        )
        worst = _max_rel_diff(ours["stats"], base["stats"])
        print(
            f"\nspeed-up {base['wall'] / ours['wall']:.2f}x; peak RSS "
            f"{ours['maxrss_kib'] / 1024:.0f} MiB vs {base['maxrss_kib'] / 1024:.0f} MiB; "
            f"largest relative difference between the two statistics: {worst:.1e}"
        )
        summary = {
            "bytes": nbytes,
            "tensors": ntensors,
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "zarrckpt": {k: v for k, v in ours.items() if k != "stats"},
            "numpy": {k: v for k, v in base.items() if k != "stats"},
            "max_rel_diff": worst,
        }
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
