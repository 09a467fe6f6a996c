"""Keys: hostile FQNs, the FQN <-> path mapping, missing keys, shape mismatches, strict.

Every hostile key either round-trips or is refused with InvalidKeyError; no key
can place a file outside the checkpoint directory; plain zarr (in a subprocess
that never imports zarrckpt) and tensorstore open the array of a 10 000
character key.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from conftest import (
    assert_bits_equal,
    digest,
    plain_zarr_digests,
    save_fast,
    tensorstore_read,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import zarrckpt
from zarrckpt.errors import (
    InvalidKeyError,
    MissingKeysError,
    ShapeMismatchError,
    StateDictMismatchError,
)
from zarrckpt.format._fqn import fqn_to_path, path_to_fqn

LONG = "x" * 10_000
LONG_UNICODE = "é" * 3000 + "😀" * 500 + ".weight"

HOSTILE: list[str] = [
    "../../etc/passwd",
    "../escape",
    "a/b",
    "/abs/path",
    "a/../../..",
    ".",
    "..",
    "...",
    ".hidden",
    "a\x00b",
    "\x00",
    "😀",
    "中文键",
    "שלום\u202eעולם",  # RTL + right-to-left override
    "é",  # NFC
    "e\u0301",  # NFD: a different key that looks the same
    LONG,
    LONG_UNICODE,
    "y" * 255,
    "y" * 256,
    "zarr.json",
    "zarrckpt.commit",
    "c",
    "__x",
    "__",
    "~",
    "~pickle",
    "a~",
    "%2F",
    "%",
    "%%",
    "%zz",
    "a%2Fb",
    " ",
    "\n\t\r",
    "\\",
    "..\\..\\windows",
    "CON",
    "a:b",
    "*?<>|\"'",
    "=",
    "a=b",
]


def _value(i: int) -> torch.Tensor:
    return torch.full((2, 3), i, dtype=torch.int32)


@pytest.fixture(scope="module")
def hostile_ckpt(tmp_path_factory: Any) -> tuple[str, str, dict[str, Any]]:
    """All hostile keys in one checkpoint, inside a fresh directory tree.

    Returns (sandbox, checkpoint path, listing of the sandbox before the save).
    """
    sandbox = tmp_path_factory.mktemp("hostile")
    inner = sandbox / "a" / "b"
    inner.mkdir(parents=True)
    (sandbox / "etc").mkdir()
    (sandbox / "etc" / "passwd").write_text("root:x:0:0")
    before = _listing(sandbox)
    ckpt = str(inner / "ckpt")
    sd = {k: _value(i) for i, k in enumerate(HOSTILE)}
    sd["nested"] = {"../../up": _value(1000), "a/b": {"..": _value(1001)}}
    save_fast(sd, ckpt)
    return str(sandbox), ckpt, before


def _listing(root: Any) -> set[str]:
    out = set()
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def test_hostile_keys_round_trip(hostile_ckpt: Any) -> None:
    _, ckpt, _ = hostile_ckpt
    target: dict[str, Any] = {k: torch.zeros(2, 3, dtype=torch.int32) for k in HOSTILE}
    target["nested"] = {
        "../../up": torch.zeros(2, 3, dtype=torch.int32),
        "a/b": {"..": torch.zeros(2, 3, dtype=torch.int32)},
    }
    zarrckpt.load(target, ckpt)
    for i, k in enumerate(HOSTILE):
        assert_bits_equal(_value(i), target[k], repr(k[:40]))
    assert_bits_equal(_value(1000), target["nested"]["../../up"])
    assert_bits_equal(_value(1001), target["nested"]["a/b"][".."])
    opened = zarrckpt.open(ckpt)
    assert set(opened.keys()) == set(HOSTILE) | {"nested.../../up", "nested.a/b..."}
    for i, k in enumerate(HOSTILE):
        assert_bits_equal(_value(i), opened.read(k), repr(k[:40]))
        assert_bits_equal(_value(i), opened[k][...], repr(k[:40]))
    assert_bits_equal(_value(1001), opened.read("nested.a/b..."))


def test_no_file_outside_the_checkpoint(hostile_ckpt: Any) -> None:
    sandbox, ckpt, before = hostile_ckpt
    after = _listing(sandbox)
    rel = os.path.relpath(ckpt, sandbox)
    created = {p for p in after - before if p != rel and not p.startswith(rel + os.sep)}
    assert created == set()
    assert (before - after) == set()
    with open(os.path.join(sandbox, "etc", "passwd")) as f:
        assert f.read() == "root:x:0:0"
    # every file of the checkpoint really is below it (no symlink or '..' trick)
    real = os.path.realpath(ckpt)
    for dirpath, dirs, files in os.walk(ckpt):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            assert not os.path.islink(p)
            assert os.path.realpath(p).startswith(real + os.sep)
            assert len(name.encode()) <= 255


def test_every_array_has_its_own_directory(hostile_ckpt: Any) -> None:
    _, ckpt, _ = hostile_ckpt
    arrays = zarrckpt.open(ckpt).metadata["arrays"]
    paths = [rec["path"] for rec in arrays.values()]
    assert len(set(paths)) == len(paths)
    for p in paths:  # no array path is a prefix (ancestor) of another
        assert not any(q.startswith(p + "/") for q in paths)
        assert os.path.isfile(os.path.join(ckpt, p, "zarr.json"))


def test_long_key_readable_by_plain_zarr_and_tensorstore(hostile_ckpt: Any) -> None:
    _, ckpt, _ = hostile_ckpt
    arrays = zarrckpt.open(ckpt).metadata["arrays"]
    for key in (LONG, LONG_UNICODE, "😀", "a\x00b", "../../etc/passwd"):
        path = arrays[key]["path"]
        assert path == fqn_to_path(key)
        expected = _value(HOSTILE.index(key))
        assert digest(tensorstore_read(ckpt, path)) == digest(expected), repr(key[:20])
    paths = [arrays[k]["path"] for k in (LONG, LONG_UNICODE, "😀", "a\x00b", "../../etc/passwd")]
    got = plain_zarr_digests(ckpt, paths)
    for key, path in zip(
        (LONG, LONG_UNICODE, "😀", "a\x00b", "../../etc/passwd"), paths, strict=True
    ):
        assert got[path] == digest(_value(HOSTILE.index(key))), repr(key[:20])


def test_long_key_recorded_in_array_attributes(hostile_ckpt: Any) -> None:
    """A long key's path is not reversible; its zarr.json names the key."""
    import json

    _, ckpt, _ = hostile_ckpt
    for key in (LONG, LONG_UNICODE):
        with open(os.path.join(ckpt, fqn_to_path(key), "zarr.json"), encoding="utf-8") as f:
            assert json.load(f)["attributes"]["zarrckpt"]["fqn"] == key


def test_escaping_twins_are_distinct(ckpt_dir: Any) -> None:
    """Keys that differ only by escaping never share a path."""
    twins = ["a/b", "a%2Fb", "a%252Fb", "a.b", "a%2Eb", "~", "%7E", ".", "%2E", "é", "%C3%A9"]
    sd = {k: torch.tensor([i]) for i, k in enumerate(twins)}
    save_fast(sd, ckpt_dir / "twins")
    target = {k: torch.tensor([-1]) for k in twins}
    zarrckpt.load(target, ckpt_dir / "twins")
    assert [int(target[k]) for k in twins] == list(range(len(twins)))
    assert len({fqn_to_path(k) for k in twins}) == len(twins)


@pytest.mark.parametrize(
    "state,needle",
    [
        ({"": torch.zeros(1)}, "empty"),
        ({"a": {"": torch.zeros(1)}}, None),  # nested empty key -> FQN "a." is not empty
        ({"\ud800": torch.zeros(1)}, "Unicode"),  # lone surrogate: not encodable
        ({("t", 1): torch.zeros(1)}, "tuple"),
        ({1.5: torch.zeros(1)}, "float"),
        ({"a.b": torch.zeros(1), "a": {"b": torch.zeros(1)}}, "a.b"),  # same FQN twice
        ({"x.0": 1, "x": [2]}, "x.0"),
        ({1: torch.zeros(1), "1": torch.zeros(1)}, "'1'"),
    ],
    ids=[
        "empty",
        "nested-empty",
        "surrogate",
        "tuple-key",
        "float-key",
        "dup",
        "dup-plain",
        "int-str",
    ],
)
def test_invalid_keys_refused(ckpt_dir: Any, state: dict[Any, Any], needle: str | None) -> None:
    path = ckpt_dir / "bad"
    if needle is None:  # FQN "a." is legal: round-trips
        save_fast(state, path)
        target = {"a": {"": torch.ones(1)}}
        zarrckpt.load(target, path)
        assert torch.equal(target["a"][""], torch.zeros(1))
        return
    with pytest.raises(InvalidKeyError) as info:
        zarrckpt.save(state, path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)
    assert not os.path.exists(path)
    assert os.listdir(ckpt_dir) == []


# ----------------------------------------------------------------- fqn_to_path / path_to_fqn

# text with the characters that matter most, plus arbitrary Unicode (no surrogates)
_ALPHABET = st.one_of(
    st.sampled_from(list("a.%~/_-=\\ \x00\n") + ["é", "😀", "中", "\u202e", "A", "z", "0"]),
    st.characters(exclude_categories=("Cs",)),
)
_KEYS = st.one_of(
    st.text(_ALPHABET, min_size=1, max_size=40),
    st.text(_ALPHABET, min_size=60, max_size=500),
    st.builds(
        lambda a, n, b: a + "x" * n + b,
        st.text(_ALPHABET, max_size=5),
        st.integers(150, 500),
        st.text(_ALPHABET, max_size=200),
    ),
)


def _check_components(path: str) -> None:
    assert not path.startswith("/") and not path.endswith("/")
    parts = path.split("/")
    for part in parts:
        assert part not in ("", ".", ".."), path
        assert len(part.encode("utf-8")) <= 255, (len(part.encode()), path[:80])
        assert "\x00" not in part and "\\" not in part
        assert part.isascii(), part
    assert parts[0] not in ("zarr.json", "zarrckpt.commit")
    assert not parts[0].startswith("__")
    assert not parts[0].startswith(".")
    # bounded total length, whatever the key (PATH_MAX is 4096 bytes)
    assert len(path) <= 1024


@settings(max_examples=400, deadline=None)
@given(_KEYS)
def test_fqn_path_mapping_properties(key: str) -> None:
    path = fqn_to_path(key)
    _check_components(path)
    assert fqn_to_path(key) == path  # deterministic
    try:
        back = path_to_fqn(path)
    except InvalidKeyError:
        # only long keys get the (irreversible, hashed) long-name path
        assert len(key.encode("utf-8")) > 100, key
        return
    assert back == key


@settings(max_examples=300, deadline=None)
@given(_KEYS, _KEYS)
def test_fqn_path_mapping_is_injective(a: str, b: str) -> None:
    if a != b:
        pa, pb = fqn_to_path(a), fqn_to_path(b)
        assert pa != pb
        # neither array directory contains the other
        assert not pa.startswith(pb + "/") and not pb.startswith(pa + "/")


@pytest.mark.parametrize("key", HOSTILE)
def test_fqn_path_mapping_hostile(key: str) -> None:
    path = fqn_to_path(key)
    _check_components(path)
    if len(key.encode()) <= 100:
        assert path_to_fqn(path) == key


def test_fqn_to_path_refuses_empty_and_non_str() -> None:
    with pytest.raises(InvalidKeyError):
        fqn_to_path("")
    with pytest.raises(InvalidKeyError):
        fqn_to_path(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        fqn_to_path("\udcff")


# ----------------------------------------------------------------- missing keys, shapes, strict


def _saved(ckpt_dir: Any) -> tuple[Any, dict[str, Any]]:
    path = ckpt_dir / "src"
    sd = {
        "a": torch.randn(3, 4),
        "b": {"c": torch.randn(5), "d": 7, "e": "text"},
        "f": [torch.randn(2, 2), 3.5],
    }
    save_fast(sd, path)
    return path, sd


def _fresh_target() -> dict[str, Any]:
    return {
        "a": torch.zeros(3, 4),
        "b": {"c": torch.zeros(5), "d": 0, "e": ""},
        "f": [torch.zeros(2, 2), 0.0],
    }


def _assert_unmodified(target: dict[str, Any], reference: dict[str, Any]) -> None:
    assert list(target) == list(reference)
    for k, v in reference.items():
        got = target[k]
        if isinstance(v, torch.Tensor):
            assert_bits_equal(v, got, k)
        elif isinstance(v, (dict, list)):
            assert type(got) is type(v)
            _assert_unmodified(
                dict(enumerate(got)) if isinstance(v, list) else got,
                dict(enumerate(v)) if isinstance(v, list) else v,
            )
        else:
            assert got == v and type(got) is type(v), k


def test_missing_keys_error_lists_them(ckpt_dir: Any) -> None:
    path, _ = _saved(ckpt_dir)
    target = _fresh_target()
    target["new.weight"] = torch.ones(2)
    target["b"]["extra"] = 5
    target["f"].append(torch.ones(1))
    reference = copy.deepcopy(target)
    with pytest.raises(MissingKeysError) as info:
        zarrckpt.load(target, path)
    err = info.value
    assert sorted(err.missing) == sorted(["new.weight", "b.extra", "f.2"])
    for k in err.missing:
        assert k in str(err)
    assert str(path) in str(err)
    assert isinstance(err, KeyError) and isinstance(err, StateDictMismatchError)
    _assert_unmodified(target, reference)


def test_strict_false_skips_missing(ckpt_dir: Any) -> None:
    path, sd = _saved(ckpt_dir)
    target = _fresh_target()
    extra = torch.ones(2)
    target["new.weight"] = extra
    target["b"]["extra"] = 5
    zarrckpt.load(target, path, strict=False)
    assert target["new.weight"] is extra and torch.equal(extra, torch.ones(2))
    assert target["b"]["extra"] == 5
    assert_bits_equal(sd["a"], target["a"])
    assert_bits_equal(sd["b"]["c"], target["b"]["c"])
    assert target["b"]["d"] == 7 and target["b"]["e"] == "text" and target["f"][1] == 3.5


def test_extra_stored_keys_are_ignored(ckpt_dir: Any) -> None:
    path, sd = _saved(ckpt_dir)
    target = {"a": torch.zeros(3, 4)}
    zarrckpt.load(target, path)
    assert list(target) == ["a"]
    assert_bits_equal(sd["a"], target["a"])


@pytest.mark.parametrize("where", ["first", "last", "nested"])
def test_shape_mismatch_names_key_path_and_shapes(ckpt_dir: Any, where: str) -> None:
    path, _ = _saved(ckpt_dir)
    target = _fresh_target()
    if where == "first":
        target["a"] = torch.zeros(4, 3)
        key, shapes = "a", ("[3, 4]", "[4, 3]")
    elif where == "last":
        target["f"][0] = torch.zeros(2, 2, 1)
        key, shapes = "f.0", ("[2, 2]", "[2, 2, 1]")
    else:
        target["b"]["c"] = torch.zeros(())
        key, shapes = "b.c", ("[5]", "[]")
    reference = copy.deepcopy(target)
    ptrs = [t.data_ptr() for t in (target["a"], target["b"]["c"], target["f"][0])]
    with pytest.raises(ShapeMismatchError) as info:
        zarrckpt.load(target, path)
    msg = str(info.value)
    assert repr(key) in msg or key in msg
    assert str(path) in msg
    for s in shapes:
        assert s in msg
    assert isinstance(info.value, ValueError)
    _assert_unmodified(target, reference)
    assert [t.data_ptr() for t in (target["a"], target["b"]["c"], target["f"][0])] == ptrs


def test_shape_mismatch_wins_over_strict_false(ckpt_dir: Any) -> None:
    path, _ = _saved(ckpt_dir)
    target = _fresh_target()
    target["a"] = torch.zeros(1)
    reference = copy.deepcopy(target)
    with pytest.raises(ShapeMismatchError):
        zarrckpt.load(target, path, strict=False)
    _assert_unmodified(target, reference)


def test_mismatch_leaves_stateful_objects_untouched(ckpt_dir: Any) -> None:
    path = ckpt_dir / "mod"
    model = torch.nn.Linear(3, 2)
    save_fast({"model": model, "other": torch.ones(4)}, path)
    fresh = torch.nn.Linear(3, 2)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ShapeMismatchError):
        zarrckpt.load({"model": fresh, "other": torch.zeros(5)}, path)
    for k, v in before.items():
        assert_bits_equal(v, fresh.state_dict()[k], k)


def test_missing_key_in_open_checkpoint(ckpt_dir: Any) -> None:
    path, _ = _saved(ckpt_dir)
    ckpt = zarrckpt.open(path)
    for call in (lambda: ckpt.read("nope"), lambda: ckpt["nope"]):
        with pytest.raises(KeyError) as info:
            call()
        assert isinstance(info.value, MissingKeysError)
        assert "nope" in str(info.value) and str(path) in str(info.value)
