"""Multi-process scenarios of tests/test_dcp_plugin.py (run with zarrckpt.testing.run_distributed).

ws2 (:func:`run_ws2`): an FSDP2 model + Adam state after one step is saved
twice, with ``dcp.save`` + ZarrStorageWriter and with ``zarrckpt.save``;
rank 0 writes the full tensors as reference. Both checkpoints are then loaded
with ``dcp.load`` + ZarrStorageReader into a tensor-parallel model (with
``pickle.load``/``pickle.loads`` patched to raise).

ws4 (:func:`run_ws4`): FSDP2 on 4 ranks loads the DCP-written checkpoint with
``zarrckpt.load`` and the zarrckpt-written one with ``dcp.load`` +
ZarrStorageReader; an FSDP2 + TP model on a 2x2 mesh (``_StridedShard``) is
saved both ways.

Every comparison is bit-exact against the reference.
"""

from __future__ import annotations

import os
import pickle
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

IN, HIDDEN, OUT = 8, 16, 5  # fc3 has 5 rows: uneven shards on 2 and 4 ranks


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, IN)
        self.fc3 = torch.nn.Linear(IN, OUT)


def build(layout: str, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(seed)
    model: torch.nn.Module = MLP()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if layout == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in (model.fc1, model.fc2, model.fc3):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif layout == "fsdp2_tp":  # 2x2: FSDP2 over TP gives _StridedShard placements
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = _tp(model, mesh["tp"])
        fully_shard(model, mesh=mesh["dp"])
    elif layout == "tp":
        model = _tp(model, mesh)
    else:
        raise ValueError(layout)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def _tp(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    return parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})


def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
    """One Adam step with element-dependent gradients (no forward pass needed)."""
    for p in model.parameters():
        p.grad = p.detach() * 0.5 + 0.1
    optim.step()
    optim.zero_grad()


def state(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd, "step": 11, "note": {"tags": ["a", "b"], "lr": 0.5}}


def apply(model: torch.nn.Module, optim: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def full(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().detach().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full(v) for v in value)
    return value


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """{fqn: leaf} with DCP's dotted keys (tensors and plain values)."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in items:
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _bits(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def compare(reference: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Keys whose value differs from the reference (tensors bit for bit)."""
    bad = []
    for key, ref in reference.items():
        value = got.get(key, "<missing>")
        if isinstance(ref, torch.Tensor):
            ok = (
                isinstance(value, torch.Tensor)
                and value.dtype == ref.dtype
                and value.shape == ref.shape
                and _bits(value) == _bits(ref)
            )
        else:
            ok = value == ref
        if not ok:
            bad.append(key)
    return bad


def _no_unpickling() -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle.load/pickle.loads called while reading a zarrckpt checkpoint")

    return mock.patch.multiple(pickle, load=refuse, loads=refuse)


def _load_dcp(path: str, layout: str, reference: dict[str, Any]) -> tuple[list[str], int]:
    import torch.distributed.checkpoint as dcp

    from zarrckpt import ZarrStorageReader

    model, optim = build(layout, seed=99)
    sd = state(model, optim)
    sd["step"], sd["note"] = 0, {"tags": [], "lr": 0.0}
    reader = ZarrStorageReader(path)
    with _no_unpickling():
        dcp.load(sd, storage_reader=reader)
    apply(model, optim, sd)
    got = flat(full(state(model, optim)))
    got["step"], got["note.tags"], got["note.lr"] = sd["step"], sd["note"]["tags"], sd["note"]["lr"]
    return compare(reference, got), reader.bytes_read


def run_ws2(rank: int, world_size: int, root: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    import zarrckpt
    from zarrckpt import ZarrStorageWriter

    model, optim = build("fsdp2", seed=7)
    train_step(model, optim)
    sd = state(model, optim)
    dcp_path = os.path.join(root, "dcp_fsdp2_ws2")
    zc_path = os.path.join(root, "zarrckpt_fsdp2_ws2")
    dcp.save(sd, storage_writer=ZarrStorageWriter(dcp_path, fsync=False))
    zarrckpt.save(sd, zc_path, fsync=False)
    reference = flat(full(sd))
    if rank == 0:
        torch.save(reference, os.path.join(root, "reference.pt"))
    dist.barrier()
    local_shapes = {
        key: list(value._local_tensor.shape)
        for key, value in flat(sd).items()
        if hasattr(value, "_local_tensor")
    }
    out: dict[str, Any] = {"local_shapes": local_shapes, "n_reference": len(reference)}
    for name, path in (("dcp->dcp_tp2", dcp_path), ("zarrckpt->dcp_tp2", zc_path)):
        mismatched, bytes_read = _load_dcp(path, "tp", reference)
        out[name] = {"mismatched": mismatched, "bytes_read": bytes_read}
    return out


def run_ws4(rank: int, world_size: int, root: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    import zarrckpt
    from zarrckpt import ZarrStorageWriter

    reference = torch.load(os.path.join(root, "reference.pt"), weights_only=True)
    out: dict[str, Any] = {}
    # DCP-written checkpoint, zarrckpt.load on 4 ranks
    model, optim = build("fsdp2", seed=99)
    sd = state(model, optim)
    sd["step"], sd["note"] = 0, {"tags": [], "lr": 0.0}
    zarrckpt.load(sd, os.path.join(root, "dcp_fsdp2_ws2"))
    apply(model, optim, sd)
    got = flat(full(state(model, optim)))
    got["step"], got["note.tags"], got["note.lr"] = sd["step"], sd["note"]["tags"], sd["note"]["lr"]
    out["dcp->zarrckpt_fsdp2_ws4"] = {"mismatched": compare(reference, got)}
    # FSDP2 + TP on a 2x2 mesh (strided shards): dcp.save + ZarrStorageWriter and
    # zarrckpt.save must write the same checkpoint, holding the full tensors
    model, optim = build("fsdp2_tp", seed=7)
    train_step(model, optim)
    sd = state(model, optim)
    dcp.save(sd, storage_writer=ZarrStorageWriter(os.path.join(root, "dcp_2x2"), fsync=False))
    zarrckpt.save(sd, os.path.join(root, "zarrckpt_2x2"), fsync=False)
    full_2x2 = flat(full(sd))
    for name in ("dcp_2x2", "zarrckpt_2x2"):
        ckpt = zarrckpt.open(os.path.join(root, name))
        names = ckpt.keys()
        got = {k: ckpt.read(k) for k in names}
        got.update((k, v) for k, v in full_2x2.items() if not isinstance(v, torch.Tensor))
        out[f"fsdp2_tp->{name}"] = {"mismatched": compare(full_2x2, got)}
    # zarrckpt-written checkpoint (ws2), dcp.load on 4 ranks
    for name, source in (
        ("zarrckpt->dcp_fsdp2_ws4", "zarrckpt_fsdp2_ws2"),
        ("dcp->dcp_fsdp2_ws4", "dcp_fsdp2_ws2"),
    ):
        mismatched, bytes_read = _load_dcp(os.path.join(root, source), "fsdp2", reference)
        out[name] = {"mismatched": mismatched, "bytes_read": bytes_read}
    return out
