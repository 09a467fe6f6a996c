"""Rank-side scenarios for the distributed tests (run through ``zarrckpt.testing``).

Ports of the reference scenarios in ``shared/seeds`` (PyTorch's DCP tests
001-004 and the save side of 000) and the reliability scenarios (a rank
failing mid-save, planning failures, async_save, single writer per chunk).

Each scenario is ``fn(rank, world_size, path) -> dict``. Checks never raise in
the middle of a scenario (a rank that stops early would leave the others
waiting in a collective): they are recorded with :class:`Checks` and returned.
:func:`run_scenarios` runs several scenarios in one spawned process group (a
spawn costs several seconds on the test machine) and reports, per scenario,
the failed checks, an exception traceback if one escaped, and extra data the
parent test inspects (for example the chunk files each rank wrote).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import zarrckpt
from zarrckpt.errors import DistributedSaveError, ZarrCkptError
from zarrckpt.storage import _posix as _chunkio

STAGING_INFIX = ".zarrckpt-tmp-"

# --------------------------------------------------------------------------- models


class MLPModule(nn.Module):
    """torch.testing._internal.distributed._tensor.common_dtensor.MLPModule."""

    def __init__(self, device: str | torch.device = "cpu", seed: int = 5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net1 = nn.Linear(10, 16, device=device)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(16, 10, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(self.relu(self.net1(x)))


class UnevenShardedModel(nn.Module):
    """Seed 001: 1 output feature in net3, so 4 TP ranks get empty shards."""

    def __init__(self, device: str | torch.device) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net1 = nn.Linear(5, 10, device=device)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(10, 15, device=device)
        self.net3 = nn.Linear(15, 1, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net3(self.net2(self.relu(self.net1(x))))


class SimpleModelUneven(nn.Module):
    """Seed 000."""

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


class SkipModule(nn.Module):
    def __init__(self, width: int = 10) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class NestedLinear(nn.Module):
    def __init__(self, fsdp_wrap: bool, width: int = 10) -> None:
        from torch.distributed.fsdp.wrap import wrap

        super().__init__()
        linear = nn.Linear(width, width, bias=False)
        self.nested_linear = wrap(linear) if fsdp_wrap else linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nested_linear(x)


class SkipModel(nn.Module):
    """torch.testing._internal.common_fsdp.SkipModel on CPU (nested FSDP units via wrap).

    ``width=10`` is the seed's model; an odd width (7) gives FSDP1 flat
    parameters with padding and uneven per-rank shards.
    """

    def __init__(self, double_nest: bool, width: int = 10) -> None:
        from torch.distributed.fsdp.wrap import wrap

        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        self.linear_skip = SkipModule(width)
        self.nested_linear = wrap(NestedLinear(fsdp_wrap=double_nest, width=width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nested_linear(self.linear_skip(self.linear(x)))


class Wide(nn.Module):
    """Even sharding on 2 and 4 ranks: net1 Linear(16, 32), net2 Linear(32, 16)."""

    def __init__(self, seed: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net1 = nn.Linear(16, 32)
        self.net2 = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(F.relu(self.net1(x)))


# --------------------------------------------------------------------------- helpers


class Checks:
    """Record failed checks instead of raising (keeps the ranks' collectives aligned)."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def true(self, cond: Any, what: str) -> None:
        if not cond:
            self.failures.append(what)

    def equal(self, a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        """Bit-exact equality (same shape, dtype and values)."""
        a = local(a).detach().cpu()
        b = local(b).detach().cpu()
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            self.failures.append(
                f"{what}: {a.flatten()[:6].tolist()} != {b.flatten()[:6].tolist()}"
            )

    def differ(self, a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        a = local(a).detach().cpu()
        b = local(b).detach().cpu()
        if a.shape == b.shape and a.numel() and torch.equal(a, b):
            self.failures.append(f"{what}: expected different values")


def local(t: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: Any) -> torch.Tensor:
    """Global value of a DTensor / ShardedTensor / tensor (collective for sharded ones)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed._state_dict_utils import _all_gather_sharded_tensor
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return t.full_tensor().detach()
    if isinstance(t, ShardedTensor):
        return _all_gather_sharded_tensor(t).detach()
    return t.detach()


def staging_dirs(path: str) -> list[str]:
    parent, name = os.path.split(os.path.abspath(path))
    return [n for n in os.listdir(parent) if n.startswith(f".{name}{STAGING_INFIX}")]


def relative_to_staging(file_path: str) -> str:
    parts = file_path.split(os.sep)
    for i, part in enumerate(parts):
        if STAGING_INFIX in part:
            return "/".join(parts[i + 1 :])
    return file_path


@contextlib.contextmanager
def record_writes() -> Iterator[list[tuple[str, int, int]]]:
    """Record the chunk-file writes of this rank: (path relative to the checkpoint,
    byte offset, bytes) - offset 0 for a whole file."""
    written: list[tuple[str, int, int]] = []
    lock = threading.Lock()
    original = _chunkio.write_file

    def spy(path: str, buffers: Any, **kw: Any) -> int:
        n = sum(memoryview(b).nbytes for b in buffers)
        with lock:
            written.append((relative_to_staging(path), kw.get("offset") or 0, n))
        return original(path, buffers, **kw)

    _chunkio.write_file = spy
    try:
        yield written
    finally:
        _chunkio.write_file = original


@contextlib.contextmanager
def fail_writes_after(n_ok: int) -> Iterator[list[int]]:
    """Make this rank's chunk writes raise OSError after ``n_ok`` successful ones."""
    calls = [0]
    lock = threading.Lock()
    original = _chunkio.write_file

    def failing(path: str, buffers: Any, **kw: Any) -> int:
        with lock:
            calls[0] += 1
            n = calls[0]
        if n > n_ok:
            raise OSError(28, "No space left on device (injected by the test)", path)
        return original(path, buffers, **kw)

    _chunkio.write_file = failing
    try:
        yield calls
    finally:
        _chunkio.write_file = original


@contextlib.contextmanager
def gate_writes(gate: threading.Event) -> Iterator[None]:
    """Block every chunk write of this process until ``gate`` is set (30 s at most)."""
    original = _chunkio.write_file

    def gated(path: str, buffers: Any, **kw: Any) -> int:
        gate.wait(30)
        return original(path, buffers, **kw)

    _chunkio.write_file = gated
    try:
        yield
    finally:
        _chunkio.write_file = original


def chunk_files_on_disk(path: str) -> dict[str, set[str]]:
    """{fqn: chunk files of its array (relative to the checkpoint)} from the manifest."""
    with open(os.path.join(path, "zarr.json")) as f:
        manifest = json.load(f)["attributes"]["zarrckpt"]
    out: dict[str, set[str]] = {}
    for fqn, info in manifest["arrays"].items():
        array_dir = os.path.join(path, info["path"])
        files = set()
        for dirpath, _dirs, names in os.walk(array_dir):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), path).replace(os.sep, "/")
                if rel != f"{info['path']}/zarr.json":
                    files.add(rel)
        out[fqn] = files
    return out


def array_document(path: str, fqn: str) -> dict[str, Any]:
    with open(os.path.join(path, "zarr.json")) as f:
        manifest = json.load(f)["attributes"]["zarrckpt"]
    with open(os.path.join(path, manifest["arrays"][fqn]["path"], "zarr.json")) as f:
        return dict(json.load(f))


def tp_mesh(world_size: int) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size,))


def fsdp1(module: nn.Module, **kw: Any) -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(module, device_id=torch.device("cpu"), **kw)


def fsdp2(module: nn.Module, world_size: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    mesh = tp_mesh(world_size)
    for child in module.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def train_step(model: nn.Module, in_features: int, seed: int = 0) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.25)
    torch.manual_seed(seed)
    model(torch.rand(20, in_features)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def ckpt_save(state: Any, path: str, backend: str = "zarrckpt", **kw: Any) -> None:
    """``zarrckpt.save``, or ``dcp.save`` with ``ZarrStorageWriter`` (backend "dcp")."""
    if backend == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.save(state, storage_writer=zarrckpt.ZarrStorageWriter(path, **kw))
    else:
        zarrckpt.save(state, path, **kw)


def ckpt_load(state: Any, path: str, backend: str = "zarrckpt") -> Any:
    """``zarrckpt.load``, or ``dcp.load`` with ``ZarrStorageReader`` (backend "dcp");
    returns the load's result (``LoadResult``; None for DCP)."""
    if backend == "dcp":
        import torch.distributed.checkpoint as dcp

        dcp.load(state, storage_reader=zarrckpt.ZarrStorageReader(path))
        return None
    return zarrckpt.load(state, path)


def _exc_info(e: BaseException, start: float) -> dict[str, Any]:
    return {
        "type": type(e).__name__,
        "zarrckpt_error": isinstance(e, ZarrCkptError),
        "distributed_save_error": isinstance(e, DistributedSaveError),
        "message": str(e)[:500],
        "seconds": round(time.monotonic() - start, 3),
    }


# --------------------------------------------------------------------------- 001 TP


def tp_checkpoint(
    rank: int, world_size: int, path: str, backend: str = "zarrckpt"
) -> dict[str, Any]:
    """Seed 001 test_tp_checkpoint: save, train a step, load in place."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    chk = Checks()
    model = parallelize_module(
        MLPModule(), tp_mesh(world_size), {"net1": ColwiseParallel(), "net2": RowwiseParallel()}
    )
    original = copy.deepcopy(model.state_dict())
    ckpt_save(original, path, backend)

    train_step(model, 10)
    state_dict = model.state_dict()
    for name in original:
        chk.differ(original[name], state_dict[name], f"{name} changed by the training step")
    ids = {k: id(v) for k, v in state_dict.items()}
    ptrs = {k: local(v).data_ptr() for k, v in state_dict.items()}
    param_ptrs = {k: local(p).data_ptr() for k, p in model.named_parameters()}

    result = ckpt_load(state_dict, path, backend)
    chk.true(
        result is None or result == zarrckpt.LoadResult([], []),
        "load reports no missing or unexpected keys",
    )
    for name in original:
        chk.equal(state_dict[name], original[name], f"{name} loaded")
        chk.true(id(state_dict[name]) == ids[name], f"{name} is the same object after load")
        chk.true(local(state_dict[name]).data_ptr() == ptrs[name], f"{name} filled in place")
    # the model's own parameters were filled (the state dict shares their storage)
    for name, p in model.named_parameters():
        chk.true(local(p).data_ptr() == param_ptrs[name], f"param {name} kept its storage")
        chk.equal(p, original[name], f"param {name} restored")
    return {"failures": chk.failures}


def tp_checkpoint_meta(
    rank: int, world_size: int, path: str, backend: str = "zarrckpt"
) -> dict[str, Any]:
    """Seed 001 test_tp_checkpoint_load_on_meta_device (uneven and empty shards)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    chk = Checks()
    mesh = tp_mesh(world_size)
    plan = {"net1": ColwiseParallel(), "net2": RowwiseParallel(), "net3": ColwiseParallel()}
    model = parallelize_module(UnevenShardedModel("cpu"), mesh, parallelize_plan=plan)
    original = {"model": model.state_dict()}
    ckpt_save(original, path, backend)
    local_shapes = {k: list(local(v).shape) for k, v in original["model"].items()}

    model2 = parallelize_module(UnevenShardedModel("meta"), mesh, parallelize_plan=plan)
    before = model2.state_dict()
    to_load = {"model": before}
    ckpt_load(to_load, path, backend)
    chk.true(to_load["model"] is before, "state_dict_to_load['model'] is model2_sd_before_load")

    model2.load_state_dict(to_load["model"], assign=True)
    after = {"model": model2.state_dict()}
    chk.true(len(original["model"]) == len(to_load["model"]), "same number of keys (loaded)")
    chk.true(len(original["model"]) == len(after["model"]), "same number of keys (after)")
    for name, param in original["model"].items():
        loaded = to_load["model"][name]
        after_load = after["model"][name]
        chk.true(not loaded.is_meta, f"{name} is not meta after load")
        chk.true(not after_load.is_meta, f"{name} is not meta after load_state_dict")
        chk.true(
            tuple(loaded.placements) == tuple(param.placements),
            f"{name} keeps its placements",
        )
        chk.equal(loaded, param, f"{name} loaded")
        chk.equal(after_load, param, f"{name} after load_state_dict(assign=True)")
    for name, p in model2.named_parameters():
        chk.true(not p.is_meta, f"model2 param {name} is not meta")
    # global values too (the uneven model cannot run forward on 4 TP ranks in torch 2.13)
    for name, param in original["model"].items():
        chk.equal(full(after["model"][name]), full(param), f"{name} full tensor after load")
    return {"failures": chk.failures, "local_shapes": local_shapes}


# --------------------------------------------------------------------------- 002 FSDP1 -> TP


def fsdp_to_tp(rank: int, world_size: int, path: str, backend: str = "zarrckpt") -> dict[str, Any]:
    """Seed 002: FSDP1 SHARDED_STATE_DICT (ShardedTensor) saved, loaded into a TP model."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    chk = Checks()
    fsdp_model = fsdp1(MLPModule(), use_orig_params=True)
    FSDP.set_state_dict_type(fsdp_model, StateDictType.SHARDED_STATE_DICT)
    fsdp_state_dict = fsdp_model.state_dict()
    chk.true(
        all(isinstance(v, ShardedTensor) for v in fsdp_state_dict.values()),
        "FSDP1 sharded state dict holds ShardedTensors",
    )
    ckpt_save(fsdp_state_dict, path, backend)

    tp_model = parallelize_module(
        MLPModule(), tp_mesh(world_size), {"net1": ColwiseParallel(), "net2": RowwiseParallel()}
    )
    train_step(tp_model, 10)
    tp_state_dict = tp_model.state_dict()
    chk.true(list(fsdp_state_dict) == list(tp_state_dict), "same keys in both state dicts")
    for (k, fsdp_v), tp_v in zip(fsdp_state_dict.items(), tp_state_dict.values(), strict=True):
        chk.true(isinstance(tp_v, DTensor), f"{k} is a DTensor in the TP model")
        chk.differ(full(fsdp_v), full(tp_v), f"{k} differs before load")

    ckpt_load(tp_state_dict, path, backend)
    tp_model.load_state_dict(tp_state_dict)
    for (k, fsdp_v), tp_v in zip(fsdp_state_dict.items(), tp_state_dict.values(), strict=True):
        chk.equal(full(tp_v), full(fsdp_v), f"{k} equal after load")
    for k, p in tp_model.named_parameters():
        chk.equal(full(p), full(fsdp_state_dict[k]), f"TP model param {k} equal after load")
    return {"failures": chk.failures}


# ----------------------------------------------------------------------- 003 FSDP1 local / sharded


def _fsdp_state_dict_roundtrip(
    rank: int,
    world_size: int,
    path: str,
    state_dict_type_name: str,
    backend: str,
    width: int = 10,
) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType
    from torch.distributed.fsdp.wrap import enable_wrap, wrap

    state_dict_type = getattr(StateDictType, state_dict_type_name)
    chk = Checks()
    with enable_wrap(wrapper_cls=FSDP, device_id=torch.device("cpu")):
        torch.manual_seed(100)
        model = wrap(SkipModel(double_nest=True, width=width))
        torch.manual_seed(200)
        new_model = wrap(SkipModel(double_nest=True, width=width))
    n_units = sum(1 for m in model.modules() if isinstance(m, FSDP))
    chk.true(n_units == 3, f"nested wrapping gives 3 FSDP units (got {n_units})")

    with FSDP.summon_full_params(model), FSDP.summon_full_params(new_model):
        params = [p.detach().clone() for p in model.parameters()]
        new_params = [p.detach().clone() for p in new_model.parameters()]
    chk.true(
        any(not torch.equal(a, b) for a, b in zip(params, new_params, strict=True)),
        "models differ before load",
    )

    with (
        FSDP.state_dict_type(model, state_dict_type),
        FSDP.state_dict_type(new_model, state_dict_type),
    ):
        state_dict = model.state_dict()
    leaf_types = sorted({type(v).__name__ for v in state_dict.values()})
    ckpt_save(state_dict, path, backend)

    with (
        FSDP.state_dict_type(model, state_dict_type),
        FSDP.state_dict_type(new_model, state_dict_type),
    ):
        state_dict = new_model.state_dict()
        ckpt_load(state_dict, path, backend)
        new_model.load_state_dict(state_dict)

    with FSDP.summon_full_params(model), FSDP.summon_full_params(new_model):
        params = list(model.parameters())
        new_params = list(new_model.parameters())
        chk.true(len(params) == len(new_params), "same number of parameters")
        for i, (a, b) in enumerate(zip(params, new_params, strict=True)):
            chk.equal(b, a, f"parameter {i} equal after load")
    return {"failures": chk.failures, "keys": sorted(state_dict), "leaf_types": leaf_types}


def fsdp1_local_state_dict(
    rank: int, world_size: int, path: str, backend: str = "zarrckpt"
) -> dict[str, Any]:
    """Seed 003 with StateDictType.LOCAL_STATE_DICT."""
    return _fsdp_state_dict_roundtrip(rank, world_size, path, "LOCAL_STATE_DICT", backend)


def fsdp1_sharded_state_dict(
    rank: int, world_size: int, path: str, backend: str = "zarrckpt"
) -> dict[str, Any]:
    """Seed 003 with StateDictType.SHARDED_STATE_DICT."""
    return _fsdp_state_dict_roundtrip(rank, world_size, path, "SHARDED_STATE_DICT", backend)


def fsdp1_local_state_dict_padded(
    rank: int, world_size: int, path: str, backend: str = "zarrckpt"
) -> dict[str, Any]:
    """Seed 003 LOCAL_STATE_DICT with width-7 layers: padded flat parameters, uneven shards."""
    return _fsdp_state_dict_roundtrip(rank, world_size, path, "LOCAL_STATE_DICT", backend, 7)


def fsdp1_sharded_state_dict_padded(
    rank: int, world_size: int, path: str, backend: str = "zarrckpt"
) -> dict[str, Any]:
    """Seed 003 SHARDED_STATE_DICT with width-7 layers (7 rows over 2 or 4 ranks)."""
    return _fsdp_state_dict_roundtrip(rank, world_size, path, "SHARDED_STATE_DICT", backend, 7)


# --------------------------------------------------------------------------- 004 FSDP1 model state


def _fsdp_model_state(
    rank: int, world_size: int, path: str, process_group: Any, backend: str
) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    chk = Checks()
    model = fsdp1(nn.Linear(8, 8, device="meta"))
    model(torch.rand(8, 8)).sum().backward()

    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        state_dict = {"model": model.state_dict()}
        ckpt_save(state_dict, path, backend)

    model_2 = fsdp1(nn.Linear(8, 8, device="meta"), process_group=process_group)
    with FSDP.summon_full_params(model), FSDP.summon_full_params(model_2):
        chk.differ(model.weight, model_2.weight, "weight before load")
        chk.differ(model.bias, model_2.bias, "bias before load")

    with FSDP.state_dict_type(model_2, StateDictType.SHARDED_STATE_DICT):
        state_dict = {"model": model_2.state_dict()}
        ckpt_load(state_dict, path, backend)
        model_2.load_state_dict(state_dict["model"])

    with FSDP.summon_full_params(model), FSDP.summon_full_params(model_2):
        chk.equal(model_2.weight, model.weight, "weight after load")
        chk.equal(model_2.bias, model.bias, "bias after load")
    flat = next(model_2.parameters())
    return {"failures": chk.failures, "model_2_flat_numel": flat.numel()}


def fsdp_model_state_no_resharding(
    rank: int, world_size: int, path: str, backend: str = "zarrckpt"
) -> dict[str, Any]:
    """Seed 004 test_fsdp_model_state_no_resharding."""
    return _fsdp_model_state(rank, world_size, path, None, backend)


def fsdp_model_state_with_resharding(
    rank: int, world_size: int, path: str, backend: str = "zarrckpt"
) -> dict[str, Any]:
    """Seed 004 test_fsdp_model_state_with_resharding: load into even/odd subgroups."""
    group1 = [i for i in range(world_size) if i % 2 == 0]
    group2 = [i for i in range(world_size) if i % 2 != 0]
    fsdp_0 = dist.new_group(ranks=group1)
    fsdp_1 = dist.new_group(ranks=group2)
    my_fsdp = fsdp_0 if rank % 2 == 0 else fsdp_1
    return _fsdp_model_state(rank, world_size, path, my_fsdp, backend)


# --------------------------------------------------------------------------- 000 save side


def stateful_model_fsdp2(
    rank: int, world_size: int, path: str, backend: str = "zarrckpt"
) -> dict[str, Any]:
    """Seed 000 save side: ``save({"model": model})`` of an FSDP2 module, load into another."""
    chk = Checks()
    model = fsdp2(SimpleModelUneven(seed=0), world_size)
    ckpt_save({"model": model}, path, backend)
    expected = {k: full(v) for k, v in model.state_dict().items()}

    model2 = fsdp2(SimpleModelUneven(seed=1), world_size)
    calls: list[int] = []
    load_state_dict = model2.load_state_dict

    def spy(sd: Any, *a: Any, **kw: Any) -> Any:
        calls.append(1)
        return load_state_dict(sd, *a, **kw)

    model2.load_state_dict = spy  # type: ignore[method-assign]
    for k, v in model2.state_dict().items():
        chk.differ(full(v), expected[k], f"{k} differs before load")
    ckpt_load({"model": model2}, path, backend)
    chk.true(len(calls) == 1, f"model2.load_state_dict called once (got {len(calls)})")
    for k, v in model2.state_dict().items():
        chk.equal(full(v), expected[k], f"{k} equal after load")
    if rank == 0:
        ckpt = zarrckpt.open(path)
        stored = {k: ckpt.read(k) for k in list(ckpt.keys())}
        chk.true(
            sorted(stored) == sorted(f"model.{k}" for k in expected),
            f"stored keys {sorted(stored)}",
        )
        for k, v in expected.items():
            if f"model.{k}" in stored:
                chk.equal(stored[f"model.{k}"], v, f"offline read of model.{k}")
    return {"failures": chk.failures}


def stateful_model_single(path: str, backend: str = "zarrckpt") -> dict[str, Any]:
    """Seed 000 save side in one process (no torch.distributed)."""
    chk = Checks()
    model = SimpleModelUneven(seed=0)
    ckpt_save({"model": model}, path, backend)
    model2 = SimpleModelUneven(seed=1)
    calls: list[int] = []
    load_state_dict = model2.load_state_dict

    def spy(sd: Any, *a: Any, **kw: Any) -> Any:
        calls.append(1)
        return load_state_dict(sd, *a, **kw)

    model2.load_state_dict = spy  # type: ignore[method-assign]
    ckpt_load({"model": model2}, path, backend)
    chk.true(len(calls) == 1, f"model2.load_state_dict called once (got {len(calls)})")
    sd, sd2 = model.state_dict(), model2.state_dict()
    chk.true(list(sd) == list(sd2), "same keys")
    for k in sd:
        chk.equal(sd2[k], sd[k], f"{k} equal after load")
    x = torch.rand(3, 5)
    chk.true(torch.equal(model(x), model2(x)), "same outputs")
    return {"failures": chk.failures}


# --------------------------------------------------------------------------- single writer


def _single_writer(
    rank: int, world_size: int, path: str, model: nn.Module, n_extra: int, backend: str
) -> dict[str, Any]:
    """Save a sharded model plus replicated plain tensors, recording this rank's chunk files."""
    chk = Checks()
    state = {
        "model": model.state_dict(),
        "step": torch.tensor(7),
        "extra": {f"t{i}": torch.arange(4, dtype=torch.float32) + i for i in range(n_extra)},
    }
    with record_writes() as written:
        ckpt_save(state, path, backend)
    local_shapes = {f"model.{k}": list(local(v).shape) for k, v in state["model"].items()}
    placements = {
        f"model.{k}": [str(p) for p in getattr(v, "placements", ())]
        for k, v in state["model"].items()
    }
    expected = {f"model.{k}": full(v) for k, v in state["model"].items()}
    # values: offline read on one rank, collective load into a fresh copy on all
    if rank == 0:
        ckpt = zarrckpt.open(path)
        for k, v in expected.items():
            chk.equal(ckpt.read(k), v, f"offline read of {k}")
        chk.equal(ckpt.read("step"), torch.tensor(7), "offline read of step")
    target = {
        "model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
        "step": torch.tensor(0),
        "extra": {k: torch.zeros(4) for k in state["extra"]},
    }
    ckpt_load(target, path, backend)
    for k, v in state["model"].items():
        chk.equal(target["model"][k], v, f"model.{k} loaded")
    chk.equal(target["step"], torch.tensor(7), "step loaded")
    for k, v in state["extra"].items():
        chk.equal(target["extra"][k], v, f"extra.{k} loaded")
    return {
        "failures": chk.failures,
        "written": sorted(written),
        "local_shapes": local_shapes,
        "placements": placements,
    }


def single_writer_fsdp2(
    rank: int, world_size: int, path: str, backend: str = "zarrckpt"
) -> dict[str, Any]:
    """FSDP2 (fully_shard, Shard(0)) with even shards, plus replicated plain tensors."""
    return _single_writer(
        rank, world_size, path, fsdp2(Wide(), world_size), n_extra=2 * world_size, backend=backend
    )


def single_writer_tp(
    rank: int, world_size: int, path: str, backend: str = "zarrckpt"
) -> dict[str, Any]:
    """TP colwise net1 (Shard(0)) / rowwise net2 (Shard(1), replicated bias), even shards."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    model = parallelize_module(
        Wide(), tp_mesh(world_size), {"net1": ColwiseParallel(), "net2": RowwiseParallel()}
    )
    return _single_writer(rank, world_size, path, model, n_extra=2 * world_size, backend=backend)


# --------------------------------------------------------------------------- failures


def _failure_state(world_size: int, version: int) -> dict[str, Any]:
    model = fsdp2(Wide(seed=10 + version), world_size)
    return {
        "model": model.state_dict(),
        "step": torch.tensor(version),
        "extra": {f"t{i}": torch.full((4,), float(version * 100 + i)) for i in range(world_size)},
    }


def _load_fresh_and_compare(path: str, expected: dict[str, Any], chk: Checks, what: str) -> None:
    target = {
        "model": {k: torch.zeros_like(v) for k, v in expected["model"].items()},
        "step": torch.tensor(-1),
        "extra": {k: torch.zeros_like(v) for k, v in expected["extra"].items()},
    }
    try:
        zarrckpt.load(target, path)
    except Exception as e:
        chk.true(False, f"{what}: load raised {type(e).__name__}: {e}")
        return
    for k, v in expected["model"].items():
        chk.equal(target["model"][k], v, f"{what}: model.{k}")
    chk.equal(target["step"], expected["step"], f"{what}: step")
    for k, v in expected["extra"].items():
        chk.equal(target["extra"][k], v, f"{what}: extra.{k}")


def _failing_save(rank: int, world_size: int, path: str, failing_rank: int) -> dict[str, Any]:
    chk = Checks()
    old = _failure_state(world_size, 1)
    zarrckpt.save(old, path)
    new = _failure_state(world_size, 2)
    start = time.monotonic()
    error: dict[str, Any] | None = None
    calls = [0]
    try:
        ctx: Any = fail_writes_after(1) if rank == failing_rank else contextlib.nullcontext([0])
        with ctx as calls:
            zarrckpt.save(new, path, overwrite=True)
    except Exception as e:
        error = _exc_info(e, start)
        error["traceback"] = traceback.format_exc()[-2000:]
    if rank == failing_rank:
        chk.true(calls[0] >= 2, f"the failing rank attempted >= 2 chunk writes (got {calls[0]})")
    dist.barrier()  # rank 0 removes the staging directory when its save raises
    chk.true(not staging_dirs(path), f"no staging directory left: {staging_dirs(path)}")
    _load_fresh_and_compare(path, old, chk, "previous checkpoint after the failed save")
    # the same failure when saving to a new path: nothing appears there
    fresh = path + "-fresh"
    try:
        ctx = fail_writes_after(1) if rank == failing_rank else contextlib.nullcontext([0])
        with ctx:
            zarrckpt.save(new, fresh)
        chk.true(False, "the save to a new path did not raise")
    except ZarrCkptError:
        pass
    dist.barrier()
    chk.true(not os.path.lexists(fresh), f"failed save to a new path left {fresh}")
    chk.true(not staging_dirs(fresh), f"no staging directory left: {staging_dirs(fresh)}")
    # the group is still usable: a later save succeeds
    zarrckpt.save(new, path, overwrite=True)
    _load_fresh_and_compare(path, new, chk, "checkpoint saved after the failure")
    return {"failures": chk.failures, "error": error}


def save_failure_other_rank(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """The last rank's second chunk write raises mid-save (saving over a checkpoint)."""
    return _failing_save(rank, world_size, path, failing_rank=world_size - 1)


def save_failure_coordinator(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Rank 0 (the committing rank) fails mid-save."""
    return _failing_save(rank, world_size, path, failing_rank=0)


def _planning_failure(
    rank: int, world_size: int, path: str, make_bad: Callable[[], Any], bad_rank: int | None
) -> dict[str, Any]:
    chk = Checks()
    state: dict[str, Any] = {"w": torch.arange(8.0) + rank * 0, "x": torch.ones(4)}
    if bad_rank is None or rank == bad_rank:
        state["x"] = make_bad()
    start = time.monotonic()
    error = None
    try:
        zarrckpt.save(state, path)
    except Exception as e:
        error = _exc_info(e, start)
    dist.barrier()
    chk.true(not os.path.lexists(path), f"nothing was created at {path}")
    chk.true(not staging_dirs(path), f"no staging directory left: {staging_dirs(path)}")
    return {"failures": chk.failures, "error": error}


def _sparse() -> torch.Tensor:
    return torch.ones(4).to_sparse()


def _partial() -> Any:
    from torch.distributed.tensor import DTensor, Partial

    return DTensor.from_local(torch.ones(4), tp_mesh(dist.get_world_size()), [Partial()])


def _complex32() -> torch.Tensor:
    return torch.zeros(4, dtype=torch.complex32)


def planning_failure_sparse(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Only the last rank holds a sparse tensor at key "x"."""
    return _planning_failure(rank, world_size, path, _sparse, world_size - 1)


def planning_failure_partial(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """A DTensor with a Partial placement (on every rank)."""
    return _planning_failure(rank, world_size, path, _partial, None)


def planning_failure_dtype(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Only the last rank holds a tensor of an unsupported dtype (complex32)."""
    return _planning_failure(rank, world_size, path, _complex32, world_size - 1)


# --------------------------------------------------------------------------- async_save


def async_save_scenario(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """async_save: snapshot at call time, serialized saves to one path, errors on result()."""
    chk = Checks()
    info: dict[str, Any] = {}
    model = fsdp2(Wide(), world_size) if world_size > 1 else Wide()
    state = {"model": model.state_dict(), "step": torch.tensor(1)}
    old = {k: local(v).clone() for k, v in state["model"].items()}

    # 1. mutate right after async_save returns: the checkpoint holds the old values
    fut = zarrckpt.async_save(state, path)
    with torch.no_grad():
        for p in model.parameters():
            local(p).add_(1.0)
    state["step"].fill_(2)
    fut.result(timeout=120)
    target = {
        "model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
        "step": torch.tensor(0),
    }
    zarrckpt.load(target, path)
    for k, v in old.items():
        chk.equal(local(target["model"][k]), v, f"first async_save holds the old {k}")
        chk.differ(local(state["model"][k]), v, f"{k} was mutated")
    chk.equal(target["step"], torch.tensor(1), "first async_save holds the old step")

    # 2. two saves to the same path, the second issued while the first is in flight
    gate = threading.Event()
    v1 = {k: local(v).clone() for k, v in state["model"].items()}
    with gate_writes(gate):
        fut1 = zarrckpt.async_save(state, path, overwrite=True)
        with torch.no_grad():
            for p in model.parameters():
                local(p).mul_(2.0)
        state["step"].fill_(3)
        v2 = {k: local(v).clone() for k, v in state["model"].items()}
        fut2 = zarrckpt.async_save(state, path, overwrite=True)
        info["first_in_flight_when_second_issued"] = not fut1.done()
        gate.set()
        errors = []
        for name, f in (("first", fut1), ("second", fut2)):
            try:
                f.result(timeout=120)
            except Exception as e:
                errors.append(f"{name}: {type(e).__name__}: {e}")
    chk.true(not errors, f"both overlapping async saves succeed: {errors}")
    chk.true(info["first_in_flight_when_second_issued"], "first save still in flight")
    zarrckpt.load(target, path)
    for k in v1:
        chk.differ(v1[k], v2[k], f"{k} differs between the two saves")
        chk.equal(local(target["model"][k]), v2[k], f"final checkpoint holds the second {k}")
    chk.equal(target["step"], torch.tensor(3), "final checkpoint holds the second step")
    chk.true(not staging_dirs(path), f"no staging directory left: {staging_dirs(path)}")

    # 3. an error surfaces on result() as a zarrckpt error (missing parents are
    # created, so the parent is a file here)
    blocker = os.path.join(os.path.dirname(path), "no-such-parent")
    if rank == 0:
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
    bad = os.path.join(blocker, "ckpt")
    start = time.monotonic()
    fut = zarrckpt.async_save(state, bad)
    try:
        fut.result(timeout=120)
        info["error"] = None
    except Exception as e:
        info["error"] = _exc_info(e, start)
    # 4. the executor still works after a failed save
    fut = zarrckpt.async_save({"after_error": torch.arange(3)}, path + "-after")
    try:
        fut.result(timeout=120)
        chk.equal(
            zarrckpt.open(path + "-after").read("after_error"),
            torch.arange(3),
            "save after a failed async_save",
        )
    except Exception as e:
        chk.true(False, f"async_save after an error raised {type(e).__name__}: {e}")
    return {"failures": chk.failures, **info}


# --------------------------------------------------------------------------- runner


def run_scenarios(
    rank: int, world_size: int, base: str, names: list[str]
) -> dict[str, dict[str, Any]]:
    """Run the named scenarios in order, each with its own checkpoint path under ``base``.

    Returns ``{name: result}`` where result holds ``failures`` (failed
    checks), ``exception`` (traceback of an exception that escaped, or None)
    and the scenario's extra data.
    """
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        # "scenario@dcp": the scenario through dcp.save / dcp.load and the zarrckpt plug-ins
        func, _, backend = name.partition("@")
        fn = functools.partial(globals()[func], backend=backend) if backend else globals()[func]
        # progress log: tells the parent which scenario a hung group was in
        with open(os.path.join(base, f"progress-rank{rank}.txt"), "a") as log:
            log.write(f"{name}\n")
        start = time.monotonic()
        try:
            result = dict(fn(rank, world_size, os.path.join(base, name)))
            result["exception"] = None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException:  # DCP's CheckpointException is a BaseException
            result = {"failures": [], "exception": traceback.format_exc()}
        result["seconds"] = round(time.monotonic() - start, 2)
        out[name] = result
    return out


# --------------------------------------------------------------------------- parent side


#: scenarios of tests/test_seeds.py ("name@dcp": through dcp.save / dcp.load and the plug-ins)
SEED_SCENARIOS: dict[int, list[str]] = {
    2: [
        "tp_checkpoint",
        "tp_checkpoint_meta",
        "fsdp_to_tp",
        "fsdp1_local_state_dict",
        "fsdp1_sharded_state_dict",
        "fsdp1_local_state_dict_padded",
        "fsdp1_sharded_state_dict_padded",
        "fsdp_model_state_no_resharding",
        "stateful_model_fsdp2",
    ],
    4: [
        "tp_checkpoint",
        "tp_checkpoint_meta",
        "fsdp_to_tp",
        "fsdp1_local_state_dict",
        "fsdp1_sharded_state_dict",
        "fsdp1_local_state_dict_padded",
        "fsdp1_sharded_state_dict_padded",
        "fsdp_model_state_no_resharding",
        "fsdp_model_state_with_resharding",
    ],
}
for _names in SEED_SCENARIOS.values():
    _names += [f"{n}@dcp" for n in list(_names)]

#: scenarios of tests/test_distributed_reliability.py
RELIABILITY_SCENARIOS: dict[int, list[str]] = {
    2: [
        "save_failure_other_rank",
        "save_failure_coordinator",
        "planning_failure_sparse",
        "planning_failure_partial",
        "planning_failure_dtype",
        "async_save_scenario",
        "single_writer_fsdp2",
        "single_writer_tp",
        "single_writer_fsdp2@dcp",
        "single_writer_tp@dcp",
    ],
    4: [
        "save_failure_other_rank",
        "save_failure_coordinator",
        "planning_failure_sparse",
        "planning_failure_partial",
        "planning_failure_dtype",
        "single_writer_fsdp2",
        "single_writer_fsdp2@dcp",
    ],
}


class SpawnCache:
    """Run each world size's scenario list once and keep the results (and directories)."""

    def __init__(
        self, scenarios: dict[int, list[str]], base: Callable[[int], str], timeout: float
    ) -> None:
        self.scenarios = scenarios
        self.base = base
        self.timeout = timeout
        #: world size -> directory holding the checkpoints of that spawn
        self.bases: dict[int, str] = {}
        self._done: dict[int, Any] = {}

    def __call__(self, world_size: int) -> list[dict[str, dict[str, Any]]]:
        from zarrckpt.testing import DistributedTestError, run_distributed

        if world_size not in self._done:
            base = self.bases[world_size] = self.base(world_size)
            try:
                self._done[world_size] = run_distributed(
                    run_scenarios,
                    world_size,
                    base,
                    self.scenarios[world_size],
                    timeout=self.timeout,
                )
            except DistributedTestError as e:
                progress = {}
                for r in range(world_size):
                    try:
                        with open(os.path.join(base, f"progress-rank{r}.txt")) as f:
                            progress[r] = f.read().split()[-1:]
                    except OSError:
                        progress[r] = []
                self._done[world_size] = DistributedTestError(
                    f"{e}\nlast scenario started per rank: {progress}"
                )
        value = self._done[world_size]
        if isinstance(value, BaseException):
            raise value
        return list(value)


_SHARED: SpawnCache | None = None


def shared_spawns(tmp_path_factory: Any) -> SpawnCache:
    """One spawn per world size for the whole pytest session, running the scenarios of
    both test modules (a spawn of 4 ranks costs 10-20 s on the 2-core test machine)."""
    global _SHARED
    if _SHARED is None:
        scenarios = {
            ws: SEED_SCENARIOS.get(ws, []) + RELIABILITY_SCENARIOS.get(ws, [])
            for ws in sorted(set(SEED_SCENARIOS) | set(RELIABILITY_SCENARIOS))
        }
        _SHARED = SpawnCache(
            scenarios,
            lambda ws: str(tmp_path_factory.mktemp(f"scenarios-ws{ws}")),
            timeout=600,
        )
    return _SHARED


def problems(per_rank: list[dict[str, dict[str, Any]]], name: str) -> list[str]:
    """Failed checks and escaped exceptions of scenario ``name`` on every rank."""
    out = []
    for rank, results in enumerate(per_rank):
        r = results[name]
        if r["exception"]:
            out.append(f"rank {rank} raised:\n{r['exception']}")
        out.extend(f"rank {rank}: {f}" for f in r["failures"])
    return out
