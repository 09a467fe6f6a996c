"""Distributed resharding scenarios run by tests/test_resharding.py."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch
import torch.distributed as dist

SIZES = [(256, 256), (256,), (512, 128), (64, 256)]


def _fsdp2_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 128),
    )


def save_fsdp2(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """FSDP2 save with small inner chunks; returns local shapes for the layout check."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import zarrckpt

    model = _fsdp2_model(seed=3)
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    sd = model.state_dict()
    zarrckpt.save(sd, path, inner_chunk_bytes=16 << 10)
    return {k: list(v.to_local().shape) for k, v in sd.items()}


def load_fsdp2(rank: int, world_size: int, path: str) -> dict[str, Any]:
    """Load into FSDP2 on this world size; return bytes read/needed and correctness."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import zarrckpt

    model = _fsdp2_model(seed=11)
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    sd = model.state_dict()
    stats: dict[str, int] = {}
    zarrckpt.load(sd, path, stats=stats)
    reference = _fsdp2_model(seed=3).state_dict()
    equal = all(torch.equal(sd[k].full_tensor(), reference[k]) for k in reference)
    return {"equal": equal, **stats}


def dcp_read_amplification(rank: int, world_size: int, dcp_dir: str, save: bool) -> dict[str, Any]:
    """Bytes DCP's FileSystemReader reads for the same reshard (for comparison)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _fsdp2_model(seed=3 if save else 11)
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    sd = model.state_dict()
    if save:
        dcp.save(sd, checkpoint_id=dcp_dir)
        return {}
    needed = sum(v.to_local().numel() * v.element_size() for v in sd.values())
    reader = dcp.FileSystemReader(dcp_dir)
    read = 0
    original = reader._slice_file  # every tensor read goes through a slice of its file

    def counting(file: Any, storage_info: Any) -> Any:
        nonlocal read
        read += storage_info.length
        return original(file, storage_info)

    reader._slice_file = counting  # type: ignore[method-assign]
    dcp.load(sd, storage_reader=reader)
    return {"bytes_read": read, "bytes_needed": needed}


# ---------------------------------------------------------------------------- property test


def _placements(draw: Any, st: Any, mesh_ndim: int, tensor_ndim: int) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard

    choices = [Replicate()] + [Shard(d) for d in range(tensor_ndim)]
    return [draw(st.sampled_from(choices)) for _ in range(mesh_ndim)]


def property_reshard(rank: int, world_size: int, root: str, max_examples: int) -> dict[str, Any]:
    """Hypothesis, run identically on every rank: random shape, dtype, mesh and placements
    for the save and for the load; the loaded local shard equals the global tensor
    sliced the way DTensor slices it."""
    from hypothesis import Phase, given, settings
    from hypothesis import strategies as st
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    import zarrckpt

    meshes = {
        (4,): init_device_mesh("cpu", (4,)),
        (2, 2): init_device_mesh("cpu", (2, 2)),
    }
    counter = {"examples": 0, "failures": []}

    @st.composite
    def cases(draw: Any) -> dict[str, Any]:
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
        dtype = draw(
            st.sampled_from(
                [torch.float32, torch.bfloat16, torch.int16, torch.float8_e5m2, torch.bool]
            )
        )
        save_mesh = draw(st.sampled_from(list(meshes)))
        load_mesh = draw(st.sampled_from(list(meshes)))
        return {
            "shape": shape,
            "dtype": dtype,
            "save_mesh": save_mesh,
            "save_placements": _placements(draw, st, len(save_mesh), ndim),
            "load_mesh": load_mesh,
            "load_placements": _placements(draw, st, len(load_mesh), ndim),
            "inner": draw(st.sampled_from([64, 1 << 20])),
            "seed": draw(st.integers(0, 2**16)),
        }

    @settings(
        max_examples=max_examples,
        derandomize=True,  # the same examples, in the same order, on every rank
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: ranks would diverge
    )
    @given(cases())
    def check(case: dict[str, Any]) -> None:
        n = counter["examples"]
        counter["examples"] += 1
        path = os.path.join(root, f"case{n}")
        ok = True
        message = ""
        try:
            g = torch.Generator().manual_seed(case["seed"])
            full = (torch.randn(case["shape"], generator=g) * 100).to(case["dtype"])
            if case["dtype"] == torch.bool:
                full = torch.randn(case["shape"], generator=g) > 0
            src = distribute_tensor(
                full, meshes[case["save_mesh"]], case["save_placements"], src_data_rank=None
            )
            zarrckpt.save({"t": src}, path, inner_chunk_bytes=case["inner"])
            expected = distribute_tensor(
                full, meshes[case["load_mesh"]], case["load_placements"], src_data_rank=None
            )
            target = distribute_tensor(
                torch.zeros(case["shape"], dtype=case["dtype"]),
                meshes[case["load_mesh"]],
                case["load_placements"],
                src_data_rank=None,
            )
            local_before = target.to_local().data_ptr()
            zarrckpt.load({"t": target}, path)
            ok = torch.equal(target.to_local(), expected.to_local()) and (
                target.to_local().data_ptr() == local_before
            )
            if not ok:
                message = "loaded local shard differs"
        except Exception as e:  # agreed on below so that every rank fails together
            ok, message = False, f"{type(e).__name__}: {e}"
        oks = [None] * world_size
        dist.all_gather_object(oks, (ok, message))
        bad = [(r, m) for r, (o, m) in enumerate(oks) if not o]
        if bad:
            counter["failures"].append({"case": repr(case), "ranks": bad})
            raise AssertionError(f"case {case}: {bad}")

    with contextlib.suppress(AssertionError):  # failures are collected in counter
        check()
    return {"examples": counter["examples"], "failures": counter["failures"]}


def manifest_chunks(path: str) -> dict[str, Any]:
    """Per array, the shape of the unit a reader fetches: the inner chunk of a shard
    file (format 3: each rank's piece, when not cut further), else the chunk."""
    with open(os.path.join(path, "zarr.json")) as f:
        arrays = json.load(f)["attributes"]["zarrckpt"]["arrays"]
    return {k: v["inner_chunk_shape"] or v["chunk_shape"] for k, v in arrays.items()}
