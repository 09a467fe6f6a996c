"""Distributed object-store scenarios run by tests/test_object_store_dist.py:
save a model + Adam state in one layout to an S3 URL, load it in another,
compare every full tensor bit-exactly with a torch.save reference of the source."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from _matrix_cases import _apply, build, flat_tensors, full, state, train_step


def save_layout(
    rank: int, world_size: int, url: str, options: dict[str, Any], layout: str, reference: str
) -> None:
    import zarrckpt

    model, optim = build(layout, seed=7)
    train_step(model, optim)
    sd = state(model, optim, layout)
    zarrckpt.save(sd, url, storage_options=options)
    ref = flat_tensors(full(sd))
    if rank == 0:
        torch.save(ref, reference)
    dist.barrier()


def load_layout(
    rank: int, world_size: int, url: str, options: dict[str, Any], layout: str, reference: str
) -> dict[str, Any]:
    import zarrckpt

    ref = torch.load(reference, weights_only=True)
    model, optim = build(layout, seed=99)
    sd = state(model, optim, layout)
    zarrckpt.load(sd, url, storage_options=options)
    _apply(model, optim, sd, layout)
    got = flat_tensors(full(state(model, optim, layout)))
    mismatched = [
        k
        for k, v in ref.items()
        if k not in got or got[k].dtype != v.dtype or not torch.equal(got[k], v)
    ]
    return {"mismatched": mismatched, "compared": len(ref)}


def save_both_then_reshard(
    rank: int, world_size: int, base: str, options: dict[str, Any], tmp: str
) -> dict[str, Any]:
    """Save FSDP2 and TP checkpoints (2 ranks) below ``base``, then load the TP one
    into FSDP2 on the same 2 ranks."""
    save_layout(rank, world_size, f"{base}/fsdp2", options, "fsdp2_ws2", f"{tmp}/fsdp2.pt")
    save_layout(rank, world_size, f"{base}/tp", options, "tp_ws2", f"{tmp}/tp.pt")
    return load_layout(rank, world_size, f"{base}/tp", options, "fsdp2_ws2", f"{tmp}/tp.pt")
