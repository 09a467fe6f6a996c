"""Peak resident memory of the converters on a ~4 GB checkpoint.

Usage::

    python -m benchmarks.convert_memory [--dir DIR] [--gib 4] [--keep] [--out results.md]

Creates a ~4 GB state dict (one 1 GiB float32 tensor, the largest; several
512 MiB bfloat16 tensors; 256 small tensors; an optimizer-like nested part
and plain values), writes it once as a ``torch.save`` file, a DCP directory
(``dcp.save``) and a safetensors file, then runs each conversion in a fresh
process and reports that process's peak RSS (``VmHWM``: anonymous *and*
file-backed mapped pages, so memory-mapped reads count) next to the largest
tensor's size and the target, largest tensor + 512 MiB. For comparison it
also measures DCP's own ``format_utils`` converters, which load the whole
state into memory. The checkpoints are checked bit for bit after each
conversion (by the parent, not counted).

Not part of the unit tests: it writes ~25 GB and takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


def _peak_rss() -> int:
    """Peak resident set of this process in bytes: ``VmHWM`` (anonymous and file-backed pages).

    ``ru_maxrss`` is not used: Linux carries it over ``fork`` + ``exec``, so a
    child would report its parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_state(total_gib: float) -> dict[str, Any]:
    """The benchmark state dict (~``total_gib`` GiB; largest tensor 1 GiB float32)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    largest = torch.randn(16384, 16384, generator=gen)  # 1 GiB float32
    budget = int(total_gib * GiB) - largest.nbytes - 256 * MiB
    layers = {}
    i = 0
    while budget >= 512 * MiB:
        layers[f"layers.{i}.weight"] = torch.randn(16384, 16384, generator=gen).to(torch.bfloat16)
        budget -= 512 * MiB
        i += 1
    small = {f"small.{j}": torch.randn(512, 512, generator=gen) for j in range(256)}  # 256 MiB
    return {
        "model": {"embed.weight": largest, **layers},
        "buffers": small,
        "optim": {"step": 1000, "param_groups": [{"lr": 1e-3, "betas": [0.9, 0.999]}]},
        "epoch": 3,
    }


def prepare(workdir: str, total_gib: float) -> dict[str, Any]:
    """Write the three source checkpoints; return sizes."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    state = make_state(total_gib)
    torch.save(state, os.path.join(workdir, "src.pt"))
    dcp.save(state, checkpoint_id=os.path.join(workdir, "src_dcp"), no_dist=True)
    flat = {f"{group}.{k}": v for group in ("model", "buffers") for k, v in state[group].items()}
    save_file(flat, os.path.join(workdir, "src.safetensors"))
    tensors = [v for g in ("model", "buffers") for v in state[g].values()]
    return {
        "total_bytes": sum(t.nbytes for t in tensors),
        "largest_bytes": max(t.nbytes for t in tensors),
        "tensors": len(tensors),
    }


#: (name, function, source, destination) run in a fresh process each
RUNS = [
    ("torch.save -> zarrckpt", "from_torch_save", "src.pt", "z_torch"),
    ("zarrckpt -> torch.save", "to_torch_save", "z_torch", "back.pt"),
    ("DCP -> zarrckpt", "from_dcp", "src_dcp", "z_dcp"),
    ("zarrckpt -> DCP", "to_dcp", "z_dcp", "back_dcp"),
    ("safetensors -> zarrckpt", "from_safetensors", "src.safetensors", "z_st"),
    ("zarrckpt -> safetensors", "to_safetensors", "z_st", "back.safetensors"),
    ("DCP format_utils dcp_to_torch_save", "dcp_to_torch_save", "src_dcp", "fu.pt"),
    ("DCP format_utils torch_save_to_dcp", "torch_save_to_dcp", "src.pt", "fu_dcp"),
]


def child(function: str, src: str, dst: str) -> None:
    """Run one conversion; print JSON with the peak RSS before and after."""
    import torch  # noqa: F401  (import cost is part of the baseline)
    import torch.distributed.checkpoint  # noqa: F401

    from zarrckpt import convert

    baseline = _peak_rss()
    start = time.perf_counter()
    if function in ("dcp_to_torch_save", "torch_save_to_dcp"):
        import warnings

        from torch.distributed.checkpoint import format_utils

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            getattr(format_utils, function)(src, dst)
    else:
        getattr(convert, function)(src, dst, fsync=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"baseline": baseline, "peak": _peak_rss(), "seconds": seconds}))


def _check(workdir: str, dst: str, kind: str) -> bool:
    """Bit-exact check of a converted checkpoint against the torch.save source (mmap)."""
    import torch

    src = torch.load(os.path.join(workdir, "src.pt"), mmap=True, weights_only=True)
    expected = {f"{g}.{k}": v for g in ("model", "buffers") for k, v in src[g].items()}
    path = os.path.join(workdir, dst)
    if kind == "zarrckpt":
        import zarrckpt

        ckpt = zarrckpt.open(path)
        return all(torch.equal(ckpt.read(k), v) for k, v in expected.items())
    if kind == "torch":
        got = torch.load(path, mmap=True, weights_only=True)
        return (
            all(torch.equal(got[g][k], v) for g in ("model", "buffers") for k, v in src[g].items())
            and got["optim"] == src["optim"]
        )
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            return all(torch.equal(f.get_tensor(k), v) for k, v in expected.items())
    if kind == "dcp":
        from zarrckpt import convert

        tmp = path + ".check"
        convert.from_dcp(path, tmp, fsync=False)
        try:
            return _check(workdir, os.path.basename(tmp), "zarrckpt")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return False


def _kind(dst: str) -> str:
    if dst.startswith("z_"):
        return "zarrckpt"
    if dst.endswith(".pt"):
        return "torch"
    if dst.endswith(".safetensors"):
        return "safetensors"
    return "dcp" if "dcp" in dst else "zarrckpt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--gib", type=float, default=4.0, help="checkpoint size in GiB")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--child", nargs=3, metavar=("FUNC", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    workdir = args.dir or tempfile.mkdtemp(prefix="zarrckpt-convert-mem-")
    os.makedirs(workdir, exist_ok=True)
    try:
        info_file = os.path.join(workdir, "sources.json")
        if os.path.exists(info_file):  # sources of an earlier --keep run
            with open(info_file) as f:
                info = json.load(f)
        else:
            print(f"writing the sources in {workdir} ...", flush=True)
            info = prepare(workdir, args.gib)
            with open(info_file, "w") as f:
                json.dump(info, f)
        for _, _, _, dst in RUNS:  # outputs of an earlier run
            out = os.path.join(workdir, dst)
            if os.path.isdir(out):
                shutil.rmtree(out)
            elif os.path.exists(out):
                os.remove(out)
        largest = info["largest_bytes"]
        target = largest + 512 * MiB
        rows = []
        for name, function, src, dst in RUNS:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.convert_memory",
                    "--child",
                    function,
                    os.path.join(workdir, src),
                    os.path.join(workdir, dst),
                ],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(os.path.dirname(__file__)),
            )
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                rows.append((name, None, None, None, "FAILED"))
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            ok = _check(workdir, dst, _kind(dst))
            rows.append((name, result["peak"], result["baseline"], result["seconds"], ok))
            print(
                f"{name}: peak {result['peak'] / MiB:.0f} MiB, "
                f"{result['seconds']:.1f} s, bit-exact {ok}",
                flush=True,
            )
        lines = [
            f"Checkpoint: {info['total_bytes'] / GiB:.2f} GiB in {info['tensors']} tensors; "
            f"largest tensor {largest / MiB:.0f} MiB; target peak RSS <= largest + 512 MiB "
            f"= {target / MiB:.0f} MiB.",
            "",
            "| conversion | peak RSS (MiB) | RSS after imports (MiB) | peak - imports (MiB) "
            "| within target | seconds | bit-exact |",
            "|---|---:|---:|---:|---|---:|---|",
        ]
        for name, peak, base, seconds, ok in rows:
            if peak is None:
                lines.append(f"| {name} | - | - | - | - | - | {ok} |")
                continue
            within = "yes" if peak <= target else "no"
            if name.startswith("DCP format_utils"):
                within += " (reference)"
            lines.append(
                f"| {name} | {peak / MiB:.0f} | {base / MiB:.0f} | {(peak - base) / MiB:.0f} "
                f"| {within} | {seconds:.1f} | {ok} |"
            )
        table = "\n".join(lines)
        print()
        print(table)
        if args.out:
            with open(args.out, "w") as f:
                f.write(table + "\n")
        return 0
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
