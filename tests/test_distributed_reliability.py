"""Distributed save reliability: rank failures, planning failures, async_save, single writer.

Scenarios run in spawned gloo groups of 2 and 4 CPU processes (one spawn per
world size for the session, shared with test_seeds.py, see ``_seed_cases.py``); the 1-rank
async_save scenario runs in the test process. The spawn timeout bounds every
collective: a rank left waiting for a failed one fails the test instead of
hanging it.
"""

from __future__ import annotations

import itertools
import json
import math
import os

import _seed_cases as cases
import numpy as np
import pytest

from zarrckpt.format._shard import PAGE_BYTES


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> cases.SpawnCache:
    """Results of the session's spawns (cases.RELIABILITY_SCENARIOS run there)."""
    return cases.shared_spawns(tmp_path_factory)


def _results(spawned: cases.SpawnCache, world_size: int, name: str) -> list[dict]:
    per_rank = spawned(world_size)
    found = cases.problems(per_rank, name)
    assert not found, "\n".join(found)
    return [r[name] for r in per_rank]


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    "name,failing", [("save_failure_other_rank", -1), ("save_failure_coordinator", 0)]
)
def test_rank_fails_mid_save(
    spawned: cases.SpawnCache, world_size: int, name: str, failing: int
) -> None:
    """One rank's chunk writes raise after the first while overwriting a checkpoint.

    Every rank raises a zarrckpt error (DistributedSaveError on the others),
    no staging directory is left, the previous checkpoint still loads
    bit-exact; the same failure on a new path leaves nothing there; the group
    can save again afterwards (checked rank-side). The failure is injected by
    replacing ``zarrckpt.storage._posix.write_file`` (which ``_writer`` calls) on that rank.
    """
    failing %= world_size
    results = _results(spawned, world_size, name)
    for rank, r in enumerate(results):
        err = r["error"]
        assert err is not None, f"rank {rank}: the save did not raise"
        assert err["zarrckpt_error"], f"rank {rank}: {err['type']}: {err['message']}"
        if rank != failing:
            assert err["distributed_save_error"], f"rank {rank}: {err['type']}"
            assert f"rank {failing}" in err["message"], err["message"]
        assert "No space left on device" in err["message"], err["message"]


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    "name,bad_rank",
    [
        ("planning_failure_sparse", -1),
        ("planning_failure_dtype", -1),
        ("planning_failure_partial", None),
    ],
)
def test_planning_failure_raises_on_all_ranks(
    spawned: cases.SpawnCache, world_size: int, name: str, bad_rank: int | None
) -> None:
    """An unsupported leaf on one rank (or a Partial DTensor): all ranks raise, nothing written."""
    results = _results(spawned, world_size, name)
    for rank, r in enumerate(results):
        err = r["error"]
        assert err is not None, f"rank {rank}: the save did not raise"
        assert err["zarrckpt_error"], f"rank {rank}: {err['type']}: {err['message']}"
        assert "'x'" in err["message"], err["message"]  # names the key
        holds_bad = bad_rank is None or rank == bad_rank % world_size
        if holds_bad:
            assert err["type"] == "UnsupportedValueError", err
        else:
            assert err["distributed_save_error"], err


# --------------------------------------------------------------------------- async_save


def _check_async(result: dict, rank: int, world_size: int) -> None:
    assert result["first_in_flight_when_second_issued"]
    err = result["error"]
    assert err is not None, "async_save to a path without parent did not fail"
    assert err["zarrckpt_error"], err
    if rank == 0:
        assert err["type"] == "CheckpointNotFoundError", err
        assert "no-such-parent" in err["message"], err
    else:
        assert err["distributed_save_error"], err


def test_async_save_single_process(tmp_path) -> None:
    """1 rank: snapshot at call time, serialized overlapping saves, errors on result()."""
    result = cases.async_save_scenario(0, 1, str(tmp_path / "ckpt"))
    assert not result["failures"], "\n".join(result["failures"])
    _check_async(result, 0, 1)


def test_async_save_distributed(spawned: cases.SpawnCache) -> None:
    """The same on 2 ranks (FSDP2 model, background gloo group)."""
    results = _results(spawned, 2, "async_save_scenario")
    for rank, r in enumerate(results):
        _check_async(r, rank, 2)


# --------------------------------------------------------------------------- single writer


def _check_single_writer(base: str, name: str, results: list[dict], world_size: int) -> dict:
    """Format 3: every byte of a shard file is written by exactly one rank, ranks never
    share a page of one, each rank writes the inner chunks of its own shard, and every
    replicated tensor is one file written by one rank."""
    path = os.path.join(base, name)
    with open(os.path.join(path, "zarr.json")) as f:
        manifest = json.load(f)["attributes"]["zarrckpt"]
    on_disk = cases.chunk_files_on_disk(path)
    writes: dict[str, list[tuple[int, int, int]]] = {}  # file -> (start, end, rank)
    for rank, r in enumerate(results):
        for file, offset, n in r["written"]:
            writes.setdefault(file, []).append((offset, offset + n, rank))
    assert set(writes) == set().union(*on_disk.values())
    for file, ranges in writes.items():
        ranges.sort()
        for (s0, e0, r0), (s1, e1, r1) in itertools.pairwise(ranges):
            assert e0 <= s1, (file, "overlapping writes", (s0, e0, r0), (s1, e1, r1))
            if r0 != r1:
                assert (e0 - 1) // PAGE_BYTES < s1 // PAGE_BYTES, (file, "shared page", r0, r1)
        assert ranges[-1][1] == os.path.getsize(os.path.join(path, file)), file

    placements = results[0]["placements"]
    replicated_writers = []
    for fqn, info in manifest["arrays"].items():
        files = sorted(on_disk[fqn])
        assert len(files) == 1, (fqn, files)  # one file per tensor, whatever the world size
        ranges = writes[files[0]]
        shards = [p for p in placements.get(fqn, []) if p.startswith("S(")]
        if shards:
            dim = int(shards[0][2:-1])
            inner = info["inner_chunk_shape"]
            with open(os.path.join(path, files[0]), "rb") as f:
                index = np.frombuffer(f.read(16 * _n_inner(info) + 4)[:-4], "<u8").reshape(-1, 2)
            grid = [-(-s // c) for s, c in zip(info["chunk_shape"], inner, strict=True)]
            for rank, r in enumerate(results):
                local = r["local_shapes"][fqn]
                assert local[dim] % inner[dim] == 0 and all(
                    a == b for i, (a, b) in enumerate(zip(local, inner, strict=True)) if i != dim
                ), (fqn, rank, inner, local)
                # the inner chunks of rank's shard lie in byte ranges that rank wrote
                per = local[dim] // inner[dim]
                for k in range(rank * per, (rank + 1) * per):
                    coords = [0] * len(inner)
                    coords[dim] = k
                    position = int(np.ravel_multi_index(coords, grid))
                    start, n = (int(x) for x in index[position])
                    assert any(
                        a <= start and start + n <= e and w == rank for a, e, w in ranges
                    ), (fqn, rank, k)
        else:  # plain tensors and Replicate() DTensors: one file, one writer
            assert len({w for _, _, w in ranges}) == 1, (fqn, ranges)
            replicated_writers.append(ranges[0][2])
    return {"replicated_writers": replicated_writers}


def _n_inner(info: dict) -> int:
    return math.prod(
        -(-s // c) for s, c in zip(info["chunk_shape"], info["inner_chunk_shape"], strict=True)
    )


@pytest.mark.parametrize(
    "name,world_size",
    [
        (f"single_writer_{layout}{suffix}", ws)
        for suffix in ("", "@dcp")
        for layout, ws in (("fsdp2", 2), ("fsdp2", 4), ("tp", 2))
    ],
)
def test_single_writer_per_chunk(spawned: cases.SpawnCache, name: str, world_size: int) -> None:
    """Even sharding: chunks == shards, each written by its holder, replicas written once
    (and, with zarrckpt.save, spread over the ranks)."""
    results = _results(spawned, world_size, name)
    out = _check_single_writer(spawned.bases[world_size], name, results, world_size)
    writers = out["replicated_writers"]
    # step + 2 * world_size extra tensors (+ the Replicate() bias of the rowwise layer)
    assert len(writers) >= 1 + 2 * world_size
    if name.endswith("@dcp"):
        # through dcp.save, DCP's planner (dedup_save_plans) picks the rank that
        # writes each replicated item; ZarrStorageWriter keeps that choice
        return
    assert len(set(writers)) > 1, f"all replicated chunks written by rank {writers[0]}"
    if name.startswith("single_writer_fsdp2"):
        # every rank holds equal shards, so the replicas are spread evenly
        counts = [writers.count(r) for r in range(world_size)]
        assert max(counts) - min(counts) <= 1, counts
