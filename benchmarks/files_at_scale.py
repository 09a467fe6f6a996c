"""Workload (g) "files at scale": files, directories and metadata bytes per checkpoint.

Not a timing workload. Two parts:

1. **Real saves**: the same small transformer-like model (FSDP2 ``fully_shard`` on a
   CPU mesh, AdamW state after one step; deterministic) saved by 1, 2 and 4 gloo
   ranks with zarrckpt (default: one shard file per tensor), zarrckpt
   ``file_layout="pieces"`` (the object-store layout) and DCP; each checkpoint is
   walked (files, directories including its root) and its root metadata measured
   (zarrckpt: root ``zarr.json``; DCP: ``.metadata``). The zarrckpt ones are loaded
   back on 1 process and compared bit-exact.
2. **Projection** (:mod:`benchmarks._projection`): the same counts and the
   manifest bytes for a Llama-2-70B-class model + Adam at 64, 1,024 and 8,192
   ranks, from zarrckpt's planning functions (no data, no processes).

Usage::

    python -m benchmarks.files_at_scale [--out DIR] [--quick]
    python -m benchmarks --only g        # the same, from the benchmark CLI
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import tempfile
from typing import Any

import torch

from . import _projection as proj
from . import report

__all__ = ["NAME", "ALIAS", "run", "write", "markdown", "main", "real_parameters", "walk_counts"]

NAME, ALIAS = "files_at_scale", "g"

#: mode -> (real-save model (vocab, d, ff, kv, layers), real world sizes,
#:          projected model, projected world sizes)
_MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...], proj.ModelShape, tuple[int, ...]]] = {
    "full": ((1000, 128, 344, 32, 2), (1, 2, 4), proj.LLAMA2_70B, (64, 1024, 8192)),
    "quick": ((256, 64, 176, 16, 2), (1, 2, 4), proj.LLAMA2_70B, (64, 1024, 8192)),
    "tiny": ((64, 16, 40, 8, 1), (1, 2), proj.ModelShape(2, 16, 40, 50, 2, 4), (4, 8)),
}
_SYSTEMS = ("zarrckpt v3 shard", "zarrckpt v3 pieces", "dcp")


# --------------------------------------------------------------------------- real saves


class _Block(torch.nn.Module):
    def __init__(self, d: int, ff: int, kv: int) -> None:
        super().__init__()
        self.q = torch.nn.Linear(d, d, bias=False)
        self.k = torch.nn.Linear(d, kv, bias=False)
        self.v = torch.nn.Linear(d, kv, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.gate = torch.nn.Linear(d, ff, bias=False)
        self.up = torch.nn.Linear(d, ff, bias=False)
        self.down = torch.nn.Linear(ff, d, bias=False)
        self.norm1 = torch.nn.RMSNorm(d)
        self.norm2 = torch.nn.RMSNorm(d)


class _Model(torch.nn.Module):
    """Transformer-shaped parameters (no forward pass is needed)."""

    def __init__(self, vocab: int, d: int, ff: int, kv: int, layers: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(_Block(d, ff, kv) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)


def real_parameters(mode: str) -> dict[str, tuple[int, ...]]:
    """Parameter FQN -> shape of the model the real saves of ``mode`` use."""
    model = _Model(*_MODES[mode][0])
    return {k: tuple(p.shape) for k, p in model.named_parameters()}


def _full(tree: Any) -> Any:
    """The tree with DTensors gathered (collective) and tensors cloned."""
    if isinstance(tree, dict):
        return {k: _full(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_full(v) for v in tree)
    if hasattr(tree, "full_tensor"):
        return tree.full_tensor()
    return tree.clone() if isinstance(tree, torch.Tensor) else tree


def _save_rank(rank: int, world: int, root: str, config: tuple[int, ...]) -> Any:
    """Rank function: build, shard, step, save three ways; rank 0 returns the full state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import zarrckpt

    torch.manual_seed(7)
    model = _Model(*config)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = p.detach() * 0.5 + 0.1
    optim.step()
    model_sd, optim_sd = get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd}
    zarrckpt.save(state, os.path.join(root, "zarrckpt v3 shard"), fsync=False)
    zarrckpt.save(
        state, os.path.join(root, "zarrckpt v3 pieces"), fsync=False, file_layout="pieces"
    )
    dcp.save(state, storage_writer=dcp.FileSystemWriter(os.path.join(root, "dcp")))
    full = _full(state)
    return full if rank == 0 else None


def walk_counts(path: str) -> dict[str, int]:
    """Files and directories of a checkpoint (its root directory counted)."""
    files, dirs = 0, 1
    for _, dirnames, filenames in os.walk(path):
        files += len(filenames)
        dirs += len(dirnames)
    return {"files": files, "dirs": dirs}


def _tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: tree} if isinstance(tree, torch.Tensor) else {}
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _loads_bit_exact(path: str, expected: Any) -> bool:
    import zarrckpt

    target = torch.utils._pytree.tree_map(
        lambda x: torch.zeros_like(x) if isinstance(x, torch.Tensor) else x, expected
    )
    zarrckpt.load(target, path)
    want, got = _tensors(expected), _tensors(target)
    return want.keys() == got.keys() and all(
        got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want
    )


def _dcp_entries(path: str) -> int:
    """Tensor chunk entries of a DCP ``.metadata`` file."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with open(path, "rb") as f:
        md = pickle.load(f)
    return sum(
        len(m.chunks)
        for m in md.state_dict_metadata.values()
        if isinstance(m, TensorStorageMetadata)
    )


def real_saves(
    data_dir: str, config: tuple[int, ...], worlds: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Save the model at each world size three ways and measure each checkpoint."""
    from zarrckpt.testing import run_distributed

    rows = []
    for world in worlds:
        root = os.path.join(data_dir, f"world{world}")
        expected = run_distributed(_save_rank, world, root, config)[0]
        for system in _SYSTEMS:
            path = os.path.join(root, system)
            meta = os.path.join(path, ".metadata" if system == "dcp" else "zarr.json")
            row: dict[str, Any] = {"world_size": world, "layout": system, **walk_counts(path)}
            row["metadata_bytes"] = os.path.getsize(meta)
            if system == "dcp":
                row["entries"] = _dcp_entries(meta)
            row["loads_bit_exact"] = None if system == "dcp" else _loads_bit_exact(path, expected)
            rows.append(row)
        shutil.rmtree(root, ignore_errors=True)
    n_tensors = len(_tensors(expected))
    nbytes = sum(t.numel() * t.element_size() for t in _tensors(expected).values())
    for row in rows:
        row["tensors"], row["nbytes"] = n_tensors, nbytes
    return rows


# --------------------------------------------------------------------------- run / report


def run(mode: str, data_dir: str) -> dict[str, Any]:
    """Both parts of the workload; ``mode`` is ``full``, ``quick`` or ``tiny``."""
    config, worlds, model, proj_worlds = _MODES[mode]
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="files-at-scale-", dir=data_dir) as tmp:
        real = real_saves(tmp, config, worlds)
    projection = proj.project(model, proj_worlds, dcp_base=max(2, proj_worlds[0]))
    targets = []
    for part, rows in (("real saves", real), ("projection", projection["rows"])):
        files = {r["files"] for r in rows if r["layout"] == "zarrckpt v3 shard"}
        targets.append({
            "text": f"v3 (shard files): the file count does not grow with the world size "
                    f"({part}: {', '.join(map(str, sorted(files)))} files)",
            "met": len(files) == 1,
        })  # fmt: skip
    real_ok = all(r["loads_bit_exact"] is not False for r in real)
    targets.append({"text": "zarrckpt checkpoints load back bit-exact", "met": real_ok})
    vocab, d, ff, kv, layers = config
    return {
        "workload": NAME,
        "mode": mode,
        "real_model": {"vocab": vocab, "hidden": d, "intermediate": ff, "kv": kv,
                       "layers": layers},
        "real": real,
        "projection": projection,
        "targets": targets,
    }  # fmt: skip


def _n(x: float) -> str:
    return f"{x:,.0f}"


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def markdown(results: dict[str, Any]) -> str:
    """The workload's section of the report."""
    real, p = results["real"], results["projection"]
    m, st, dcp = p["model"], p["statement"], p["dcp"]
    first = real[0] if real else {"tensors": 0, "nbytes": 0}
    lines = [
        f"## (g) {NAME}",
        "",
        f"Real saves: {first['tensors']} tensors, {_bytes(first['nbytes'])} (FSDP2 model + "
        "AdamW state after one step), files and directories counted by walking each "
        "checkpoint (its root directory included); root metadata = root `zarr.json` "
        "(zarrckpt) or `.metadata` (DCP).",
        "",
        "| ranks | layout | files | dirs | root metadata | loads bit-exact |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in real:
        ok = {None: "-", True: "yes", False: "**NO**"}[r["loads_bit_exact"]]
        lines.append(
            f"| {r['world_size']} | {r['layout']} | {_n(r['files'])} | {_n(r['dirs'])} | "
            f"{_bytes(r['metadata_bytes'])} | {ok} |"
        )
    lines += [
        "",
        f"Projection (planning only, no data): {m['layers']} layers, hidden {m['hidden']}, "
        f"vocab {m['vocab']}: {m['parameters']} parameters + Adam = {_n(m['tensors'])} "
        f"tensors, {_bytes(m['fp32_bytes'])} fp32; FSDP2 Shard(0) (torch.chunk rows).",
        "",
        "| ranks | layout | files | dirs | manifest / metadata | parse |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in p["rows"]:
        if r["layout"] == "dcp":
            how = "" if r["metadata_measured"] else " (extrapolated)"
            parse = f"{_n(r['entries'])} chunk entries"
        else:
            how, parse = "", f"{r['parse_ms']:.1f} ms" if "v3" in r["layout"] else "-"
        lines.append(
            f"| {_n(r['world_size'])} | {r['layout']} | {_n(r['files'])} | {_n(r['dirs'])} | "
            f"{_bytes(r['metadata_bytes'])}{how} | {parse} |"
        )
    lines += [
        "",
        f"DCP `.metadata`: a real `Metadata` with every chunk entry pickled at "
        f"{dcp['base_world']} ranks ({_bytes(dcp['bytes'])}, {_n(dcp['entries'])} entries, "
        f"{dcp['bytes_per_entry']:.0f} bytes per (tensor, rank) entry), extrapolated linearly "
        "to the larger world sizes. Parse = `json.loads` of the root `zarr.json` + base64 "
        "decoding of every crc32c table.",
        "",
        f"A {_n(st['tensors'])}-tensor checkpoint saved by {_n(st['world_size'])} ranks "
        f"carries {_bytes(st['manifest_bytes'])} of root metadata (manifest with crc32c "
        f"tables + consolidated metadata), parsed in {st['parse_ms']:.1f} ms.",
        "",
    ]
    for t in results["targets"]:
        lines.append(f"- {'met' if t['met'] else 'NOT met'}: {t['text']}")
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out_dir: str) -> list[str]:
    """Write ``files_at_scale.json`` and ``files_at_scale.md`` into ``out_dir``."""
    return report.write_json_and_markdown(results, markdown(results), out_dir, NAME)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.files_at_scale")
    p.add_argument("--out", default="bench-out", help="output directory (default bench-out/)")
    p.add_argument("--quick", action="store_true", help="a smaller model for the real saves")
    p.add_argument("--tiny", action="store_true", help="tiny model, small world sizes (tests)")
    args = p.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    out = os.path.abspath(args.out)
    results = run(mode, out)  # checkpoints go to a temporary directory inside, removed
    for path in write(results, out):
        print(f"wrote {path}", file=sys.stderr)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    from benchmarks import files_at_scale as _module  # rank functions pickled by module name

    raise SystemExit(_module.main())
