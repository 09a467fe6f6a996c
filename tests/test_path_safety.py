"""Path safety, racing writers and readers during an overwrite (issue #14).

* Every entry of a checkpoint is opened beneath the checkpoint directory without
  following a symbolic link: a symlinked chunk file, array directory or
  ``zarr.json``, a ``..`` key, or a FIFO chunk give ``CorruptCheckpointError``
  naming the checkpoint and the entry (with ``openat2`` and with the
  per-component ``O_NOFOLLOW`` fallback). The checkpoint path itself may be a
  symbolic link to a directory.
* Two processes saving to the same new path with ``overwrite=False``: one wins,
  the other gets ``CheckpointExistsError`` (never a raw ``FileExistsError``).
* A ``load`` while another process overwrites the checkpoint returns the old or
  the new checkpoint whole, or raises a ``ZarrCkptError``; never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import array_path, save_fast

import zarrckpt
from zarrckpt.errors import CorruptCheckpointError
from zarrckpt.storage import _posix
from zarrckpt.storage._local import LocalStore

SECRET = b"outside the checkpoint " * 1000


def _state() -> dict[str, Any]:
    return {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10)}


def _target() -> dict[str, Any]:
    return {"w": torch.zeros(1000), "b": torch.zeros(10)}


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of resolving an entry: openat2 (if the kernel has it) and the
    per-component O_NOFOLLOW walk."""
    if request.param == "walk":
        monkeypatch.setattr(_posix, "USE_OPENAT2", False, raising=False)
    elif not getattr(_posix, "USE_OPENAT2", True):
        pytest.skip("openat2 is not available on this system")
    return str(request.param)


@pytest.fixture
def ckpt(tmp_path: Any) -> str:
    path = str(tmp_path / "ckpt")
    save_fast(_state(), path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(SECRET)
    return path


def _chunk(ckpt: str, fqn: str = "w") -> str:
    return os.path.join(ckpt, array_path(fqn), "c.0")


def _readers(ckpt: str) -> Iterator[tuple[str, Any]]:
    yield "load", lambda: zarrckpt.load(_target(), ckpt)
    yield "open.read", lambda: zarrckpt.open(ckpt).read("w")
    yield "open[...]", lambda: zarrckpt.open(ckpt)["w"][...]
    yield "open.to_dask", lambda: zarrckpt.open(ckpt).to_dask()["w"].compute()
    yield "verify", lambda: _verify_raising(ckpt)


def _verify_raising(ckpt: str) -> None:
    """verify raises, or reports the entry as a problem (raised here)."""
    report = zarrckpt.open(ckpt).verify()
    assert not report.ok
    raise CorruptCheckpointError("; ".join(p.message for p in report.problems))


def _assert_refused(ckpt: str, entry: str, *, what: str = "symbolic link") -> None:
    for name, call in _readers(ckpt):
        with pytest.raises(CorruptCheckpointError) as info:
            call()
        message = str(info.value)
        assert ckpt in message, (name, message)
        assert entry in message, (name, message)
        assert what in message, (name, message)


def _swap_for_link(path: str, target: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
    os.symlink(target, path)


def test_symlinked_chunk_outside_is_refused(ckpt: str, tmp_path: Any, resolver: str) -> None:
    outside = tmp_path / "outside.bin"
    # same size as the chunk, so that only the link gives it away
    outside.write_bytes(open(_chunk(ckpt), "rb").read())  # noqa: SIM115
    _swap_for_link(_chunk(ckpt), str(outside))
    _assert_refused(ckpt, f"{array_path('w')}/c.0")


def test_symlinked_chunk_inside_is_refused(ckpt: str, resolver: str) -> None:
    # even a link to another file of the same checkpoint
    inside = os.path.join(ckpt, array_path("w"), "copy")
    shutil.copy(_chunk(ckpt), inside)
    _swap_for_link(_chunk(ckpt), "copy")
    _assert_refused(ckpt, f"{array_path('w')}/c.0")


def test_symlinked_array_directory_is_refused(ckpt: str, tmp_path: Any, resolver: str) -> None:
    array = os.path.join(ckpt, array_path("w"))
    elsewhere = str(tmp_path / "elsewhere")
    shutil.copytree(array, elsewhere)
    _swap_for_link(array, elsewhere)
    for name, call in _readers(ckpt):
        with pytest.raises(CorruptCheckpointError, match="symbolic link") as info:
            call()
        assert ckpt in str(info.value) and array_path("w") in str(info.value), name


def test_symlinked_array_metadata_is_refused(ckpt: str, tmp_path: Any, resolver: str) -> None:
    meta = os.path.join(ckpt, array_path("w"), "zarr.json")
    copy = str(tmp_path / "zarr.json")
    shutil.copy(meta, copy)
    _swap_for_link(meta, copy)
    _assert_refused(ckpt, f"{array_path('w')}/zarr.json")


def test_symlinked_root_metadata_is_refused(ckpt: str, tmp_path: Any, resolver: str) -> None:
    meta = os.path.join(ckpt, "zarr.json")
    copy = str(tmp_path / "root.json")
    shutil.copy(meta, copy)
    _swap_for_link(meta, copy)
    with pytest.raises(CorruptCheckpointError, match="symbolic link") as info:
        zarrckpt.load(_target(), ckpt)
    assert ckpt in str(info.value) and "zarr.json" in str(info.value)


def _unblock_fifo(path: str, after: float, stop: threading.Event) -> None:
    """Watchdog: a reader still blocked in open() after ``after`` seconds is released
    (a writer opens and closes the FIFO), so that a hang fails the test instead."""
    if stop.wait(after):
        return
    while not stop.wait(0.05):
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_fifo_chunk_is_refused_without_hanging(ckpt: str, resolver: str) -> None:
    fifo = _chunk(ckpt)
    os.remove(fifo)
    os.mkfifo(fifo)
    stop = threading.Event()
    watchdog = threading.Thread(target=_unblock_fifo, args=(fifo, 5.0, stop), daemon=True)
    watchdog.start()
    start = time.monotonic()
    try:
        _assert_refused(ckpt, f"{array_path('w')}/c.0", what="FIFO")
    finally:
        stop.set()
        watchdog.join()
    assert time.monotonic() - start < 5.0


def test_dotdot_key_is_refused(ckpt: str, resolver: str) -> None:
    store = LocalStore(ckpt)
    for key in ("../outside.bin", "a/../../outside.bin", "/etc/passwd", "a//b"):
        with pytest.raises(CorruptCheckpointError, match="path component") as info:
            store.read_small(key)
        assert ckpt in str(info.value) and key in str(info.value)


def test_checkpoint_path_may_be_a_symlink(ckpt: str, tmp_path: Any, resolver: str) -> None:
    link = str(tmp_path / "latest")
    os.symlink(ckpt, link)
    target = _target()
    zarrckpt.load(target, link)
    assert torch.equal(target["w"], _state()["w"])
    assert (zarrckpt.open(link)["w"][...] == _state()["w"].numpy()).all()
    assert zarrckpt.open(link).verify().ok
    # and a save through the link replaces what it points to
    state = {"w": torch.full((1000,), 3.0), "b": torch.ones(10)}
    save_fast(state, link, overwrite=True)
    zarrckpt.load(target, link)
    assert torch.equal(target["w"], state["w"])


def test_staging_writes_do_not_follow_a_symlink(tmp_path: Any, resolver: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    staging = LocalStore(str(tmp_path / "ckpt")).stage()
    os.symlink(str(victim), os.path.join(staging.local_dir, "x"))
    for write in (
        lambda: staging.write_chunk("x", [b"data"]),
        lambda: staging.write_small("x", b"data"),
        lambda: staging.write_json("x", {"a": 1}),
    ):
        with pytest.raises(OSError):
            write()
    assert victim.read_bytes() == b"keep"
    staging.abort()


# ----------------------------------------------------------------- converter inputs


def _dcp_save(state: dict[str, Any], path: str) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=path, no_dist=True)


def test_dcp_source_with_symlinked_files_is_refused(tmp_path: Any) -> None:
    """A DCP directory's data files and ``.metadata`` must not be symbolic links
    (the DCP directory path itself may be one)."""
    from zarrckpt import convert

    state = {"w": torch.arange(6, dtype=torch.float32)}
    src = str(tmp_path / "dcp")
    _dcp_save(state, src)
    link = str(tmp_path / "dcp-link")
    os.symlink(src, link)
    convert.from_dcp(link, str(tmp_path / "ok"), fsync=False)  # a linked directory is fine
    data = [n for n in os.listdir(src) if n.endswith(".distcp")][0]
    for name in (data, ".metadata"):
        copy = str(tmp_path / f"copy-{name}")
        shutil.copy(os.path.join(src, name), copy)
        _swap_for_link(os.path.join(src, name), copy)
        with pytest.raises(CorruptCheckpointError, match="symbolic link") as info:
            convert.from_dcp(src, str(tmp_path / f"out-{name}"), fsync=False)
        assert src in str(info.value) and name in str(info.value)
        os.remove(os.path.join(src, name))
        shutil.move(copy, os.path.join(src, name))
