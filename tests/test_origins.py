"""Origin helpers that need no server: reading an origin's Retry-After."""

from __future__ import annotations

from gateway.origins import retry_after_seconds


def test_retry_after_forms() -> None:
    assert retry_after_seconds("120", 0) == 120
    assert retry_after_seconds("0", 0) == 1  # at least a second
    assert retry_after_seconds("999999", 0) == 86400  # the plugin caps at 24 h
    assert retry_after_seconds("Thu, 01 Jan 1970 00:10:00 GMT", 0) == 600
    assert retry_after_seconds("soon", 0) == 60 and retry_after_seconds(None, 0) == 60
