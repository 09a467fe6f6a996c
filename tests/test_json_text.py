"""The JSON text zarrckpt writes for root metadata and commit markers."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zarrckpt.format._json import dumps_json

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text()
    | st.floats(allow_nan=False, allow_infinity=False)
)
_json = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(deadline=None)
@given(st.dictionaries(st.text(), _json, max_size=6))
def test_round_trips_any_json_document(document: dict) -> None:
    text = dumps_json(document)
    # compared as canonical text, so that True / 1 / 1.0 must come back as written
    assert json.dumps(json.loads(text)) == json.dumps(document)


def test_one_line_per_member_down_to_depth_four() -> None:
    doc = {"a": {"b": {"c": {"d": {"e": [1, 2]}, "f": 1}}}}
    lines = dumps_json(doc).splitlines()
    assert lines == [
        "{",
        ' "a": {',
        '  "b": {',
        '   "c": {',
        '    "d": {"e": [1, 2]},',
        '    "f": 1',
        "   }",
        "  }",
        " }",
        "}",
    ]


def test_non_ascii_is_kept_and_nan_is_refused() -> None:
    assert dumps_json({"é": "ü"}) == '{\n "é": "ü"\n}'
    for bad in (math.nan, {"y": math.inf}, {"a": {"b": {"c": {"d": [-math.inf]}}}}):
        with pytest.raises(ValueError):
            dumps_json({"x": bad})
    with pytest.raises(ValueError):
        dumps_json(math.nan)


def test_non_str_keys_are_refused() -> None:
    for key in (1, True, None, (1, 2)):
        with pytest.raises(TypeError, match="keys must be str"):
            dumps_json({"x": {key: 1}})
