"""Merge the state-dict trees of all ranks into the one tree a checkpoint stores.

The stored tree is the union of the ranks' trees (docs/format.md, "Distributed
layout"): a key that only some ranks have (torchtitan's per-rank data-loader
state, ``{"dataloader": {"dp_rank_1": ...}}``) is kept, dict items in order of
first appearance (rank 0's first). Where several ranks have the same key they
must agree: the same node form (dict, list of the same length, tensor, plain
value, ...) and, for plain values and bytes, the same value. A checkpoint
holds one value per key, so divergent values are refused, never resolved by
picking one rank's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ..errors import InvalidKeyError
from ._flatten import JsonNode, bytes_array_fqn, decode_plain

__all__ = ["merge_trees"]

#: (rank, node) pairs: the node each rank holding a key has there
Holders = list[tuple[int, JsonNode]]

_SCALARS = ("value", "float")


def _form(node: JsonNode) -> str:
    """Node form, plain scalars (``value``, ``float``) counted as one form."""
    kind = next(iter(node)) if isinstance(node, dict) and node else "?"
    return "value" if kind in _SCALARS else kind


_FORM_WORDS = {
    "dict": "a dict",
    "list": "a list",
    "tuple": "a tuple",
    "tensor": "a tensor",
    "value": "a plain value",
    "stateful": "a Stateful object",
    "pickle": "a pickled object",
    "bytes": "a bytes value",
}


class _Placeholder:
    def __init__(self, kind: str, fqn: str) -> None:
        self.text = f"<{kind} {fqn}>"

    def __repr__(self) -> str:
        return self.text


def _show(node: JsonNode, limit: int = 80) -> str:
    """Short text of a node's value for error messages (tensors etc. as placeholders)."""
    try:
        text = repr(decode_plain(node, _Placeholder))
    except Exception:  # a malformed node: show its JSON
        text = json.dumps(node)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_str(key: Any) -> str:
    return str(key["int"]) if isinstance(key, dict) else str(key)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def merge_trees(
    trees: list[JsonNode],
    *,
    path: str,
    blob_digests: list[dict[str, str]] | None = None,
) -> JsonNode:
    """The union of the ranks' trees (``trees[r]`` is rank ``r``'s).

    ``blob_digests[r]`` maps the FQN of each bytes value rank ``r`` stores as an
    array to a digest of its content, so that such values are compared without
    gathering them.

    Raises
    ------
    InvalidKeyError
        Ranks have different node forms at one key (a tensor and a plain value,
        a dict and a list, lists of different lengths), different plain or
        bytes values at one key, or keys of different ranks flatten to the same
        FQN.
    """
    digests = blob_digests or [{} for _ in trees]
    claimed: dict[str, int] = {}

    def claim(fqn: str, rank: int) -> None:
        if fqn in claimed:
            raise InvalidKeyError(
                f"two entries of the ranks' state dicts flatten to the same key {fqn!r} "
                f"(checkpoint {path!r}; one of them on rank {rank}); rename one of them"
            )
        claimed[fqn] = rank

    def differ(fqn: str, groups: dict[str, list[int]], shown: Callable[[str], str]) -> None:
        parts = [
            f"rank{'s' if len(r) > 1 else ''} {_ranks(r)}: {shown(k)}" for k, r in groups.items()
        ]
        raise InvalidKeyError(
            f"ranks disagree on the value of key {fqn!r} in checkpoint {path!r} ("
            + "; ".join(parts[:4])
            + ("; ..." if len(parts) > 4 else "")
            + "). A checkpoint stores one value per key and zarrckpt does not pick one "
            "rank's: make the key per-rank (e.g. {'dp_rank_0': ...} on rank 0, "
            "{'dp_rank_1': ...} on rank 1, as torchtitan does for its data loader) "
            "or make the ranks agree"
        )

    def merge(holders: Holders, fqn: str) -> JsonNode:
        forms: dict[str, list[int]] = {}
        for rank, node in holders:
            forms.setdefault(_form(node), []).append(rank)
        if len(forms) > 1:
            parts = [
                f"rank{'s' if len(r) > 1 else ''} {_ranks(r)} "
                f"{'have' if len(r) > 1 else 'has'} {_FORM_WORDS.get(f, repr(f))} "
                f"({_show(dict(holders)[r[0]], 40)})"
                for f, r in forms.items()
            ]
            raise InvalidKeyError(
                f"ranks disagree on the type of key {fqn or '<root>'!r} in checkpoint "
                f"{path!r}: " + "; ".join(parts[:4]) + ". Every rank that has a key must "
                "hold the same kind of value there (or use a per-rank key)"
            )
        form = next(iter(forms))
        first = holders[0][1]
        if form == "dict":
            order: dict[str, Any] = {}
            children: dict[str, Holders] = {}
            for rank, node in holders:
                for key, child in node["dict"]:
                    ident = json.dumps(key, sort_keys=True)
                    if ident not in order:
                        order[ident] = key
                        children[ident] = []
                    children[ident].append((rank, child))
            return {
                "dict": [
                    [key, merge(children[ident], _join(fqn, _key_str(key)))]
                    for ident, key in order.items()
                ]
            }
        if form in ("list", "tuple"):
            lengths: dict[str, list[int]] = {}
            for rank, node in holders:
                lengths.setdefault(str(len(node[form])), []).append(rank)
            if len(lengths) > 1:
                by_len = {n: r for n, r in lengths.items()}
                differ(
                    fqn,
                    by_len,
                    lambda n: f"a {form} of {n}: {_show(dict(holders)[by_len[n][0]])}",
                )
            return {
                form: [
                    merge([(rank, node[form][i]) for rank, node in holders], _join(fqn, str(i)))
                    for i in range(len(first[form]))
                ]
            }
        if form == "stateful":
            return {"stateful": merge([(r, n["stateful"]) for r, n in holders], fqn)}
        claim(fqn, holders[0][0])
        if form in ("tensor", "pickle"):
            # tensors are compared by the save's tensor checks; pickled objects are
            # taken from the lowest rank holding them (equal objects may pickle
            # differently, so their bytes are not compared)
            return first
        values: dict[str, list[int]] = {}
        for rank, node in holders:
            blob = bytes_array_fqn(node) if form == "bytes" else None
            ident = (
                json.dumps(node, sort_keys=True)
                if blob is None
                else f"{json.dumps(node, sort_keys=True)}\n{digests[rank].get(blob)}"
            )
            values.setdefault(ident, []).append(rank)
        if len(values) > 1:
            by_value = {ident: r for ident, r in values.items()}

            def shown(ident: str) -> str:
                node = dict(holders)[by_value[ident][0]]
                blob = bytes_array_fqn(node)
                if blob is None:
                    return _show(node)
                return f"<{ident.rsplit(chr(10), 1)[1]}>"

            differ(fqn, by_value, shown)
        return first

    return merge(list(enumerate(trees)), "")


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:8]))
    return shown + (", ..." if len(ranks) > 8 else "")
