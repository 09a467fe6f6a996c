"""ZarrStorageWriter / ZarrStorageReader: torch.distributed.checkpoint writes and reads zarrckpt.

Single-process tests call ``dcp.save`` / ``dcp.load`` without a process group;
the multi-process test runs FSDP2 and TP on gloo (tests/_dcp_cases.py).
Tensors are compared bit for bit (conftest.assert_bits_equal).
"""

from __future__ import annotations

import gc
import json
import math
import os
import pickle
from typing import Any
from unittest import mock

import _dcp_cases
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import DTYPES, assert_bits_equal, random_tensor
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

import zarrckpt
from zarrckpt import ZarrStorageReader, ZarrStorageWriter
from zarrckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    InvalidKeyError,
    UnsafeCheckpointError,
)
from zarrckpt.format._dtypes import BY_ZARR
from zarrckpt.format._marker import COMMIT_MARKER
from zarrckpt.interop.dcp._tree import dcp_leaves, tree_from_leaves
from zarrckpt.testing import run_distributed

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is (disabled|unavailable):UserWarning"
)

ALL_DTYPES = [*DTYPES, torch.uint16, torch.uint32, torch.uint64]
#: small size targets so that a few-KB tensor has several chunks and inner chunks
SMALL = {"chunk_bytes": 2048, "inner_chunk_bytes": 1024}


def manifest(path: Any) -> dict[str, Any]:
    with open(os.path.join(path, "zarr.json"), "rb") as f:
        return json.load(f)["attributes"]["zarrckpt"]  # type: ignore[no-any-return]


def failure(exc: CheckpointException) -> BaseException:
    """The (first) per-rank exception DCP wrapped."""
    return next(iter(exc.failures.values()))[0]


def sample_state() -> dict[str, Any]:
    """Nested state dict: every dtype, odd shapes, views, plain values of all forms."""
    tensors = {
        str(dtype).removeprefix("torch."): random_tensor(dtype, (7, 5), seed=i)
        for i, dtype in enumerate(ALL_DTYPES)
    }
    big = random_tensor(torch.float32, (40, 24), seed=99)  # with SMALL: chunks of 21 rows
    return {
        "model": {"layer": {"weight": big, "bias": random_tensor(torch.bfloat16, (24,), 5)}},
        "dtypes": tensors,
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "view": random_tensor(torch.float16, (6, 4), seed=3).t(),
        "layers": [random_tensor(torch.float8_e4m3fn, (3, 3), 4), {"gain": 1.5, "on": True}],
        "step": 17,
        "lr": 1e-3,
        "nan": float("nan"),
        "inf": -math.inf,
        "name": "run-α",
        "nothing": None,
        "milestones": [10, 20, [30, 40]],
        "betas": (0.9, 0.999),
        "pair": (random_tensor(torch.int32, (2,), 6), "x"),
        "opts": {"a": 1, "b": [True, None]},
    }


def blank_like(value: Any) -> Any:
    """A target with the same structure: zeroed tensors, different plain values."""
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value.contiguous())
    if isinstance(value, dict):
        return {k: blank_like(v) for k, v in value.items()}
    if isinstance(value, list):
        return [blank_like(v) for v in value]
    if isinstance(value, tuple):
        return None  # DCP loads a tuple as one value
    return "<unloaded>"


def assert_same_state(expected: Any, actual: Any, where: str = "") -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert_bits_equal(expected, actual, where)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), where
        for k, v in expected.items():
            assert_same_state(v, actual[k], f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same_state(e, a, f"{where}.{i}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert isinstance(actual, float) and math.isnan(actual), where
    else:
        assert type(actual) is type(expected) and actual == expected, (where, actual)


def tensor_leaves(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items: Any = (
        value.items() if isinstance(value, dict)
        else enumerate(value) if isinstance(value, (list, tuple)) else ()
    )
    for k, v in items:
        out.update(tensor_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def chunk_files(path: Any) -> dict[str, bytes]:
    """Every file of a checkpoint except the root metadata and the commit marker."""
    out = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            if rel not in ("zarr.json", COMMIT_MARKER):
                with open(os.path.join(dirpath, name), "rb") as f:
                    out[rel] = f.read()
    return out


# ----------------------------------------------------------------------- round trips


def test_dcp_save_writes_exactly_the_zarrckpt_format(ckpt_dir):
    sd = sample_state()
    via_dcp, via_zarrckpt = ckpt_dir / "dcp", ckpt_dir / "zc"
    dcp.save(sd, storage_writer=ZarrStorageWriter(via_dcp, fsync=False, **SMALL))
    zarrckpt.save(sd, via_zarrckpt, fsync=False, **SMALL)

    m_dcp, m_zc = manifest(via_dcp), manifest(via_zarrckpt)
    assert m_dcp["tree"] == m_zc["tree"]
    assert m_dcp["arrays"] == m_zc["arrays"]
    assert list(m_dcp["arrays"]) == list(m_zc["arrays"])
    assert m_dcp["pickled"] == m_zc["pickled"] == {}
    weight = m_dcp["arrays"]["model.layer.weight"]
    # format 3: one shard file (rows rounded up to whole inner chunks) of 7-row inner chunks
    assert weight["chunk_shape"] == [42, 24] and weight["inner_chunk_shape"] == [7, 24]
    # every array file (zarr.json of arrays and chunk files) is byte-identical
    files = chunk_files(via_dcp)
    assert files == chunk_files(via_zarrckpt)
    assert not any(name.endswith(".metadata") or name.endswith(".distcp") for name in files)


def test_dcp_round_trip_every_dtype_and_value(ckpt_dir):
    sd = sample_state()
    path = ckpt_dir / "ck"
    dcp.save(sd, storage_writer=ZarrStorageWriter(path, fsync=False, **SMALL))

    target = blank_like(sd)
    before = {k: id(v) for k, v in tensor_leaves(target).items()}
    reader = ZarrStorageReader(path)
    dcp.load(target, storage_reader=reader)
    expected = dict(sd, view=sd["view"].contiguous())
    assert_same_state(expected, target)
    # tensors are filled in place
    after = tensor_leaves(target)
    assert all(id(after[k]) == before[k] for k in before)
    stored = sum(
        math.prod(a["shape"]) * BY_ZARR[a["dtype"]].numpy_dtype.itemsize
        for a in manifest(path)["arrays"].values()
    )
    assert stored <= reader.bytes_read <= stored + 600  # payload + crc32c + shard indexes


def test_dcp_written_checkpoint_loads_with_zarrckpt_and_opens(ckpt_dir):
    sd = sample_state()
    path = ckpt_dir / "ck"
    dcp.save(sd, storage_writer=ZarrStorageWriter(path, fsync=False))

    target = blank_like(sd)
    zarrckpt.load(target, path)
    assert_same_state(dict(sd, view=sd["view"].contiguous()), target)

    ckpt = zarrckpt.open(path)
    for fqn, tensor in tensor_leaves(sd).items():
        assert_bits_equal(tensor, ckpt.read(fqn), fqn)
        assert_bits_equal(tensor, np.asarray(ckpt[fqn][...]), fqn)
    assert ckpt.verify().ok


def test_zarrckpt_save_then_dcp_load(ckpt_dir):
    sd = sample_state()
    sd["by_layer"] = {3: {"w": torch.arange(4.0)}}  # int dict key: DCP offers it as "3"
    path = ckpt_dir / "ck"
    zarrckpt.save(sd, path, fsync=False, **SMALL)

    target = blank_like(sd)
    target["by_layer"] = {3: {"w": torch.zeros(4)}}
    dcp.load(target, storage_reader=ZarrStorageReader(path))
    expected = dict(sd, view=sd["view"].contiguous())
    assert_same_state(expected, target)


def test_partial_target_loads_only_its_keys(ckpt_dir):
    sd = sample_state()
    path = ckpt_dir / "ck"
    zarrckpt.save(sd, path, fsync=False)
    target = {"model": {"layer": {"weight": torch.zeros(40, 24)}}, "step": 0}
    reader = ZarrStorageReader(path)
    dcp.load(target, storage_reader=reader)
    assert_bits_equal(sd["model"]["layer"]["weight"], target["model"]["layer"]["weight"])
    assert target["step"] == 17
    assert reader.bytes_read < 40 * 24 * 4 + 200


class Net(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(6, 3)
        self.register_buffer("count", torch.tensor(seed))


def test_stateful_objects(ckpt_dir):
    model = Net(1)
    dcp.save(
        {"model": model, "epoch": 4},
        storage_writer=ZarrStorageWriter(ckpt_dir / "dcp", fsync=False),
    )
    zarrckpt.save({"model": model, "epoch": 4}, ckpt_dir / "zc", fsync=False)
    assert manifest(ckpt_dir / "dcp")["arrays"] == manifest(ckpt_dir / "zc")["arrays"]

    for source in ("dcp", "zc"):
        for loader in ("dcp", "zarrckpt"):
            other = Net(2)
            state = {"model": other, "epoch": 0}
            if loader == "dcp":
                dcp.load(state, storage_reader=ZarrStorageReader(ckpt_dir / source))
            else:
                zarrckpt.load(state, ckpt_dir / source)
            assert state["epoch"] == 4 and state["model"] is other
            for k, v in model.state_dict().items():
                assert_bits_equal(v, other.state_dict()[k], f"{source}->{loader} {k}")


def test_async_save(ckpt_dir):
    sd = {"w": torch.arange(12.0).reshape(3, 4), "meta": {"step": 3}}
    expected = sd["w"].clone()
    future = dcp.async_save(sd, storage_writer=ZarrStorageWriter(ckpt_dir / "ck", fsync=False))
    sd["w"].add_(100)  # after staging: must not reach the checkpoint
    future.result()
    target = {"w": torch.zeros(3, 4), "meta": {"step": 0}}
    dcp.load(target, storage_reader=ZarrStorageReader(ckpt_dir / "ck"))
    assert_bits_equal(expected, target["w"])
    assert target["meta"] == {"step": 3}
    assert zarrckpt.open(ckpt_dir / "ck").verify().ok


def test_checkpoint_id_overrides_path(ckpt_dir):
    sd = {"w": torch.ones(3)}
    writer = ZarrStorageWriter(ckpt_dir / "unused", fsync=False)
    dcp.save(sd, checkpoint_id=ckpt_dir / "a", storage_writer=writer)
    dcp.save(sd, checkpoint_id=ckpt_dir / "b", storage_writer=writer)  # writer reused
    assert sorted(os.listdir(ckpt_dir)) == ["a", "b"]
    target = {"w": torch.zeros(3)}
    dcp.load(target, checkpoint_id=ckpt_dir / "b", storage_reader=ZarrStorageReader("elsewhere"))
    assert_bits_equal(sd["w"], target["w"])
    assert ZarrStorageReader.validate_checkpoint_id(ckpt_dir / "a")
    assert not ZarrStorageReader.validate_checkpoint_id(ckpt_dir / "missing")
    assert ZarrStorageWriter.validate_checkpoint_id(ckpt_dir / "new")
    assert ZarrStorageWriter.validate_checkpoint_id("s3://bucket/ck")  # object stores work
    assert not ZarrStorageWriter.validate_checkpoint_id("hdfs://host/ck")


def test_overwrite_is_refused_by_default_and_atomic_when_allowed(ckpt_dir):
    path = ckpt_dir / "ck"
    dcp.save({"w": torch.ones(2)}, storage_writer=ZarrStorageWriter(path, fsync=False))
    with pytest.raises(CheckpointException) as info:
        dcp.save({"w": torch.zeros(2)}, storage_writer=ZarrStorageWriter(path, fsync=False))
    assert isinstance(failure(info.value), CheckpointExistsError)
    assert_bits_equal(torch.ones(2), zarrckpt.open(path).read("w"))

    dcp.save({"w": torch.zeros(2)}, storage_writer=ZarrStorageWriter(path, overwrite=True))
    assert_bits_equal(torch.zeros(2), zarrckpt.open(path).read("w"))
    assert sorted(os.listdir(ckpt_dir)) == ["ck"]  # no staging directory left behind


def test_non_json_values_need_allow_pickle(ckpt_dir):
    path = ckpt_dir / "ck"
    sd = {"w": torch.ones(2), "tags": {"a", "b"}}
    writer = ZarrStorageWriter(path, fsync=False)
    with pytest.raises(CheckpointException) as info:
        dcp.save(sd, storage_writer=writer)
    error = failure(info.value)
    assert isinstance(error, UnsafeCheckpointError)
    assert "'tags'" in str(error) and "allow_pickle" in str(error)
    assert not path.exists()
    # DCP never calls finish() after a failed write: the staging directory of
    # the aborted save goes away with the writer's next save ... (it is still
    # there, beside its owner record, storage/_liveness.py)
    left = sorted(os.listdir(ckpt_dir))
    assert len(left) == 2 and left[1] == left[0] + ".owner", left
    dcp.save({"w": torch.ones(2)}, storage_writer=writer)
    assert sorted(os.listdir(ckpt_dir)) == ["ck"]
    # ... or with the writer itself
    with pytest.raises(CheckpointException):
        dcp.save(sd, storage_writer=ZarrStorageWriter(ckpt_dir / "other", fsync=False))
    gc.collect()
    assert sorted(os.listdir(ckpt_dir)) == ["ck"]

    pickled = ckpt_dir / "pickled"
    dcp.save(sd, storage_writer=ZarrStorageWriter(pickled, allow_pickle=True, fsync=False))
    assert list(manifest(pickled)["pickled"]) == ["tags"]
    with pytest.raises(UnsafeCheckpointError):
        zarrckpt.load({"w": torch.zeros(2), "tags": None}, pickled)
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(2), "tags": None}, storage_reader=ZarrStorageReader(pickled))
    assert isinstance(failure(info.value), UnsafeCheckpointError)
    target: dict[str, Any] = {"w": torch.zeros(2), "tags": None}
    dcp.load(target, storage_reader=ZarrStorageReader(pickled, allow_pickle=True))
    assert target["tags"] == {"a", "b"}
    # zarrckpt.load reads what DCP wrote with pickle too
    target = {"w": torch.zeros(2), "tags": None}
    zarrckpt.load(target, pickled, allow_pickle=True)
    assert target["tags"] == {"a", "b"}


def test_reading_never_unpickles(ckpt_dir):
    tensors_only = {"m": {"w": torch.randn(4, 4), "b": torch.randn(4).bfloat16()}}
    zarrckpt.save(tensors_only, ckpt_dir / "t", fsync=False)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("deserialization attempted")

    target = {"m": {"w": torch.zeros(4, 4), "b": torch.zeros(4, dtype=torch.bfloat16)}}
    with (
        mock.patch.multiple(pickle, load=refuse, loads=refuse, Unpickler=refuse),
        mock.patch.object(torch, "load", refuse),
    ):
        dcp.load(target, storage_reader=ZarrStorageReader(ckpt_dir / "t"))
    assert_same_state(tensors_only, target)

    # plain values go to DCP's planner as torch.save'd JSON values; the reader
    # itself never calls pickle
    sd = sample_state()
    dcp.save(sd, storage_writer=ZarrStorageWriter(ckpt_dir / "v", fsync=False))
    target = blank_like(sd)
    with mock.patch.multiple(pickle, load=refuse, loads=refuse):
        dcp.load(target, storage_reader=ZarrStorageReader(ckpt_dir / "v"))
    assert_same_state(dict(sd, view=sd["view"].contiguous()), target)


# ----------------------------------------------------------------------- reader details


def test_metadata_follows_dcp_flattening(ckpt_dir):
    sd = sample_state()
    path = ckpt_dir / "ck"
    zarrckpt.save(sd, path, fsync=False, **SMALL)
    metadata = ZarrStorageReader(path).read_metadata()
    flat, mappings = flatten_state_dict(sd)
    assert set(metadata.state_dict_metadata) == set(flat)
    assert metadata.planner_data == mappings
    for key, value in flat.items():
        md = metadata.state_dict_metadata[key]
        if isinstance(value, torch.Tensor):
            assert isinstance(md, TensorStorageMetadata), key
            assert md.size == value.shape and md.properties.dtype == value.dtype
        else:
            assert isinstance(md, BytesStorageMetadata), key
    weight = metadata.state_dict_metadata["model.layer.weight"]
    # the blocks a reader fetches independently: here the whole shard file
    assert [(list(c.offsets), list(c.sizes)) for c in weight.chunks] == [([0, 0], [40, 24])]
    assert metadata.state_dict_metadata["empty"].chunks == []

    # DCP's metadata-driven loader rebuilds the nested state dict from it
    rebuilt = _load_state_dict_from_keys(storage_reader=ZarrStorageReader(path))
    assert_same_state(dict(sd, view=sd["view"].contiguous()), rebuilt)
    part = _load_state_dict_from_keys({"model", "betas"}, storage_reader=ZarrStorageReader(path))
    assert_same_state({"model": sd["model"], "betas": sd["betas"]}, part)


class _RecordingPlanner:
    """The three LoadPlanner methods ``read_data`` uses."""

    def __init__(self, targets: dict[str, torch.Tensor]) -> None:
        self.targets = targets
        self.committed: list[str] = []

    def resolve_tensor(self, item: Any) -> torch.Tensor:
        return self.targets[item.dest_index.fqn]

    def commit_tensor(self, item: Any, tensor: torch.Tensor) -> None:
        self.committed.append(item.dest_index.fqn)

    def load_bytes(self, item: Any, value: Any) -> None:  # pragma: no cover - unused
        raise AssertionError("no byte items in this plan")


def test_read_data_reads_only_the_requested_region(ckpt_dir):
    weight = random_tensor(torch.float32, (64, 256), seed=1)  # 64 KiB: one chunk, 16 inner
    path = ckpt_dir / "ck"
    zarrckpt.save({"w": weight}, path, fsync=False, inner_chunk_bytes=4096)
    entry = manifest(path)["arrays"]["w"]
    assert entry["chunk_shape"] == [64, 256] and entry["inner_chunk_shape"] == [4, 256]

    reader = ZarrStorageReader(path)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    wanted = ChunkStorageMetadata(offsets=torch.Size([9, 0]), sizes=torch.Size([3, 256]))
    items = create_read_items_for_chunk_list("w", metadata.state_dict_metadata["w"], [wanted])
    assert [list(i.storage_offsets) for i in items] == [[9, 0]]
    # a strided destination: every other column of a wider tensor
    backing = torch.zeros(3, 512)
    planner = _RecordingPlanner({"w": backing[:, ::2]})
    reader.read_data(LoadPlan(items), planner).wait()  # type: ignore[arg-type]
    assert planner.committed == ["w"]
    assert_bits_equal(weight[9:12], backing[:, ::2])
    # rows 9..11 lie in inner chunks 2 (rows 8-11): one inner chunk + crc + shard index
    assert reader.bytes_read == 4 * 256 * 4 + 4 + 16 * 16 + 4


def test_damaged_and_uncommitted_checkpoints_are_refused(ckpt_dir):
    path = ckpt_dir / "ck"
    dcp.save({"w": torch.arange(8.0)}, storage_writer=ZarrStorageWriter(path, fsync=False))
    chunk = path / "w" / "c.0"
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x40
    chunk.write_bytes(bytes(data))
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(8)}, storage_reader=ZarrStorageReader(path))
    assert isinstance(failure(info.value), CorruptCheckpointError)

    os.remove(path / COMMIT_MARKER)
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(8)}, storage_reader=ZarrStorageReader(path))
    assert "incomplete" in str(failure(info.value))


# ----------------------------------------------------------------------- tree mapping


def test_dcp_leaves_and_tree_from_leaves():
    tree = {
        "dict": [
            ["m", {"stateful": {"dict": [["w", {"tensor": "m.w"}]]}}],
            [{"int": 2}, {"list": [{"value": 1}, {"list": [{"value": 2}]}]}],
            ["t", {"tuple": [{"tensor": "t.0"}]}],
            ["l", {"list": [{"tensor": "l.0"}, {"dict": [["a", {"value": 1}]]}, {"value": 3}]}],
            ["e", {"dict": []}],
        ]
    }
    leaves = dcp_leaves(tree)
    assert [(leaf.key, leaf.path) for leaf in leaves] == [
        ("m.w", ("m", "w")),
        ("2", ("2",)),
        ("t", ("t",)),
        ("l.0", ("l", 0)),
        ("l.1.a", ("l", 1, "a")),
        ("l.2", ("l", 2)),
    ]
    rebuilt = tree_from_leaves([(leaf.key, leaf.path, leaf.node) for leaf in leaves])
    assert rebuilt["dict"][0] == ["m", {"dict": [["w", {"tensor": "m.w"}]]}]
    assert rebuilt["dict"][3] == tree["dict"][3]
    # a list position DCP left out was an empty dict
    gap = tree_from_leaves([("x.1", ("x", 1), {"value": 0})])
    assert gap == {"dict": [["x", {"list": [{"dict": []}, {"value": 0}]}]]}
    with pytest.raises(InvalidKeyError):
        tree_from_leaves([("a", ("a",), {"value": 1}), ("a.b", ("a", "b"), {"value": 2})])
    with pytest.raises(InvalidKeyError):
        tree_from_leaves([("a", ("a",), {"value": 1}), ("a", ("a",), {"value": 2})])


# ----------------------------------------------------------------------- distributed


def test_distributed_fsdp2_tp_cross_api(tmp_path):
    root = str(tmp_path)
    ws2 = run_distributed(_dcp_cases.run_ws2, 2, root)
    ws4 = run_distributed(_dcp_cases.run_ws4, 4, root)
    for rank_result in ws2:
        assert rank_result["n_reference"] >= 6 + 6 * 3 + 2
        for name in ("dcp->dcp_tp2", "zarrckpt->dcp_tp2"):
            assert rank_result[name]["mismatched"] == [], name
            assert rank_result[name]["bytes_read"] > 0
    for rank_result in ws4:
        for name, outcome in rank_result.items():
            assert outcome["mismatched"] == [], name

    dcp_path = tmp_path / "dcp_fsdp2_ws2"
    zc_path = tmp_path / "zarrckpt_fsdp2_ws2"
    m_dcp, m_zc = manifest(dcp_path), manifest(zc_path)
    # same layout as zarrckpt.save: inner chunk = rank 0's local shard (ceil split)
    local0 = ws2[0]["local_shapes"]
    assert local0["model.fc1.weight"] == [8, 8] and local0["model.fc3.weight"] == [3, 8]
    for fqn, shape in local0.items():
        rec = m_dcp["arrays"][fqn]
        assert (rec["inner_chunk_shape"] or rec["chunk_shape"]) == shape, fqn
    assert m_dcp["arrays"] == m_zc["arrays"]
    assert m_dcp["tree"] == m_zc["tree"]
    assert m_dcp["world_size"] == 2
    assert chunk_files(dcp_path) == chunk_files(zc_path)

    m_dcp, m_zc = manifest(tmp_path / "dcp_2x2"), manifest(tmp_path / "zarrckpt_2x2")
    assert m_dcp["arrays"] == m_zc["arrays"] and m_dcp["tree"] == m_zc["tree"]
    assert m_dcp["arrays"]["model.fc1.weight"]["inner_chunk_shape"] == [4, 8]  # 16 rows, 4 ranks
    assert chunk_files(tmp_path / "dcp_2x2") == chunk_files(tmp_path / "zarrckpt_2x2")
    assert sorted(os.listdir(tmp_path)) == [
        "dcp_2x2", "dcp_fsdp2_ws2", "reference.pt", "zarrckpt_2x2", "zarrckpt_fsdp2_ws2"
    ]
