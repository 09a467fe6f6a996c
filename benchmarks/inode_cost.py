"""What one file creation costs on a filesystem: the floor under workload (b).

``python -m benchmarks.inode_cost [DIR ...] [--n 1000]``

A zarr v3 array of one chunk is at least three inodes (its directory, its
``zarr.json``, its chunk file; zarrckpt's default chunk keys add a ``c/``
directory). Saving 1,000 small tensors as 1,000 arrays therefore costs 3,000
to 4,000 inode creations, while ``torch.save`` writes one file. This script
measures, with plain ``os`` calls and no checkpoint library, in a fresh
directory under each ``DIR`` (default: the current directory, and
``/dev/shm`` when it exists):

* ``n`` directories, ``n`` empty files, ``n`` files of 16 KiB;
* ``n`` zarr-shaped arrays: directory + ``zarr.json`` + ``c/`` + chunk (as
  zarrckpt writes them) and directory + ``zarr.json`` + chunk (a ``.``
  chunk-key separator);
* one file of ``n`` x 16 KiB (what ``torch.save`` writes);

each followed by one ``syncfs``, and prints milliseconds (creating and
writing, then syncing) and microseconds per created inode.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

__all__ = ["measure", "main"]

_LIBC = ctypes.CDLL(None, use_errno=True)
_DATA = b"\x01" * 16384
_META = b"{" + b" " * 600 + b"}"


def _syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if getattr(_LIBC, "syncfs", None) is None or _LIBC.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _cases(n: int) -> dict[str, tuple[int, Callable[[str], None]]]:
    """name -> (inodes created, function filling a fresh directory)."""

    def arrays(root: str, c_dir: bool) -> None:
        for i in range(n):
            d = f"{root}/layers.{i}.weight"
            os.mkdir(d)
            _write(f"{d}/zarr.json", _META)
            if c_dir:
                os.mkdir(f"{d}/c")
                _write(f"{d}/c/0", _DATA)
            else:
                _write(f"{d}/c.0", _DATA)

    def single_file(root: str) -> None:
        with open(f"{root}/model.pt", "wb") as f:
            for _ in range(n):
                f.write(_DATA)

    def directories(root: str) -> None:
        for i in range(n):
            os.mkdir(f"{root}/d{i}")

    def files(root: str, data: bytes) -> None:
        for i in range(n):
            _write(f"{root}/f{i}", data)

    return {
        "directories": (n, directories),
        "empty files": (n, lambda root: files(root, b"")),
        "16 KiB files": (n, lambda root: files(root, _DATA)),
        "arrays: dir + zarr.json + c/ + c/0": (4 * n, lambda root: arrays(root, True)),
        "arrays: dir + zarr.json + c.0": (3 * n, lambda root: arrays(root, False)),
        "one file of n x 16 KiB": (1, single_file),
    }


def measure(base: str, n: int = 1000, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Median ms (create, sync, total) of each case, in fresh directories under ``base``.

    Nothing is deleted until every case has run: on ext4, deleting thousands
    of inodes slows the next thousands of creations nearby for ~30 s (the
    allocator skips recently deleted inodes), which would be charged to the
    next case. Cases are interleaved across repetitions.
    """
    cases = _cases(n)
    creates: dict[str, list[float]] = {name: [] for name in cases}
    syncs: dict[str, list[float]] = {name: [] for name in cases}
    scratch = tempfile.mkdtemp(prefix="inode-cost-", dir=base)
    try:
        for rnd in range(repeats):
            for name, (_inodes, fill) in cases.items():
                root = tempfile.mkdtemp(prefix=f"{rnd}-", dir=scratch)
                _syncfs(root)
                t0 = time.perf_counter()
                fill(root)
                t1 = time.perf_counter()
                _syncfs(root)
                t2 = time.perf_counter()
                creates[name].append((t1 - t0) * 1e3)
                syncs[name].append((t2 - t1) * 1e3)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out: dict[str, dict[str, float]] = {}
    for name, (inodes, _fill) in cases.items():
        create, sync = statistics.median(creates[name]), statistics.median(syncs[name])
        out[name] = {
            "inodes": inodes,
            "create_ms": create,
            "sync_ms": sync,
            "total_ms": create + sync,
            "us_per_inode": create * 1e3 / inodes,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", help="directories to measure in")
    parser.add_argument("--n", type=int, default=1000, help="arrays / files per case")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    dirs = args.dirs or ["."] + (["/dev/shm"] if os.path.isdir("/dev/shm") else [])
    for base in dirs:
        print(f"\n{os.path.realpath(base)} (n = {args.n}, medians of {args.repeats})\n")
        print("| case | inodes | create ms | sync ms | total ms | us per inode |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, r in measure(base, args.n, args.repeats).items():
            print(
                f"| {name} | {r['inodes']} | {r['create_ms']:.1f} | {r['sync_ms']:.1f} | "
                f"{r['total_ms']:.1f} | {r['us_per_inode']:.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
