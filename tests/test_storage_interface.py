"""The storage seam: the local implementation of ``Store`` / ``Staging`` /
``RangeReader`` (zarrckpt/storage/_base.py, _local.py), and the rule that
checkpoint files are touched only behind it.

The rule is checked by an AST scan of every module under zarrckpt/ outside
storage/: none may call ``os.open``/``os.pread(v)``/``os.pwrite(v)``/``os.writev``,
``renameat2``, ``syncfs``, builtin ``open(`` and the other file calls listed in
``FORBIDDEN_ATTRS`` / ``FORBIDDEN_NAMES``, nor hand a file path to a library that
opens, maps or writes it itself (``LIBRARY_FILE_CALLS``). zarrckpt checkpoints are
reached through Store / Staging / RangeReader, foreign files (torch.save,
safetensors, DCP) through storage/_files.py. The few library calls that must stay
where they are are listed, each with its reason, in ``ALLOWED``.
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from zarrckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidPathError,
)
from zarrckpt.format._chunk_reader import ChunkReader
from zarrckpt.format._codec import encode_chunk
from zarrckpt.format._layout import choose_layout
from zarrckpt.format._marker import COMMIT_MARKER, FORMAT_NAME, FORMAT_VERSION, ROOT_METADATA
from zarrckpt.storage import _posix
from zarrckpt.storage._base import RangeReader, Staging, Store
from zarrckpt.storage._local import LocalStaging, LocalStore, open_store

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "zarrckpt"


def _root_doc(checkpoint_id: str) -> dict[str, Any]:
    manifest = {
        "format_version": FORMAT_VERSION,
        "checkpoint_id": checkpoint_id,
        "tree": {},
        "arrays": {"a": {"path": "a"}},  # the entry _commit writes (owned, not foreign)
    }
    return {"zarr_format": 3, "node_type": "group", "attributes": {FORMAT_NAME: manifest}}


def _commit(store: Store, payload: bytes, checkpoint_id: str, *, overwrite: bool) -> None:
    staging = store.stage()
    staging.ensure_dir("a/c")
    staging.write_chunk("a/c/0", [payload])
    staging.commit(_root_doc(checkpoint_id), checkpoint_id, overwrite=overwrite, fsync=True)


def _staging_dirs(path: Path) -> list[str]:
    return [n for n in os.listdir(path.parent) if ".zarrckpt-tmp-" in n]


# --------------------------------------------------------------- reading and writing


def test_write_chunk_then_read_byte_ranges(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path / "ckpt"))
    staging = store.stage()
    staging.ensure_dir("x/c/0")  # nested prefix, created with its parents
    data = np.arange(1000, dtype=np.uint8)
    n = staging.write_chunk("x/c/0/1", [data[:300].data, b"", bytes(data[300:])], writeback=True)
    assert n == 1000
    staging.write_small("x/zarr.json", b"{}")
    assert staging.write_chunk_at("x/c/0/2", 4, [b"ta", b"il"]) == 4
    assert staging.write_chunk_at("x/c/0/2", 0, [b"head"]) == 4
    assert staging.read_small("x/c/0/2") == b"headtail"
    staging.publish(overwrite=False, fsync=False)

    assert store.kind() == "dir" and store.kind("x/c/0/1") == "file"
    assert store.kind("x/c") == "dir" and store.kind("nope") == "missing"
    assert store.exists("x/zarr.json") and not store.exists("x/nope")
    assert store.size("x/c/0/1") == 1000
    assert store.list_dir("x") == ["c", "zarr.json"]
    assert store.list_dir("x/c/0") == ["1", "2"]
    assert store.read_small("x/zarr.json") == b"{}"
    assert store.location("x/c/0/1") == os.path.join(store.path, "x", "c", "0", "1")

    a, b = bytearray(10), bytearray(5)
    with store.open_reader("x/c/0/1") as reader:
        assert isinstance(reader, RangeReader)
        assert reader.size == 1000
        assert reader.readv_into([memoryview(a), memoryview(b)], 500) == 15
        assert bytes(a + b) == bytes(data[500:515])
        assert reader.readv_into([memoryview(a)], 995) == 5  # short at the end
        assert reader.readv_into([memoryview(a)], 1000) == 0  # end of the object
    reader.close()  # idempotent
    with pytest.raises(FileNotFoundError):
        store.open_reader("x/c/0/9")
    with pytest.raises(FileNotFoundError):
        store.size("x/c/0/9")
    with pytest.raises(FileNotFoundError):
        store.read_small("x/nope")


def test_write_chunk_passes_the_callers_buffers_to_one_gathered_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No copy on the way: the buffers reach ``_posix.write_file`` as they are."""
    seen: list[Any] = []
    real = _posix.write_file

    def spy(path: str, buffers: list[Any], **kw: Any) -> int:
        seen.append((path, buffers, kw))
        return real(path, buffers, **kw)

    monkeypatch.setattr(_posix, "write_file", spy)
    staging = LocalStore(str(tmp_path / "ckpt")).stage()
    view = memoryview(bytearray(b"abcdef"))
    buffers = [view, b"gh"]
    staging.write_chunk("k", buffers, writeback=True)
    staging.write_chunk("k2", buffers)
    (path, got, kw), (_, _, kw2) = seen
    assert got is buffers and got[0] is view
    assert path == os.path.join(staging.local_dir, "k") and ".zarrckpt-tmp-" in path
    assert kw == {"writeback": True} and kw2 == {}
    staging.abort()


def test_chunk_reader_reads_through_the_store_into_the_destination(tmp_path: Path) -> None:
    layout = choose_layout((64, 32), 4, chunk_bytes=4096, inner_bytes=1024)
    assert layout.inner_shape is not None  # sharded chunks: index, inner chunks
    array = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    store = LocalStore(str(tmp_path / "ckpt"))
    staging = store.stage()
    for index in layout.chunk_indices():
        key = f"t/{layout.chunk_key(index)}"
        staging.ensure_dir(key.rpartition("/")[0])
        staging.write_chunk(key, encode_chunk(layout, index, array, (0, 0))[0])
    staging.publish(overwrite=False, fsync=False)
    dest = np.empty_like(array)
    reader = ChunkReader(store, "t", layout, "test")
    reader.read_into(dest, (0, 0))
    np.testing.assert_array_equal(dest, array)
    assert reader.bytes_read >= array.nbytes
    part = np.empty((10, 7), np.float32)
    ChunkReader(store, "t", layout, "test").read_into(part, (20, 5))
    np.testing.assert_array_equal(part, array[20:30, 5:12])


class _Reader(RangeReader):
    """Serves ``data`` at most ``step`` bytes per call, claiming ``size`` bytes."""

    def __init__(self, data: bytes, step: int, size: int | None = None) -> None:
        self.data, self.step, self.calls = data, step, 0
        self._size = len(data) if size is None else size

    @property
    def size(self) -> int:
        return self._size

    def readv_into(self, buffers: list[memoryview], offset: int) -> int:
        self.calls += 1
        n = 0
        for b in buffers:
            take = min(len(b), self.step - n, max(0, len(self.data) - offset - n))
            b[:take] = self.data[offset + n : offset + n + take]
            n += take
            if take < len(b):
                break
        return n

    def close(self) -> None:
        pass


class _Source:
    def __init__(self, reader: _Reader) -> None:
        self.reader = reader

    def open_reader(self, key: str) -> _Reader:
        return self.reader

    def location(self, key: str) -> str:
        return f"mem://{key}"


def test_chunk_reader_completes_short_reads_and_raises_at_end_of_data() -> None:
    layout = choose_layout((100,), 8, chunk_bytes=1 << 20, inner_bytes=1 << 20)
    array = np.arange(100, dtype=np.float64)
    encoded = b"".join(bytes(b) for b in encode_chunk(layout, (0,), array, (0,))[0])
    short = _Reader(encoded, step=7)  # a backend returning 7 bytes per call
    dest = np.empty_like(array)
    ChunkReader(_Source(short), "t", layout, "test").read_into(dest, (0,))
    np.testing.assert_array_equal(dest, array)
    assert short.calls > 100
    # the object claims its full size but delivers nothing from byte 400 on
    stalled = _Reader(encoded[:400], step=1 << 30, size=len(encoded))
    with pytest.raises(CorruptCheckpointError, match="is truncated"):
        ChunkReader(_Source(stalled), "t", layout, "test").read_into(dest, (0,))


def test_chunk_reader_names_a_missing_chunk_by_location(tmp_path: Path) -> None:
    layout = choose_layout((8,), 4, chunk_bytes=1 << 20, inner_bytes=1 << 20)
    store = LocalStore(str(tmp_path))
    with pytest.raises(CorruptCheckpointError, match="is missing") as e:
        ChunkReader(store, "arr", layout, "test").read_into(np.empty(8, np.float32), (0,))
    assert store.location(f"arr/{layout.chunk_key((0,))}") in str(e.value)


def test_truncated_chunk_file_raises(tmp_path: Path) -> None:
    layout = choose_layout((256,), 4, chunk_bytes=1 << 20, inner_bytes=1 << 20)
    array = np.arange(256, dtype=np.float32)
    store = LocalStore(str(tmp_path / "ckpt"))
    staging = store.stage()
    key = f"t/{layout.chunk_key((0,))}"
    staging.ensure_dir(key.rpartition("/")[0])
    staging.write_chunk(key, encode_chunk(layout, (0,), array, (0,))[0])
    staging.publish(overwrite=False, fsync=False)
    with open(store.location(key), "r+b") as f:
        f.truncate(store.size(key) - 10)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        ChunkReader(store, "t", layout, "test").read_into(np.empty_like(array), (0,))


# --------------------------------------------------------------- commit and publish


def test_nothing_is_visible_before_commit_and_commit_publishes_atomically(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    store = open_store(str(path))
    assert isinstance(store, LocalStore)
    store.check_writable(overwrite=False)
    staging = store.stage()
    assert isinstance(staging, Staging)
    staging.ensure_dir("a/c")
    staging.write_chunk("a/c/0", [b"one"])
    staging.sync()
    assert store.kind() == "missing"  # staged beside the path, invisible at it
    with pytest.raises(Exception, match="no checkpoint at"):
        store.read_committed_root()
    staging.commit(_root_doc("first"), "first", overwrite=False, fsync=True)
    assert _staging_dirs(path) == []
    root = store.read_committed_root()
    assert root["attributes"][FORMAT_NAME]["checkpoint_id"] == "first"
    assert store.exists(COMMIT_MARKER) and store.looks_like_checkpoint()
    assert store.read_small("a/c/0") == b"one"


def test_overwrite_exchanges_the_whole_directory(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    store = LocalStore(str(path))
    _commit(store, b"old", "old", overwrite=False)
    with pytest.raises(CheckpointExistsError, match="already exists"):
        store.check_writable(overwrite=False)
    store.check_writable(overwrite=True)
    _commit(store, b"new", "new", overwrite=True)
    assert store.read_small("a/c/0") == b"new"
    assert store.read_committed_root()["attributes"][FORMAT_NAME]["checkpoint_id"] == "new"
    assert _staging_dirs(path) == []  # the old checkpoint went with the staging


def test_commit_refuses_a_path_that_appeared_meanwhile(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    store = LocalStore(str(path))
    staging = store.stage()
    staging.write_chunk("x", [b"mine"])
    _commit(store, b"theirs", "theirs", overwrite=False)  # another save won
    with pytest.raises(CheckpointExistsError):
        staging.commit(_root_doc("mine"), "mine", overwrite=False, fsync=False)
    assert store.read_small("a/c/0") == b"theirs"  # untouched
    staging.abort()
    staging.abort()  # idempotent
    assert _staging_dirs(path) == []


def test_commit_without_marker_is_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    store = LocalStore(str(path))
    staging = store.stage()
    staging.write_json(ROOT_METADATA, _root_doc("x"))
    staging.publish(overwrite=False, fsync=False)  # no marker: as after a crash
    with pytest.raises(IncompleteCheckpointError):
        store.read_committed_root()


def test_publish_file_replaces_the_path_with_one_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"previous")
    store = LocalStore(str(path))
    staging = store.stage()
    staging.write_chunk("archive", [b"new content"])
    with pytest.raises(CheckpointExistsError):
        staging.publish_file("archive", overwrite=False, fsync=False)
    staging.publish_file("archive", overwrite=True, fsync=True)
    assert path.read_bytes() == b"new content"
    assert store.kind() == "file"
    assert _staging_dirs(path) == []


def test_attach_accepts_only_a_staging_of_the_same_path(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path / "ckpt"))
    staging = store.stage()
    attached = store.attach(staging.token, rank=1)
    assert attached.local_dir == staging.local_dir
    attached.write_chunk("from_rank_1", [b"x"])
    assert staging.read_small("from_rank_1") == b"x"
    with pytest.raises(InvalidPathError, match="not a staging directory"):
        store.attach(str(tmp_path))
    other = LocalStore(str(tmp_path / "other")).stage()
    with pytest.raises(InvalidPathError):
        store.attach(other.token)
    with pytest.raises(InvalidPathError, match="no checkpoint path"):
        LocalStaging(staging.local_dir).publish(overwrite=False, fsync=False)
    staging.abort()
    other.abort()


def test_remove_and_pickle(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    store = LocalStore(str(path))
    _commit(store, b"data", "id", overwrite=False)
    copy = pickle.loads(pickle.dumps(store))  # dask tasks carry stores
    assert copy == store and copy.read_small("a/c/0") == b"data"
    assert open_store(store) is store
    store.remove()
    assert store.kind() == "missing"
    store.remove()  # nothing there is fine


# --------------------------------------------------------------- nothing else touches files

#: calls that open, read, write, rename, sync or probe files: only storage/ makes them
FORBIDDEN_ATTRS = {
    "os": {
        "open", "read", "write", "pread", "preadv", "pwrite", "pwritev", "writev", "readv",
        "fsync", "fdatasync", "fstat", "stat", "lstat", "rename", "replace", "remove",
        "unlink", "rmdir", "mkdir", "makedirs", "listdir", "scandir", "walk", "ftruncate",
    },
    "os.path": {"exists", "lexists", "isdir", "isfile", "islink", "getsize"},
    "shutil": {"rmtree", "copyfile", "copytree", "move"},
    "io": {"open"},
    "builtins": {"open"},
}
#: names that are forbidden however they are reached (libc through ctypes, helpers)
FORBIDDEN_NAMES = {"open", "renameat2", "_renameat2", "syncfs", "sync_file_range"}
#: library calls that open, map, create or write a file given its path (or its
#: descriptor) themselves; ``torch.load`` only with ``mmap=`` (else it reads the
#: buffer or file object it is given)
LIBRARY_FILE_CALLS = {
    "mmap.mmap", "np.memmap", "np.fromfile", "np.load", "zipfile.is_zipfile",
    "tempfile.mkstemp", "tempfile.mkdtemp", "tempfile.NamedTemporaryFile",
    "torch._C.PyTorchFileWriter", "FileSystemWriter", "FileSystemReader", "safe_open",
    "shutil.copy", "shutil.copy2",
}

#: the exceptions, ``(module, call)``: each one is found by the scan (a stale entry
#: fails ``test_the_allowlist_is_current``) and says why it stays outside storage/
ALLOWED: dict[tuple[str, str], str] = {
    ("interop/_torchsave_source.py", "torch.load"):
        "torch.load(path, mmap=True) memory-maps the source torch.save file itself so "
        "that tensors are views of the page cache (no copy); storage/ stays torch-free",
    ("interop/_torchsave_writer.py", "torch._C.PyTorchFileWriter"):
        "torch's archive writer lays out the torch.save zip records by path, inside "
        "the staging's local_dir (Staging.local_dir exists for such writers); the "
        "record bytes are then written through storage._files.PositionalFile",
    ("interop/dcp/_export.py", "FileSystemWriter"):
        "DCP's own FileSystemWriter writes the DCP destination files into the "
        "staging's local_dir; the directory is published by Staging.publish",
    ("interop/_safetensors_io.py", "mmap.mmap"):
        "memory-maps the safetensors source file opened by storage._files.open_read, "
        "so that tensor data is read zero-copy from the page cache",
}

#: every module of the package outside storage/
SCANNED = sorted(
    p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "storage"
)


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def forbidden_calls(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: call`` for every forbidden file-system call in ``source``."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in FORBIDDEN_ATTRS:
            for alias in node.names:
                if alias.name in FORBIDDEN_ATTRS[node.module]:
                    found.append(
                        f"{filename}:{node.lineno}: from {node.module} import {alias.name}"
                    )
            continue
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = _dotted(func)
        if isinstance(func, ast.Name) and func.id in FORBIDDEN_NAMES:
            found.append(f"{filename}:{node.lineno}: {func.id}(")
        elif isinstance(func, ast.Attribute) and func.attr in FORBIDDEN_NAMES - {"open"}:
            found.append(f"{filename}:{node.lineno}: {name or '?.' + func.attr}(")
        elif name in LIBRARY_FILE_CALLS or (
            name == "torch.load" and any(k.arg == "mmap" for k in node.keywords)
        ):
            found.append(f"{filename}:{node.lineno}: {name}(")
        elif name is not None and "." in name:
            module, _, attr = name.rpartition(".")
            if attr in FORBIDDEN_ATTRS.get(module, ()):
                found.append(f"{filename}:{node.lineno}: {name}(")
    return found


def _call(finding: str) -> str:
    """The call name of a finding ``file:line: name(``."""
    return finding.rsplit(": ", 1)[1].removesuffix("(")


def test_the_scan_covers_every_module_outside_storage() -> None:
    names = {p.relative_to(PACKAGE).as_posix() for p in SCANNED}
    assert {"format/_chunk_reader.py", "format/_codec.py", "parallel/_reader.py",
            "parallel/_writer.py", "parallel/_save.py", "api.py", "inspect/_verify.py",
            "inspect/_scan.py", "inspect/_checkpoint.py", "inspect/_blocks.py",
            "interop/convert/_builder.py", "interop/_staged.py", "interop/dcp/_writer.py",
            "interop/dcp/_reader.py", "interop/dcp/_export.py", "interop/dcp/_source.py",
            "interop/_torchsave_writer.py", "interop/_safetensors_io.py", "cli/__init__.py",
            "testing.py", "demo.py", "__init__.py"} <= names
    assert not any(n.startswith("storage/") for n in names)
    assert len(names) == sum(
        1 for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "storage"
    )


@pytest.mark.parametrize("path", SCANNED, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_module_outside_storage_touches_checkpoint_files(path: Path) -> None:
    module = path.relative_to(PACKAGE).as_posix()
    found = [
        f for f in forbidden_calls(path.read_text(), str(path.relative_to(ROOT)))
        if (module, _call(f)) not in ALLOWED
    ]
    assert not found, "file-system calls outside zarrckpt/storage/:\n" + "\n".join(found)


def test_the_allowlist_is_current() -> None:
    """Every allowed exception is still there (else it must leave the list)."""
    for module, call in ALLOWED:
        found = forbidden_calls((PACKAGE / module).read_text(), module)
        assert call in {_call(f) for f in found}, (module, call)


@pytest.mark.parametrize(
    "line",
    [
        "fd = os.open(path, os.O_RDONLY)",
        "n = os.preadv(fd, buffers, 0)",
        "os.pread(fd, 10, 0)",
        "os.pwrite(fd, b'x', 0)",
        "os.writev(fd, buffers)",
        "f = open(path, 'rb')",
        "libc.renameat2(-100, a, -100, b, 1)",
        "_LIBC.syncfs(fd)",
        "if os.path.isfile(path): pass",
        "size = os.stat(path).st_size",
        "shutil.rmtree(path)",
        "from os import preadv",
        "f = builtins.open(path, 'rb')",
        "t = torch.load(path, mmap=True)",
        "m = mmap.mmap(fd, 0)",
        "ok = zipfile.is_zipfile(path)",
        "w = FileSystemWriter(path)",
    ],
)
def test_the_scan_finds_an_injected_call(line: str) -> None:
    """The scan can fail: one forbidden call appended to a real module is found."""
    source = (PACKAGE / "parallel" / "_reader.py").read_text()
    assert forbidden_calls(source) == []
    found = forbidden_calls(source + "\n\ndef _injected(path, fd, buffers, a, b):\n    "
                            + line + "\n")
    assert len(found) == 1, found
