"""Rank-side scenarios of tests/test_object_store_file_load.py: ``zarrckpt.load``
of a safetensors or torch.save object on S3 straight into a sharded model
(FSDP2, TP) on 2 gloo ranks, compared bit-exactly with the saved state."""

from __future__ import annotations

from typing import Any

import torch
from _convert_cases import SimpleModelUneven, fsdp2, full, mesh1d, tp

import zarrckpt


def load_into_sharded(
    rank: int, world_size: int, url: str, options: dict[str, Any], wrap: str, reference: str
) -> dict[str, Any]:
    expected = torch.load(reference, weights_only=True)
    mesh = mesh1d(world_size)
    model = SimpleModelUneven(seed=1)
    model = fsdp2(model, mesh) if wrap == "fsdp2" else tp(model, mesh)
    stats: dict[str, int] = {}
    zarrckpt.load(model, url, storage_options=options, stats=stats)
    got = {k: full(v) for k, v in model.state_dict().items()}
    mismatched = [
        k for k, v in expected.items()
        if k not in got or got[k].dtype != v.dtype or not torch.equal(got[k], v)
    ]
    total = sum(v.numel() * v.element_size() for v in expected.values())
    return {"mismatched": mismatched, "bytes_read": stats.get("bytes_read", 0), "total": total}
