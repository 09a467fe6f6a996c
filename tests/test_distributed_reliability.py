"""Distributed save reliability: rank failures, planning failures, async_save, single writer.

Scenarios run in spawned gloo groups of 2 and 4 CPU processes (one spawn per
world size for the session, shared with test_seeds.py, see ``_seed_cases.py``); the 1-rank
async_save scenario runs in the test process. The spawn timeout bounds every
collective: a rank left waiting for a failed one fails the test instead of
hanging it.
"""

from __future__ import annotations

import json
import math
import os

import _seed_cases as cases
import pytest


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


def _chunk_key(coords: list[int]) -> str:
    return "/".join(["c", *map(str, coords)])


def _check_single_writer(base: str, name: str, results: list[dict], world_size: int) -> dict:
    path = os.path.join(base, name)
    with open(os.path.join(path, "zarr.json")) as f:
        manifest = json.load(f)["attributes"]["zarrckpt"]
    on_disk = cases.chunk_files_on_disk(path)
    written = [set(r["written"]) for r in results]
    # every chunk file written by exactly one rank
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not written[a] & written[b], (
                f"ranks {a} and {b} both wrote {written[a] & written[b]}"
            )
    assert sum(len(w) for w in written) == sum(len(r["written"]) for r in results)
    all_written = set().union(*written)
    all_on_disk = set().union(*on_disk.values())
    assert all_written == all_on_disk
    writer_of = {f: rank for rank, w in enumerate(written) for f in w}

    placements = results[0]["placements"]
    replicated_writers = []
    for fqn, info in manifest["arrays"].items():
        doc = cases.array_document(path, fqn)
        shape = doc["shape"]
        chunk_shape = doc["chunk_grid"]["configuration"]["chunk_shape"]
        n_chunks = math.prod(-(-s // c) for s, c in zip(shape, chunk_shape, strict=True))
        assert len(on_disk[fqn]) == n_chunks, (fqn, sorted(on_disk[fqn]))
        shards = [p for p in placements.get(fqn, []) if p.startswith("S(")]
        if shards:
            # chunk shape == local shard shape, and each rank writes its own shard
            for rank, r in enumerate(results):
                assert chunk_shape == r["local_shapes"][fqn], (fqn, rank, chunk_shape)
                coords = [0] * len(shape)
                coords[int(shards[0][2:-1])] = rank
                key = f"{info['path']}/{_chunk_key(coords)}"
                assert writer_of[key] == rank, (fqn, key, writer_of[key])
        else:  # plain tensors and Replicate() DTensors: one chunk here, one writer
            assert n_chunks == 1, fqn
            (f,) = on_disk[fqn]
            replicated_writers.append(writer_of[f])
    return {"replicated_writers": replicated_writers}


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
