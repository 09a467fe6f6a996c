"""A checkpoint is a clean zarr v3 hierarchy: plain zarr lists it without a
warning, xarray opens it (one variable per tensor), tensorstore reads the
dimension names, and checkpoints of format version 1 (commit marker
``zarrckpt.commit``) still open, load and verify.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorstore as ts
import torch
import xarray as xr
import zarr
from conftest import DTYPES, assert_bits_equal, dtype_name, random_tensor

import zarrckpt
from zarrckpt.errors import CorruptCheckpointError, IncompleteCheckpointError
from zarrckpt.format._codec import crc32c
from zarrckpt.format._json import dumps_json
from zarrckpt.format._marker import FORMAT_VERSION
from zarrckpt.format._metadata import array_document
from zarrckpt.inspect import verify
from zarrckpt.parallel._writer import array_json

LONG = "layer." + "x" * 250  # encoded name > 200 characters: split into nested groups
HASHED = "y" * 450  # > 400 characters: hashed path
V1_CHECKPOINT = Path(__file__).parent / "data" / "checkpoint-v1"
#: where the commit marker is (docs/format.md, section 6): since format version 2 ...
COMMIT_MARKER = "~commit/zarr.json"
#: ... and in format version 1
LEGACY_COMMIT_MARKER = "zarrckpt.commit"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every dtype, a 0-d tensor, split and hashed long names, a pickled value."""
    path = str(tmp_path_factory.mktemp("interop") / "ckpt")
    state: dict[str, Any] = {
        "t": {dtype_name(d): random_tensor(d, (5, 3), seed=i) for i, d in enumerate(DTYPES)},
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        LONG: torch.ones(2, 2),
        HASHED: torch.arange(3),
        "extra": {1, 2},  # pickled (a set)
        "step": 7,
        "none": None,
    }
    zarrckpt.save(state, path, allow_pickle=True, fsync=False)
    return path


@pytest.fixture
def errors_on_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _walk(group: zarr.Group) -> list[str]:
    """Every node below ``group``, by hand (arrays, groups, their attributes)."""
    names = []
    for name, node in group.members():
        names.append(name)
        dict(node.attrs)
        if isinstance(node, zarr.Group):
            names += [f"{name}/{n}" for n in _walk(node)]
    return names


# ----------------------------------------------------------------- plain zarr


@pytest.mark.parametrize("use_consolidated", [None, False])
def test_plain_zarr_lists_without_warnings(
    ckpt: str, use_consolidated: bool | None, errors_on_warnings: None
) -> None:
    group = zarr.open_group(ckpt, mode="r", use_consolidated=use_consolidated)
    members = dict(group.members(max_depth=None))
    arrays = {name for name, node in members.items() if isinstance(node, zarr.Array)}
    manifest = group.attrs["zarrckpt"]
    expected = {e["path"] for e in manifest["arrays"].values()}
    expected |= {e["path"] for e in manifest["pickled"].values()}
    assert arrays == expected
    assert set(_walk(group)) == set(members)
    assert {name for name, _ in group.arrays()} <= arrays
    # the root's consolidated metadata (format 3) lists every node but the commit
    # marker's group, which is written after the root
    listed = {"~pickle"} if use_consolidated is not False else {"~commit", "~pickle"}
    assert {name for name, _ in group.groups()} >= listed
    group.tree()  # walks the whole hierarchy
    assert zarr.open(ckpt, mode="r").attrs["zarrckpt"] == manifest


def test_plain_zarr_with_consolidated_metadata_without_warnings(
    ckpt: str, tmp_path: Path, errors_on_warnings: None
) -> None:
    """zarr.consolidate_metadata (on a copy: it rewrites the root zarr.json) lists it too."""
    copy = tmp_path / "consolidated"
    shutil.copytree(ckpt, copy)
    with warnings.catch_warnings():  # zarr's own note that this is not in the v3 spec
        warnings.filterwarnings("ignore", "Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(copy))  # lists the hierarchy: no other warning
    group = zarr.open_group(str(copy), mode="r", use_consolidated=True)
    assert group.metadata.consolidated_metadata is not None
    fresh = zarr.open_group(ckpt, mode="r", use_consolidated=False)
    assert set(dict(group.members(max_depth=None))) == set(dict(fresh.members(max_depth=None)))


def test_commit_marker_is_an_empty_zarr_group(ckpt: str) -> None:
    group = zarr.open_group(ckpt, mode="r", use_consolidated=False)
    marker = group["~commit"]
    assert isinstance(marker, zarr.Group) and list(marker.members()) == []
    members = marker.attrs["zarrckpt_commit"]
    assert members["format"] == "zarrckpt" and members["format_version"] == FORMAT_VERSION
    assert members["checkpoint_id"] == group.attrs["zarrckpt"]["checkpoint_id"]
    with open(os.path.join(ckpt, "zarr.json"), "rb") as f:
        assert members["root_metadata_crc32c"] == crc32c(f.read())
    assert not os.path.exists(os.path.join(ckpt, LEGACY_COMMIT_MARKER))


def test_every_array_has_unique_dimension_names(ckpt: str) -> None:
    files = zarrckpt.open(ckpt)._files
    seen: set[str] = set()
    for entry in [*files.arrays.values(), *files.pickled.values()]:
        with open(os.path.join(ckpt, entry.path, "zarr.json"), "rb") as f:
            data = f.read()
        names = json.loads(data)["dimension_names"]
        base = entry.path.rsplit("/", 1)[-1]
        assert names == [f"{base}:dim_{i}" for i in range(len(entry.shape))], entry.path
        assert not seen & set(names)
        seen |= set(names)
        # the per-array template fills in the path's last component exactly
        assert data == json.dumps(array_document(entry), ensure_ascii=False, indent=1).encode()
        assert data == array_json(entry)


def test_tensorstore_reads_dimension_names(ckpt: str) -> None:
    entry = zarrckpt.open(ckpt).metadata["arrays"]["t.bfloat16"]
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{ckpt}/{entry['path']}"}}
    array = ts.open(spec, open=True, read=True).result()
    assert array.domain.labels == ("t.bfloat16:dim_0", "t.bfloat16:dim_1")
    assert np.asarray(array.read().result()).shape == (5, 3)


# -------------------------------------------------------------------- xarray


def test_xarray_opens_one_variable_per_tensor(ckpt: str, errors_on_warnings: None) -> None:
    state = zarrckpt.open(ckpt).state_dict(allow_pickle=True)
    ds = xr.open_zarr(ckpt, consolidated=False, zarr_format=3)
    root_tensors = {k for k, e in zarrckpt.open(ckpt).metadata["arrays"].items()
                    if "/" not in e["path"]}
    assert set(ds.data_vars) == root_tensors
    assert {LONG, HASHED} & set(ds.data_vars) == set()
    for name, tensor in state["t"].items():
        var = ds[f"t.{name}"]
        assert var.dims == (f"t.{name}:dim_0", f"t.{name}:dim_1")
        assert var.dtype.name == name or (name == "bool" and var.dtype == np.bool_)
        assert_bits_equal(tensor, var.values)  # bfloat16 and float8 included
    assert ds["scalar"].dims == () and ds["scalar"].values == 3.5
    assert ds["empty"].shape == (0, 4)
    assert ds.attrs["zarrckpt"]["tree"] == zarrckpt.open(ckpt).metadata["tree"]


def test_xarray_datatree_has_the_long_names(ckpt: str, errors_on_warnings: None) -> None:
    tree = xr.open_datatree(ckpt, engine="zarr", consolidated=False, zarr_format=3)
    arrays = zarrckpt.open(ckpt).metadata["arrays"]
    for fqn in (LONG, HASHED):
        group, name = arrays[fqn]["path"].rsplit("/", 1)
        node = tree[group]
        np.testing.assert_array_equal(node[name].values, zarrckpt.open(ckpt).read(fqn).numpy())


# ------------------------------------------------ format version 1 checkpoints


def _downgrade_to_v1(path: str) -> None:
    """Rewrite a checkpoint as format version 1 wrote it: no dimension_names,
    manifest format_version 1, the commit marker in the file zarrckpt.commit."""
    files = zarrckpt.open(path)._files
    for entry in [*files.arrays.values(), *files.pickled.values()]:
        doc_path = os.path.join(path, entry.path, "zarr.json")
        with open(doc_path) as f:
            document = json.load(f)
        del document["dimension_names"]
        with open(doc_path, "w") as f:
            json.dump(document, f, ensure_ascii=False, indent=1)
    with open(os.path.join(path, "zarr.json")) as f:
        root = json.load(f)
    root["attributes"]["zarrckpt"]["format_version"] = 1
    root_bytes = dumps_json(root).encode()
    with open(os.path.join(path, "zarr.json"), "wb") as f:
        f.write(root_bytes)
    with open(os.path.join(path, COMMIT_MARKER)) as f:
        marker = json.load(f)["attributes"]["zarrckpt_commit"]
    marker.update(format_version=1, root_metadata_crc32c=crc32c(root_bytes))
    shutil.rmtree(os.path.join(path, "~commit"))
    with open(os.path.join(path, LEGACY_COMMIT_MARKER), "w") as f:
        json.dump(marker, f)


def _at(tree: Any, fqn: str) -> Any:
    for key in fqn.split("."):
        tree = tree[key]
    return tree


def _check_v1_checkpoint(path: str, expected: dict[str, torch.Tensor]) -> None:
    ckpt = zarrckpt.open(path)
    assert ckpt.info().format_version == 1
    for fqn, tensor in expected.items():
        assert_bits_equal(tensor, ckpt.read(fqn))
    target = ckpt.state_dict()  # the saved structure, every tensor then zeroed and reloaded
    flat = {fqn: _at(target, fqn) for fqn in expected}
    for tensor in flat.values():
        tensor.zero_()
    zarrckpt.load(target, path)
    for fqn, tensor in expected.items():
        assert_bits_equal(tensor, flat[fqn])
    report = verify(path)
    assert report.ok and report.committed, report.problems


def test_downgraded_v1_checkpoint_opens_loads_verifies(tmp_path: Path) -> None:
    path = str(tmp_path / "v1")
    state = {"w": random_tensor(torch.bfloat16, (4, 3)), "n": torch.tensor(5), "step": 2}
    zarrckpt.save(state, path, fsync=False)
    _downgrade_to_v1(path)
    assert not os.path.exists(os.path.join(path, "~commit"))
    _check_v1_checkpoint(path, {"w": state["w"], "n": state["n"]})
    # and save(overwrite=True) recognises it as a checkpoint it may replace
    zarrckpt.save({"w": torch.zeros(2)}, path, overwrite=True, fsync=False)
    assert zarrckpt.open(path).info().format_version == FORMAT_VERSION
    assert not os.path.exists(os.path.join(path, LEGACY_COMMIT_MARKER))


def test_v1_checkpoint_written_by_zarrckpt_0_1_0(tmp_path: Path) -> None:
    """tests/data/checkpoint-v1 was written by zarrckpt before the format change."""
    path = str(tmp_path / "v1")
    shutil.copytree(V1_CHECKPOINT, path)
    assert os.path.isfile(os.path.join(path, LEGACY_COMMIT_MARKER))
    expected = {
        "model.w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "model.b": torch.tensor([0.5, -1.0, 2.0], dtype=torch.bfloat16),
        "count": torch.tensor(5),
    }
    _check_v1_checkpoint(path, expected)
    tree = zarrckpt.open(path).tree()
    assert tree["step"] == 7 and tree["none"] is None and tree["lrs"] == [0.1, 0.01]
    proc = subprocess.run(
        [sys.executable, "-m", "zarrckpt", "verify", path], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.startswith("OK "), proc.stdout + proc.stderr
    os.remove(os.path.join(path, LEGACY_COMMIT_MARKER))  # an unfinished version 1 save
    with pytest.raises(IncompleteCheckpointError, match="commit marker"):
        zarrckpt.open(path)
    assert verify(path).kinds() == {"missing_commit_marker"}


def test_marker_location_must_match_its_version(tmp_path: Path) -> None:
    path = str(tmp_path / "v1")
    zarrckpt.save({"w": torch.ones(3)}, path, fsync=False)
    _downgrade_to_v1(path)
    # a version 1 marker moved to the version 2 place
    with open(os.path.join(path, LEGACY_COMMIT_MARKER)) as f:
        marker = json.load(f)
    os.mkdir(os.path.join(path, "~commit"))
    with open(os.path.join(path, COMMIT_MARKER), "w") as f:
        json.dump({"zarr_format": 3, "node_type": "group",
                   "attributes": {"zarrckpt_commit": marker}}, f)
    with pytest.raises(CorruptCheckpointError, match="format version 1, whose commit marker is"):
        zarrckpt.open(path)
    report = verify(path)
    assert "bad_commit_marker" in report.kinds() and not report.committed
    # a version 2 marker in the version 1 file
    shutil.rmtree(os.path.join(path, "~commit"))
    with open(os.path.join(path, LEGACY_COMMIT_MARKER), "w") as f:
        json.dump(marker | {"format_version": 2}, f)
    with pytest.raises(CorruptCheckpointError, match="'zarrckpt.commit' has format version 2"):
        zarrckpt.open(path)


def test_new_marker_wins_over_a_stale_old_one(tmp_path: Path) -> None:
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"w": torch.ones(3)}, path, fsync=False)
    with open(os.path.join(path, LEGACY_COMMIT_MARKER), "w") as f:
        f.write("{ not json")
    assert zarrckpt.open(path).info().format_version == FORMAT_VERSION
    assert verify(path).ok


# -------------------------------------------------------------------- py.typed


def test_package_ships_py_typed() -> None:
    import tomllib

    package = Path(zarrckpt.__file__).parent
    assert (package / "py.typed").is_file()
    with open(package.parent / "pyproject.toml", "rb") as f:
        hatch = tomllib.load(f)["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert "zarrckpt" in hatch["only-include"]  # the whole package directory, py.typed included
