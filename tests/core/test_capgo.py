"""Capgo request shapes (core/capgo.py): what the official backend accepts, refuses, and how stats are labelled."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.capgo import (
    ACTION_LABELS,
    MAX_STATS_EVENTS,
    InvalidRequest,
    Kind,
    action_label,
    kind_for,
    parse_info,
    parse_stats,
    stats_ok,
)
from gateway.core.reasons import Reason
from tests.support import device_body


def test_the_plugins_body_is_accepted_and_forwarded_whole() -> None:
    body = device_body(defaultChannel="beta", key_id="MIIBCgKCAQEAqJikYizo")
    info = parse_info(body)
    assert (info.app_id, info.platform, info.version_name, info.default_channel) == (
        "com.example.app",
        "android",
        "1.0.0",
        "beta",
    )
    assert info.fields == body


def test_uppercase_ios_device_ids_and_builtin_are_accepted() -> None:
    info = parse_info(device_body(version="builtin", device_id="0F673663-459A-44C0-A7F5-613F2A4AF3AB", platform="ios"))
    assert info.version_name == "builtin"


def test_unknown_fields_pass_only_as_short_scalars() -> None:
    info = parse_info({**device_body(), "new_flag": True, "nested": {"a": 1}, "bad key": "x", "long": "y" * 300})
    assert info.fields["new_flag"] is True
    assert "nested" not in info.fields and "bad key" not in info.fields and "long" not in info.fields


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"app_id": None}, "app_id is required"),
        ({"app_id": 7}, "app_id must be a string"),
        ({"app_id": "app"}, "App ID must be a reverse domain"),
        ({"app_id": "com..example"}, "App ID must be a reverse domain"),
        ({"device_id": "not-a-uuid"}, "Device ID must be a valid UUID"),
        ({"device_id": "6f1c2f7e-3f5a-4c2e-9a55-0b1f7e9d2c11x"}, "device_id is longer than 36"),
        ({"platform": "web"}, "platform must be one of"),
        ({"version_name": ""}, "version_name is required"),
        ({"version_name": "1.0"}, "version_name must be a semantic version"),
        ({"version_build": None}, "version_build is required"),
        ({"plugin_version": "eight"}, "plugin_version must be a semantic version"),
        ({"is_prod": "true"}, "is_prod must be a boolean"),
        ({"defaultChannel": "../etc"}, "defaultChannel is not a valid channel name"),
        ({"key_id": "x" * 21}, "key_id is longer than 20"),
    ],
)
def test_invalid_update_requests(change: dict[str, Any], message: str) -> None:
    body = {**device_body(), **change}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(InvalidRequest, match=message):
        parse_info(body)


def test_not_an_object() -> None:
    for body in ([], "x", None, 3):
        with pytest.raises(InvalidRequest, match="JSON object"):
            parse_info(body)


def event(**extra: Any) -> dict[str, Any]:
    return {**device_body(version="1.1.0:main.js"), "action": "set", **extra}


def test_stats_single_and_batch() -> None:
    events, batch = parse_stats(event(action="checksum_fail", metadata={"k": "v"}, timestamp=1))
    assert not batch and events[0].label == "checksum_fail" and events[0].event["metadata"] == {"k": "v"}
    events, batch = parse_stats([event(), event(action="brand_new")])
    assert batch and [e.label for e in events] == ["set", "other"]
    assert events[1].action == "brand_new" and events[1].event["action"] == "brand_new"
    assert stats_ok(2, True) == {
        "status": "ok",
        "results": [{"status": "ok", "index": 0}, {"status": "ok", "index": 1}],
    }
    assert stats_ok(1, False) == {"status": "ok"}


def test_stats_without_plugin_fields_of_updates() -> None:
    body = event()
    del body["version_build"], body["plugin_version"]
    parse_stats(body)
    del body["version_os"]
    with pytest.raises(InvalidRequest, match="version_os is required"):
        parse_stats(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "empty"),
        ([event()] * (MAX_STATS_EVENTS + 1), "at most 200"),
        ([event(), {**event(), "app_id": "com.other.app"}], "same app_id"),
        (event(timestamp="yesterday"), "timestamp must be an integer"),
        (event(metadata=["x"]), "metadata must be an object"),
        (event(metadata={"k": 1}), "metadata values are strings"),
        ([event(), event(action=5)], "event 1: action must be a string"),
    ],
)
def test_invalid_stats(body: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_stats(body)


def test_action_labels_are_a_closed_set() -> None:
    assert action_label("download_50") == "download_50"
    assert action_label("x" * 64) == "other"
    assert len(ACTION_LABELS) == len(set(ACTION_LABELS))


def test_kinds() -> None:
    assert kind_for(Reason.ROLLBACK) is Kind.BLOCKED
    assert kind_for(Reason.BUILTIN_NOT_ALLOWED) is Kind.BLOCKED and kind_for(Reason.KEY_ID_MISMATCH) is Kind.BLOCKED
    assert kind_for(Reason.FOREIGN_HOST) is Kind.FAILED
    assert kind_for(Reason.IDENTITY_NOT_ALLOWED) is Kind.BLOCKED
    assert kind_for(Reason.ORIGIN_ERROR) is Kind.FAILED
    assert kind_for(Reason.RATE_LIMITED) is Kind.FAILED
