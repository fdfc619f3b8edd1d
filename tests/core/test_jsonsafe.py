"""Bounded JSON parsing (core/jsonsafe.py): depth and size are checked before parsing, without recursion."""

from __future__ import annotations

import pytest

from gateway.core.jsonsafe import JsonRejected, compact_json, loads_bounded, nesting_depth


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b"1", 0),
        (b'"[[[["', 0),
        (b"[]", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'["\\"[", {"k": "]]]]"}]', 2),
        (b'["\\\\", [[]]]', 3),
        (b"]]]][", 1),
    ],
)
def test_nesting_depth_skips_brackets_inside_strings(text: bytes, depth: int) -> None:
    assert nesting_depth(text) == depth


def test_a_body_at_the_depth_limit_parses() -> None:
    doc = b"[" * 32 + b"]" * 32
    value = loads_bounded(doc, max_depth=32)
    for _ in range(31):
        value = value[0]
    assert value == []


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_a_body_past_the_depth_limit_is_rejected_without_recursion(depth: int) -> None:
    with pytest.raises(JsonRejected, match="nested deeper than 32"):
        loads_bounded(b'{"a":' * depth + b"1" + b"}" * depth, max_depth=32)


def test_unclosed_deep_nesting_is_rejected_too() -> None:
    with pytest.raises(JsonRejected, match="nested deeper"):
        loads_bounded(b"[" * 50_000)


def test_size_limit() -> None:
    assert loads_bounded(b'"' + b"x" * 98 + b'"', max_bytes=100) == "x" * 98
    with pytest.raises(JsonRejected, match="larger than 100 bytes"):
        loads_bounded(b'"' + b"x" * 99 + b'"', max_bytes=100)


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"[1,]", b"1" * 5000, "{'a': 1}"])
def test_malformed_json_is_rejected_as_a_value_error(raw: bytes | str) -> None:
    with pytest.raises(JsonRejected) as info:
        loads_bounded(raw)
    assert isinstance(info.value, ValueError)


def test_str_input() -> None:
    assert loads_bounded('{"app_id": "com.example.app"}') == {"app_id": "com.example.app"}


@pytest.mark.parametrize(
    ("raw", "accepted"),
    [
        (b'{"a": "' + b"[" * 40 + b'"}', True),  # many brackets, all inside a string: the scan runs and finds 1
        (b"[" * 33 + b"]" * 33, False),  # as many brackets, all real: refused
        (b'{"a": [1, {"b": []}]}', True),  # few brackets: no scan needed
    ],
)
def test_the_depth_check_only_skips_its_scan_when_the_brackets_cannot_reach_the_limit(
    raw: bytes, accepted: bool
) -> None:
    if accepted:
        loads_bounded(raw, max_depth=32)
    else:
        with pytest.raises(JsonRejected, match="nested deeper than 32"):
            loads_bounded(raw, max_depth=32)


def test_compact_json_has_no_spaces() -> None:
    assert compact_json({"a": [1, "b c"], "d": None}) == '{"a":[1,"b c"],"d":null}'


@pytest.mark.parametrize("raw", [b"NaN", b"[Infinity]", b'{"x": -Infinity}', b'{"a": {"b": NaN}}'])
def test_nan_and_infinity_are_not_json(raw: bytes) -> None:
    """Python's json module reads them; JSON (RFC 8259) and the Capgo backend's JSON.parse do not, and a NaN read
    here would be written on as `NaN`, which no update server can parse."""
    with pytest.raises(JsonRejected, match="not JSON"):
        loads_bounded(raw)


def test_the_twin_large_and_signed_numbers_are_json() -> None:
    assert loads_bounded(b'[1e308, -0.0, 1E5, -12, "NaN"]') == [1e308, -0.0, 1e5, -12, "NaN"]
    assert loads_bounded(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # a UTF-8 BOM, as json.loads takes bytes
