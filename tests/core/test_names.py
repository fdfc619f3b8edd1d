"""Name shapes (core/names.py): what may reach a file path or URL path from a client or an index."""

from __future__ import annotations

import pytest

from gateway.core.names import host_of, is_app_id, is_channel, is_lower_hex, is_relative_file, is_version


@pytest.mark.parametrize(
    "value",
    ["com.example.app", "io.ionic.starter", "com.example.my_app", "a.b", "Com.Example.App", "com.ex-ample.app1"],
)
def test_good_app_ids(value: str) -> None:
    assert is_app_id(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "myapp",  # not reverse-domain
        "com.",
        ".com.example",
        "com..example",
        "1com.example",
        "com.example/app",
        "com.example.app/../x",
        "com.example.app\n",
        "com.example.app ",
        "com.example.-app",
        "com.exämple.app",
        "c." + "a" * 127,  # 129 characters
    ],
)
def test_bad_app_ids(value: str) -> None:
    assert not is_app_id(value)


def test_app_id_length_limit() -> None:
    assert is_app_id("c." + "a" * 126)  # 128 characters
    assert not is_app_id("c." + "a" * 127)


@pytest.mark.parametrize("value", ["1.0.0", "2.0.0-beta.1", "1.0.0+build.5", "10", "v1.2.3", "1_0_0", "a" * 64])
def test_good_versions(value: str) -> None:
    assert is_version(value)


@pytest.mark.parametrize(
    "value", ["", "..", "1..0", "../1.0.0", "1.0.0/..", "1.0/0", ".1.0", "-1.0", "1.0.0\\x", "1 0", "a" * 65, "1.0.0\n"]
)
def test_bad_versions(value: str) -> None:
    assert not is_version(value)


@pytest.mark.parametrize("value", ["production", "beta", "dev-1", "qa.eu", "a", "A_b", "x" * 64])
def test_good_channels(value: str) -> None:
    assert is_channel(value)


@pytest.mark.parametrize("value", ["", "-beta", ".beta", "be ta", "beta/1", "béta", "x" * 65, "beta\n"])
def test_bad_channels(value: str) -> None:
    assert not is_channel(value)


@pytest.mark.parametrize(
    "value", ["1.0.0.zip", "bundles/1.0.0.zip", "a/b/c/d.zip", "_x.zip", "v1+build.zip", "1.0.0.enc.zip"]
)
def test_good_relative_files(value: str) -> None:
    assert is_relative_file(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "/etc/passwd",
        "../x.zip",
        "a/../x.zip",
        "..",
        ".",
        "./x.zip",
        "a//b.zip",
        "a/b/",
        "a\\b.zip",
        ".hidden",
        "a/b/c/d/e.zip",  # five levels
        "x y.zip",
        "%2e%2e/x.zip",
        "x.zip\x00",
        "x.zip\n",  # `$` alone would accept a trailing newline
        "a\n/x.zip",
    ],
)
def test_bad_relative_files(value: str) -> None:
    assert not is_relative_file(value)


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("gw.example.com", "gw.example.com"),
        ("gw.example.com:8443", "gw.example.com"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:8443", "[::1]"),
        ("[::1]", "[::1]"),
        ("evil.com/path", None),
        ("a b", None),
        ("host:99999x", None),
        ("", None),
    ],
)
def test_host_of_a_host_header(value: str, host: str | None) -> None:
    assert host_of(value) == host


@pytest.mark.parametrize(
    ("value", "length"), [("ab" * 32, 64), ("0123456789abcdef", None), ("0", None), ("f" * 512, 512)]
)
def test_lower_hex(value: str, length: int | None) -> None:
    assert is_lower_hex(value, length)


@pytest.mark.parametrize(
    ("value", "length"),
    [
        ("AB" * 32, 64),  # uppercase is another spelling: callers normalise first
        ("ab" * 31, 64),
        ("ab" * 33, 64),
        ("", None),
        ("0x12", None),
        ("ab cd", None),
        ("ab\n", None),  # a trailing newline is no hex digit (a "$" anchor would let it pass)
        ("ab" * 32 + "\n", 64),
        ("\u0661\u0662", None),  # Arabic-Indic digits are digits to str.isdigit, not hex
        (None, None),
        (b"ab", None),
    ],
)
def test_not_lower_hex(value: object, length: int | None) -> None:
    assert not is_lower_hex(value, length)
