"""The command line starts without torch: ``zarrckpt --help`` imports neither
torch, numpy nor zarr, and the commands that only read a checkpoint never
import torch. ``import zarrckpt`` itself is light; its public names are
imported on first use.

Each check runs a fresh interpreter with ``-X importtime`` and reads the set
of imported modules from its report (the import set, not the time, is tested).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

import _zarrckpt_zarr_autoload
import zarrckpt

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
#: never imported by a command that only reads a checkpoint
HEAVY = ("torch", "torch.distributed", "safetensors", "transformers")


def imported_modules(args: Sequence[str], *, expect_rc: int = 0) -> set[str]:
    """Modules imported by ``python -X importtime ARGS`` (top-level and dotted names)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    modules = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                modules.add(name)
    return modules


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("cli-imports")
    a, b = str(root / "a"), str(root / "b")
    state = {"w": torch.randn(8, 4), "b": torch.zeros(4, dtype=torch.bfloat16), "step": 1}
    zarrckpt.save(state, a, fsync=False)
    state["w"] = state["w"] + 1
    zarrckpt.save(state, b, fsync=False)
    return a, b


def test_help_imports_neither_torch_nor_zarr_nor_numpy() -> None:
    for entry in (["-m", "zarrckpt", "--help"], ["-m", "zarrckpt", "ls", "--help"]):
        modules = imported_modules(entry)
        assert "zarrckpt.cli" in modules
        assert not {"torch", "zarr", "numpy", "ml_dtypes", "dask"} & modules, entry


def test_console_script_help_is_torch_free() -> None:
    script = Path(sys.executable).parent / "zarrckpt"
    if not script.exists():
        pytest.skip("zarrckpt console script not installed next to this interpreter")
    modules = imported_modules([str(script), "--help"])
    assert not {"torch", "zarr", "numpy"} & modules


@pytest.mark.parametrize(
    "command",
    [
        ["ls", "A"],
        ["ls", "A", "--json"],
        ["info", "A"],
        ["tree", "A"],
        ["stats", "A"],
        ["verify", "A"],
        ["diff", "A", "B"],
        ["plot", "A", "-o", "OUT"],
    ],
    ids=lambda c: " ".join(x for x in c if x not in ("A", "B", "OUT")),
)
def test_reading_commands_do_not_import_torch(
    command: list[str], ckpts: tuple[str, str], tmp_path: Path
) -> None:
    a, b = ckpts
    args = [{"A": a, "B": b, "OUT": str(tmp_path / "out.png")}.get(x, x) for x in command]
    expect_rc = 1 if command[0] == "diff" else 0  # the two checkpoints differ
    modules = imported_modules(["-m", "zarrckpt", *args], expect_rc=expect_rc)
    assert "zarrckpt.inspect" in modules  # the command did run
    assert not set(HEAVY) & modules, sorted(set(HEAVY) & modules)
    if command[0] in ("ls", "info", "tree"):  # metadata only: no zarr, no dask either
        assert not {"zarr", "dask"} & modules


@pytest.mark.parametrize("command", [["ls"], ["gc", "--dry-run"]])
def test_manager_root_commands_do_not_import_torch(
    command: list[str], ckpts: tuple[str, str], tmp_path: Path
) -> None:
    import shutil

    shutil.copytree(ckpts[0], tmp_path / "run" / "step_00000001")
    out = subprocess.run([sys.executable, "-m", "zarrckpt", *command, "--json",
                          str(tmp_path / "run")], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    assert ('"step": 1' if command[0] == "ls" else '"removed": []') in out.stdout
    modules = imported_modules(["-m", "zarrckpt", *command, str(tmp_path / "run")])
    assert "zarrckpt.manager._steps" in modules  # the command did run
    assert not {"torch", "zarr", "dask"} & modules, sorted({"torch", "zarr", "dask"} & modules)


def test_import_zarrckpt_is_light_and_names_resolve_lazily() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        import zarrckpt
        light = sorted(m for m in ("torch", "zarr", "numpy") if m in sys.modules)
        names = sorted(zarrckpt.__all__)
        missing = sorted(n for n in names if n not in dir(zarrckpt))
        from zarrckpt import save, load, async_save, open, Checkpoint, register_zarr_dtypes
        from zarrckpt import api, inspect, _zarr_dtypes
        same = [save is api.save, load is api.load, async_save is api.async_save,
                open is inspect.open, Checkpoint is inspect.Checkpoint,
                register_zarr_dtypes is _zarr_dtypes.register_zarr_dtypes,
                zarrckpt.save is save, zarrckpt.errors.ZarrCkptError is not None]
        print(json.dumps({"light": light, "missing": missing, "same": same,
                          "torch": "torch" in sys.modules}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["light"] == []
    assert out["missing"] == []
    assert all(out["same"])
    assert out["torch"]  # the API module does import torch, once it is asked for
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        zarrckpt.nope  # noqa: B018
    assert zarrckpt.__all__ == [
        "__version__", "async_save", "Checkpoint", "CheckpointManager", "convert", "errors",
        "load", "LoadResult",
        "open", "register_zarr_dtypes", "save", "ZarrStorageReader", "ZarrStorageWriter",
    ]


@pytest.mark.parametrize("zarr_first", [False, True])
def test_import_zarrckpt_still_registers_the_zarr_dtypes(tmp_path: Path, zarr_first: bool) -> None:
    """With the automatic hook turned off, ``import zarrckpt`` (before or after
    ``import zarr``) still makes plain zarr read bfloat16, without importing torch."""
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"b": torch.arange(4).to(torch.bfloat16)}, path, fsync=False)
    first, second = ("zarr", "zarrckpt") if zarr_first else ("zarrckpt", "zarr")
    script = textwrap.dedent(
        f"""
        import sys
        import {first}
        import {second}
        a = zarr.open_array(sys.argv[1] + "/b", mode="r")
        assert str(a.dtype) == "bfloat16", a.dtype
        assert a[...].astype("float32").tolist() == [0.0, 1.0, 2.0, 3.0]
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    env = ENV | {_zarrckpt_zarr_autoload.DISABLE_ENV_VAR: "1"}
    proc = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
