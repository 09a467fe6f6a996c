"""Multi-process scenario of tests/test_object_store_dcp.py: the DCP plug-ins on an
S3 URL (run with zarrckpt.testing.run_distributed on 2 gloo ranks).

An FSDP2 model + Adam state after one step (tests/_dcp_cases.py) is saved with
``dcp.save`` + ZarrStorageWriter to the URL, then loaded with ``dcp.load`` +
ZarrStorageReader into a tensor-parallel model on the same ranks; rank 0 writes
the full tensors as the reference for a single-process load afterwards.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from _dcp_cases import _no_unpickling, apply, build, compare, flat, full, state, train_step


def save_then_load_tp(
    rank: int, world_size: int, url: str, options: dict[str, Any], root: str
) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from zarrckpt import ZarrStorageReader, ZarrStorageWriter

    model, optim = build("fsdp2", seed=7)
    train_step(model, optim)
    sd = state(model, optim)
    dcp.save(sd, storage_writer=ZarrStorageWriter(url, storage_options=options, fsync=False))
    whole = full(sd)  # collective: every rank
    reference = flat(whole)
    if rank == 0:
        torch.save(whole, os.path.join(root, "reference.pt"))
    dist.barrier()
    model, optim = build("tp", seed=99)
    target = state(model, optim)
    target["step"], target["note"] = 0, {"tags": [], "lr": 0.0}
    reader = ZarrStorageReader(url, storage_options=options)
    with _no_unpickling():
        dcp.load(target, storage_reader=reader)
    apply(model, optim, target)
    got = flat(full(state(model, optim)))
    got["step"] = target["step"]
    got["note.tags"], got["note.lr"] = target["note"]["tags"], target["note"]["lr"]
    return {
        "mismatched": compare(reference, got),
        "compared": len(reference),
        "bytes_read": reader.bytes_read,
    }
