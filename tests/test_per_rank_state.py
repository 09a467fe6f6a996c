"""Per-rank state (issue 11, item 5): keys only some ranks have, divergent values, bytes.

torchtitan saves its data-loader state per data-parallel rank
(``{"dataloader": {"dp_rank_0": ...}}`` on rank 0, ``dp_rank_1`` on rank 1), and
data-loader and RNG states are often ``bytes``. The stored tree is the union of the
ranks' trees; a key with different values on different ranks is refused (never
saved from one rank silently); bytes are stored without pickle.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

import zarrckpt
from zarrckpt import convert
from zarrckpt.errors import InvalidKeyError, UnsupportedValueError
from zarrckpt.format._marker import FORMAT_VERSION
from zarrckpt.testing import run_distributed

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is (disabled|unavailable):UserWarning"
)

#: larger than the inline limit: stored as a uint8 array under ~bytes/
BIG = 5000


def _blob(seed: int, n: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())


def _loader_state(rank: int) -> dict[str, Any]:
    """What rank ``rank``'s data loader would save (different on every rank)."""
    return {
        "pos": 100 + rank,
        "epoch": 2,
        "buffer": [rank, 0.5 + rank, None],
        "state": _blob(rank, 37),  # inline bytes
        "snapshot": _blob(10 + rank, BIG),  # bytes stored as an array
    }


def _empty_loader_state() -> dict[str, Any]:
    return {"pos": -1, "epoch": -1, "buffer": [0, 0.0, 0], "state": b"", "snapshot": b""}


def _common(rank: int) -> dict[str, Any]:
    """State every rank holds the same (model weights, step, RNG bytes)."""
    return {
        "model": {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)},
        "step": 7,
        "rng": _blob(99, 64),
        "big_rng": _blob(98, BIG),
    }


def _outcome(fn: Any) -> dict[str, Any]:
    try:
        return {"ok": True, "value": fn()}
    # reported to the parent process, checked there (DCP's CheckpointException is a
    # BaseException)
    except BaseException as e:
        return {
            "ok": False,
            "type": type(e).__name__,
            "zarrckpt_error": isinstance(e, zarrckpt.errors.ZarrCkptError),
            "message": str(e),
            "traceback": traceback.format_exc(),
        }


def _scenarios(rank: int, world_size: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}

    # per-rank keys: the torchtitan layout, each rank its own data-loader key
    per_rank = os.path.join(root, "per_rank")

    def save_per_rank() -> dict[str, Any]:
        sd = {**_common(rank), "dataloader": {f"dp_rank_{rank}": _loader_state(rank)}}
        zarrckpt.save(sd, per_rank)
        target = {
            "model": {"w": torch.zeros(3, 4)},
            "step": 0,
            "rng": b"",
            "big_rng": b"",
            "dataloader": {f"dp_rank_{rank}": _empty_loader_state()},
        }
        zarrckpt.load(target, per_rank)
        return target

    out["per_rank"] = _outcome(save_per_rank)

    # the same with JSON values only (no bytes) and a tensor of each rank's own
    plain = os.path.join(root, "per_rank_plain")

    def save_per_rank_plain() -> dict[str, Any]:
        own = {"pos": 100 + rank, "buffer": [rank, 0.5], "seen": torch.full((3,), float(rank))}
        zarrckpt.save({"step": 7, "dataloader": {f"dp_rank_{rank}": own}}, plain)
        target = {
            "step": 0,
            "dataloader": {f"dp_rank_{rank}": {"pos": 0, "buffer": [0, 0], "seen": torch.zeros(3)}},
        }
        zarrckpt.load(target, plain)
        return target

    out["per_rank_plain"] = _outcome(save_per_rank_plain)

    # the same through dcp.save and the DCP plug-in (bytes via DCP's BYTE_IO, no pickle)
    via_dcp = os.path.join(root, "per_rank_dcp")

    def save_per_rank_dcp() -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        sd = {**_common(rank), "dataloader": {f"dp_rank_{rank}": _loader_state(rank)}}
        dcp.save(sd, storage_writer=zarrckpt.ZarrStorageWriter(via_dcp))
        target = {
            "model": {"w": torch.zeros(3, 4)},
            "big_rng": b"",
            "dataloader": {f"dp_rank_{rank}": _empty_loader_state()},
        }
        zarrckpt.load(target, via_dcp)
        return target

    out["per_rank_dcp"] = _outcome(save_per_rank_dcp)

    # a plain tensor only rank 1 has (written by rank 1)
    only_one = os.path.join(root, "only_rank1")

    def save_only_rank1() -> Any:
        sd: dict[str, Any] = {"shared": torch.ones(2)}
        if rank == 1:
            sd["extra"] = torch.arange(6, dtype=torch.float64).reshape(2, 3) * 1.5
        zarrckpt.save(sd, only_one)
        if rank == 1:
            target = {"shared": torch.zeros(2), "extra": torch.zeros(2, 3, dtype=torch.float64)}
        else:
            target = {"shared": torch.zeros(2)}
        zarrckpt.load(target, only_one)
        return target

    out["only_rank1"] = _outcome(save_only_rank1)

    # divergent values: refused on every rank, the previous checkpoint intact
    def refused(name: str, make: Any) -> dict[str, Any]:
        path = os.path.join(root, name)
        zarrckpt.save({"old": torch.full((2,), 3.0), "lr": 0.5}, path)
        result = _outcome(lambda: zarrckpt.save(make(), path, overwrite=True))

        def load_previous() -> dict[str, Any]:
            target = {"old": torch.zeros(2), "lr": 0.0}
            zarrckpt.load(target, path)
            return target

        result["previous"] = _outcome(load_previous)
        result["entries"] = sorted(os.listdir(root))
        return result

    out["divergent_float"] = refused(
        "divergent_float", lambda: {"model": {"w": torch.ones(2)}, "lr": 0.1 if rank == 0 else 0.2}
    )
    out["divergent_int_bool"] = refused(
        "divergent_int_bool", lambda: {"flag": 1 if rank == 0 else True}
    )
    out["divergent_list_length"] = refused(
        "divergent_list_length", lambda: {"losses": [0.5, 0.4] if rank == 0 else [0.5]}
    )
    out["divergent_bytes"] = refused(
        "divergent_bytes", lambda: {"rng": _blob(rank, 16)}
    )
    out["divergent_big_bytes"] = refused(
        "divergent_big_bytes", lambda: {"rng": _blob(rank, BIG)}
    )
    out["tensor_vs_value"] = refused(
        "tensor_vs_value", lambda: {"x": torch.ones(2) if rank == 0 else 3}
    )
    out["dict_vs_list"] = refused(
        "dict_vs_list", lambda: {"x": {"a": 1} if rank == 0 else [1]}
    )
    return out


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Every 2-rank scenario in one process group (each checked by its own test)."""
    root = tmp_path_factory.mktemp("per_rank")
    return root, run_distributed(_scenarios, 2, str(root))


def _ok(result: dict[str, Any]) -> Any:
    assert result["ok"], result.get("traceback")
    return result["value"]


# --------------------------------------------------------------------------- per-rank keys


def test_per_rank_plain_keys_each_rank_loads_its_own(distributed):
    root, results = distributed
    for rank, result in enumerate(results):
        loaded = _ok(result["per_rank_plain"])
        own = loaded["dataloader"][f"dp_rank_{rank}"]
        assert own["pos"] == 100 + rank and own["buffer"] == [rank, 0.5]
        assert torch.equal(own["seen"], torch.full((3,), float(rank)))
    assert zarrckpt.open(root / "per_rank_plain").keys() == [
        "dataloader.dp_rank_0.seen",
        "dataloader.dp_rank_1.seen",
    ]


def test_per_rank_keys_each_rank_loads_its_own(distributed):
    _, results = distributed
    for rank, result in enumerate(results):
        loaded = _ok(result["per_rank"])
        assert loaded["dataloader"] == {f"dp_rank_{rank}": _loader_state(rank)}
        assert torch.equal(loaded["model"]["w"], _common(rank)["model"]["w"])
        assert loaded["step"] == 7
        assert loaded["rng"] == _common(rank)["rng"]
        assert loaded["big_rng"] == _common(rank)["big_rng"]


def test_per_rank_bytes_through_dcp_save_without_pickle(distributed):
    root, results = distributed
    for rank, result in enumerate(results):
        loaded = _ok(result["per_rank_dcp"])
        assert loaded["dataloader"] == {f"dp_rank_{rank}": _loader_state(rank)}
        assert loaded["big_rng"] == _common(rank)["big_rng"]
    manifest = zarrckpt.open(root / "per_rank_dcp").metadata
    assert manifest["pickled"] == {}
    assert sorted(manifest["bytes"]) == [
        "big_rng",
        "dataloader.dp_rank_0.snapshot",
        "dataloader.dp_rank_1.snapshot",
    ]


def test_per_rank_keys_load_on_one_process_with_both_ranks_keys(distributed):
    root, results = distributed
    _ok(results[0]["per_rank"])
    target = {
        "dataloader": {"dp_rank_0": _empty_loader_state(), "dp_rank_1": _empty_loader_state()},
        "step": 0,
    }
    zarrckpt.load(target, root / "per_rank")
    assert target["dataloader"] == {"dp_rank_0": _loader_state(0), "dp_rank_1": _loader_state(1)}
    state = zarrckpt.open(root / "per_rank").state_dict()
    assert list(state["dataloader"]) == ["dp_rank_0", "dp_rank_1"]
    assert state["dataloader"]["dp_rank_1"]["snapshot"] == _blob(11, BIG)
    # each rank's large bytes value is its own array; the shared one is stored once
    manifest = zarrckpt.open(root / "per_rank").metadata
    assert sorted(manifest["bytes"]) == [
        "big_rng",
        "dataloader.dp_rank_0.snapshot",
        "dataloader.dp_rank_1.snapshot",
    ]
    assert manifest["world_size"] == 2


def test_plain_tensor_only_on_rank_1(distributed):
    root, results = distributed
    assert list(_ok(results[0]["only_rank1"])) == ["shared"]
    loaded = _ok(results[1]["only_rank1"])
    expected = torch.arange(6, dtype=torch.float64).reshape(2, 3) * 1.5
    assert torch.equal(loaded["extra"], expected)
    assert torch.equal(loaded["shared"], torch.ones(2))
    ckpt = zarrckpt.open(root / "only_rank1")
    assert ckpt.keys() == ["shared", "extra"]
    assert torch.equal(ckpt.read("extra"), expected)


# --------------------------------------------------------------------------- divergent values


def _check_refused(results: list[dict[str, Any]], name: str, *needles: str) -> str:
    """The save raised InvalidKeyError on every rank; the old checkpoint is intact."""
    messages = []
    for result in results:
        outcome = result[name]
        assert not outcome["ok"], f"{name}: the save succeeded on a rank"
        assert outcome["type"] == "InvalidKeyError", outcome["traceback"]
        assert outcome["zarrckpt_error"]
        for needle in needles:
            assert needle in outcome["message"], (needle, outcome["message"])
        assert name in outcome["message"]  # the path
        previous = _ok(outcome["previous"])
        assert torch.equal(previous["old"], torch.full((2,), 3.0))
        assert previous["lr"] == 0.5
        # no staging directory left behind
        assert [e for e in outcome["entries"] if e.startswith(f".{name}")] == []
        messages.append(outcome["message"])
    return messages[0]


def test_divergent_plain_values_are_refused(distributed):
    _, results = distributed
    message = _check_refused(results, "divergent_float", "'lr'", "rank 0: 0.1", "rank 1: 0.2")
    assert "per-rank" in message and "dp_rank_0" in message
    _check_refused(results, "divergent_int_bool", "'flag'", "rank 0: 1", "rank 1: True")
    _check_refused(
        results,
        "divergent_list_length",
        "'losses'",
        "rank 0: a list of 2: [0.5, 0.4]",
        "rank 1: a list of 1: [0.5]",
    )


def test_divergent_bytes_are_refused(distributed):
    _, results = distributed
    _check_refused(results, "divergent_bytes", "'rng'", f"rank 0: {_blob(0, 16)!r}")
    message = _check_refused(results, "divergent_big_bytes", "'rng'", f"{BIG} bytes, sha256")
    assert "rank 0" in message and "rank 1" in message


def test_mixed_type_conflicts_are_refused(distributed):
    _, results = distributed
    _check_refused(
        results, "tensor_vs_value", "'x'", "rank 0 has a tensor", "rank 1 has a plain value (3)"
    )
    _check_refused(
        results, "dict_vs_list", "'x'", "rank 0 has a dict ({'a': 1})", "rank 1 has a list ([1])"
    )


# --------------------------------------------------------------------------- bytes, one process


def _bytes_state() -> dict[str, Any]:
    return {
        "w": torch.arange(4.0),
        "small": b"\x00\x01abc\xff",
        "empty": b"",
        "array": bytearray(b"mutable"),
        "big": _blob(1, BIG),
        "big_array": bytearray(_blob(2, BIG)),
        "nested": [b"x", (b"", _blob(3, BIG)), {"k": b"v"}],
    }


def _empty_bytes_target() -> dict[str, Any]:
    return {
        "w": torch.zeros(4),
        "small": b"",
        "empty": b"?",
        "array": b"",
        "big": b"",
        "big_array": b"",
        "nested": [b"", (b"", b""), {"k": b""}],
    }


def _assert_same(loaded: dict[str, Any], expected: dict[str, Any]) -> None:
    assert torch.equal(loaded["w"], expected["w"])
    for key in ("small", "empty", "array", "big", "big_array", "nested"):
        assert loaded[key] == expected[key], key
    assert type(loaded["small"]) is bytes and type(loaded["big"]) is bytes
    assert type(loaded["array"]) is bytearray and type(loaded["big_array"]) is bytearray


def test_bytes_round_trip_without_pickle(tmp_path):
    path = tmp_path / "ckpt"
    expected = _bytes_state()
    zarrckpt.save(expected, path)  # no allow_pickle
    target = _empty_bytes_target()
    zarrckpt.load(target, path)
    _assert_same(target, expected)
    ckpt = zarrckpt.open(path)
    _assert_same(ckpt.state_dict(), expected)
    assert ckpt.metadata["pickled"] == {}
    assert sorted(ckpt.metadata["bytes"]) == ["big", "big_array", "nested.1.1"]
    assert ckpt.keys() == ["w"]  # bytes values are not tensors
    assert ckpt.info().format_version == FORMAT_VERSION  # v1 readers do not know bytes
    assert (path / "~bytes" / "big" / "zarr.json").is_file()
    assert zarrckpt.inspect.verify(path).ok


def test_checkpoints_without_bytes_are_format_version_2_too(tmp_path):
    zarrckpt.save({"w": torch.ones(2), "step": 1}, tmp_path / "ckpt")
    assert zarrckpt.open(tmp_path / "ckpt").info().format_version == FORMAT_VERSION


def test_bytes_in_tree_ls_info_and_diff(tmp_path, capsys):
    from zarrckpt.cli import main
    from zarrckpt.inspect import BytesInfo

    path = tmp_path / "ckpt"
    zarrckpt.save(_bytes_state(), path)
    tree = zarrckpt.open(path).tree()
    assert tree["small"] == BytesInfo(6, "bytes")
    assert tree["big_array"] == BytesInfo(BIG, "bytearray")
    assert tree["nested"][1] == (BytesInfo(0, "bytes"), BytesInfo(BIG, "bytes"))
    for command in (["tree"], ["tree", "--json"], ["ls"], ["info"], ["verify"]):
        assert main([*command, str(path)]) == 0, command
    text = capsys.readouterr().out
    assert "bytearray (5000 bytes)" in text
    changed = _bytes_state()
    changed["small"] = b"other"
    changed["big"] = _blob(7, BIG)
    zarrckpt.save(changed, tmp_path / "other")
    report = zarrckpt.open(path).diff(tmp_path / "other")
    assert sorted(report.values_changed) == ["big", "small"]
    assert zarrckpt.open(path).diff(path).values_changed == {}


def test_bytes_through_converters(tmp_path):
    path = tmp_path / "ckpt"
    expected = _bytes_state()
    zarrckpt.save(expected, path)
    convert.to_torch_save(path, tmp_path / "a.pt")
    # b"" included: the file loads with PyTorch's weights-only unpickler
    _assert_same(torch.load(tmp_path / "a.pt", weights_only=True), expected)
    convert.from_torch_save(tmp_path / "a.pt", tmp_path / "from_pt")
    _assert_same(zarrckpt.open(tmp_path / "from_pt").state_dict(), expected)
    target = _empty_bytes_target()
    zarrckpt.load(target, tmp_path / "a.pt")
    _assert_same(target, expected)
    convert.to_dcp(path, tmp_path / "dcp")
    convert.from_dcp(tmp_path / "dcp", tmp_path / "from_dcp")
    _assert_same(zarrckpt.open(tmp_path / "from_dcp").state_dict(), expected)
    # safetensors metadata carries small bytes, refuses large ones clearly
    with pytest.raises(UnsupportedValueError, match="bytes values larger than 4096 bytes"):
        convert.to_safetensors(path, tmp_path / "a.safetensors")
    small = {"w": torch.ones(2), "s": b"abc", "e": b"", "ba": bytearray(b"z")}
    zarrckpt.save(small, tmp_path / "small")
    convert.to_safetensors(tmp_path / "small", tmp_path / "s.safetensors")
    target2 = {"w": torch.zeros(2), "s": b"", "e": b"?", "ba": b""}
    zarrckpt.load(target2, tmp_path / "s.safetensors")
    assert target2["s"] == b"abc" and target2["e"] == b"" and target2["ba"] == bytearray(b"z")


def test_bytes_through_the_dcp_plugins_without_pickle(tmp_path):
    import torch.distributed.checkpoint as dcp

    expected = _bytes_state()
    del expected["nested"]  # a tuple holding bytes is fine, but keep DCP's flattening simple
    dcp.save(dict(expected), storage_writer=zarrckpt.ZarrStorageWriter(tmp_path / "ckpt"))
    ckpt = zarrckpt.open(tmp_path / "ckpt")
    assert ckpt.metadata["pickled"] == {}
    assert sorted(ckpt.metadata["bytes"]) == ["big", "big_array"]
    state = ckpt.state_dict()
    for key in expected:
        if key != "w":
            assert state[key] == expected[key] and type(state[key]) is type(expected[key]), key
    target = _empty_bytes_target()
    del target["nested"]
    dcp.load(target, storage_reader=zarrckpt.ZarrStorageReader(tmp_path / "ckpt"))
    for key in expected:
        if key != "w":
            assert target[key] == expected[key], key


def test_keys_colliding_across_ranks_are_refused():
    from zarrckpt.format._tree_merge import merge_trees

    trees = [
        {"dict": [["a.b", {"value": 1}]]},
        {"dict": [["a", {"dict": [["b", {"value": 1}]]}]]},
    ]
    with pytest.raises(InvalidKeyError, match="flatten to the same key 'a.b'"):
        merge_trees(trees, path="p")
