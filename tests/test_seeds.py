"""Ports of the reference scenarios (shared/seeds 000-004) to zarrckpt.save / load.

The scenarios run on CPU with gloo in spawned process groups
(:func:`zarrckpt.testing.run_distributed`); each world size is spawned once
per pytest session and runs all scenarios of this module and of
test_distributed_reliability.py (lists in ``_seed_cases.py``), then every
test below checks one scenario's results on every rank.

Seed map:
* 001 test_tp_checkpoint / test_tp_checkpoint_load_on_meta_device
  -> ``tp_checkpoint`` / ``tp_checkpoint_meta`` (2 and 4 ranks; on 4 ranks the
  1-feature ``net3`` gives empty shards and ``net1`` 3/3/3/1 rows);
* 002 test_fsdp_to_tp -> ``fsdp_to_tp`` (FSDP1 ShardedTensor -> TP DTensor);
* 003 test_distributed_checkpoint[LOCAL|SHARDED] -> ``fsdp1_*_state_dict`` (also
  with padded flat parameters: ``*_padded``);
* 004 test_fsdp_model_state_{no,with}_resharding -> ``fsdp_model_state_*``
  (meta-device FSDP1 models; resharding into even/odd subgroups on 4 ranks);
* 000 save side: ``save({"model": model})`` of a Stateful module, one process
  and FSDP2 on 2 ranks.

Every scenario also runs through DCP with the zarrckpt plug-ins
(``dcp.save(..., storage_writer=ZarrStorageWriter(path))`` /
``dcp.load(..., storage_reader=ZarrStorageReader(path))``): ``backend="dcp"``.
"""

from __future__ import annotations

import _seed_cases as cases
import pytest

BACKENDS = ["zarrckpt", "dcp"]


def _name(scenario: str, backend: str) -> str:
    return scenario if backend == "zarrckpt" else f"{scenario}@{backend}"


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> cases.SpawnCache:
    """Results of the session's spawns (cases.SEED_SCENARIOS run there)."""
    return cases.shared_spawns(tmp_path_factory)


def _run(spawned: cases.SpawnCache, world_size: int, name: str) -> list[dict]:
    per_rank = spawned(world_size)
    found = cases.problems(per_rank, name)
    assert not found, "\n".join(found)
    return [r[name] for r in per_rank]


# --------------------------------------------------------------------------- 001


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_checkpoint(spawned: cases.SpawnCache, world_size: int, backend: str) -> None:
    """Colwise/rowwise TP: load restores the saved values into the same tensor objects."""
    _run(spawned, world_size, _name("tp_checkpoint", backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_checkpoint_load_on_meta_device(
    spawned: cases.SpawnCache, world_size: int, backend: str
) -> None:
    """Meta-device TP target: same dict object, no meta params, values equal after assign."""
    results = _run(spawned, world_size, _name("tp_checkpoint_meta", backend))
    shapes = [r["local_shapes"] for r in results]
    # the scenario really covers uneven and empty shards
    rows = [s["net1.weight"][0] for s in shapes]
    assert rows == ([5, 5] if world_size == 2 else [3, 3, 3, 1])
    assert [s["net3.weight"][0] for s in shapes] == [1] + [0] * (world_size - 1)


# --------------------------------------------------------------------------- 002


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp_to_tp(spawned: cases.SpawnCache, world_size: int, backend: str) -> None:
    """FSDP1 SHARDED_STATE_DICT saved, loaded into a TP model: gathered tensors equal."""
    _run(spawned, world_size, _name("fsdp_to_tp", backend))


# --------------------------------------------------------------------------- 003

#: "" is the seed's model (10x10 layers); "_padded" uses 7x7 layers, so FSDP1's
#: flat parameters are padded and the shards uneven
VARIANTS = ["", "_padded"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("variant", VARIANTS, ids=["seed", "padded"])
def test_fsdp1_local_state_dict(
    spawned: cases.SpawnCache, world_size: int, backend: str, variant: str
) -> None:
    """FSDP1 LOCAL_STATE_DICT (flat-parameter ShardedTensors) of a nested-wrapped model."""
    results = _run(spawned, world_size, _name(f"fsdp1_local_state_dict{variant}", backend))
    assert all(k.endswith("_flat_param") for k in results[0]["keys"])
    assert results[0]["leaf_types"] == ["ShardedTensor"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("variant", VARIANTS, ids=["seed", "padded"])
def test_fsdp1_sharded_state_dict(
    spawned: cases.SpawnCache, world_size: int, backend: str, variant: str
) -> None:
    """FSDP1 SHARDED_STATE_DICT (per-parameter ShardedTensors) of a nested-wrapped model."""
    results = _run(spawned, world_size, _name(f"fsdp1_sharded_state_dict{variant}", backend))
    assert results[0]["keys"] == [
        "linear.weight",
        "linear_skip.lin.weight",
        "nested_linear.nested_linear.weight",
    ]
    assert results[0]["leaf_types"] == ["ShardedTensor"]


# --------------------------------------------------------------------------- 004


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp_model_state_no_resharding(
    spawned: cases.SpawnCache, world_size: int, backend: str
) -> None:
    """Meta-device FSDP1 Linear(8, 8) saved and loaded with the same process group."""
    results = _run(spawned, world_size, _name("fsdp_model_state_no_resharding", backend))
    assert {r["model_2_flat_numel"] for r in results} == {72 // world_size}


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp_model_state_with_resharding(spawned: cases.SpawnCache, backend: str) -> None:
    """Saved on 4 ranks, loaded into FSDP1 models sharded over even / odd subgroups of 2."""
    results = _run(spawned, 4, _name("fsdp_model_state_with_resharding", backend))
    assert {r["model_2_flat_numel"] for r in results} == {72 // 2}


# --------------------------------------------------------------------------- 000 save side


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("backend", BACKENDS)
def test_stateful_model_single_process(tmp_path, backend: str) -> None:
    """``save({"model": model})`` then ``load({"model": model2})`` in one process."""
    result = cases.stateful_model_single(str(tmp_path / "ckpt"), backend)
    assert not result["failures"], "\n".join(result["failures"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_stateful_model_fsdp2(spawned: cases.SpawnCache, backend: str) -> None:
    """The same with FSDP2 (fully_shard) modules on 2 ranks, plus an offline read."""
    _run(spawned, 2, _name("stateful_model_fsdp2", backend))
