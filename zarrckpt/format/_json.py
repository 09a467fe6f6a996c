"""The JSON text of zarrckpt's metadata documents (root manifest, commit marker)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["dumps_json", "loads_json"]

#: objects nested deeper than this are written on one line by :func:`dumps_json`
_JSON_LINE_DEPTH = 4
#: members whose values are written one per line one level higher: the root's
#: consolidated metadata lists one array document per line
_SHALLOW = {"consolidated_metadata": 3}


def dumps_json(document: Any, *, _depth: int = 0, _limit: int = _JSON_LINE_DEPTH) -> str:
    """``document`` as JSON text: objects down to depth 4 one member per line
    (indent 1), everything deeper on one line (the documents in the root's
    ``consolidated_metadata`` one per line).

    Readable (one manifest entry per line) and fast: the one-line parts go
    through the C encoder, which ``json.dumps(..., indent=...)`` never uses, so
    the manifest of 100,000 tensors is written in a fraction of the time.
    NaN and infinities are refused (``ValueError``) at every level, and so
    are object keys that are not ``str`` (``TypeError``) in the expanded ones.
    """
    if not isinstance(document, dict) or not document or _depth >= _limit:
        return json.dumps(document, allow_nan=False, ensure_ascii=False, separators=(", ", ": "))
    pad = " " * (_depth + 1)
    for key in document:
        if not isinstance(key, str):
            raise TypeError(f"JSON object keys must be str, not {type(key).__name__} ({key!r})")
    members = ",\n".join(
        f"{pad}{json.dumps(k, ensure_ascii=False)}: "
        f"{dumps_json(v, _depth=_depth + 1, _limit=_SHALLOW.get(k, _limit))}"
        for k, v in document.items()
    )
    return "{\n" + members + "\n" + " " * _depth + "}"


def loads_json(data: str | bytes) -> Any:
    """``json.loads(data)``, raising ``ValueError`` for every text it cannot parse.

    ``json.loads`` raises ``RecursionError`` for deeply nested text (``[[[[...``
    some thousand levels deep), which a hostile checkpoint can hold; readers
    handle ``ValueError`` as "not valid JSON", so that is what this raises.
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON text nested too deeply") from None
