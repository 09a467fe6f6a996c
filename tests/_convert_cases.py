"""Rank-side scenarios of tests/test_convert.py (run through ``zarrckpt.testing``).

Port of seed 000 (PyTorch's ``test_format_utils.py``): DCP -> torch.save,
torch.save -> DCP and the online load of a ``torch.save`` file into a sharded
model, each also with zarrckpt checkpoints in place of DCP; plus sharded DCP
checkpoints (FSDP2, TP, FSDP2 + TP) converted to zarrckpt and back on 2 and 4
ranks.

Every scenario is ``fn(rank, world_size, base) -> dict``; failed checks are
collected (never raised mid-scenario, which would leave the other ranks
waiting in a collective) and returned under ``"failures"``. Conversions run
on rank 0 only, between barriers, as a user would run them.
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import zarrckpt
from zarrckpt import convert


class SimpleModelUneven(nn.Module):
    """Seed 000's model (uneven shapes: 10/15/30/5 features)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net1 = nn.Linear(5, 10)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(10, 15)
        self.net3 = nn.Linear(15, 30)
        self.net4 = nn.Linear(30, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.net1(x))
        x = F.relu(self.net2(x))
        x = F.relu(self.net3(x))
        return self.net4(x)


class Checks:
    """Failed checks, collected."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def true(self, cond: Any, what: str) -> None:
        if not cond:
            self.failures.append(what)

    def equal(self, a: Any, b: Any, what: str) -> None:
        """Same shape, dtype and bits (tensors), or equal values."""
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            ok = (
                isinstance(a, torch.Tensor)
                and isinstance(b, torch.Tensor)
                and a.shape == b.shape
                and a.dtype == b.dtype
                and torch.equal(a.detach().cpu(), b.detach().cpu())
            )
            if not ok:
                self.failures.append(f"{what}: tensors differ ({_describe(a)} vs {_describe(b)})")
            return
        if a != b:
            self.failures.append(f"{what}: {a!r} != {b!r}")

    def state_dicts(self, expected: dict[str, Any], actual: dict[str, Any], what: str) -> None:
        """Same keys (in order) and bit-equal full values."""
        if list(expected) != list(actual):
            self.failures.append(f"{what}: keys {list(actual)} != {list(expected)}")
            return
        for k in expected:
            self.equal(full(expected[k]), full(actual[k]), f"{what}[{k!r}]")

    def run(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn``; record (do not raise) its exception."""
        try:
            return fn()
        except Exception:
            self.failures.append(f"{what} raised:\n{traceback.format_exc()}")
            return None


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype}{list(t.shape)} {t.detach().flatten()[:4].tolist()}"
    return type(t).__name__


def full(t: Any) -> Any:
    """The global value of a DTensor / ShardedTensor (collective), else ``t``."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed._state_dict_utils import _all_gather_sharded_tensor
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.full_tensor().detach()
    if isinstance(t, ShardedTensor):
        return _all_gather_sharded_tensor(t).detach()
    return t.detach() if isinstance(t, torch.Tensor) else t


def mesh1d(world_size: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size,))


def fsdp2(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def tp(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {
        "net1": ColwiseParallel(),
        "net2": RowwiseParallel(),
        "net3": ColwiseParallel(),
        "net4": RowwiseParallel(),
    }
    return parallelize_module(model, mesh, plan)


def fsdp_tp(model: nn.Module, world_size: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
    tp(model, mesh["tp"])
    return fsdp2(model, mesh["dp"])


def fsdp1(model: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(model, device_mesh=mesh, use_orig_params=True, device_id=torch.device("cpu"))


def _rank0(chk: Checks, rank: int, fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn`` on rank 0 only, then barrier (a failure is recorded, never raised)."""
    result = chk.run(fn, what) if rank == 0 else None
    dist.barrier()
    return result


def _total_bytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def _manifest(path: str) -> dict[str, Any]:
    import json

    with open(os.path.join(path, "zarr.json")) as f:
        return dict(json.load(f)["attributes"]["zarrckpt"])


# ============================================================ seed 000, with DCP


def dcp_to_torch_save(rank: int, world_size: int, base: str) -> dict[str, Any]:
    """Seed 000 test_dcp_to_torch_save: dcp.save of a model -> torch.save file."""
    import torch.distributed.checkpoint as dcp

    chk = Checks()
    model = SimpleModelUneven()
    ckpt = os.path.join(base, "dcp")
    dcp.save({"model": model}, checkpoint_id=ckpt)
    torch_path = os.path.join(base, "model.pt")
    _rank0(chk, rank, lambda: convert.convert(ckpt, torch_path), "convert DCP -> torch.save")
    loaded = torch.load(torch_path, weights_only=True)
    chk.true(list(loaded) == ["model"], f"top-level keys {list(loaded)}")
    chk.state_dicts(model.state_dict(), loaded.get("model", {}), "torch.load(converted)")
    return {"failures": chk.failures}


def torch_save_to_dcp(rank: int, world_size: int, base: str) -> dict[str, Any]:
    """Seed 000 test_torch_save_to_dcp: torch.save -> DCP, dcp.load into a model (and FSDP2)."""
    import torch.distributed.checkpoint as dcp

    chk = Checks()
    sd = {"model": SimpleModelUneven().state_dict()}
    torch_path = os.path.join(base, "model.pt")
    ckpt = os.path.join(base, "dcp")
    _rank0(chk, rank, lambda: torch.save(sd, torch_path), "torch.save")
    _rank0(chk, rank, lambda: convert.convert(torch_path, ckpt, dst_format="dcp"), "convert")
    model = SimpleModelUneven(seed=1)
    dcp.load({"model": model}, checkpoint_id=ckpt)
    chk.state_dicts(sd["model"], model.state_dict(), "dcp.load into a plain model")
    sharded = fsdp2(SimpleModelUneven(seed=1), mesh1d(world_size))
    target = {"model": sharded.state_dict()}
    dcp.load(target, checkpoint_id=ckpt)
    chk.state_dicts(sd["model"], sharded.state_dict(), "dcp.load into an FSDP2 model")
    return {"failures": chk.failures}


def _online(
    rank: int, world_size: int, base: str, wrap: str, source: str
) -> dict[str, Any]:
    """Seed 000 test_online_torch_save_to_dcp: torch.save file -> sharded model.

    ``source`` is ``"file"`` (zarrckpt.load reads the torch.save file itself) or
    ``"zarrckpt"`` (the file converted to a zarrckpt checkpoint first).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    chk = Checks()
    sd = {"model": SimpleModelUneven().state_dict()}
    torch_path = os.path.join(base, "model.pt")
    _rank0(chk, rank, lambda: torch.save(sd, torch_path), "torch.save")
    path = torch_path
    if source == "zarrckpt":
        path = os.path.join(base, "ckpt")
        _rank0(chk, rank, lambda: convert.from_torch_save(torch_path, path), "from_torch_save")
    mesh = mesh1d(world_size)
    stats: dict[str, int] = {}
    model = SimpleModelUneven(seed=1)
    if wrap == "fsdp1":  # as in the seed: FULL_STATE_DICT through Stateful
        model = fsdp1(model, mesh)
        zarrckpt.load({"model": model}, path, stats=stats)
        chk.state_dicts(sd["model"], model.state_dict(), "FSDP1 model after load")
    elif wrap == "fsdp1_sharded":
        model = fsdp1(model, mesh)
        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            target = {"model": model.state_dict()}
            zarrckpt.load(target, path, stats=stats)
            model.load_state_dict(target["model"])
        chk.state_dicts(sd["model"], model.state_dict(), "FSDP1 (sharded state dict) model")
    else:
        model = fsdp2(model, mesh) if wrap == "fsdp2" else tp(model, mesh)
        zarrckpt.load({"model": model}, path, stats=stats)
        chk.state_dicts(sd["model"], model.state_dict(), f"{wrap} model after load")
    total = _total_bytes(sd["model"])
    if wrap != "fsdp1" and source == "file":
        # each rank reads the slices it holds, not the whole file
        chk.true(
            0 < stats.get("bytes_read", 0) < total,
            f"rank {rank} read {stats.get('bytes_read')} of {total} bytes",
        )
    return {"failures": chk.failures, "bytes_read": stats.get("bytes_read"), "total": total}


def online_fsdp1(rank: int, world_size: int, base: str) -> dict[str, Any]:
    return _online(rank, world_size, base, "fsdp1", "file")


def online_fsdp1_sharded(rank: int, world_size: int, base: str) -> dict[str, Any]:
    return _online(rank, world_size, base, "fsdp1_sharded", "file")


def online_fsdp2(rank: int, world_size: int, base: str) -> dict[str, Any]:
    return _online(rank, world_size, base, "fsdp2", "file")


def online_tp(rank: int, world_size: int, base: str) -> dict[str, Any]:
    return _online(rank, world_size, base, "tp", "file")


# ============================================================ seed 000, with zarrckpt


def zarrckpt_to_torch_save(rank: int, world_size: int, base: str) -> dict[str, Any]:
    """zarrckpt.save of an FSDP2 model (sharded chunks) -> torch.save file of full tensors."""
    chk = Checks()
    model = fsdp2(SimpleModelUneven(), mesh1d(world_size))
    ckpt = os.path.join(base, "ckpt")
    zarrckpt.save({"model": model, "step": 3}, ckpt, fsync=False)
    expected = {k: full(v) for k, v in model.state_dict().items()}
    torch_path = os.path.join(base, "model.pt")
    _rank0(chk, rank, lambda: convert.to_torch_save(ckpt, torch_path), "to_torch_save")
    loaded = torch.load(torch_path, weights_only=True)
    chk.true(loaded.get("step") == 3, f"step {loaded.get('step')!r}")
    chk.state_dicts(expected, loaded.get("model", {}), "torch.load(converted)")
    return {"failures": chk.failures}


def torch_save_to_zarrckpt(rank: int, world_size: int, base: str) -> dict[str, Any]:
    """torch.save -> zarrckpt, zarrckpt.load into a plain and an FSDP2 model."""
    chk = Checks()
    sd = {"model": SimpleModelUneven().state_dict()}
    torch_path = os.path.join(base, "model.pt")
    ckpt = os.path.join(base, "ckpt")
    _rank0(chk, rank, lambda: torch.save(sd, torch_path), "torch.save")
    _rank0(chk, rank, lambda: convert.from_torch_save(torch_path, ckpt), "from_torch_save")
    model = SimpleModelUneven(seed=1)
    zarrckpt.load({"model": model}, ckpt)
    chk.state_dicts(sd["model"], model.state_dict(), "plain model")
    sharded = fsdp2(SimpleModelUneven(seed=1), mesh1d(world_size))
    zarrckpt.load({"model": sharded}, ckpt)
    chk.state_dicts(sd["model"], sharded.state_dict(), "FSDP2 model")
    return {"failures": chk.failures}


def online_zarrckpt_fsdp1(rank: int, world_size: int, base: str) -> dict[str, Any]:
    """The online scenario with the file converted to zarrckpt first (FSDP1 as in the seed)."""
    return _online(rank, world_size, base, "fsdp1", "zarrckpt")


def online_zarrckpt_fsdp2(rank: int, world_size: int, base: str) -> dict[str, Any]:
    return _online(rank, world_size, base, "fsdp2", "zarrckpt")


# ============================================================ sharded DCP <-> zarrckpt


def _sharded_roundtrip(rank: int, world_size: int, base: str, wrap: str) -> dict[str, Any]:
    """dcp.save of a sharded model -> zarrckpt (global arrays) -> DCP -> dcp.load, resharded."""
    import torch.distributed.checkpoint as dcp

    chk = Checks()

    def make(seed: int) -> nn.Module:
        model = SimpleModelUneven(seed)
        if wrap == "fsdp2":
            return fsdp2(model, mesh1d(world_size))
        if wrap == "tp":
            return tp(model, mesh1d(world_size))
        return fsdp_tp(model, world_size)

    model = make(0)
    state = {"model": model.state_dict(), "step": 11}
    src = os.path.join(base, "dcp")
    dcp.save(state, checkpoint_id=src)
    expected = {k: full(v) for k, v in model.state_dict().items()}
    pieces = {
        k: [tuple(c.sizes) for c in md.chunks]
        for k, md in dcp.FileSystemReader(src).read_metadata().state_dict_metadata.items()
        if hasattr(md, "chunks")
    }
    ckpt = os.path.join(base, "ckpt")
    back = os.path.join(base, "dcp_back")
    _rank0(chk, rank, lambda: convert.from_dcp(src, ckpt), "from_dcp")
    _rank0(chk, rank, lambda: convert.to_dcp(ckpt, back), "to_dcp")
    manifest: dict[str, Any] = {}
    if rank == 0:
        manifest = chk.run(lambda: _manifest(ckpt), "read manifest") or {}
        arrays = manifest.get("arrays", {})
        opened = zarrckpt.open(ckpt)
        for k, v in expected.items():
            fqn = f"model.{k}"
            record = arrays.get(fqn)
            if record is None:
                chk.failures.append(f"{fqn} missing from the converted checkpoint")
                continue
            chk.true(record["shape"] == list(v.shape), f"{fqn}: shape {record['shape']}")
            chk.equal(v, opened.read(fqn), f"{fqn} in the converted checkpoint")
    dist.barrier()
    # back in DCP: load into a fresh sharded model (and into a differently sharded one)
    model2 = make(1)
    target = {"model": model2.state_dict(), "step": 0}
    dcp.load(target, checkpoint_id=back)
    model2.load_state_dict(target["model"])
    chk.true(target["step"] == 11, f"step {target['step']}")
    chk.state_dicts(expected, model2.state_dict(), f"{wrap} model loaded from converted DCP")
    plain = SimpleModelUneven(seed=2)
    dcp.load({"model": plain}, checkpoint_id=back)
    chk.state_dicts(expected, plain.state_dict(), "plain model loaded from converted DCP")
    # the unit a reader fetches: the inner chunk of a shard file (format 3), else the chunk
    chunk_shapes = {
        k: r["inner_chunk_shape"] or r["chunk_shape"] for k, r in manifest.get("arrays", {}).items()
    }
    return {"failures": chk.failures, "pieces": pieces, "chunk_shapes": chunk_shapes}


def sharded_fsdp2(rank: int, world_size: int, base: str) -> dict[str, Any]:
    return _sharded_roundtrip(rank, world_size, base, "fsdp2")


def sharded_tp(rank: int, world_size: int, base: str) -> dict[str, Any]:
    return _sharded_roundtrip(rank, world_size, base, "tp")


def sharded_fsdp_tp(rank: int, world_size: int, base: str) -> dict[str, Any]:
    return _sharded_roundtrip(rank, world_size, base, "fsdp_tp")


# ============================================================ runner

SCENARIOS: dict[int, list[str]] = {
    2: [
        "dcp_to_torch_save",
        "torch_save_to_dcp",
        "online_fsdp1",
        "online_fsdp1_sharded",
        "online_fsdp2",
        "online_tp",
        "zarrckpt_to_torch_save",
        "torch_save_to_zarrckpt",
        "online_zarrckpt_fsdp1",
        "online_zarrckpt_fsdp2",
        "sharded_fsdp2",
        "sharded_tp",
    ],
    4: ["sharded_fsdp2", "sharded_tp", "sharded_fsdp_tp", "online_tp", "online_fsdp1_sharded"],
}


def run_all(rank: int, world_size: int, base: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """Run the named scenarios in order, each in its own directory under ``base``."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        directory = os.path.join(base, name)
        if rank == 0:
            os.makedirs(directory, exist_ok=True)
        dist.barrier()
        start = time.monotonic()
        try:
            result = dict(globals()[name](rank, world_size, directory))
            result["exception"] = None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # DCP's CheckpointException is a BaseException
            result = {"failures": [], "exception": traceback.format_exc()}
        result["seconds"] = round(time.monotonic() - start, 2)
        out[name] = result
        dist.barrier()
    return out
