"""Distributed workloads: multi-process FSDP2 save/load and resharding reads.

``python -m benchmarks.distributed [--gib 1.0] [--repeat 3] [--out DIR]``

* FSDP2-style state (DTensors sharded on dim 0) of about ``--gib`` GiB saved by
  2 gloo processes with ``zarrckpt.save`` and with ``dcp.save``
  (FileSystemWriter), loaded back with ``zarrckpt.load`` / ``dcp.load``, warm
  (files in the page cache) and cold (evicted with POSIX_FADV_DONTNEED after
  fsync). Times are wall-clock on rank 0 between barriers; medians of
  ``--repeat`` runs, systems interleaved.
* Resharding 4 -> 2 and 2 -> 4 ranks: bytes each rank reads vs the bytes it
  needs, for zarrckpt (``load(stats=...)``) and DCP (bytes sliced from its
  files by FileSystemReader).

Everything runs on this machine with the same data and disk in one run, so
the ratios are comparable; the absolute numbers depend on the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import torch

ROWS, COLS = 4096, 2048  # one fp32 tensor: 32 MiB


def _shapes(gib: float) -> list[tuple[int, int]]:
    n = max(2, round(gib * (1 << 30) / (ROWS * COLS * 4)))
    return [(ROWS, COLS)] * n


def _evict(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _state(world_size: int, shapes: list[tuple[int, int]], fill: bool) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    rank = dist.get_rank()
    state = {}
    for i, (rows, cols) in enumerate(shapes):
        per = -(-rows // world_size)
        local_rows = max(0, min(per, rows - rank * per))
        if fill:
            g = torch.Generator().manual_seed(i * 1000 + rank)
            local = torch.rand((local_rows, cols), generator=g)
        else:
            local = torch.zeros((local_rows, cols))
        state[f"layers.{i}.weight"] = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=(rows, cols), stride=(cols, 1)
        )
    return state


def _timed(fn: Any) -> float:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def save_load_worker(
    rank: int, world_size: int, root: str, shapes: list[tuple[int, int]], repeat: int
) -> dict[str, Any]:
    """Interleaved save / warm load / cold load of both systems; rank 0 reports."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import zarrckpt

    state = _state(world_size, shapes, fill=True)
    target = _state(world_size, shapes, fill=False)
    times: dict[str, list[float]] = {}
    paths = {"zarrckpt": os.path.join(root, "zarrckpt"), "dcp": os.path.join(root, "dcp")}

    def record(key: str, seconds: float) -> None:
        times.setdefault(key, []).append(seconds)

    def clear(path: str) -> None:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    for _ in range(repeat):
        clear(paths["zarrckpt"])
        record("zarrckpt save", _timed(lambda: zarrckpt.save(state, paths["zarrckpt"])))
        clear(paths["dcp"])
        record("dcp save", _timed(lambda: dcp.save(state, checkpoint_id=paths["dcp"])))
        record("zarrckpt load warm", _timed(lambda: zarrckpt.load(target, paths["zarrckpt"])))
        record("dcp load warm", _timed(lambda: dcp.load(target, checkpoint_id=paths["dcp"])))
        for system in ("zarrckpt", "dcp"):
            if rank == 0:
                _evict(paths[system])
            dist.barrier()
            if system == "zarrckpt":
                seconds = _timed(lambda: zarrckpt.load(target, paths["zarrckpt"]))
            else:
                seconds = _timed(lambda: dcp.load(target, checkpoint_id=paths["dcp"]))
            record(f"{system} load cold", seconds)
    ok = all(torch.equal(target[k].to_local(), state[k].to_local()) for k in state)
    nbytes = sum(r * c * 4 for r, c in shapes)
    return {"times": times, "bytes": nbytes, "equal": ok}


def reshard_save_worker(
    rank: int, world_size: int, root: str, shapes: list[tuple[int, int]]
) -> None:
    import torch.distributed.checkpoint as dcp

    import zarrckpt

    state = _state(world_size, shapes, fill=True)
    zarrckpt.save(state, os.path.join(root, f"zarrckpt-ws{world_size}"))
    dcp.save(state, checkpoint_id=os.path.join(root, f"dcp-ws{world_size}"))


def reshard_load_worker(
    rank: int, world_size: int, root: str, shapes: list[tuple[int, int]], source_ws: int
) -> dict[str, int]:
    import torch.distributed.checkpoint as dcp

    import zarrckpt

    target = _state(world_size, shapes, fill=False)
    needed = sum(t.to_local().numel() * 4 for t in target.values())
    stats: dict[str, int] = {}
    zarrckpt.load(target, os.path.join(root, f"zarrckpt-ws{source_ws}"), stats=stats)
    reader = dcp.FileSystemReader(os.path.join(root, f"dcp-ws{source_ws}"))
    read = 0
    original = reader._slice_file

    def counting(file: Any, info: Any) -> Any:
        nonlocal read
        read += info.length
        return original(file, info)

    reader._slice_file = counting  # type: ignore[method-assign]
    dcp.load(target, storage_reader=reader)
    return {"needed": needed, "zarrckpt": stats["bytes_read"], "dcp": read}


def run(gib: float, repeat: int, root: str) -> dict[str, Any]:
    from zarrckpt.testing import run_distributed

    shapes = _shapes(gib)
    result: dict[str, Any] = {"gib": sum(r * c * 4 for r, c in shapes) / (1 << 30)}
    os.makedirs(os.path.join(root, "ws2"), exist_ok=True)
    rank0 = run_distributed(
        save_load_worker, 2, os.path.join(root, "ws2"), shapes, repeat, timeout=3600
    )[0]
    result["fsdp2_ws2"] = {
        key: {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "gb_per_s": rank0["bytes"] / statistics.median(values) / 1e9,
        }
        for key, values in rank0["times"].items()
    }
    result["fsdp2_ws2_equal"] = rank0["equal"]
    small = shapes[: max(2, len(shapes) // 4)]
    reshard_root = os.path.join(root, "reshard")
    os.makedirs(reshard_root, exist_ok=True)
    for ws in (4, 2):
        run_distributed(reshard_save_worker, ws, reshard_root, small, timeout=3600)
    for src, dst in ((4, 2), (2, 4)):
        per_rank = run_distributed(reshard_load_worker, dst, reshard_root, small, src, timeout=3600)
        result[f"reshard_{src}to{dst}"] = {
            "per_rank": per_rank,
            "zarrckpt_max_ratio": max(r["zarrckpt"] / r["needed"] for r in per_rank),
            "dcp_max_ratio": max(r["dcp"] / r["needed"] for r in per_rank),
        }
    return result


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"FSDP2 state of {result['gib']:.2f} GiB on 2 gloo processes "
        f"(bit-exact: {result['fsdp2_ws2_equal']})",
        "",
        "| operation | median s | min s | max s | GB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, v in result["fsdp2_ws2"].items():
        lines.append(
            f"| {key} | {v['median_s']:.3f} | {v['min_s']:.3f} | {v['max_s']:.3f} "
            f"| {v['gb_per_s']:.2f} |"
        )
    t = result["fsdp2_ws2"]

    def speedup(op: str) -> float:
        return float(t[f"dcp {op}"]["median_s"] / t[f"zarrckpt {op}"]["median_s"])

    lines += [
        "",
        f"zarrckpt / DCP speed: save {speedup('save'):.2f}x, "
        f"warm load {speedup('load warm'):.2f}x, cold load {speedup('load cold'):.2f}x",
        "",
        "| reshard | zarrckpt bytes read / needed (max over ranks) | DCP |",
        "|---|---:|---:|",
    ]
    for key in ("reshard_4to2", "reshard_2to4"):
        r = result[key]
        lines.append(f"| {key[8:]} | {r['zarrckpt_max_ratio']:.3f} | {r['dcp_max_ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    root = tempfile.mkdtemp(prefix="zarrckpt-dist-bench-", dir=args.out)
    try:
        result = run(args.gib, args.repeat, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    with open(os.path.join(args.out, "distributed.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = to_markdown(result)
    with open(os.path.join(args.out, "distributed.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
