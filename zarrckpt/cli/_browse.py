"""The commands that show what a checkpoint holds: ``ls``, ``info``, ``tree``.

Registered with :func:`zarrckpt.cli.command` when :mod:`zarrckpt.cli` is imported.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

from . import EXIT_OK, Arg, Output, UsageError, _jsonable, command, fmt_bytes, fmt_shape


def _open(path: str) -> Any:
    from ..inspect._checkpoint import open as open_checkpoint

    return open_checkpoint(path)


def _select(ckpt: Any, pattern: str | None) -> list[str]:
    keys: list[str] = ckpt.select(pattern)
    if pattern is not None and not keys:
        raise UsageError(f"no tensor of checkpoint {ckpt.path!r} matches {pattern!r}")
    return keys


_PATH = Arg("path", metavar="PATH", help="checkpoint directory")
_PATTERN = Arg(
    "pattern", metavar="PATTERN", nargs="?", default=None,
    help="glob on tensor names, e.g. 'layers.*.weight' (quote it)",
)


@command(
    "ls",
    "list the tensors: name, shape, dtype, chunks, bytes (on a checkpoint manager's "
    "root: the steps, their state, size, date and metrics)",
    _PATH, _PATTERN,
)
def _ls(args: argparse.Namespace, out: Output) -> int:
    from ._steps import is_manager_root, list_steps

    if args.pattern is None and is_manager_root(args.path):
        return list_steps(args.path, out)
    ckpt = _open(args.path)
    infos = [ckpt.tensor_info(k) for k in _select(ckpt, args.pattern)]
    if out.json:
        out.emit([i.to_dict() | {"name": i.fqn} for i in infos])
        return EXIT_OK
    total = sum(i.nbytes for i in infos)
    rows = [
        [i.fqn, fmt_shape(i.shape), i.dtype, fmt_shape(i.chunks),
         fmt_bytes(i.nbytes) if out.rich else str(i.nbytes)]
        for i in infos
    ]
    out.table(
        ["name", "shape", "dtype", "chunks", "bytes"], rows, right=["bytes"],
        optional=["chunks"],
        caption=f"{len(infos)} tensors, {fmt_bytes(total)}",
    )
    return EXIT_OK


@command("info", "format, provenance, world size and mesh, sizes, dtype histogram", _PATH)
def _info(args: argparse.Namespace, out: Output) -> int:
    info = _open(args.path).info()
    if out.json:
        out.emit(info)
        return EXIT_OK
    mesh = info.mesh if info.mesh is not None else "-"
    pairs = [
        ("path", info.path),
        ("format_version", str(info.format_version)),
        ("checkpoint_id", str(info.checkpoint_id)),
        ("created", str(info.created)),
        ("zarrckpt_version", str(info.zarrckpt_version)),
        ("torch_version", str(info.torch_version)),
        ("world_size", str(info.world_size)),
        ("mesh", json.dumps(mesh) if not isinstance(mesh, str) else mesh),
        ("tensors", str(info.tensors)),
        ("total_bytes", f"{info.total_bytes} ({fmt_bytes(info.total_bytes)})"),
        ("pickled", f"{info.pickled} ({info.pickled_bytes} bytes)"),
    ]
    pairs += [
        (f"dtype {name}", f"{d['tensors']} tensors, {d['bytes']} bytes")
        for name, d in info.dtypes.items()
    ]
    out.fields(pairs)
    return EXIT_OK


def _tree_json(node: Any) -> Any:
    if hasattr(node, "to_dict"):
        return node.to_dict()
    if isinstance(node, dict):
        return {str(k): _tree_json(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_tree_json(v) for v in node]
    return node


#: the "leaf" of a tree line that opens a non-empty container (None is a stored value)
_CONTAINER = object()


def _tree_lines(node: Any, depth: int = 0) -> Iterator[tuple[int, str, Any]]:
    """(depth, label, leaf or _CONTAINER) for each line of the tree."""
    from ..inspect._checkpoint import BytesInfo, PickledInfo, TensorInfo

    items: Any
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        if isinstance(value, (TensorInfo, PickledInfo, BytesInfo)) or not isinstance(
            value, (dict, list, tuple)
        ) or not value:
            yield depth, str(key), value
        else:
            yield depth, str(key), _CONTAINER
            yield from _tree_lines(value, depth + 1)


def _leaf_text(value: Any) -> str:
    from ..inspect._checkpoint import BytesInfo, PickledInfo, TensorInfo

    if isinstance(value, TensorInfo):
        return f"{value.dtype}{fmt_shape(value.shape)}"
    if isinstance(value, PickledInfo):
        return f"pickled ({value.nbytes} bytes)"
    if isinstance(value, BytesInfo):
        return f"{value.type} ({value.nbytes} bytes)"
    return "= " + json.dumps(_jsonable(value))


@command("tree", "the nested state-dict structure (no tensor data read)", _PATH)
def _tree(args: argparse.Namespace, out: Output) -> int:
    tree = _open(args.path).tree()
    if out.json:
        out.emit(_tree_json(tree))
        return EXIT_OK
    if not isinstance(tree, (dict, list, tuple)):
        out.line(_leaf_text(tree))
        return EXIT_OK
    if out.rich:
        from rich.markup import escape
        from rich.tree import Tree

        root = Tree(escape(args.path), guide_style="dim")
        stack = [root]
        for depth, label, leaf in _tree_lines(tree):
            del stack[depth + 1 :]
            if leaf is _CONTAINER:
                stack.append(stack[depth].add(f"[bold]{escape(label)}[/]"))
            else:
                stack[depth].add(f"{escape(label)}  [cyan]{escape(_leaf_text(leaf))}[/]")
        out.console.print(root)
        return EXIT_OK
    for depth, label, leaf in _tree_lines(tree):
        text = label if leaf is _CONTAINER else f"{label}  {_leaf_text(leaf)}"
        out.line("  " * depth + text)
    return EXIT_OK
