"""Resharding matrix: every layout saves, every layout loads every checkpoint.

Run by tests/test_resharding_matrix.py through zarrckpt.testing.run_distributed.
Model + Adam state (after one training step) are saved with zarrckpt.save from
each source layout, together with a torch.save reference of the full tensors
written by rank 0; each target layout loads each checkpoint with zarrckpt.load
and compares its full tensors bit-exactly with that reference.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

IN, HIDDEN, OUT = 6, 13, 3  # 13 rows on 4 ranks: 4,4,4,1; 3 rows on 4 ranks: one empty shard

SOURCES = {
    1: ["single"],
    2: ["fsdp2_ws2", "tp_ws2", "fsdp1_ws2"],
    4: ["fsdp2_ws4", "fsdp2_tp_2x2", "hsdp_2x2"],
}
TARGETS = SOURCES | {1: ["single", "plain_full"]}


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HIDDEN)
        self.relu = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def build(layout: str, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model (+ Adam) in the given parallel layout, initialized from ``seed``."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(seed)
    model: torch.nn.Module = MLP()
    ws = dist.get_world_size() if dist.is_initialized() else 1
    if layout in ("fsdp2_ws2", "fsdp2_ws4"):
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (ws,)))
    elif layout == "tp_ws2":
        model = _tp(model, init_device_mesh("cpu", (ws,)))
    elif layout == "fsdp2_tp_2x2":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = _tp(model, mesh["tp"])
        fully_shard(model, mesh=mesh["dp"])
    elif layout == "hsdp_2x2":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(model, mesh=mesh)
    elif layout == "fsdp1_ws2":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
    elif layout not in ("single", "plain_full"):
        raise ValueError(layout)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def _tp(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    return parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})


def state(model: torch.nn.Module, optim: torch.optim.Optimizer, layout: str) -> dict[str, Any]:
    """{"model": ..., "optim": ...} as DCP's get_state_dict gives it (FSDP1: ShardedTensors)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if layout == "fsdp1_ws2":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType

        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            msd = model.state_dict()
        _, osd = get_state_dict(model, optim)
        return {"model": msd, "optim": osd}
    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd}


def full(value: Any) -> Any:
    """Full (unsharded) CPU tensor of a leaf, recursively for containers."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().detach().clone()
    if isinstance(value, ShardedTensor):
        out = torch.empty(value.size(), dtype=value.dtype) if dist.get_rank() == 0 else None
        value.gather(0, out)
        out = out if out is not None else torch.empty(value.size(), dtype=value.dtype)
        dist.broadcast(out, 0)
        return out
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full(v) for v in value)
    return value


def flat_tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    out: dict[str, torch.Tensor] = {}
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return out
    for k, v in items:
        out.update(flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
    """One Adam step with element-dependent gradients (no forward pass: DTensor
    sharding propagation does not support the uneven TP shards used here)."""
    for p in model.parameters():
        p.grad = p.detach() * 0.5 + 0.1
    optim.step()
    optim.zero_grad()


def save_sources(root: str) -> list[str]:
    """Save every source layout of this world size; rank 0 writes the reference."""
    ws = dist.get_world_size() if dist.is_initialized() else 1
    import zarrckpt

    done = []
    for layout in SOURCES[ws]:
        model, optim = build(layout, seed=7)
        train_step(model, optim)
        sd = state(model, optim, layout)
        path = os.path.join(root, layout)
        zarrckpt.save(sd, path)
        reference = flat_tensors(full(sd))
        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(reference, path + ".reference.pt")
        if dist.is_initialized():
            dist.barrier()
        done.append(layout)
    return done


def load_all(root: str, sources: list[str]) -> dict[str, dict[str, Any]]:
    """Load every source checkpoint into every target layout of this world size."""
    import zarrckpt

    ws = dist.get_world_size() if dist.is_initialized() else 1
    results: dict[str, dict[str, Any]] = {}
    for target in TARGETS[ws]:
        for source in sources:
            path = os.path.join(root, source)
            reference = torch.load(path + ".reference.pt", weights_only=True)
            model, optim = build(target, seed=99)
            if target == "plain_full":
                sd: dict[str, Any] = {
                    "model": model.state_dict(),
                    "optim": _plain_optim_target(model, optim),
                }
            else:
                sd = state(model, optim, target)
            before = {k: id(v) for k, v in flat_tensors(sd).items()}
            zarrckpt.load(sd, path)
            same_objects = all(id(v) == before[k] for k, v in flat_tensors(sd).items())
            if target != "plain_full":
                _apply(model, optim, sd, target)
                sd = state(model, optim, target)
            got = flat_tensors(full(sd))
            mismatched = [
                k
                for k, ref in reference.items()
                if k not in got or got[k].dtype != ref.dtype or not torch.equal(got[k], ref)
            ]
            results[f"{source}->{target}"] = {
                "mismatched": mismatched,
                "compared": len(reference),
                "same_objects": same_objects,
            }
    return results


def _plain_optim_target(model: torch.nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    """Full-tensor Adam state keyed by FQN, the shape get_state_dict produces."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    _, osd = get_state_dict(model, optim)
    return osd  # type: ignore[no-any-return]


def _apply(
    model: torch.nn.Module, optim: torch.optim.Optimizer, sd: dict[str, Any], layout: str
) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if layout == "fsdp1_ws2":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType

        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            model.load_state_dict(sd["model"])
        set_state_dict(model, optim, model_state_dict={}, optim_state_dict=sd["optim"])
        return
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


# ---------------------------------------------------------------------------- entry points


def run_save(rank: int, world_size: int, root: str) -> list[str]:
    return save_sources(root)


def run_save_and_load(rank: int, world_size: int, root: str, sources: list[str]) -> Any:
    mine = save_sources(root)
    return load_all(root, sources + mine)


def run_load(rank: int, world_size: int, root: str, sources: list[str]) -> Any:
    return load_all(root, sources)
