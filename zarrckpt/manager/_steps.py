"""The step checkpoints below a checkpoint manager's root, found through the storage interface.

A manager root holds one zarrckpt checkpoint per saved step, ``step_<zero-padded
step>``, plus what killed saves left behind: a step entry without a commit
marker (an object store writes in place) or the staging of a save that never
published (the local store's hidden ``.step_<n>.zarrckpt-tmp-<id>``). Both are
*incomplete*: never restored, removed by the manager's next save or by
``zarrckpt gc``. Keys are joined with ``/`` and every access goes through
:class:`~zarrckpt.storage._base.Store`, so the same code lists a local
directory and an object-store prefix. Imports neither torch nor zarr (the
command line lists steps).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedValueError
from ..format._marker import COMMIT_MARKER, FORMAT_NAME, LEGACY_COMMIT_MARKER
from ..storage._base import Store
from ..storage._local import open_store

__all__ = [
    "MANIFEST_MEMBER",
    "STEP_PREFIX",
    "StepEntry",
    "child_location",
    "encode_metrics",
    "decode_metrics",
    "is_manager_root",
    "remove_entry",
    "scan_steps",
    "step_name",
]

#: step checkpoints are ``<root>/step_<zero-padded step>``
STEP_PREFIX = "step_"
#: the manifest member holding ``{"step": ..., "metrics": {...}}``
MANIFEST_MEMBER = "manager"
_STEP_NAME = re.compile(r"^step_([0-9]+)$")
#: non-finite floats are stored as these strings (JSON has no NaN)
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def step_name(step: int, digits: int) -> str:
    """The entry name of ``step``: ``step_`` and the step zero-padded to ``digits``."""
    return f"{STEP_PREFIX}{step:0{digits}d}"


def child_location(root: str, name: str) -> str:
    """``root/name`` for a path or a URL (joined with ``/``, never ``os.path``).

    An object-store root (:class:`~zarrckpt.storage._object_config.ObjectPath`)
    gives an ``ObjectPath`` carrying the same ``storage_options`` (a plain
    ``str`` join would drop them and the child would be opened with the
    environment's endpoint and credentials instead)."""
    joined = f"{root.rstrip('/')}/{name}" if root.rstrip("/") else f"/{name}"
    options = getattr(root, "storage_options", None)
    if options is not None:
        from ..storage._object_config import ObjectPath

        return ObjectPath(joined, options)
    return joined


def _parse(name: str) -> int | None:
    m = _STEP_NAME.match(name)
    return int(m.group(1)) if m else None


@dataclass
class StepEntry:
    """One step found below a manager root.

    Attributes
    ----------
    step
        The step number.
    committed
        True when ``names`` holds a committed checkpoint (only the committed
        entry is then listed in ``names``' first place).
    names
        Entries below the root that belong to the step: the step checkpoint
        and, for an incomplete step, stagings of killed saves.
    """

    step: int
    committed: bool = False
    names: list[str] = field(default_factory=list)


def scan_steps(store: Store) -> dict[int, StepEntry]:
    """Every step below the root ``store`` (nothing there: ``{}``), by step number.

    A step is committed when its ``step_*`` entry holds a commit marker; a
    step with only an uncommitted entry or stagings is incomplete. Stagings of
    a committed step (a save of it that died after another one committed) are
    listed in its ``names`` too.
    """
    if store.kind() != "dir":
        return {}
    steps: dict[int, StepEntry] = {}
    for name in store.list_dir():
        step = _parse(name)
        if step is not None:
            if store.kind(name) != "dir":
                continue
            entry = steps.setdefault(step, StepEntry(step))
            entry.committed = any(
                store.kind(f"{name}/{marker}") == "file"
                for marker in (COMMIT_MARKER, LEGACY_COMMIT_MARKER)
            )
            entry.names.insert(0, name)
            continue
        owner = store.staging_owner(name)
        step = _parse(owner) if owner is not None else None
        if step is not None:
            steps.setdefault(step, StepEntry(step)).names.append(name)
    return dict(sorted(steps.items()))


def is_manager_root(store: Store) -> bool:
    """True when ``store`` is a directory (prefix) holding step entries and is not
    itself a checkpoint."""
    return store.kind() == "dir" and not store.looks_like_checkpoint() and bool(scan_steps(store))


def read_manifest(root: str, name: str) -> dict[str, Any]:
    """The manifest of the committed step checkpoint ``root/name`` (marker checked).

    Raises
    ------
    zarrckpt.errors.IncompleteCheckpointError, CorruptCheckpointError
        As :meth:`~zarrckpt.storage._base.Store.read_committed_root`.
    """
    document = open_store(child_location(root, name)).read_committed_root()
    manifest = document.get("attributes", {}).get(FORMAT_NAME, {})
    return manifest if isinstance(manifest, dict) else {}


def stored_metrics(manifest: dict[str, Any]) -> dict[str, Any]:
    """The metrics a manager stored in a step's manifest (``{}`` if none)."""
    member = manifest.get(MANIFEST_MEMBER)
    if not isinstance(member, dict):
        return {}
    return decode_metrics(member.get("metrics") or {})


def remove_entry(root: str, name: str) -> None:
    """Delete the entry ``name`` below ``root``. A checkpoint loses its commit
    marker first, so that a removal cut short leaves an incomplete step (never
    restored), not a committed one with chunks missing."""
    location = child_location(root, name)
    store = open_store(location)
    if store.kind() == "dir":
        for marker in (COMMIT_MARKER, LEGACY_COMMIT_MARKER):
            marker_entry = marker.split("/", 1)[0]  # "~commit" (a group) or the v1 file
            if store.exists(marker_entry):
                open_store(child_location(location, marker_entry)).remove()
    store.remove()


def encode_metrics(metrics: Any, *, step: int) -> dict[str, Any]:
    """``metrics`` as JSON for the manifest: numbers (0-d tensors and numpy scalars
    via ``.item()``), strings, booleans and None; NaN and infinities as strings.

    Raises
    ------
    zarrckpt.errors.UnsupportedValueError
        ``metrics`` is not a dict with str keys, or a value is none of the above.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise UnsupportedValueError(
            f"metrics of step {step} must be a dict of name -> number, got "
            f"{type(metrics).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise UnsupportedValueError(
                f"metric names must be str; step {step} has the key {key!r}"
            )
        if hasattr(value, "item") and not isinstance(value, (bool, int, float, str)):
            with contextlib.suppress(ValueError, RuntimeError):  # more than one element
                value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise UnsupportedValueError(
                f"metric {key!r} of step {step} is a {type(value).__name__}; metrics are "
                "numbers (a 0-d tensor is fine), strings, booleans or None"
            )
        out[key] = value
    json.dumps(out, allow_nan=False)  # cannot fail after the checks above
    return out


def decode_metrics(stored: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`encode_metrics` (``"nan"``/``"inf"``/``"-inf"`` become floats)."""
    return {
        k: _NON_FINITE[v] if isinstance(v, str) and v in _NON_FINITE else v
        for k, v in stored.items()
    }


def describe_root(root: str) -> str:
    """What the root holds, for messages: its committed and incomplete steps."""
    steps = scan_steps(open_store(root))
    committed = [s for s, e in steps.items() if e.committed]
    incomplete = [s for s, e in steps.items() if not e.committed]
    return f"committed steps {committed[-8:]}, incomplete steps {incomplete[-8:]}"
