"""Hostile checkpoints: hypothesis mutates the files of a small saved checkpoint.

One checkpoint (several dtypes, a tensor with inner chunks and a shard index) is
saved once per module. Each example mutates one of its files in place, runs
one reader over the checkpoint, and restores the file:

* JSON documents (the root ``zarr.json``, every array's ``zarr.json``, the commit
  marker; found by walking the checkpoint): structured mutations (a value
  replaced by another type, by a huge or negative number, keys removed or
  added, deep nesting) and text mutations (truncated, deeply nested, not UTF-8);
* every other file (chunk and shard files): bit flips, truncation, extension,
  ranges overwritten with random bytes or with large 64-bit integers at
  8-byte-aligned offsets (where a shard index keeps its offsets and lengths).

Readers: ``zarrckpt.load``, ``zarrckpt.open(path)[key][...]``,
``zarrckpt.open(path).read(key)`` and ``zarrckpt.inspect.verify``.

Invariants, checked for every example:

* the reader returns the original values bit for bit, or raises a
  ``ZarrCkptError`` (verify: reports problems, raising nothing but ZarrCkptError,
  and reports the checkpoint intact only if ``load`` returns the original values);
* nothing outside the checkpoint is opened (a ``sys.addaudithook`` hook sees
  every ``open``/``os.listdir``/``os.scandir`` of the reader) or written (a
  sentinel directory beside the checkpoint stays byte-for-byte and mtime unchanged);
* memory stays bounded: in the number and index tests (every number of the
  metadata, every aligned 64-bit integer of the binary files replaced by huge
  ones, arrays of up to 10**15 elements claimed) the traced peak
  (``tracemalloc``, which counts numpy buffers) of an example stays under
  :data:`PEAK_LIMIT` (every third example is traced, for speed); an allocation
  that fails raises MemoryError / RuntimeError, which the first invariant catches.

Example counts: ``FAST`` by default, ``SLOW`` (>= 10,000 in total) in the slow
group; ``ZARRCKPT_FUZZ_SCALE`` multiplies both (e.g. 10 for a long local run).
Examples are derandomized (fixed seeds), so a failure reproduces.
"""

from __future__ import annotations

import codecs
import json
import os
import struct
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

import crc32c
import numpy as np
import pytest
import torch
from conftest import random_tensor, tensor_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zarrckpt
import zarrckpt.inspect
from zarrckpt.errors import ZarrCkptError

SCALE = float(os.environ.get("ZARRCKPT_FUZZ_SCALE", "1"))
#: examples per test: fast run / slow group (sum of SLOW >= 10,000)
FAST = {"json": 40, "numbers": 40, "bytes": 40, "index": 30}
SLOW = {"json": 3500, "numbers": 2200, "bytes": 3000, "index": 1300}
#: bound of the traced memory peak of one example (the checkpoint holds ~60 KiB)
PEAK_LIMIT = 64 << 20

OPS = ("load", "open_getitem", "read", "verify")
#: the commit marker (the only path the test knows: the format's commit protocol)
MARKER = os.path.join("~commit", "zarr.json")


def make_state() -> dict[str, Any]:
    return {
        "big": random_tensor(torch.float32, (48, 64), seed=1),  # inner chunks, shard index
        "bf16": random_tensor(torch.bfloat16, (300,), seed=2),
        "i64": random_tensor(torch.int64, (5, 7), seed=3),
        "u8": random_tensor(torch.uint8, (33,), seed=4),
        "c64": random_tensor(torch.complex64, (4,), seed=5),
        "flags": random_tensor(torch.bool, (9,), seed=6),
        "f8": random_tensor(torch.float8_e4m3fn, (16,), seed=7),
        "nested": {"h": random_tensor(torch.float16, (3, 5), seed=8), "step": 7},
        "name": "fuzz",
        "lr": 0.125,
    }


def flat_tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(flat_tensors(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


STATE = make_state()
TENSORS = flat_tensors(STATE)


# --------------------------------------------------------------------------- audit


class Audit:
    """Every path a reader opens or lists while ``active`` (one hook per process)."""

    installed = False
    active = False
    seen: list[tuple[str, Any]] = []

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return

        def hook(event: str, args: tuple[Any, ...]) -> None:
            if cls.active and event in ("open", "os.listdir", "os.scandir", "shutil.rmtree",
                                        "os.remove", "os.rename", "os.mkdir"):
                cls.seen.append((event, args[0] if args else None))

        sys.addaudithook(hook)
        cls.installed = True


def outside(root: str, events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The events that touched a path outside ``root`` (or wrote anything)."""
    bad = []
    for event, p in events:
        if event in ("shutil.rmtree", "os.remove", "os.rename", "os.mkdir"):
            bad.append((event, p))
            continue
        if p is None or isinstance(p, int):
            continue  # an open directory descriptor
        text = os.fsdecode(p)
        if not os.path.isabs(text):
            # relative to a directory descriptor of the checkpoint (openat)
            if ".." in text.split("/"):
                bad.append((event, p))
            continue
        real = os.path.realpath(text)
        if event in ("os.listdir", "os.scandir") and real == os.path.dirname(root):
            # the names beside the checkpoint (verify lists the stagings dead saves
            # left there); no file outside the checkpoint is opened
            continue
        if real != root and not real.startswith(root + os.sep):
            bad.append((event, p))
    return bad


# --------------------------------------------------------------------------- fixture


class Target:
    """The saved checkpoint, its files' original bytes and a sentinel beside it."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.path = os.path.join(base, "ckpt")
        zarrckpt.save(STATE, self.path, chunk_bytes=4096, inner_chunk_bytes=1024, fsync=False)
        self.root = os.path.realpath(self.path)
        self.sentinel = os.path.join(base, "sentinel")
        os.mkdir(self.sentinel)
        with open(os.path.join(self.sentinel, "secret.bin"), "wb") as f:
            f.write(b"do not read" * 100)
        self.json_files: list[str] = []
        self.binary_files: list[str] = []
        self.original: dict[str, bytes] = {}
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.path)
                with open(full, "rb") as f:
                    self.original[rel] = f.read()
                (self.json_files if name.endswith(".json") else self.binary_files).append(rel)
        assert "zarr.json" in self.json_files and len(self.json_files) > len(TENSORS)
        assert any("commit" in f for f in self.json_files)
        assert self.binary_files
        self.snapshot = self.outside_state()

    def outside_state(self) -> Any:
        out = {}
        for dirpath, _, filenames in os.walk(self.sentinel):
            for name in filenames:
                full = os.path.join(dirpath, name)
                st_ = os.stat(full)
                with open(full, "rb") as f:
                    out[full] = (st_.st_mtime_ns, f.read())
        return sorted(os.listdir(self.base)), os.stat(self.sentinel).st_mtime_ns, out

    def write(self, rel: str, data: bytes) -> None:
        with open(os.path.join(self.path, rel), "wb") as f:
            f.write(data)

    def restore(self, rel: str) -> None:
        self.write(rel, self.original[rel])


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Target:
    Audit.install()
    t = Target(str(tmp_path_factory.mktemp("fuzz")))
    assert MARKER in t.json_files
    for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"):
        codecs.lookup(encoding)  # json.loads of bytes imports these on first sight
    for op in OPS:  # warm up: lazy imports happen before the audit starts
        run_reader(t, op, "big")
    return t


# --------------------------------------------------------------------------- readers


def _check_values(got: dict[str, Any]) -> None:
    for key, expected in TENSORS.items():
        assert tensor_bytes(got[key]) == tensor_bytes(expected), f"{key}: wrong values loaded"


def _load(t: Target, exact: bool = True) -> None:
    target = {
        "big": torch.zeros(48, 64),
        "bf16": torch.zeros(300, dtype=torch.bfloat16),
        "i64": torch.zeros(5, 7, dtype=torch.int64),
        "u8": torch.zeros(33, dtype=torch.uint8),
        "c64": torch.zeros(4, dtype=torch.complex64),
        "flags": torch.zeros(9, dtype=torch.bool),
        "f8": torch.zeros(16, dtype=torch.float8_e4m3fn),
        "nested": {"h": torch.zeros(3, 5, dtype=torch.float16), "step": None},
        "name": None,
        "lr": None,
    }
    zarrckpt.load(target, t.path)
    if not exact:
        return
    _check_values(flat_tensors(target))
    assert (target["nested"]["step"], target["name"], target["lr"]) == (7, "fuzz", 0.125)


def run_reader(t: Target, op: str, key: str, exact: bool = True) -> str:
    """Run reader ``op``; return "ok" or "error" (a ZarrCkptError). With ``exact``
    "ok" means the original values were read (else: whatever the manifest says)."""
    try:
        if op == "load":
            _load(t, exact)
        elif op == "open_getitem":
            data = zarrckpt.open(t.path)[key][...]
            assert not exact or tensor_bytes(np.asarray(data)) == tensor_bytes(TENSORS[key]), key
        elif op == "read":
            data = zarrckpt.open(t.path).read(key)
            assert not exact or tensor_bytes(data) == tensor_bytes(TENSORS[key]), key
        else:
            report = zarrckpt.inspect.verify(t.path)
            if report.ok:  # then the checkpoint must really be intact
                _load(t, exact)
            else:
                assert report.problems
                return "error"
    except ZarrCkptError:
        return "error"
    return "ok"


def check_example(
    t: Target, rel: str, data: bytes, op: str, key: str, *, trace: bool = False
) -> str:
    """Write ``data`` over file ``rel``, run ``op``, restore; check the invariants.

    A mutated root ``zarr.json`` comes with a re-signed commit marker (its
    ``root_metadata_crc32c`` recomputed) half of the time: a crc32c is no
    signature, so whoever crafts a checkpoint can make the two agree, and the
    readers' checks of the manifest itself must hold on their own (and a
    reader may then return whatever values the re-signed manifest describes).
    With ``trace`` the example runs under tracemalloc and its peak is bounded.
    """
    t.write(rel, data)
    resigned = rel == "zarr.json" and crc32c.crc32c(data) % 2 == 0
    if resigned:
        marker = json.loads(t.original[MARKER])
        marker["attributes"]["zarrckpt_commit"]["root_metadata_crc32c"] = crc32c.crc32c(data)
        t.write(MARKER, json.dumps(marker).encode())
    Audit.seen = []
    if trace:
        tracemalloc.start()
    Audit.active = True
    try:
        outcome = run_reader(t, op, key, exact=not resigned)
    except Exception as e:
        raise AssertionError(
            f"{op} of {key!r} with {rel} mutated ({len(data)} bytes, "
            f"{data[:300]!r}...) raised {type(e).__name__}: {e}"
        ) from e
    finally:
        Audit.active = False
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        tracemalloc.stop()
        t.restore(rel)
        if resigned:
            t.restore(MARKER)
    assert peak < PEAK_LIMIT, f"{op} with {rel} mutated: traced peak {peak} bytes"
    bad = outside(t.root, Audit.seen)
    assert not bad, f"{op} with {rel} mutated touched paths outside the checkpoint: {bad[:5]}"
    return outcome


def _key_of(rel: str) -> str:
    """The tensor a file belongs to, if any (its array directory), else "big"."""
    parts = rel.split(os.sep)
    for n in range(len(parts), 0, -1):
        fqn = ".".join(parts[:n])
        if fqn in TENSORS:
            return fqn
    return "big"


def fuzz(strategy: st.SearchStrategy[Any], body: Callable[[Any], None], kind: str,
         slow: bool) -> None:
    n = max(1, int((SLOW if slow else FAST)[kind] * SCALE))

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def inner(case: Any) -> None:
        ran.append(None)
        body(case)

    ran: list[None] = []
    inner()
    # the cases really ran (hypothesis stops early only when the space is exhausted)
    assert len(ran) >= n, f"{kind}: {len(ran)} of {n} examples ran"


def _traced(case: tuple[str, bytes, str, str]) -> bool:
    """Every third example runs under tracemalloc (which makes a reader ~4x slower)."""
    return crc32c.crc32c(case[1]) % 3 == 0


SPEEDS = [pytest.param(False, id="fast"), pytest.param(True, id="slow", marks=pytest.mark.slow)]


# --------------------------------------------------------------------------- JSON

HOSTILE_SCALARS = st.one_of(
    st.sampled_from([10**15, -(10**15), 2**63, 2**64, -1, 0, -(2**63) - 1, 10**400,
                     1e308, float("inf"), float("-inf"), float("nan"), 0.5, True, False,
                     None, "", "float32", "int64", "bfloat16", "<f4", "|b1", "c", "..",
                     "../sentinel", "/etc/passwd", "\x00", "\ud800"]),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=20),
)
HOSTILE_VALUES = st.one_of(
    HOSTILE_SCALARS,
    st.lists(HOSTILE_SCALARS, max_size=4),
    st.dictionaries(st.text(max_size=8), HOSTILE_SCALARS, max_size=3),
    st.lists(st.sampled_from([10**15, 10**5, 2**31, -3, 0]), min_size=0, max_size=40),
)


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every node of a JSON document (the root included)."""
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _nodes(v, (*path, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def _mutate_json(doc: Any, node: tuple[Any, ...], action: str, value: Any, name: str) -> Any:
    if not node:
        return value if action == "replace" else doc
    parent = _get(doc, node[:-1])
    last = node[-1]
    if action == "replace":
        parent[last] = value
    elif action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent[name] = value
    elif action == "add":
        parent.append(value)
    elif action == "stringify":
        parent[last] = json.dumps(parent[last]) if not isinstance(parent[last], str) else 1
    elif action == "wrap":
        parent[last] = [parent[last]]
    elif action == "nest":
        deep: Any = parent[last]
        for _ in range(200):
            deep = {"x": deep}
        parent[last] = deep
    return doc


@st.composite
def json_cases(draw: Any, t: Target, numbers_only: bool) -> tuple[str, bytes, str, str]:
    rel = draw(st.sampled_from(t.json_files))
    doc = json.loads(t.original[rel])
    nodes = _nodes(doc)
    if numbers_only:
        nodes = [n for n in nodes if isinstance(_get(doc, n), int | float)
                 and not isinstance(_get(doc, n), bool)] or nodes
        node = draw(st.sampled_from(nodes))
        value = draw(st.sampled_from([10**15, 10**12, 2**62, 2**63, 2**64, -1, -(10**15), 0,
                                      10**400, 1e300, 3, 17, 4096, 1 << 32]))
        doc = _mutate_json(doc, node, "replace", value, "")
        text = json.dumps(doc)
    else:
        how = draw(st.sampled_from(["structured"] * 4 + ["truncate", "deep", "bytes"]))
        if how == "structured":
            node = draw(st.sampled_from(nodes))
            action = draw(st.sampled_from(["replace", "replace", "delete", "add", "stringify",
                                           "wrap", "nest"]))
            value = draw(HOSTILE_VALUES)
            name = draw(st.sampled_from(["extra", "shape", "data_type", "codecs", "zarrckpt",
                                         "chunk_grid", "arrays", "path", ""]))
            doc = _mutate_json(doc, node, action, value, name)
            text = json.dumps(doc)
        elif how == "truncate":
            raw = t.original[rel]
            text = raw[: draw(st.integers(0, len(raw) - 1))].decode("utf-8", "replace")
        elif how == "deep":
            n = draw(st.sampled_from([100, 5000, 200_000]))
            text = "[" * n + "]" * n
        else:
            raw = bytearray(t.original[rel])
            pos = draw(st.integers(0, len(raw) - 1))
            raw[pos] = draw(st.sampled_from([0x00, 0xFF, 0xC0, 0x22, 0x5C, 0x7B]))
            return rel, bytes(raw), draw(st.sampled_from(OPS)), _key_of(rel)
    data = text.encode("utf-8", "surrogatepass")
    return rel, data, draw(st.sampled_from(OPS)), _key_of(rel)


@pytest.mark.parametrize("slow", SPEEDS)
def test_fuzz_json_documents(target: Target, slow: bool) -> None:
    """Structured and textual mutations of every JSON document."""
    fuzz(json_cases(target, numbers_only=False),
         lambda c: check_example(target, *c), "json", slow)


@pytest.mark.parametrize("slow", SPEEDS)
def test_fuzz_json_numbers(target: Target, slow: bool) -> None:
    """Every number of the JSON documents replaced by a huge, negative or other number
    (shapes and chunk shapes claiming 10**15 elements, offsets past the file...)."""
    fuzz(json_cases(target, numbers_only=True),
         lambda c: check_example(target, *c, trace=_traced(c)), "numbers", slow)


# --------------------------------------------------------------------------- binary

BIG_INTS = [2**64 - 1, 2**63, 2**63 - 1, 2**32, 10**15, 1 << 40, 0, 1, 7, 8]


@st.composite
def binary_cases(draw: Any, t: Target, index_only: bool) -> tuple[str, bytes, str, str]:
    rel = draw(st.sampled_from(t.binary_files))
    raw = bytearray(t.original[rel])
    n = len(raw)
    if index_only:
        # 64-bit integers over aligned positions, weighted to the file's end
        # (where a shard index lives) but anywhere
        slots = max(1, n // 8)
        slot = draw(st.one_of(st.integers(max(0, slots - 40), slots - 1),
                              st.integers(0, slots - 1)))
        value = draw(st.sampled_from(BIG_INTS))
        start = min(slot * 8, max(0, n - 8))
        raw[start : start + 8] = struct.pack("<Q", value)[: n - start]
        if draw(st.booleans()):  # and the next one (offset, length pairs)
            second = draw(st.sampled_from(BIG_INTS))
            raw[start + 8 : start + 16] = struct.pack("<Q", second)[: max(0, n - start - 8)]
    else:
        how = draw(st.sampled_from(["flip", "truncate", "extend", "overwrite", "zero"]))
        if how == "flip":
            for _ in range(draw(st.integers(1, 3))):
                pos = draw(st.integers(0, n - 1))
                raw[pos] ^= 1 << draw(st.integers(0, 7))
        elif how == "truncate":
            del raw[draw(st.integers(0, n - 1)) :]
        elif how == "extend":
            raw += draw(st.binary(min_size=1, max_size=64))
        elif how == "overwrite":
            pos = draw(st.integers(0, n - 1))
            raw[pos : pos + 16] = draw(st.binary(min_size=1, max_size=16))
        else:
            raw[:] = bytes(n)
    return rel, bytes(raw), draw(st.sampled_from(OPS)), _key_of(rel)


@pytest.mark.parametrize("slow", SPEEDS)
def test_fuzz_binary_files(target: Target, slow: bool) -> None:
    """Bit flips, truncation, extension and overwritten ranges of chunk and shard files."""
    fuzz(binary_cases(target, index_only=False),
         lambda c: check_example(target, *c), "bytes", slow)


@pytest.mark.parametrize("slow", SPEEDS)
def test_fuzz_index_integers(target: Target, slow: bool) -> None:
    """Large 64-bit integers written over aligned positions (shard index offsets/lengths)."""
    fuzz(binary_cases(target, index_only=True),
         lambda c: check_example(target, *c, trace=_traced(c)), "index", slow)


def test_fixture_readers_succeed_unmutated(target: Target) -> None:
    """The invariant can fail: every reader returns the original values of the
    untouched checkpoint, and the sentinel beside it is unchanged after the fuzzing."""
    for op in OPS:
        assert run_reader(target, op, "big") == "ok", op
    assert target.outside_state() == target.snapshot
    assert {"ckpt", "sentinel"} == set(os.listdir(target.base))


# --------------------------------------------------------------------------- regressions
# The defects the fuzzer found, one example each (each raised something other
# than a ZarrCkptError, or returned wrong values, before the fix).


def _resign(t: Target, root: dict[str, Any]) -> None:
    data = json.dumps(root).encode()
    t.write("zarr.json", data)
    marker = json.loads(t.original[MARKER])
    marker["attributes"]["zarrckpt_commit"]["root_metadata_crc32c"] = crc32c.crc32c(data)
    t.write(MARKER, json.dumps(marker).encode())


@pytest.fixture
def fresh(tmp_path: Any) -> Target:
    return Target(str(tmp_path))


def test_deeply_nested_json_is_corrupt(fresh: Target) -> None:
    """json.loads raised RecursionError on a marker / array zarr.json 100,000 levels deep."""
    deep = b"[" * 100_000 + b"]" * 100_000
    for rel in (MARKER, os.path.join("big", "zarr.json")):
        fresh.write(rel, deep)
        with pytest.raises(ZarrCkptError, match="JSON"):
            _load(fresh)
        assert not zarrckpt.inspect.verify(fresh.path).ok
        fresh.restore(rel)


def test_open_getitem_damaged_or_empty_chunk_raises(fresh: Target) -> None:
    """open()[k][...] returned zeros for an emptied chunk file and raised zarr's
    ValueError for a damaged one."""
    rel = next(f for f in fresh.binary_files if _key_of(f) == "bf16")
    arr = zarrckpt.open(fresh.path)["bf16"]
    fresh.write(rel, b"")
    with pytest.raises(zarrckpt.errors.CorruptCheckpointError, match="bf16"):
        arr[...]
    damaged = bytearray(fresh.original[rel])
    damaged[3] ^= 0x40
    fresh.write(rel, bytes(damaged))
    with pytest.raises(zarrckpt.errors.CorruptCheckpointError, match="crc|checksum|damaged"):
        zarrckpt.open(fresh.path)["bf16"][:5]
    with pytest.raises(IndexError):  # a bad selection stays an IndexError
        arr[10**6]


@pytest.mark.parametrize(
    "node",
    [{"tensor": 5}, {"tensor": "nope"}, {"dict": 3}, {"float": "garbage"}, {"x": 1},
     {"value": 1, "tensor": "big"}, {"bytes": {"array": "big"}}, {"list": {"a": 1}}],
)
def test_crafted_tree_node_is_corrupt(fresh: Target, node: Any) -> None:
    """A re-signed manifest with a malformed tree node: TypeError, KeyError or
    ValueError came out of the loader before the tree was validated."""
    root = json.loads(fresh.original["zarr.json"])
    root["attributes"]["zarrckpt"]["tree"]["dict"][0][1] = node
    _resign(fresh, root)
    with pytest.raises(zarrckpt.errors.CorruptCheckpointError, match="tree"):
        _load(fresh)


@pytest.mark.parametrize(
    "field,value",
    [("shape", [10**15, 64]), ("chunk_shape", [1, 1]), ("shape", ["48", 64]),
     ("shape", [48]), ("chunk_shape", [-1, 64]), ("shape", [2**64, 2**64])],
)
def test_crafted_layout_is_corrupt(fresh: Target, field: str, value: Any) -> None:
    """A re-signed manifest claiming 10**15 elements (or chunks), or malformed
    shapes: verify ran out of memory or raised TypeError/OverflowError before."""
    root = json.loads(fresh.original["zarr.json"])
    record = root["attributes"]["zarrckpt"]["arrays"]["big"]
    record[field] = value
    if field == "chunk_shape" and value == [1, 1]:
        record["shape"] = [10**8, 10**7]
    _resign(fresh, root)
    tracemalloc.start()
    try:
        report = zarrckpt.inspect.verify(fresh.path)
        with pytest.raises(zarrckpt.errors.CorruptCheckpointError, match="'big'"):
            zarrckpt.open(fresh.path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert not report.ok and any(p.key == "big" for p in report.problems)
    assert peak < PEAK_LIMIT


def test_array_document_with_bad_codec_configuration_is_corrupt(fresh: Target) -> None:
    """A sharding configuration that is not an object tripped an ``assert`` (an
    AssertionError, or nothing under ``python -O``) in the layout parser."""
    rel = os.path.join("big", "zarr.json")
    doc = json.loads(fresh.original[rel])
    doc["codecs"][0]["configuration"] = 10**15
    fresh.write(rel, json.dumps(doc).encode())
    with pytest.raises(zarrckpt.errors.CorruptCheckpointError, match="big"):
        _load(fresh)
