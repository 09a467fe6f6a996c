"""No pickle unless asked for, at save and at load.

* a custom object: save refuses (UnsafeCheckpointError naming the key), saves
  with allow_pickle=True; loading that checkpoint refuses without
  allow_pickle, works with it;
* with pickle.loads / load / dumps / dump / Unpickler / Pickler patched to
  raise, every kind of checkpoint is saved, loaded and opened (read, zarr,
  dask, state_dict).
"""

from __future__ import annotations

import collections
import os
import pickle
from typing import Any

import pytest
import torch
from conftest import DTYPES, assert_bits_equal, dtype_name, random_tensor, save_fast

import zarrckpt
from zarrckpt.errors import UnsafeCheckpointError, UnsupportedValueError


class Custom:
    """Neither a tensor, a JSON value nor Stateful."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.value == self.value


Point = collections.namedtuple("Point", "x y")


class MyList(list):  # noqa: FURB189 - a list subclass on purpose
    pass


class MyDict(dict):  # noqa: FURB189
    pass


@pytest.mark.parametrize(
    "leaf,typename",
    [
        (Custom(3), "Custom"),
        ({1, 2}, "set"),
        (memoryview(b"bytes"), "memoryview"),  # bytes / bytearray are stored (data)
        (3 + 4j, "complex"),
        (Point(1, 2), "Point"),
        (MyList([1]), "MyList"),
        (torch.float32, "dtype"),
        (torch.device("cpu"), "device"),
        (slice(1, 2), "slice"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v,
)
def test_save_refuses_non_json_objects(ckpt_dir: Any, leaf: Any, typename: str) -> None:
    path = ckpt_dir / "refused"
    with pytest.raises(UnsafeCheckpointError) as info:
        zarrckpt.save({"model": {"w": torch.zeros(2)}, "extra": {"obj": leaf}}, path)
    msg = str(info.value)
    assert "extra.obj" in msg, msg
    assert typename in msg, msg
    assert str(path) in msg
    assert "allow_pickle" in msg
    assert not os.path.exists(path)
    assert os.listdir(ckpt_dir) == []


def test_dict_subclass_is_refused_or_kept_as_dict(ckpt_dir: Any) -> None:
    """A dict subclass either needs pickle (refused) or is stored as a plain dict."""
    path = ckpt_dir / "dsub"
    try:
        save_fast({"d": MyDict(a=1)}, path)
    except UnsafeCheckpointError as e:
        assert "'d'" in str(e) or "d" in str(e)
        return
    target: dict[str, Any] = {"d": None}
    zarrckpt.load(target, path)
    assert target["d"] == {"a": 1}


def test_allow_pickle_round_trip(ckpt_dir: Any) -> None:
    path = ckpt_dir / "pickled"
    sd = {"w": torch.arange(3), "obj": Custom(7), "pt": Point(1, [2, 3]), "s": {1, 2}}
    save_fast(sd, path, allow_pickle=True)

    # load refuses without allow_pickle, and names the path and a pickled key
    target: dict[str, Any] = {
        "w": torch.zeros(3, dtype=torch.int64),
        "obj": None,
        "pt": None,
        "s": None,
    }
    with pytest.raises(UnsafeCheckpointError) as info:
        zarrckpt.load(target, path)
    assert str(path) in str(info.value) and "obj" in str(info.value)
    assert target["obj"] is None and torch.equal(target["w"], torch.zeros(3, dtype=torch.int64))
    # even when the target does not ask for the pickled keys
    with pytest.raises(UnsafeCheckpointError):
        zarrckpt.load({"w": torch.zeros(3, dtype=torch.int64)}, path)

    zarrckpt.load(target, path, allow_pickle=True)
    assert torch.equal(target["w"], torch.arange(3))
    assert target["obj"] == Custom(7)
    assert target["pt"] == Point(1, [2, 3]) and type(target["pt"]) is Point
    assert target["s"] == {1, 2}

    # open() is fine (it unpickles nothing); state_dict() needs allow_pickle
    ckpt = zarrckpt.open(path)
    assert torch.equal(ckpt.read("w"), torch.arange(3))
    with pytest.raises(UnsafeCheckpointError):
        ckpt.state_dict()
    assert ckpt.state_dict(allow_pickle=True)["obj"] == Custom(7)


def test_pickled_payload_not_executed_without_allow_pickle(ckpt_dir: Any, monkeypatch: Any) -> None:
    """A malicious object in a checkpoint: nothing runs unless allow_pickle=True."""
    path = ckpt_dir / "evil"
    marker = ckpt_dir / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    save_fast({"x": torch.ones(1), "evil": Evil()}, path, allow_pickle=True)
    calls = []
    real_loads = pickle.loads

    def spy_loads(data: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(bytes(data))
        return real_loads(data, *args, **kwargs)

    monkeypatch.setattr(pickle, "loads", spy_loads)
    with pytest.raises(UnsafeCheckpointError):
        zarrckpt.load({"x": torch.zeros(1), "evil": None}, path)
    ckpt = zarrckpt.open(path)
    ckpt.read("x")
    ckpt.to_dask()["x"].compute()
    with pytest.raises(UnsafeCheckpointError):
        ckpt.state_dict()
    # (dask's compute() pickles its own classes; no stored byte reaches pickle)
    assert not any(str(marker).encode() in c for c in calls)
    assert not marker.exists()
    zarrckpt.load({"evil": None}, path, allow_pickle=True)
    assert marker.exists()  # the control: with allow_pickle the payload does run


# ----------------------------------------------------------------- pickle patched out


class _PickleUsed(AssertionError):
    pass


def _forbid(*args: Any, **kwargs: Any) -> Any:
    raise _PickleUsed(f"pickle was called: {args[:1]!r:.200}")


class _ForbiddenClass:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise _PickleUsed("pickle.Pickler/Unpickler was instantiated")


class Stateful:
    def __init__(self) -> None:
        self.step = 0
        self.t = torch.zeros(3)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "t": self.t}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = sd["step"]
        self.t.copy_(sd["t"])


def _every_kind_of_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(state to save, matching load target)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    counter = Stateful()
    counter.step, counter.t = 9, torch.randn(3)
    sd: dict[str, Any] = {
        "model": model,
        "optim": opt,
        "counter": counter,
        "json": {"a": [1, 2.5, float("nan"), None, "s", True, (1, 2)], 3: {"x": -0.0}},
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(10, 8)[::3, 1::2],
        "big_sharded": torch.randn(500, 100),  # sharded with the options below
        "../hostile/ké😀": torch.ones(2),
        "long" * 200: torch.ones(1),
    }
    for dtype in DTYPES:
        sd[f"dt.{dtype_name(dtype)}"] = random_tensor(dtype, (7, 5), 1)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt2 = torch.optim.Adam(model2.parameters())
    model2(torch.randn(2, 4)).sum().backward()
    opt2.step()
    target = {
        k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None
        for k, v in sd.items()
        if k not in ("model", "optim", "counter")
    }
    target.update({"model": model2, "optim": opt2, "counter": Stateful()})
    target["strided"] = torch.zeros(4, 4)
    return sd, target


def test_default_path_never_uses_pickle(ckpt_dir: Any, monkeypatch: Any) -> None:
    import dask.array  # noqa: F401 - imported before pickle is patched: its imports use pickle
    import tensorstore  # noqa: F401
    import zarr  # noqa: F401

    sd, target = _every_kind_of_state()
    path = ckpt_dir / "nopickle"
    dask_allowed: set[bytes] = set()
    real_dumps, real_loads = pickle.dumps, pickle.loads

    # dask's compute() tokenizes its own expression *classes* with pickle.dumps
    # (by reference) and loads them back; that is dask's business and never
    # touches checkpoint data. Allow exactly that, nothing else.
    def dumps_classes_only(obj: Any, *args: Any, **kwargs: Any) -> bytes:
        if isinstance(obj, type) and obj.__module__.startswith("dask"):
            out = real_dumps(obj, *args, **kwargs)
            dask_allowed.add(out)
            return out
        return _forbid(obj)

    def loads_own_dumps_only(data: Any, *args: Any, **kwargs: Any) -> Any:
        if bytes(data) in dask_allowed:
            return real_loads(data, *args, **kwargs)
        return _forbid(data)

    for name in ("loads", "load", "dumps", "dump"):
        monkeypatch.setattr(pickle, name, _forbid)
    monkeypatch.setattr(pickle, "Unpickler", _ForbiddenClass)
    monkeypatch.setattr(pickle, "Pickler", _ForbiddenClass)
    monkeypatch.setattr(pickle, "_Unpickler", _ForbiddenClass)
    monkeypatch.setattr(pickle, "_Pickler", _ForbiddenClass)

    for options in ({}, {"chunk_bytes": 50_000, "inner_chunk_bytes": 5_000}):
        p = path / str(len(options))
        path.mkdir(exist_ok=True)
        zarrckpt.save(sd, p, fsync=False, **options)
        zarrckpt.save(sd, p, fsync=False, overwrite=True, **options)
        sd_fresh, target = _every_kind_of_state()
        zarrckpt.load(target, p)
        zarrckpt.load({"scalar": torch.empty(0, device="meta").new_empty((), device="meta")}, p)
        for k, v in sd.items():
            if isinstance(v, torch.Tensor):
                assert_bits_equal(v, target[k], k)
        assert target["counter"].step == 9
        assert target["json"] == sd["json"] or str(target["json"]) == str(sd["json"])
        ckpt = zarrckpt.open(p)
        ckpt.state_dict()
        arrays = ckpt.to_dask()
        for k in ckpt:
            ckpt.read(k)
            ckpt[k][...]
        monkeypatch.setattr(pickle, "dumps", dumps_classes_only)
        monkeypatch.setattr(pickle, "loads", loads_own_dumps_only)
        for k in ckpt:
            arrays[k].compute()
        monkeypatch.setattr(pickle, "dumps", _forbid)
        monkeypatch.setattr(pickle, "loads", _forbid)
        # the stored files hold no pickle stream either (protocol 2+ starts with 0x80)
        for dirpath, _dirs, files in os.walk(p):
            assert "~pickle" not in dirpath
            for f in files:
                if f.endswith(".json"):
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        assert not fh.read(1).startswith(b"\x80")
    # control: the patch is effective (a save that needs pickle does hit it)
    with pytest.raises((_PickleUsed, UnsupportedValueError)) as info:
        zarrckpt.save({"o": Custom(1)}, path / "control", allow_pickle=True, fsync=False)
    assert isinstance(info.value, _PickleUsed) or isinstance(info.value.__cause__, _PickleUsed)
    assert not (path / "control").exists()
