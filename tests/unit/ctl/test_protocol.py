"""The control channel's wire format: strict JSON both ways, bounded, one typed error."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.ctl.protocol import (
    MAX_LINE,
    MAX_REQUEST,
    CtlError,
    decode_message,
    encode_message,
)

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _strict(line: bytes) -> Any:
    """The line as a JSON reader that knows no NaN or Infinity reads it."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} on the wire"))


def test_limits() -> None:
    """Requests stay small; answers (a status of many routes) may be large."""
    assert MAX_REQUEST == 64 * 1024
    assert MAX_LINE == 16 * 1024 * 1024
    line = b'{"x": "' + b"a" * 100 + b'"}'
    assert decode_message(line) == {"x": "a" * 100}
    with pytest.raises(CtlError, match="longer than 50 bytes") as info:
        decode_message(line, limit=50)
    assert info.value.code == "bad-request"


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400",
                                    b"123456789e400"])
def test_numbers_json_does_not_have_are_bad_requests(number: bytes) -> None:
    """Python's json reads them; an id read as NaN was echoed back as NaN, which is not JSON."""
    with pytest.raises(CtlError) as info:
        decode_message(b'{"id": ' + number + b', "method": "status"}')
    assert info.value.code == "bad-request" and "\n" not in info.value.message
    assert number.decode().lstrip("-")[:3] in info.value.message


@pytest.mark.parametrize("line", [b"[" * 5000, b'{"a":' * 5000, b"[" * 100_000])
def test_deep_nesting_is_one_bad_request(line: bytes) -> None:
    with pytest.raises(CtlError, match="nested too deeply") as info:
        decode_message(line)
    assert info.value.code == "bad-request"


def test_answers_never_carry_nan_or_infinity() -> None:
    """A status may hold a value not measured yet: it goes out as null, never as NaN."""
    line = encode_message({"id": 1, "result": {"rtt": math.nan, "max": math.inf,
                                               "min": [-math.inf, 1.5], math.nan: "key"}})
    assert _strict(line) == {"id": 1, "result": {"rtt": None, "max": None,
                                                 "min": [None, 1.5], "nan": "key"}}


def test_requests_with_nan_or_infinity_are_refused() -> None:
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(CtlError, match="NaN and Infinity") as info:
            encode_message({"id": 1, "method": "set", "params": {"x": [value]}},
                           finite_only=True)
        assert info.value.code == "bad-request"
    assert _strict(encode_message({"id": 1, "params": {"x": 1.5}}, finite_only=True))


def test_what_json_cannot_carry_is_one_typed_error() -> None:
    circular: list[Any] = []
    circular.append(circular)
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(5000):
        node["a"] = {}
        node = node["a"]
    for message in ({"result": circular}, {"result": deep}, {"result": {(1, 2): 3}},
                    {"result": circular, "nan": math.nan}):
        with pytest.raises(CtlError) as info:
            encode_message(message)
        assert info.value.code == "unencodable" and "\n" not in info.value.message
    # what has a text form is sent as text, as before
    assert _strict(encode_message({"result": {"set": {1}}})) == {"result": {"set": "{1}"}}


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_json_values_cross_unchanged(value: Any, finite_only: bool) -> None:
    message = {"id": 1, "result": value}
    line = encode_message(message, finite_only=finite_only)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_message(line[:-1]) == message


@settings(max_examples=300, deadline=None)
@given(st.floats() | st.lists(st.floats(), max_size=4))
def test_every_float_answer_is_strict_json(value: Any) -> None:
    _strict(encode_message({"id": 1, "result": value}))


TOKENS = st.sampled_from(['{', '}', '[', ']', ',', ':', '"id"', '"a"', 'NaN', 'Infinity',
                          '-Infinity', '1e999', '-0', '1.5', '9' * 40, 'null', 'true', '"\\ud800"',
                          ' ', '\\', '"'])


@settings(max_examples=500, deadline=None)
@given(st.lists(TOKENS, max_size=40))
def test_decode_fuzz_json_like_text_only_typed_errors(tokens: list[str]) -> None:
    """Near-JSON (the constants, huge exponents, broken nesting) gives a dict or a
    bad-request, and whatever is read can be written back as strict JSON."""
    try:
        obj = decode_message("".join(tokens).encode())
    except CtlError as exc:
        assert exc.code == "bad-request"
    else:
        assert isinstance(obj, dict)
        _strict(encode_message(obj, finite_only=True))
