"""Storage faults: ENOSPC, EIO, EACCES, EROFS and short writes/reads at the storage interface.

Faults are injected through the storage interface (``tests/_faults.py`` wraps the
``Store``/``Staging``/``RangeReader`` that save and load obtain), so every backend
gets the same tests. For each fault kind x operation kind a save over an
existing checkpoint (``overwrite=True``) must raise a zarrckpt error (a
:class:`~zarrckpt.errors.StorageError` keeping the errno, never a raw
``OSError``) naming the path, leave the previous checkpoint loadable bit-exact
and leave no staging behind; a load whose read fails names the key, the chunk
and the file. The same runs on 2 gloo ranks with the fault on one rank only
(every rank raises, within the spawn's timeout), and a real ``ENOSPC`` comes
from a 1 MiB tmpfs where one can be mounted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from typing import Any

import _faults
import pytest
import torch

import zarrckpt
from zarrckpt.errors import (
    CheckpointNotFoundError,
    DistributedSaveError,
    StorageError,
    ZarrCkptError,
)
from zarrckpt.testing import run_distributed

#: (operation kind, fault) pairs a save meets
SAVE_CASES = [(op, f) for op in ("write", "sync", "publish") for f in _faults.ERRNOS] + [
    ("write", "short")
]
#: the write fault hits the 2nd write: part of the staging is written before it
NTH = {"write": 2}


def state(version: float) -> dict[str, Any]:
    """A small state of several arrays (several chunks each) and a plain value."""
    return {
        "a": torch.arange(4096, dtype=torch.float32) * version,
        "b": torch.full((64, 33), version, dtype=torch.float64),
        "c": {"d": torch.arange(1000, dtype=torch.int64) + int(version)},
        "step": int(version),
    }


def fresh() -> dict[str, Any]:
    return {
        "a": torch.zeros(4096),
        "b": torch.zeros(64, 33, dtype=torch.float64),
        "c": {"d": torch.zeros(1000, dtype=torch.int64)},
        "step": -1,
    }


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        torch.equal(a["a"], b["a"])
        and torch.equal(a["b"], b["b"])
        and torch.equal(a["c"]["d"], b["c"]["d"])
        and a["step"] == b["step"]
    )


def leftovers(path: str) -> list[str]:
    """Entries beside the checkpoint that belong to a save to it (stagings, records)."""
    parent, name = os.path.split(os.path.abspath(path))
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


SAVE_KW = {"chunk_bytes": 4096}


# --------------------------------------------------------------------------- single process


@pytest.mark.parametrize("op,fault", SAVE_CASES)
def test_save_fault(tmp_path: Any, op: str, fault: str) -> None:
    """The save raises StorageError (errno kept, path named), the previous checkpoint
    loads bit-exact and nothing of the failed save is left; on a new path nothing is."""
    path = str(tmp_path / "ckpt")
    zarrckpt.save(state(1.0), path, **SAVE_KW)
    with _faults.inject(op, fault, NTH.get(op, 1)) as injector, pytest.raises(
        ZarrCkptError
    ) as info:
        zarrckpt.save(state(2.0), path, overwrite=True, **SAVE_KW)
    assert injector.fired, f"no {op} fault was injected"
    err = info.value
    assert isinstance(err, StorageError), f"{type(err).__name__}: {err}"
    assert err.errno == injector.errno
    assert path in str(err), str(err)
    assert os.strerror(injector.errno) in str(err), str(err)
    assert leftovers(path) == []
    target = fresh()
    zarrckpt.load(target, path)
    assert same(target, state(1.0))

    new = str(tmp_path / "new")
    with _faults.inject(op, fault, NTH.get(op, 1)), pytest.raises(StorageError):
        zarrckpt.save(state(3.0), new, **SAVE_KW)
    assert not os.path.lexists(new)
    assert leftovers(new) == []
    with pytest.raises(CheckpointNotFoundError):
        zarrckpt.load(fresh(), new)


@pytest.mark.parametrize("fault", list(_faults.ERRNOS))
def test_load_chunk_read_fault(tmp_path: Any, fault: str) -> None:
    """A failing chunk read raises StorageError naming the key, the chunk and the file."""
    path = str(tmp_path / "ckpt")
    zarrckpt.save(state(1.0), path, **SAVE_KW)
    with _faults.inject("read", fault) as injector, pytest.raises(ZarrCkptError) as info:
        zarrckpt.load(fresh(), path, threads=1)
    err = info.value
    assert isinstance(err, StorageError), f"{type(err).__name__}: {err}"
    assert err.errno == injector.errno
    text = str(err)
    assert any(f"key {k!r}" in text for k in ("a", "b", "c.d", "c/d")), text
    assert "chunk " in text, text
    assert injector.fired[0] in text, text  # the file
    assert os.strerror(injector.errno) in text, text


@pytest.mark.parametrize("fault", ["EIO", "EACCES"])
def test_load_metadata_read_fault(tmp_path: Any, fault: str) -> None:
    """A failing metadata read raises StorageError naming the file."""
    path = str(tmp_path / "ckpt")
    zarrckpt.save(state(1.0), path, **SAVE_KW)
    for nth in (1, 3):  # the commit marker, and a later document
        with _faults.inject("read_small", fault, nth) as injector, pytest.raises(
            StorageError
        ) as info:
            zarrckpt.load(fresh(), path)
        assert injector.fired[0] in str(info.value), str(info.value)
        assert path in str(info.value)


def test_short_reads_load_whole(tmp_path: Any) -> None:
    """Reads returning fewer bytes than asked (allowed by RangeReader) still load bit-exact."""
    path = str(tmp_path / "ckpt")
    zarrckpt.save(state(1.0), path, **SAVE_KW)
    target = fresh()
    with _faults.inject("read", "short") as injector:
        zarrckpt.load(target, path)
    assert len(injector.fired) > 3
    assert same(target, state(1.0))


# --------------------------------------------------------------------------- a real ENOSPC


@pytest.fixture
def tiny_fs(tmp_path: Any) -> Any:
    """A 1 MiB tmpfs mounted in the test directory (skipped where none can be mounted)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs for a real ENOSPC needs root (euid is not 0)")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot run mount for a real ENOSPC: {e}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs for a real ENOSPC: {done.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def test_real_enospc(tiny_fs: str) -> None:
    """A save that fills a real filesystem raises StorageError(ENOSPC); the previous
    checkpoint still loads bit-exact and the staging is removed (the space is free again)."""
    path = os.path.join(tiny_fs, "ckpt")
    zarrckpt.save(state(1.0), path)
    big = {**state(2.0), "big": torch.ones(2 * 2**20 // 4)}  # 2 MiB on a 1 MiB disk
    with pytest.raises(StorageError) as info:
        zarrckpt.save(big, path, overwrite=True)
    assert info.value.errno == errno.ENOSPC, str(info.value)
    assert path in str(info.value)
    assert leftovers(path) == []
    target = fresh()
    zarrckpt.load(target, path)
    assert same(target, state(1.0))
    zarrckpt.save(state(3.0), path, overwrite=True)  # the failed save's space was freed
    zarrckpt.load(target, path)
    assert same(target, state(3.0))


# --------------------------------------------------------------------------- 2 gloo ranks

#: the rank the fault is injected on: only rank 0 publishes
def _faulty_rank(op: str) -> int:
    return 0 if op == "publish" else 1


DIST_CASES = SAVE_CASES + [("read", f) for f in _faults.ERRNOS]


def _error(e: BaseException | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {
        "type": type(e).__name__,
        "message": str(e),
        "zarrckpt": isinstance(e, ZarrCkptError),
        "errno": getattr(e, "errno", None),
        "distributed": isinstance(e, DistributedSaveError),
    }


def _dist_scenarios(rank: int, world_size: int, base: str) -> dict[str, Any]:
    import torch.distributed as dist

    out: dict[str, Any] = {}
    for op, fault in DIST_CASES:
        name = f"{op}-{fault}"
        path = os.path.join(base, name)
        zarrckpt.save(state(1.0), path, **SAVE_KW)
        faulty = rank == _faulty_rank(op)
        error: BaseException | None = None
        with contextlib_inject(faulty, op, fault) as injector:
            try:
                if op == "read":
                    zarrckpt.load(fresh(), path, threads=1)
                else:
                    zarrckpt.save(state(2.0), path, overwrite=True, **SAVE_KW)
            except Exception as e:  # noqa: BLE001 - reported to the test
                error = e
        dist.barrier()
        target = fresh()
        zarrckpt.load(target, path)
        out[name] = {
            "error": _error(error),
            "fired": bool(injector and injector.fired),
            "previous_intact": same(target, state(1.0)),
            "leftovers": leftovers(path),
        }
    return out


def contextlib_inject(active: bool, op: str, fault: str) -> Any:
    """The fault on the faulty rank, nothing on the others."""
    if not active:
        return contextlib.nullcontext(None)
    return _faults.inject(op, fault, NTH.get(op, 1))


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    base = str(tmp_path_factory.mktemp("faults-dist"))
    # the timeout bounds every collective: a rank left waiting fails the test
    return run_distributed(_dist_scenarios, 2, base, timeout=120.0)


@pytest.mark.parametrize("op,fault", DIST_CASES)
def test_distributed_fault(dist_results: list[dict[str, Any]], op: str, fault: str) -> None:
    """A fault on one of 2 ranks: every rank raises a zarrckpt error (the faulty one a
    StorageError with the errno, the other a DistributedSaveError naming the faulty
    rank), the previous checkpoint loads bit-exact, no staging is left."""
    name = f"{op}-{fault}"
    bad = _faulty_rank(op)
    expect = _faults.ERRNOS.get(fault, errno.ENOSPC)
    for rank, results in enumerate(dist_results):
        r = results[name]
        err = r["error"]
        assert err is not None, f"rank {rank}: no error"
        assert err["zarrckpt"], f"rank {rank}: {err}"
        if rank == bad:
            assert r["fired"], f"rank {rank}: no fault injected"
            assert err["type"] == "StorageError" and err["errno"] == expect, err
        else:
            assert err["distributed"], err
            assert f"rank {bad}" in err["message"], err
        assert os.strerror(expect) in err["message"], err
        assert r["previous_intact"], f"rank {rank}: previous checkpoint changed"
        assert r["leftovers"] == [], r["leftovers"]
