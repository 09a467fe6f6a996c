"""The JSON text zarrckpt writes for root metadata and commit markers."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zarrckpt._storage import dumps_json

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


@given(st.dictionaries(st.text(), _json, max_size=6))
def test_round_trips_any_json_document(document: dict) -> None:
    assert json.loads(dumps_json(document)) == document


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
    with pytest.raises(ValueError):
        dumps_json({"x": {"y": math.nan}})
