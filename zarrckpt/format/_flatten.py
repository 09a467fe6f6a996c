"""Nested state dict <-> JSON tree + flat ``{fqn: tensor}``.

The tree keeps the exact nesting (dict key types, list vs tuple), the plain
values (JSON, with nan/inf kept) and, for every tensor, its FQN: the keys on
its path joined with ``.`` as DCP does. The node forms are documented in
docs/format.md ("The state-dict tree").
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidKeyError, UnsafeCheckpointError, UnsupportedValueError

__all__ = [
    "FlatState",
    "flatten_state_dict",
    "is_stateful",
    "decode_plain",
    "encode_key",
    "INLINE_BYTES_MAX",
    "bytes_array_fqn",
    "bytes_length",
    "decode_bytes",
]

JsonNode = dict[str, Any]

#: ``bytes`` / ``bytearray`` values up to this size are stored inline in the tree
#: (base64); larger ones as 1-D uint8 arrays under ``~bytes/`` (docs/format.md, section 3)
INLINE_BYTES_MAX = 4096


def _is_torch_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def is_stateful(obj: Any) -> bool:
    """DCP's ``Stateful`` protocol: callable ``state_dict`` and ``load_state_dict``."""
    import torch  # here, not at module level: the reading side (decode_plain) is torch-free

    return (
        not isinstance(obj, (torch.Tensor, dict, list, tuple))
        and callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    )


@dataclass
class FlatState:
    """Result of flattening a state dict for saving."""

    tree: JsonNode
    #: fqn -> tensor-like leaf (torch.Tensor, DTensor, ShardedTensor), in tree order
    tensors: dict[str, Any] = field(default_factory=dict)
    #: fqn -> object stored with pickle (only with allow_pickle=True)
    pickled: dict[str, Any] = field(default_factory=dict)
    #: fqn -> content of a large bytes / bytearray value (node ``{"bytes": {"array": fqn}}``)
    blobs: dict[str, bytes] = field(default_factory=dict)


def _check_text(text: str, *, what: str, checkpoint: str) -> None:
    """Refuse strings JSON/UTF-8 cannot hold (lone surrogates) before anything is written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidKeyError(
            f"{what} (checkpoint {checkpoint!r}) is not valid Unicode ({e.reason} at "
            f"position {e.start}); it cannot be stored"
        ) from None


def encode_key(key: Any, *, fqn: str, checkpoint: str) -> str | dict[str, int]:
    """JSON form of a dict key: strings as is, ints tagged."""
    if isinstance(key, str):
        _check_text(key, what=f"dict key {key!r} at {fqn or '<root>'!r}", checkpoint=checkpoint)
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return {"int": key}
    raise InvalidKeyError(
        f"dict key {key!r} at {fqn or '<root>'!r} (checkpoint {checkpoint!r}) has type "
        f"{type(key).__name__}; expected str or int"
    )


def _decode_key(key: Any) -> Any:
    return key["int"] if isinstance(key, dict) else key


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _is_plain_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _encode_scalar(value: Any) -> JsonNode:
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    return {"value": value}


def _encode_bytes(obj: bytes | bytearray, fqn: str, blobs: dict[str, bytes]) -> JsonNode:
    """``{"bytes": {...}}`` node of a bytes value: inline base64 when small, else an array."""
    body: dict[str, Any]
    if len(obj) <= INLINE_BYTES_MAX:
        body = {"base64": base64.b64encode(obj).decode("ascii")}
    else:
        blobs[fqn] = bytes(obj)
        body = {"array": fqn}
    if isinstance(obj, bytearray):
        body["bytearray"] = True
    return {"bytes": body}


def bytes_array_fqn(node: JsonNode) -> str | None:
    """The FQN of the array a ``bytes`` node refers to (None for inline bytes and other nodes)."""
    body = node.get("bytes")
    if isinstance(body, dict) and isinstance(body.get("array"), str):
        return str(body["array"])
    return None


def bytes_length(node: JsonNode, array_length: Callable[[str], int]) -> int:
    """Length of the value of a ``bytes`` node (``array_length(fqn)`` for arrays)."""
    body = node["bytes"]
    fqn = bytes_array_fqn(node)
    if fqn is not None:
        return array_length(fqn)
    text = body.get("base64", "") if isinstance(body, dict) else ""
    return len(text) // 4 * 3 - text[-2:].count("=")


def decode_bytes(node: JsonNode, resolve: Callable[[str, str], Any]) -> Any:
    """The value of a ``bytes`` node (``resolve("bytes", fqn)`` reads an array's content)."""
    return _decode_bytes(node["bytes"], resolve)


def _decode_bytes(body: Any, resolve: Callable[[str, str], Any]) -> Any:
    from ..errors import CorruptCheckpointError

    if not isinstance(body, dict):
        raise CorruptCheckpointError(f"malformed bytes node in the state-dict tree: {body!r:.80}")
    if isinstance(body.get("base64"), str):
        try:
            data = base64.b64decode(body["base64"], validate=True)
        except ValueError as e:
            raise CorruptCheckpointError(
                f"bytes node of the state-dict tree holds invalid base64 ({e})"
            ) from None
    elif isinstance(body.get("array"), str):
        data = resolve("bytes", body["array"])
        if not isinstance(data, (bytes, bytearray)):
            return data  # a placeholder (e.g. for display), passed through
    else:
        raise CorruptCheckpointError(
            f"bytes node of the state-dict tree has neither 'base64' nor 'array': {body!r:.80}"
        )
    return bytearray(data) if body.get("bytearray") is True else bytes(data)


def flatten_state_dict(
    state_dict: Any,
    *,
    allow_pickle: bool,
    checkpoint: str,
    is_tensor_leaf: Callable[[Any], bool] = _is_torch_tensor,
) -> FlatState:
    """Walk ``state_dict`` and return its tree, tensors and pickled leaves.

    Raises
    ------
    InvalidKeyError
        Two leaves flatten to the same FQN, or a key type is not str/int.
    UnsafeCheckpointError
        A leaf needs pickle and ``allow_pickle`` is False.
    """
    flat = FlatState(tree={})
    seen: set[str] = set()

    def claim(fqn: str) -> None:
        if fqn in seen:
            raise InvalidKeyError(
                f"two entries of the state dict flatten to the same key {fqn!r} "
                f"(checkpoint {checkpoint!r}); rename one of them"
            )
        seen.add(fqn)

    def walk(obj: Any, fqn: str) -> JsonNode:
        if is_tensor_leaf(obj):
            claim(fqn)
            flat.tensors[fqn] = obj
            return {"tensor": fqn}
        if isinstance(obj, dict):
            items = []
            for key, value in obj.items():
                items.append(
                    [encode_key(key, fqn=fqn, checkpoint=checkpoint), walk(value, _join(fqn, key))]
                )
            return {"dict": items}
        if isinstance(obj, (list, tuple)):
            kind = "tuple" if isinstance(obj, tuple) else "list"
            if type(obj) in (list, tuple):
                return {kind: [walk(v, _join(fqn, i)) for i, v in enumerate(obj)]}
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"value at {fqn!r} is a {type(obj).__name__} (a {kind} subclass); "
                    f"checkpoint {checkpoint!r} would need pickle to restore it. Convert it "
                    "to a plain list/tuple or pass allow_pickle=True"
                )
            # a list/tuple subclass (e.g. a namedtuple) is pickled whole to keep its type
            claim(fqn)
            flat.pickled[fqn] = obj
            return {"pickle": fqn}
        if is_stateful(obj):
            return {"stateful": walk(obj.state_dict(), fqn)}
        if type(obj) in (bytes, bytearray):
            claim(fqn)
            return _encode_bytes(obj, fqn, flat.blobs)
        if _is_plain_scalar(obj) and type(obj) in (bool, int, float, str, type(None)):
            if isinstance(obj, str):
                _check_text(obj, what=f"string value at key {fqn!r}", checkpoint=checkpoint)
            claim(fqn)
            return _encode_scalar(obj)
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"value at key {fqn!r} has type {type(obj).__module__}.{type(obj).__qualname__}, "
                f"which checkpoint {checkpoint!r} can only store with pickle. Store tensors, "
                "JSON values (int, float, str, bool, None, lists, dicts) or objects with "
                "state_dict()/load_state_dict(); or pass allow_pickle=True"
            )
        claim(fqn)
        flat.pickled[fqn] = obj
        return {"pickle": fqn}

    flat.tree = walk(state_dict, "")
    return flat


def pickle_value(fqn: str, obj: Any, *, checkpoint: str) -> bytes:
    """Pickle a leaf that ``flatten_state_dict`` set aside (``allow_pickle=True``)."""
    import pickle

    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise UnsupportedValueError(
            f"value at key {fqn!r} for checkpoint {checkpoint!r} cannot be pickled: {e}"
        ) from e


def decode_plain(
    node: JsonNode,
    resolve: Callable[[str, str], Any],
    *,
    on_bytes: Callable[[JsonNode], Any] | None = None,
) -> Any:
    """Rebuild the Python value of a tree node.

    ``resolve(kind, fqn)`` returns the value of a ``tensor`` or ``pickle`` node,
    and (kind ``"bytes"``) the content of a bytes value stored as an array.
    ``on_bytes(node)``, if given, replaces the decoding of every ``bytes`` node
    (to describe bytes values without reading them).
    """

    def decode(node: JsonNode) -> Any:
        if "value" in node:
            return node["value"]
        if "float" in node:
            return float(node["float"])
        if "dict" in node:
            return {_decode_key(k): decode(v) for k, v in node["dict"]}
        if "list" in node:
            return [decode(v) for v in node["list"]]
        if "tuple" in node:
            return tuple(decode(v) for v in node["tuple"])
        if "stateful" in node:
            return decode(node["stateful"])
        if "tensor" in node:
            return resolve("tensor", node["tensor"])
        if "pickle" in node:
            return resolve("pickle", node["pickle"])
        if "bytes" in node:
            if on_bytes is not None:
                return on_bytes(node)
            return _decode_bytes(node["bytes"], resolve)
        from ..errors import CorruptCheckpointError

        raise CorruptCheckpointError(f"unknown state-dict tree node with fields {sorted(node)}")

    return decode(node)


def child_nodes(node: JsonNode) -> dict[Any, JsonNode] | None:
    """Children of a container node keyed as in Python (None for leaves)."""
    if "stateful" in node:
        return child_nodes(node["stateful"])
    if "dict" in node:
        return {_decode_key(k): v for k, v in node["dict"]}
    for kind in ("list", "tuple"):
        if kind in node:
            return dict(enumerate(node[kind]))
    return None
