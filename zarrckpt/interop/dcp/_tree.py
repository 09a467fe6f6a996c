"""State-dict tree <-> the flat keys of ``torch.distributed.checkpoint`` (pure, no I/O).

DCP's default planners flatten a state dict with
``torch.distributed.checkpoint._nested_dict.flatten_state_dict``: mappings are
always descended into (their keys turned into ``str``); a ``list`` is
descended into only when it holds a tensor, a mapping or such a list
(recursively), otherwise the whole list is one leaf; a ``tuple`` and every
other object are leaves. Each leaf gets the key ``".".join(map(str, path))``
and the object path ``path`` (``str`` for mapping keys, ``int`` for list
positions).

:func:`dcp_leaves` applies that rule to a stored tree (so a reader can offer
exactly the keys DCP will ask for) and :func:`tree_from_leaves` rebuilds a
tree from DCP's keys and object paths (so a writer can store what DCP hands it).
``stateful`` nodes are transparent, as in zarrckpt's FQNs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import CorruptCheckpointError, InvalidKeyError
from ...format._layout import Region

__all__ = [
    "STORAGE_TAG",
    "DcpLeaf",
    "dcp_leaves",
    "nonempty",
    "region",
    "tree_from_leaves",
    "unwrap",
]

JsonNode = dict[str, Any]
ObjPath = tuple[str | int, ...]

#: the tag of zarrckpt's entries in DCP's ``storage_data`` (plans and metadata)
STORAGE_TAG = "zarrckpt"


def region(offsets: Any, sizes: Any) -> Region:
    """The region of a DCP chunk (its ``offsets`` and ``sizes``)."""
    return tuple((int(o), int(o) + int(s)) for o, s in zip(offsets, sizes, strict=True))


def nonempty(r: Region) -> bool:
    """True for a region holding at least one element."""
    return all(b > a for a, b in r)


@dataclass(frozen=True)
class DcpLeaf:
    """One key of DCP's flattened state dict and the stored tree node it stands for."""

    key: str
    path: ObjPath
    node: JsonNode


def unwrap(node: JsonNode) -> JsonNode:
    """The node a ``stateful`` node wraps (any other node unchanged)."""
    while isinstance(node, dict) and "stateful" in node:
        node = node["stateful"]
    return node


def _key_str(key: Any) -> str:
    return str(key["int"]) if isinstance(key, dict) else str(key)


def _is_terminal(node: JsonNode) -> bool:
    """DCP's ``_is_terminal`` on the object a tree node stands for."""
    node = unwrap(node)
    if "dict" in node:
        return False
    if "list" not in node:
        return True
    for entry in node["list"]:
        entry = unwrap(entry)
        if "tensor" in entry or "dict" in entry:
            return False
        if "list" in entry and not _is_terminal(entry):
            return False
    return True


def dcp_leaves(tree: JsonNode, *, checkpoint: str = "?") -> list[DcpLeaf]:
    """The leaves DCP's ``flatten_state_dict`` gives for the state dict ``tree`` describes.

    Raises
    ------
    CorruptCheckpointError
        The root is not a dict node, or two leaves get the same key.
    """
    root = unwrap(tree)
    if "dict" not in root:
        raise CorruptCheckpointError(
            f"checkpoint {checkpoint!r}: the stored state dict is a {sorted(root)} node, "
            "not a dict; torch.distributed.checkpoint only loads dict state dicts"
        )
    leaves: list[DcpLeaf] = []
    seen: set[str] = set()

    def visit(path: ObjPath, node: JsonNode) -> None:
        node = unwrap(node)
        if "dict" in node:
            for key, child in node["dict"]:
                visit((*path, _key_str(key)), child)
        elif _is_terminal(node):
            key = ".".join(map(str, path))
            if key in seen:
                raise CorruptCheckpointError(
                    f"checkpoint {checkpoint!r}: two entries flatten to the same "
                    f"torch.distributed.checkpoint key {key!r}"
                )
            seen.add(key)
            leaves.append(DcpLeaf(key, path, node))
        else:  # a list holding tensors or containers
            for i, child in enumerate(node["list"]):
                visit((*path, i), child)

    for key, child in root["dict"]:
        visit((_key_str(key),), child)
    return leaves


class _Container:
    """A dict or list under construction."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.children: dict[str | int, _Container | JsonNode] = {}

    def to_node(self) -> JsonNode:
        def conv(child: _Container | JsonNode) -> JsonNode:
            return child.to_node() if isinstance(child, _Container) else child

        if self.kind == "dict":
            return {"dict": [[key, conv(child)] for key, child in self.children.items()]}
        size = 1 + max((int(i) for i in self.children), default=-1)
        # DCP drops empty mappings, the only values that leave no key behind: a gap
        # in a list was an empty dict
        return {"list": [conv(self.children.get(i, {"dict": []})) for i in range(size)]}


def tree_from_leaves(
    leaves: Sequence[tuple[str, ObjPath, JsonNode]], *, checkpoint: str = "?"
) -> JsonNode:
    """Rebuild the tree of a state dict from DCP's keys, object paths and leaf nodes.

    ``str`` path components are dict keys, ``int`` components list positions
    (as in DCP's flattening mappings).

    Raises
    ------
    InvalidKeyError
        Two leaves have the same path, or one leaf's path runs through another.
    """
    root = _Container("dict")
    for key, path, node in leaves:
        if not path:
            raise InvalidKeyError(f"key {key!r} for checkpoint {checkpoint!r} has an empty path")
        cur = root
        for depth, comp in enumerate(path):
            if (cur.kind == "list") != isinstance(comp, int) or isinstance(comp, bool):
                raise InvalidKeyError(
                    f"key {key!r} for checkpoint {checkpoint!r}: path {list(path)} uses "
                    f"{comp!r} as a {'list position' if cur.kind == 'list' else 'dict key'}"
                )
            if depth == len(path) - 1:
                if comp in cur.children:
                    raise InvalidKeyError(
                        f"two entries of the state dict for checkpoint {checkpoint!r} have "
                        f"the path {list(path)} (key {key!r})"
                    )
                cur.children[comp] = node
                break
            child = cur.children.get(comp)
            kind = "list" if isinstance(path[depth + 1], int) else "dict"
            if child is None:
                child = cur.children[comp] = _Container(kind)
            if not isinstance(child, _Container) or child.kind != kind:
                raise InvalidKeyError(
                    f"key {key!r} for checkpoint {checkpoint!r}: path {list(path)} runs "
                    f"through {list(path[: depth + 1])}, which holds another value"
                )
            cur = child
    return root.to_node()
