"""The commands on a checkpoint manager's root: ``ls ROOT`` (the steps) and ``gc``.

``zarrckpt ls`` on a directory holding ``step_*`` checkpoints (and that is not
itself a checkpoint) lists the steps instead of tensors; ``zarrckpt gc ROOT``
removes what killed saves left behind. Torch-free.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import EXIT_OK, Arg, Output, UsageError, command, fmt_bytes


def is_manager_root(path: str) -> bool:
    """True when ``path`` holds step checkpoints and is not a checkpoint itself."""
    from ..manager._steps import is_manager_root as check
    from ..storage._local import open_store
    from ..storage._paths import check_path

    return check(open_store(check_path(path)))


def _describe(root: str) -> list[dict[str, Any]]:
    """One row per step: step, state, bytes, created, metrics, entries."""
    from ..errors import ZarrCkptError
    from ..manager import _steps
    from ..storage._local import open_store

    store = open_store(root)
    rows = []
    for step, entry in _steps.scan_steps(store).items():
        created, metrics, state = None, {}, "incomplete"
        if entry.committed:
            try:
                manifest = _steps.read_manifest(root, entry.names[0])
                created = manifest.get("created")
                metrics = _steps.stored_metrics(manifest)
                state = "committed"
            except ZarrCkptError as e:  # a damaged marker or root metadata
                state = f"damaged ({type(e).__name__})"
        names = entry.names if not entry.committed else entry.names[:1]
        leftovers = [] if not entry.committed else entry.names[1:]
        rows.append({
            "step": step, "state": state, "bytes": sum(store.tree_size(n) for n in names),
            "created": created, "metrics": metrics, "entries": names,
            "leftovers": leftovers,
        })
    return rows


def list_steps(path: str, out: Output) -> int:
    """``zarrckpt ls ROOT`` on a manager root."""
    rows = _describe(path)
    if out.json:
        out.emit({"root": path, "steps": rows})
        return EXIT_OK
    table = [
        [str(r["step"]), r["state"] + (" +leftovers" if r["leftovers"] else ""),
         fmt_bytes(r["bytes"]) if out.rich else str(r["bytes"]), r["created"] or "-",
         " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in r["metrics"].items()) or "-"]
        for r in rows
    ]
    committed = sum(r["state"] == "committed" for r in rows)
    out.table(["step", "state", "bytes", "created", "metrics"], table, right=["step", "bytes"],
              optional=["created"],
              caption=f"{committed} committed, {len(rows) - committed} incomplete steps")
    return EXIT_OK


@command(
    "gc",
    "remove the incomplete steps (killed saves) below a checkpoint manager's root",
    Arg("path", metavar="ROOT", help="checkpoint manager root (holds step_* checkpoints)"),
    Arg("--dry-run", action="store_true", help="only list what would be removed"),
)
def _gc(args: argparse.Namespace, out: Output) -> int:
    from ..manager import _steps
    from ..storage._local import open_store
    from ..storage._paths import check_path

    root = check_path(args.path, role="manager root")
    store = open_store(root)
    if not _steps.is_manager_root(store):
        raise UsageError(f"{root!r} is not a checkpoint manager root (no step_* entries)")
    doomed = [
        (step, name)
        for step, entry in _steps.scan_steps(store).items()
        for name in (entry.names[1:] if entry.committed else entry.names)
    ]
    sizes = {name: store.tree_size(name) for _step, name in doomed}
    if not args.dry_run:
        for _step, name in doomed:
            _steps.remove_entry(root, name)
    verb = "would remove" if args.dry_run else "removed"
    if out.json:
        out.emit({"root": root, "dry_run": args.dry_run,
                  "removed": [{"step": s, "entry": n, "bytes": sizes[n]} for s, n in doomed]})
        return EXIT_OK
    for step, name in doomed:
        out.line(f"{verb} {name} (step {step}, {fmt_bytes(sizes[name])})")
    total = sum(sizes.values())
    out.line(f"{verb} {len(doomed)} incomplete entries, {fmt_bytes(total)}")
    return EXIT_OK
