"""Validation of the state-dict tree of a manifest before anything walks it.

The tree comes from the checkpoint, so from whoever wrote it: the crc32c of the
commit marker catches damage, not a crafted manifest. :func:`check_tree`
checks the whole tree once, iteratively, against the node grammar that
:func:`zarrckpt.format._flatten.flatten_state_dict` writes, so that the loaders
and the inspection code that walk it meet only well-formed nodes:

* every node is an object with exactly one kind: ``value`` (a JSON scalar),
  ``float`` (``"nan"``, ``"inf"`` or ``"-inf"``), ``dict`` (a list of
  ``[key, node]`` pairs, a key being a string or ``{"int": n}``), ``list`` /
  ``tuple`` (a list of nodes), ``stateful`` (a node), ``tensor`` / ``pickle``
  (the name of an array of the manifest) or ``bytes`` (``{"base64": str}`` or
  ``{"array": name}``, optionally with ``"bytearray": true``);
* the tree is at most :data:`MAX_DEPTH` nodes deep (the recursive walks of the readers stay far
  from Python's recursion limit).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from ..errors import CorruptCheckpointError

__all__ = ["check_tree", "MAX_DEPTH"]

#: deepest tree accepted (a state dict nested 100 containers deep is 200 nodes deep)
MAX_DEPTH = 400

_FLOATS = ("nan", "inf", "-inf")


def check_tree(
    tree: Any,
    *,
    tensors: Container[str],
    pickled: Container[str],
    byte_arrays: Container[str],
    checkpoint: str,
) -> None:
    """Raise :class:`~zarrckpt.errors.CorruptCheckpointError` unless ``tree`` is a
    well-formed state-dict tree whose tensor, pickle and bytes nodes name entries
    of ``tensors``, ``pickled`` and ``byte_arrays``."""

    def bad(where: str, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"checkpoint {checkpoint!r}: the manifest's state-dict tree is malformed at "
            f"{where or 'its root'}: {why}"
        )

    stack: list[tuple[Any, str, int]] = [(tree, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad(where, f"nested deeper than {MAX_DEPTH} nodes")
        if not isinstance(node, dict) or len(node) != 1:
            raise bad(where, f"expected an object with one member, found {str(node)[:80]!r}")
        ((kind, body),) = node.items()
        if kind == "value":
            if body is not None and not isinstance(body, bool | int | float | str):
                raise bad(where, f"a value node holds a {type(body).__name__}")
        elif kind == "float":
            if body not in _FLOATS:
                raise bad(where, f"a float node holds {str(body)[:40]!r}")
        elif kind == "dict":
            if not isinstance(body, list):
                raise bad(where, "a dict node does not hold a list of [key, node] pairs")
            for item in body:
                if not (isinstance(item, list) and len(item) == 2):
                    raise bad(where, f"a dict item is not a [key, node] pair: {str(item)[:80]!r}")
                key = item[0]
                if isinstance(key, dict):
                    if not (len(key) == 1 and type(key.get("int")) is int):
                        raise bad(where, f"a dict key is neither a string nor {{'int': n}}: "
                                  f"{str(key)[:80]!r}")
                    key = key["int"]
                elif not isinstance(key, str):
                    raise bad(where, f"a dict key is a {type(key).__name__}")
                stack.append((item[1], f"{where}.{key}" if where else str(key), depth + 1))
        elif kind in ("list", "tuple"):
            if not isinstance(body, list):
                raise bad(where, f"a {kind} node does not hold a list")
            for i, child in enumerate(body):
                stack.append((child, f"{where}.{i}" if where else str(i), depth + 1))
        elif kind == "stateful":
            stack.append((body, where, depth + 1))
        elif kind in ("tensor", "pickle"):
            names = tensors if kind == "tensor" else pickled
            if not isinstance(body, str) or body not in names:
                raise bad(where, f"a {kind} node names {str(body)[:80]!r}, which the manifest "
                          f"does not list among its {'arrays' if kind == 'tensor' else 'pickled'}")
        elif kind == "bytes":
            if not isinstance(body, dict) or not set(body) <= {"base64", "array", "bytearray"}:
                raise bad(where, f"malformed bytes node {str(body)[:80]!r}")
            if "array" in body:
                if not isinstance(body["array"], str) or body["array"] not in byte_arrays:
                    raise bad(where, f"a bytes node names {str(body['array'])[:80]!r}, which "
                              "the manifest does not list")
            elif not isinstance(body.get("base64"), str):
                raise bad(where, "a bytes node has neither 'base64' nor 'array'")
            if "bytearray" in body and not isinstance(body["bytearray"], bool):
                raise bad(where, "a bytes node's 'bytearray' is not a boolean")
        else:
            raise bad(where, f"unknown node kind {kind[:40]!r}")
