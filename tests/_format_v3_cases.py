"""Rank functions for tests/test_format_v3.py (run by zarrckpt.testing.run_distributed)."""

from __future__ import annotations

import os
from typing import Any

import torch


def _model(seed: int) -> torch.nn.Module:
    """Uneven first dimensions (10 and 7 rows over 4 ranks: 3, 3, 3, 1 / 2, 2, 2, 1)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 7)
    ).to(torch.bfloat16)


def expected_state(seed: int = 5) -> dict[str, torch.Tensor]:
    """The global tensors :func:`save_fsdp2_mixed` saves."""
    sd = {k: v.detach().clone() for k, v in _model(seed).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd["fp8"] = torch.randn(13, 5, generator=g).to(torch.float8_e4m3fn)
    sd["fp8_e5m2"] = torch.randn(9, generator=g).to(torch.float8_e5m2)
    sd["replicated"] = torch.randn(3, 4, generator=g)
    return sd


def save_fsdp2_mixed(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """FSDP2 (bf16 parameters, uneven last shards) plus float8 DTensors sharded on
    dim 0 (uneven) and a replicated plain tensor; returns this rank's local shapes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    import zarrckpt

    mesh = init_device_mesh("cpu", (world_size,))
    model = _model(5)
    fully_shard(model, mesh=mesh)
    expected = expected_state()
    sd: dict[str, Any] = dict(model.state_dict())
    for key in ("fp8", "fp8_e5m2"):
        # distribute in float32 (gloo has no float8), then cast each local shard
        dt = distribute_tensor(expected[key].float(), mesh, [Shard(0)])
        sd[key] = dt.to(expected[key].dtype)
    sd["replicated"] = expected["replicated"]
    zarrckpt.save(sd, path, fsync=False, inner_chunk_bytes=16)
    return {k: list(v.to_local().shape) for k, v in sd.items() if hasattr(v, "to_local")}


def save_same_model(rank: int, world_size: int, path: str) -> int:
    """The same model saved by any world size (files counted by the test)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import zarrckpt

    model = _model(5)
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    zarrckpt.save(model.state_dict(), path, fsync=False)
    return len(os.listdir(path)) if rank == 0 else 0
