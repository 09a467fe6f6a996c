"""Rank-side scenario of tests/test_load_versions.py: the checkpoint is replaced
between the moments two ranks open it for one collective load."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import zarrckpt
from zarrckpt.parallel import _reader


def replaced_between_opens(rank: int, world_size: int, path: str) -> dict[str, Any]:
    solo = [dist.new_group([r]) for r in range(world_size)]  # every rank creates each
    real_init = _reader.CheckpointFiles.__init__

    def init(self, *args, **kwargs):
        if rank == 0:
            real_init(self, *args, **kwargs)  # opens the first version
            dist.barrier()
        else:
            dist.barrier()  # rank 0 has opened it: now it is replaced
            zarrckpt.save({"w": torch.full((8,), 2.0)}, path, overwrite=True,
                          process_group=solo[rank])
            real_init(self, *args, **kwargs)

    _reader.CheckpointFiles.__init__ = init
    target = {"w": torch.zeros(8)}
    try:
        zarrckpt.load(target, path)
    except zarrckpt.errors.IncompleteCheckpointError as e:
        return {"error": str(e), "w": target["w"].tolist()}
    finally:
        _reader.CheckpointFiles.__init__ = real_init
    return {"error": None, "w": target["w"].tolist()}


def per_rank_files(rank: int, world_size: int, base: str) -> list[float]:
    """Each rank loads its own torch.save file in one collective load."""
    path = f"{base}/rank{rank}.pt"
    torch.save({"w": torch.full((4,), float(rank))}, path)
    dist.barrier()
    target = {"w": torch.zeros(4)}
    zarrckpt.load(target, path)
    return target["w"].tolist()
