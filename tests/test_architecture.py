"""The layer rule of the package, checked by import-linter as CI runs it.

``pyproject.toml`` ([tool.importlinter]) declares the layers
``format <- storage <- parallel <- api <- (interop | inspect | manager) <- cli``: a module
imports only from its own layer and the layers below. ``lint-imports`` runs in a
subprocess with the project's configuration and no cache; the negative cases
run it on a copy of the package with one forbidden import injected, so the
check is known to fail when the rule is broken.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")  # .venv/bin/lint-imports


def _lint(package_parent: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the ``zarrckpt`` package found in ``package_parent``."""
    if not LINT.exists():
        pytest.fail(f"{LINT} not found: install the test extra (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(package_parent)}  # wins over an editable install
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=package_parent, env=env, capture_output=True, text=True, timeout=120,
    )


def test_layers_contract_is_kept() -> None:
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 1 kept, 0 broken." in r.stdout, r.stdout


@pytest.mark.parametrize(
    ("module", "line", "message"),
    [
        # a lower layer importing a higher one
        ("format/_layout.py", "from ..parallel import _save",
         "zarrckpt.format is not allowed to import zarrckpt.parallel"),
        ("storage/_files.py", "from ..parallel import _collective",
         "zarrckpt.storage is not allowed to import zarrckpt.parallel"),
        ("api.py", "from .interop import _file_source",
         "zarrckpt.api is not allowed to import zarrckpt.interop"),
        ("interop/convert/_any.py", "from ...cli import convert",
         "zarrckpt.interop is not allowed to import zarrckpt.cli"),
        # interop and inspect are independent siblings
        ("inspect/_scan.py", "from ..interop import _pages",
         "zarrckpt.inspect is not allowed to import zarrckpt.interop"),
        ("manager/_retention.py", "from ..inspect import _checkpoint",
         "zarrckpt.manager is not allowed to import zarrckpt.inspect"),
        ("api.py", "from .manager import _steps",
         "zarrckpt.api is not allowed to import zarrckpt.manager"),
        # also inside a function: lazy imports count
        ("format/_fqn.py", "def _late() -> None:\n    from ..storage import _paths",
         "zarrckpt.format is not allowed to import zarrckpt.storage"),
        # through the package root, which imports the API
        ("format/_dtypes.py", "import zarrckpt",
         "zarrckpt.format is not allowed to import zarrckpt.api"),
    ],
    ids=["format->parallel", "storage->parallel", "api->interop", "interop->cli",
         "inspect->interop", "manager->inspect", "api->manager", "lazy format->storage",
         "format->root"],
)
def test_layers_contract_catches_an_upward_import(
    tmp_path: Path, module: str, line: str, message: str
) -> None:
    shutil.copytree(ROOT / "zarrckpt", tmp_path / "zarrckpt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "zarrckpt" / module, "a") as f:
        f.write(f"\n{line}  # injected by tests/test_architecture.py\n")
    r = _lint(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "BROKEN" in r.stdout and message in r.stdout, r.stdout


def test_a_new_top_level_module_must_be_placed_in_a_layer(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "zarrckpt", tmp_path / "zarrckpt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "zarrckpt" / "_unplaced.py").write_text('"""In no layer."""\n')
    r = _lint(tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "zarrckpt._unplaced" in r.stdout, r.stdout


#: the most lines a module of the package may have ("small modules with one job")
MAX_MODULE_LINES = 500


def test_no_module_over_500_lines() -> None:
    package = ROOT / "zarrckpt"
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
        for p in sorted(package.rglob("*.py"))
    }
    assert len(sizes) > 40, sorted(sizes)  # the walk found the package
    too_long = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them): {too_long}"
