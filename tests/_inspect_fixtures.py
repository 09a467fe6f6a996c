"""Checkpoint producers for the inspection tests (tests/test_inspect.py, tests/test_cli.py).

A *producer* is ``produce(root: str) -> Produced``: it trains a small model
(with a frozen parameter and a buffer) with Adam, saves a checkpoint
(``before``), takes exactly one more optimizer step and saves again
(``after``), and returns the full (unsharded) tensors of both saves by FQN.
The inspection tests only read checkpoints, so any save path fits: add a
producer to :data:`PRODUCERS` (for instance a 2-rank FSDP2 save through
``zarrckpt.testing.run_distributed``) and every parametrized test runs on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

IN, HIDDEN, OUT = 64, 96, 10
#: stored chunk sizes of single-process saves: several chunks per tensor,
#: sharded chunks (inner chunks), partial edge chunks
SMALL_CHUNKS = {"chunk_bytes": 16 << 10, "inner_chunk_bytes": 4 << 10}


@dataclass
class Produced:
    """Two checkpoints one optimizer step apart, with their full tensors."""

    label: str
    before: str
    after: str
    before_tensors: dict[str, torch.Tensor]
    after_tensors: dict[str, torch.Tensor]

    @property
    def changed(self) -> set[str]:
        """FQNs whose values differ between the two saves."""
        return {
            k
            for k, t in self.before_tensors.items()
            if k in self.after_tensors and not torch.equal(t, self.after_tensors[k])
        }


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Linear(IN, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, OUT)
        self.frozen = torch.nn.Parameter(torch.randn(33, 7), requires_grad=False)
        self.register_buffer("scale", torch.arange(12.0))


def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> None:
    """One Adam step with element-dependent gradients (frozen parameters get none)."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = p.detach() * 0.5 + 0.1 * step
    optim.step()
    optim.zero_grad()


def state(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd, "step": step}


def full_tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{fqn: full CPU tensor}`` of a state dict (DTensors gathered)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return {prefix: value.full_tensor().detach().clone()}
    if isinstance(value, torch.Tensor):
        return {prefix: value.detach().clone()}
    out: dict[str, torch.Tensor] = {}
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return out
    for k, v in items:
        out.update(full_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def produce_single(root: str) -> Produced:
    """Single-process saves with small chunks (several, sharded, partial edge chunks)."""
    import zarrckpt

    torch.manual_seed(0)
    model = Net()
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    train_step(model, optim, 1)
    before, after = os.path.join(root, "before"), os.path.join(root, "after")
    sd = state(model, optim, 1)
    zarrckpt.save(sd, before, fsync=False, **SMALL_CHUNKS)
    before_tensors = full_tensors(sd)
    train_step(model, optim, 2)
    sd = state(model, optim, 2)
    zarrckpt.save(sd, after, fsync=False, **SMALL_CHUNKS)
    return Produced("single", before, after, before_tensors, full_tensors(sd))


#: label -> producer; every parametrized inspection test runs on each
PRODUCERS: dict[str, Callable[[str], Produced]] = {
    "single": produce_single,
}

_CACHE: dict[str, Produced] = {}


def get_produced(label: str, factory: Any) -> Produced:
    """Run a producer once per test session (``factory``: pytest's tmp_path_factory)."""
    if label not in _CACHE:
        _CACHE[label] = PRODUCERS[label](str(factory.mktemp(f"produced-{label}")))
    return _CACHE[label]


def _fsdp2_worker(rank: int, world_size: int, root: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import zarrckpt

    torch.manual_seed(0)
    model = Net()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    train_step(model, optim, 1)
    for name, step in (("before", 1), ("after", 2)):
        if step == 2:
            train_step(model, optim, 2)
        sd = state(model, optim, step)
        zarrckpt.save(sd, os.path.join(root, name), fsync=False)
        reference = full_tensors(sd)
        if rank == 0:
            torch.save(reference, os.path.join(root, f"{name}.reference.pt"))
        dist.barrier()


def produce_fsdp2_ws2(root: str) -> Produced:
    """A 2-rank FSDP2 (``fully_shard``) save on gloo: chunks follow the shards."""
    from zarrckpt.testing import run_distributed

    run_distributed(_fsdp2_worker, 2, root)
    load = lambda name: torch.load(os.path.join(root, f"{name}.reference.pt"))  # noqa: E731
    return Produced(
        "fsdp2_ws2",
        os.path.join(root, "before"),
        os.path.join(root, "after"),
        load("before"),
        load("after"),
    )


PRODUCERS["fsdp2_ws2"] = produce_fsdp2_ws2
