"""save, load and async_save report through logging.getLogger("zarrckpt").

INFO (rank 0): one record per operation with what, path, tensors, bytes,
seconds and MB/s (async_save: also the seconds the caller was blocked);
DEBUG (every rank): the rank's bytes and the seconds of each phase. Nothing is
printed unless the application configures logging.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import zarrckpt
from zarrckpt.testing import run_distributed

ROOT = Path(zarrckpt.__file__).resolve().parent.parent


def _state() -> dict[str, Any]:
    return {"a": torch.randn(256, 64), "b": {"c": torch.arange(10)}, "step": 3}


def _records(caplog: pytest.LogCaptureFixture, level: int, op: str) -> list[dict[str, Any]]:
    return [
        r.zarrckpt  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "zarrckpt" and r.levelno == level and r.zarrckpt["op"] == op  # type: ignore[attr-defined]
    ]


NBYTES = 256 * 64 * 4 + 10 * 8


def test_save_and_load_log_one_info_line_and_debug_details(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="zarrckpt")
    path = str(tmp_path / "ckpt")
    zarrckpt.save(_state(), path)
    target = {"a": torch.zeros(256, 64), "b": {"c": torch.zeros(10, dtype=torch.int64)}, "step": 0}
    zarrckpt.load(target, path)

    (save,) = _records(caplog, logging.INFO, "save")
    assert save["path"] == path and save["tensors"] == 2 and save["bytes"] == NBYTES
    assert save["seconds"] > 0 and save["mb_per_s"] == pytest.approx(NBYTES / 1e6 / save["seconds"])
    (load,) = _records(caplog, logging.INFO, "load")
    assert load["path"] == path and load["tensors"] == 2 and load["bytes"] == NBYTES
    assert load["seconds"] > 0 and load["mb_per_s"] > 0

    (save_debug,) = _records(caplog, logging.DEBUG, "save")
    assert save_debug["rank"] == 0 and save_debug["world_size"] == 1
    assert save_debug["bytes_wrote"] >= NBYTES  # chunk files, headers included
    assert {"preparing", "planning", "writing", "committing"} <= set(save_debug["phases"])
    (load_debug,) = _records(caplog, logging.DEBUG, "load")
    assert load_debug["bytes_read"] >= NBYTES
    assert {"planning", "reading"} <= set(load_debug["phases"])

    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith(f"save {path!r}: 2 tensors, {NBYTES} bytes in ") for m in messages)
    assert any("MB/s" in m and m.startswith("load ") for m in messages)


def test_async_save_logs_blocked_and_committed_times(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="zarrckpt")
    path = str(tmp_path / "ckpt")
    zarrckpt.async_save(_state(), path).result(timeout=60)

    (info,) = _records(caplog, logging.INFO, "async_save")
    assert info["path"] == path and info["tensors"] == 2 and info["bytes"] == NBYTES
    assert 0 < info["blocked_seconds"] <= info["seconds"]
    (message,) = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.INFO and r.zarrckpt["op"] == "async_save"  # type: ignore[attr-defined]
    ]
    assert "blocked" in message and "staging" in message and "committed after" in message
    (debug,) = _records(caplog, logging.DEBUG, "async_save")
    assert {"staging", "writing", "committing"} <= set(debug["phases"])


def test_failed_async_save_logs_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="zarrckpt")
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"x": torch.ones(2)}, path)
    future = zarrckpt.async_save({"x": torch.ones(2)}, path)  # exists, overwrite=False
    with pytest.raises(zarrckpt.errors.CheckpointExistsError):
        future.result(timeout=60)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "zarrckpt"]
    assert len(errors) == 1 and "CheckpointExistsError" in errors[0].getMessage()


def test_library_only_adds_a_null_handler(tmp_path: Path) -> None:
    """In a fresh interpreter: no output on stderr, the root logger untouched."""
    script = textwrap.dedent(
        """
        import logging, sys, torch, zarrckpt
        path = sys.argv[1]
        zarrckpt.save({"x": torch.ones(3)}, path)
        zarrckpt.load({"x": torch.zeros(3)}, path)
        zarrckpt.async_save({"x": torch.ones(3)}, path, overwrite=True).result()
        logger = logging.getLogger("zarrckpt")
        print([type(h).__name__ for h in logger.handlers], logging.getLogger().handlers)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.strip() == "['NullHandler'] []"


def _logged_ranks(rank: int, world_size: int, path: str) -> list[tuple[int, dict[str, Any]]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("zarrckpt")
    logger.addHandler(Keep())
    logger.setLevel(logging.DEBUG)
    torch.manual_seed(0)
    state = {"w": torch.randn(64, 32), "v": torch.randn(100)}
    zarrckpt.save(state, path)
    zarrckpt.load({k: torch.zeros_like(v) for k, v in state.items()}, path)
    zarrckpt.async_save(state, path, overwrite=True).result(timeout=120)
    return [(r.levelno, r.zarrckpt) for r in records]  # type: ignore[attr-defined]


def test_info_on_rank_0_and_debug_on_every_rank(tmp_path: Path) -> None:
    results = run_distributed(_logged_ranks, 2, str(tmp_path / "ckpt"), timeout=240)
    nbytes = (64 * 32 + 100) * 4
    for rank, records in enumerate(results):
        info = [f for level, f in records if level == logging.INFO]
        debug = [f for level, f in records if level == logging.DEBUG]
        if rank == 0:
            assert sorted(f["op"] for f in info) == ["async_save", "load", "save"]
            assert all(f["tensors"] == 2 and f["bytes"] == nbytes for f in info)
            assert all(f["world_size"] == 2 for f in info)
        else:
            assert info == []
        assert sorted(f["op"] for f in debug) == ["async_save", "load", "save"]
        assert all(f["rank"] == rank for f in debug)
        # each rank reads what it loads (here: everything, the tensors are replicated)
        assert next(f for f in debug if f["op"] == "load")["bytes_read"] >= nbytes
    # the writes of a save are split between the ranks
    for op in ("save", "async_save"):
        wrote = [
            f["bytes_wrote"]
            for r in results
            for lv, f in r
            if lv == logging.DEBUG and f["op"] == op
        ]
        assert len(wrote) == 2 and sum(wrote) >= nbytes, wrote
