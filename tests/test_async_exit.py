"""async_save at interpreter exit: a pending save finishes or fails loudly.

Every test runs a small script in a fresh interpreter that calls
``zarrckpt.async_save`` and exits without waiting for its future (the final
checkpoint of a run is exactly the one people forget to ``result()``), alone
or on 2 gloo ranks, with and without ``destroy_process_group()`` right after.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zarrckpt

ROOT = Path(zarrckpt.__file__).resolve().parent.parent

#: 8 tensors of 4 MiB in 1 MiB chunks: every rank (of 1 or 2) writes through its I/O threads
STATE_SOURCE = """
import torch
def make_state():
    gen = torch.Generator().manual_seed(1234)
    return {f"w{i}": torch.randn(1024, 1024, generator=gen) for i in range(8)}
"""


def _make_state() -> dict[str, torch.Tensor]:
    namespace: dict[str, object] = {}
    exec(STATE_SOURCE, namespace)
    return namespace["make_state"]()  # type: ignore[operator,no-any-return]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "script.py"
    script.write_text(STATE_SOURCE + textwrap.dedent(body))
    return script


def _run(script: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_bit_exact(path: Path) -> None:
    expected = _make_state()
    target = {k: torch.zeros_like(v) for k, v in expected.items()}
    zarrckpt.load(target, path)
    for k, v in expected.items():
        assert torch.equal(target[k].view(torch.int32), v.view(torch.int32)), k


def test_pending_async_save_is_committed_at_exit(tmp_path: Path) -> None:
    """One process: async_save, then the script ends; the checkpoint is committed."""
    ckpt = tmp_path / "final"
    script = _script(
        tmp_path,
        """
        import sys, zarrckpt
        zarrckpt.async_save(make_state(), sys.argv[1], chunk_bytes=1 << 20)
        """,
    )
    proc = _run(script, str(ckpt))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # nothing printed by default (no log output either)
    _assert_bit_exact(ckpt)


RANK_SCRIPT = """
import sys
import torch.distributed as dist
import zarrckpt

rank, init_file, path, destroy = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
zarrckpt.async_save(make_state(), path, chunk_bytes=1 << 20)
if destroy == "destroy":
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("destroy", ["destroy", "no-destroy"])
def test_pending_async_save_is_committed_at_exit_on_two_ranks(tmp_path: Path, destroy: str) -> None:
    """2 gloo ranks: async_save, optionally destroy_process_group() right after, exit.
    Both ranks write chunks (the tensors are replicated, their writes are split)."""
    ckpt = tmp_path / "final"
    init_file = tmp_path / "rendezvous"
    script = _script(tmp_path, RANK_SCRIPT)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(init_file), str(ckpt), destroy],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {rank}: {err}"
        assert "zarrckpt" not in err, f"rank {rank}: {err}"
    _assert_bit_exact(ckpt)


FAILING_SCRIPT = """
import atexit, sys, zarrckpt
from zarrckpt.storage import _posix as _chunkio

atexit.register(print, "an atexit handler registered earlier ran")

def broken_write(path, buffers, **kw):
    raise OSError("injected: no space left on device")

_chunkio.write_file = broken_write
future = zarrckpt.async_save(make_state(), sys.argv[1], chunk_bytes=1 << 20)
if sys.argv[2] == "observe":
    try:
        future.result()
    except OSError as e:
        print("caught:", e)
"""


def test_failed_async_save_at_exit_is_loud(tmp_path: Path) -> None:
    """A background save that fails and whose future nobody looked at: its
    traceback is on stderr and the process exits with status 1."""
    ckpt = tmp_path / "final"
    proc = _run(_script(tmp_path, FAILING_SCRIPT), str(ckpt), "ignore")
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "injected: no space left on device" in proc.stderr
    assert "Traceback" in proc.stderr
    assert str(ckpt) in proc.stderr and "NOT written" in proc.stderr
    assert not ckpt.exists()
    # the exit status is set after the other exit handlers ran
    assert "an atexit handler registered earlier ran" in proc.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging


def test_observed_async_save_failure_exits_normally(tmp_path: Path) -> None:
    """The same failure, handled by the caller through result(): no report, status 0."""
    proc = _run(_script(tmp_path, FAILING_SCRIPT), str(tmp_path / "final"), "observe")
    assert proc.returncode == 0, proc.stderr
    # the storage error (zarrckpt.errors.StorageError, an OSError) names what failed
    assert "caught: " in proc.stdout and "injected: no space left" in proc.stdout
    assert proc.stderr == ""


def test_failure_at_exit_goes_through_logging_when_configured(tmp_path: Path) -> None:
    """With logging configured the report is one ERROR record, not a second raw copy."""
    logging_setup = (
        "import logging\nlogging.basicConfig(format='LOG %(levelname)s %(name)s: %(message)s')\n"
    )
    script = _script(tmp_path, logging_setup + FAILING_SCRIPT)
    proc = _run(script, str(tmp_path / "final"), "ignore")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("LOG ERROR zarrckpt: async_save of") == 1, proc.stderr
    assert "NOT written" in proc.stderr and "Traceback" in proc.stderr
    assert "zarrckpt: ERROR:" not in proc.stderr  # the raw stderr copy is left out
    # the failure was also logged when it happened, before the exit
    assert "LOG ERROR zarrckpt: async_save '" in proc.stderr, proc.stderr


def test_forked_child_does_not_wait_for_the_parents_saves(tmp_path: Path) -> None:
    """A child forked while a save is pending exits at once (the save is the parent's)."""
    ckpt = tmp_path / "final"
    script = _script(
        tmp_path,
        """
        import os, sys, threading, zarrckpt
        from zarrckpt.storage import _posix as _chunkio

        gate = threading.Event()
        original = _chunkio.write_file
        def gated(path, buffers, **kw):
            gate.wait(60)
            return original(path, buffers, **kw)
        _chunkio.write_file = gated
        future = zarrckpt.async_save(make_state(), sys.argv[1], chunk_bytes=1 << 20)
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a normal interpreter exit in the child
        _, status = os.waitpid(pid, 0)
        gate.set()
        future.result()
        print("child status", os.waitstatus_to_exitcode(status))
        """,
    )
    proc = _run(script, str(ckpt), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "child status 0" in proc.stdout
    _assert_bit_exact(ckpt)
