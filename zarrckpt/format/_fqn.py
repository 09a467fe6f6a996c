"""Reversible, escape-safe mapping between FQNs and zarr array paths.

An FQN (the dotted key of a flattened state dict) may contain any Unicode
character. Its array path inside the checkpoint group is derived as follows
(see docs/format.md, "Array names"):

1. Encode the FQN as UTF-8 and percent-encode every byte outside
   ``[A-Za-z0-9_.-]`` as ``%XX`` (upper-case hex).
2. If the result starts with ``.`` or ``__``, or equals a reserved root name
   (``zarr.json``, ``zarrckpt.commit``), percent-encode its first byte too.
   So ``.``, ``..`` and ``../x`` never become a path component with meaning.
3. If the result is longer than 200 characters (and at most 400), cut it into
   pieces of at most 200 characters (never inside a ``%XX`` escape) and join
   them as nested groups: ``p1~/~p2~/~p3``. Every piece but the last ends with
   ``~`` and every piece but the first starts with ``~``; step 1 always escapes
   ``~``, so a split name can never collide with an unsplit one.
4. If the result is longer than 400 characters, the path would not fit the
   file-system limits (``PATH_MAX`` is 4096 bytes on Linux, and a 10 000
   character name cannot be stored reversibly in a path at all). Such a name
   is stored at ``<head>~/=<sha256>``: ``<head>`` is its first piece as in
   step 3 (for readability) and ``<sha256>`` the hex SHA-256 of the FQN's
   UTF-8 bytes. ``=`` is always escaped by step 1, so a hashed path never
   collides with another form. Its FQN is recovered from the manifest or from
   the array's ``zarr.json`` attributes (``attributes.zarrckpt.fqn``), not
   from the path.

Decoding reverses steps 1-3: split on ``/``, strip the ``~`` markers, join,
percent-decode; a hashed path (step 4) is refused. The empty FQN is refused.
"""

from __future__ import annotations

import hashlib
import re

from ..errors import InvalidKeyError

__all__ = ["fqn_to_path", "path_to_fqn", "is_hashed_path", "MAX_COMPONENT", "MAX_ENCODED"]

#: longest piece of an encoded name placed in one path component
MAX_COMPONENT = 200
#: longest encoded name stored reversibly; longer names get a hashed path (step 4)
MAX_ENCODED = 400
#: first character of the last component of a hashed path (never produced by step 1)
HASH_MARK = "="
#: root names an FQN must not take (``zarrckpt.commit`` is the commit marker of format
#: version 1; the version 2 marker group ``~commit`` needs no entry: step 1 escapes ``~``)
RESERVED_ROOT_NAMES = frozenset({"zarr.json", "zarrckpt.commit"})
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_ESCAPE_RE = re.compile(r"%([0-9A-F]{2})")


_PLAIN_RE = re.compile(rb"[A-Za-z0-9_.\-]*")


def _percent_encode(data: bytes) -> str:
    if _PLAIN_RE.fullmatch(data):  # nothing to escape (the usual FQN): skip the byte loop
        return data.decode("ascii")
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in data)


def fqn_to_path(fqn: str, *, checkpoint: str = "?") -> str:
    """Return the array path (relative to the checkpoint root) for ``fqn``."""
    if not isinstance(fqn, str):
        raise InvalidKeyError(f"key {fqn!r} for checkpoint {checkpoint!r} is not a string")
    if fqn == "":
        raise InvalidKeyError(
            f"the empty string is not a valid key (checkpoint {checkpoint!r}): "
            "every tensor needs a non-empty name"
        )
    try:
        raw = fqn.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates
        raise InvalidKeyError(
            f"key {fqn!r} for checkpoint {checkpoint!r} is not valid Unicode: {e}"
        ) from None
    name = _percent_encode(raw)
    if name.startswith(".") or name.startswith("__") or name in RESERVED_ROOT_NAMES:
        name = f"%{raw[0]:02X}" + name[1:]
    if len(name) <= MAX_COMPONENT:
        return name
    if len(name) > MAX_ENCODED:
        head = name[: _cut(name, 0)]
        return f"{head}~/{HASH_MARK}{hashlib.sha256(raw).hexdigest()}"
    pieces: list[str] = []
    start = 0
    while start < len(name):
        end = _cut(name, start)
        pieces.append(name[start:end])
        start = end
    last = len(pieces) - 1
    return "/".join(
        ("~" if i else "") + piece + ("~" if i < last else "") for i, piece in enumerate(pieces)
    )


def _cut(name: str, start: int) -> int:
    """End of the piece of ``name`` starting at ``start``: at most MAX_COMPONENT
    characters, never inside a ``%XX`` escape."""
    end = min(start + MAX_COMPONENT, len(name))
    pct = name.rfind("%", max(start, end - 2), end)
    if end < len(name) and pct != -1 and pct > end - 3:
        end = pct
    return end


def is_hashed_path(path: str) -> bool:
    """True when ``path`` is the hashed path of a long FQN (step 4)."""
    return path.rsplit("/", 1)[-1].startswith(HASH_MARK)


def path_to_fqn(path: str) -> str:
    """Inverse of :func:`fqn_to_path` for reversible (non-hashed) paths.

    Raises
    ------
    InvalidKeyError
        ``path`` is a hashed path (its FQN is only in the checkpoint's
        metadata) or not a path produced by :func:`fqn_to_path`.
    """
    if is_hashed_path(path):
        raise InvalidKeyError(
            f"array path {path!r} is the hashed path of a long key; its key is recorded in "
            "the checkpoint manifest and in the array's zarr.json attributes, not in the path"
        )
    name = "".join(part.strip("~") for part in path.split("/"))
    raw = bytearray()
    i = 0
    while i < len(name):
        ch = name[i]
        if ch == "%":
            if not _ESCAPE_RE.fullmatch(name, i, i + 3):
                raise InvalidKeyError(
                    f"array path {path!r} has a malformed escape at {name[i : i + 3]!r}"
                )
            raw.append(int(name[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(ch))
            i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidKeyError(f"array path {path!r} does not decode to UTF-8: {e}") from None
