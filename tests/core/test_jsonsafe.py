"""Bounded JSON parsing (core/jsonsafe.py): depth and size are checked before parsing, without recursion."""

from __future__ import annotations

import pytest

from gateway.core.jsonsafe import JsonRejected, loads_bounded, nesting_depth


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
