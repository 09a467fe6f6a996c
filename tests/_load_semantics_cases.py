"""Distributed scenarios of tests/test_load_semantics.py (run by ``run_distributed``)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 8),
        torch.nn.LayerNorm(8),
    )


def _shard(model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp2_meta_load(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Load a checkpoint directory, a safetensors file and a torch.save file into an
    FSDP2 model built on the meta device; report what each load left in the model."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    import zarrckpt

    source = _model(seed=5)
    reference = {k: v.detach().clone() for k, v in source.state_dict().items()}
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    expected_out = source(x).detach()
    directory = os.path.join(root, "ckpt")
    zarrckpt.save({"model": _shard(_model(seed=5), world_size)}, directory)
    files = {"st": os.path.join(root, "model.safetensors"), "pt": os.path.join(root, "model.pt")}
    if rank == 0:
        save_file(reference, files["st"])
        torch.save(reference, files["pt"])
    dist.barrier()

    failures: list[str] = []
    for name, path in (("dir", directory), ("st", files["st"]), ("pt", files["pt"])):
        with torch.device("meta"):
            model = _model(seed=0)
        model[3].weight.requires_grad_(False)  # a frozen parameter stays frozen
        _shard(model, world_size)
        before = {
            k: (p.device_mesh, p.placements, p.requires_grad) for k, p in model.named_parameters()
        }
        result = zarrckpt.load({"model": model} if name == "dir" else model, path)
        for k, p in model.named_parameters():
            if not isinstance(p, torch.nn.Parameter) or not isinstance(p, DTensor):
                failures.append(f"{name}: {k} is a {type(p).__name__}, not a DTensor parameter")
                continue
            if p.to_local().device.type == "meta":
                failures.append(f"{name}: {k} left on the meta device")
                continue
            if (p.device_mesh, p.placements, p.requires_grad) != before[k]:
                failures.append(f"{name}: {k} changed mesh/placements/requires_grad")
            if not torch.equal(p.full_tensor(), reference[k]):
                failures.append(f"{name}: {k} does not hold the stored values")
        keys = (getattr(result, "missing_keys", None), getattr(result, "unexpected_keys", None))
        if keys != ([], []):
            failures.append(f"{name}: load returned {result!r}, not an empty LoadResult")
        # FSDP2 works with the loaded parameters: same output, gradients flow
        try:
            out = model(x)
        except RuntimeError as e:  # FSDP2 refuses meta parameters
            failures.append(f"{name}: forward failed: {str(e).splitlines()[0]}")
            continue
        if not torch.equal(out.detach(), expected_out):
            failures.append(f"{name}: forward output differs from the source model's")
        out.sum().backward()
        if model[0].weight.grad is None or model[3].weight.grad is not None:
            failures.append(f"{name}: gradients do not follow requires_grad")
    return {"failures": failures}


class _Bert(torch.nn.Module):
    """An encoder, a pooler that never gets gradients, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(16, 16)
        self.pooler = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _sharded_bert(seed: int, world_size: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = _Bert()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    return model


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(seed))
    model(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def fsdp2_partial_optimizer_load(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """A fresh AdamW of an FSDP2 model loads optimizer state that covers only some
    parameters: sharded DTensor state for those, none for the pooler."""
    from torch.distributed.tensor import DTensor

    import zarrckpt

    model = _sharded_bert(seed=5, world_size=world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for seed in range(2):
        _step(model, optimizer, seed)
    path = os.path.join(root, "optim")
    zarrckpt.save({"model": model, "optim": optimizer}, path)

    model2 = _sharded_bert(seed=9, world_size=world_size)
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    failures: list[str] = []
    try:
        zarrckpt.load({"model": model2, "optim": optimizer2}, path)
    except Exception as e:  # main refused the partial state
        return {"failures": [f"load raised {type(e).__name__}: {str(e)[:300]}"]}
    state, state2 = optimizer.state_dict()["state"], optimizer2.state_dict()["state"]
    if sorted(state) != sorted(state2):
        failures.append(f"state for parameters {sorted(state2)}, expected {sorted(state)}")
    for index, entry in state.items():
        for name, value in entry.items():
            other = state2.get(index, {}).get(name)
            if type(other) is not type(value) or other.dtype != value.dtype:
                failures.append(f"{index}.{name}: {type(other).__name__}, not as saved")
            elif isinstance(value, DTensor):
                if other.placements != value.placements or not torch.equal(
                    other.full_tensor(), value.full_tensor()
                ):
                    failures.append(f"{index}.{name}: placements or values differ")
            elif not torch.equal(other, value):
                failures.append(f"{index}.{name}: values differ")
    # the next step is the source's next step, bit for bit
    _step(model, optimizer, seed=7)
    _step(model2, optimizer2, seed=7)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        if not torch.equal(p.full_tensor(), p2.full_tensor()):
            failures.append(f"after a step, {name} differs from the source's")
    return {"failures": failures}
