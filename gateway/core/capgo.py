"""The Capgo updater protocol's shapes: device requests as the official backend validates them, and answers.

Owns what a device may send to /updates, /stats and /channel_self (types, reverse-domain app id, UUID device id,
known platform, size limits; see docs/capgo-protocol.md), the closed list of stats actions used as
metric labels, and the JSON the plugin expects back: `{"error", "message", "kind"}` for everything that is not a
new version (the plugin treats an `error` without `kind` as a failure, so `kind` is always sent). Reviewing an
origin's update answer is `core/review.py`. Pure: takes parsed JSON, returns frozen values or raises
`InvalidRequest`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.core.names import is_channel
from gateway.core.reasons import Reason
from gateway.core.versions import VersionError, parse

PLATFORMS = ("ios", "android", "electron")
# the official backend's expressions (supabase/functions/_backend/utils/utils.ts)
REVERSE_DOMAIN_RE = re.compile(r"^[a-z0-9]+(\.[\w-]+)+$", re.IGNORECASE)
DEVICE_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
_EXTRA_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

MAX_STATS_EVENTS = 200
MAX_METADATA_KEYS = 30
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 2048
MAX_EXTRA_KEYS = 32  # fields of a newer plugin that the gateway passes on without knowing them

# Actions a device sends in stats (capgo-protocol.md); anything else is counted as "other".
ACTIONS: tuple[str, ...] = (
    "set",
    "set_fail",
    "set_next",
    "reset",
    "delete",
    "update_fail",
    "download_fail",
    *(f"download_{p}" for p in range(10, 100, 10)),
    "download_complete",
    "download_zip_start",
    "download_zip_complete",
    "download_manifest_start",
    "download_manifest_complete",
    "download_manifest_file_fail",
    "download_manifest_checksum_fail",
    "checksum_fail",
    "checksum_required",
    "decrypt_fail",
    "unzip_fail",
    "low_mem_fail",
    "insufficient_disk_space",
    "app_moved_to_foreground",
    "app_moved_to_background",
    "app_launch_start",
    "app_launch_ready",
    "app_launch_timeout",
    "blocked_by_server_url",
    "rate_limit_reached",
    "app_crash",
    "app_anr",
    "webview_javascript_error",
    "get",
    "setChannel",
    "getChannel",
)
OTHER_ACTION = "other"
ACTION_LABELS: tuple[str, ...] = (*ACTIONS, OTHER_ACTION)
_ACTION_SET = frozenset(ACTIONS)


class Kind(enum.Enum):
    UP_TO_DATE = "up_to_date"
    BLOCKED = "blocked"
    FAILED = "failed"


KIND_LABELS: tuple[str, ...] = ("new_version", "builtin", *(k.value for k in Kind))

# refusals that are the policy's decision (the plugin stops asking); everything else is a failure
_BLOCKED_REASONS = frozenset(
    {
        Reason.IDENTITY_NOT_ALLOWED,
        Reason.DENIED,
        Reason.PIN_MISMATCH,
        Reason.REVOKED,
        Reason.UNTRUSTED_CERT,
        Reason.NO_CLIENT_CERT,
        Reason.APP_UNKNOWN,
        Reason.CHANNEL_NOT_ALLOWED,
        Reason.BELOW_FLOOR,
        Reason.ROLLBACK,
        Reason.BUILTIN_NOT_ALLOWED,
        Reason.VERSION_JUMP,
        Reason.KEY_ID_MISMATCH,
    }
)


def kind_for(reason: Reason) -> Kind:
    return Kind.BLOCKED if reason in _BLOCKED_REASONS else Kind.FAILED


def error_body(error: str, message: str, kind: Kind) -> dict[str, str]:
    return {"error": error, "message": message, "kind": kind.value}


class InvalidRequest(ValueError):
    """A device request the official backend would refuse with HTTP 400; the message says which field."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """The info object every plugin request carries; `fields` is what is forwarded to the origin."""

    app_id: str
    device_id: str
    platform: str
    version_name: str
    version_build: str
    plugin_version: str
    default_channel: str | None
    fields: Mapping[str, Any] = field(repr=False)


def _string(body: Mapping[str, Any], name: str, *, required: bool, max_len: int, allow_empty: bool = False) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"{name} is required")
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string")
    if required and not value and not allow_empty:
        raise InvalidRequest(f"{name} is required")
    if len(value) > max_len:
        raise InvalidRequest(f"{name} is longer than {max_len} characters")
    return value


def _boolean(body: Mapping[str, Any], name: str, *, required: bool) -> None:
    value = body.get(name)
    if value is None and not required:
        return
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a boolean")


def _is_extra(key: str, value: Any) -> bool:
    """A field of a newer plugin: passed on when it is a short scalar under a plain name."""
    short = isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= 256)
    return short and _EXTRA_KEY_RE.fullmatch(key) is not None


# field -> (required for updates/channel, required for stats, max length)
_INFO_STRINGS: dict[str, tuple[bool, bool, int]] = {
    "app_id": (True, True, 128),
    "device_id": (True, True, 36),
    "platform": (True, True, 16),
    "version_name": (True, True, 128),
    "version_build": (True, False, 64),
    "version_code": (False, False, 64),
    "version_os": (False, True, 64),
    "plugin_version": (True, False, 64),
    "custom_id": (False, False, 255),
    "defaultChannel": (False, False, 64),
    "key_id": (False, False, 20),
    "install_source": (False, False, 64),
    "old_version_name": (False, False, 128),
    "channel": (False, False, 64),
}
_INFO_BOOLS = ("is_emulator", "is_prod")


def parse_info(body: Any, *, stats: bool = False) -> DeviceInfo:
    """Check the info object of an /updates, /channel_self (or, with `stats`, one /stats event) request."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    values = {
        name: _string(body, name, required=req_stats if stats else req, max_len=max_len)
        for name, (req, req_stats, max_len) in _INFO_STRINGS.items()
    }
    for name in _INFO_BOOLS:
        _boolean(body, name, required=stats)
    if not REVERSE_DOMAIN_RE.fullmatch(values["app_id"]):
        raise InvalidRequest("App ID must be a reverse domain string")
    if not DEVICE_ID_RE.fullmatch(values["device_id"]):
        raise InvalidRequest("Device ID must be a valid UUID string")
    if values["platform"] not in PLATFORMS:
        raise InvalidRequest(f"platform must be one of {', '.join(PLATFORMS)}")
    if not stats:
        try:
            parse(values["version_name"])
        except VersionError:
            raise InvalidRequest("version_name must be a semantic version or builtin") from None
        try:
            parse(values["plugin_version"])
        except VersionError:
            raise InvalidRequest("plugin_version must be a semantic version") from None
    for name in ("defaultChannel", "channel"):
        if values[name] and not is_channel(values[name]):
            raise InvalidRequest(f"{name} is not a valid channel name")
    fields: dict[str, Any] = {}
    for key, value in body.items():
        known = key in _INFO_STRINGS or key in _INFO_BOOLS
        if known or (len(fields) < len(_INFO_STRINGS) + MAX_EXTRA_KEYS and _is_extra(key, value)):
            fields[key] = value
    return DeviceInfo(
        app_id=values["app_id"],
        device_id=values["device_id"],
        platform=values["platform"],
        version_name=values["version_name"],
        version_build=values["version_build"],
        plugin_version=values["plugin_version"],
        default_channel=values["defaultChannel"] or None,
        fields=fields,
    )


@dataclass(frozen=True, slots=True)
class StatsEvent:
    info: DeviceInfo
    action: str  # as sent (forwarded)
    label: str  # the metric label: the action if known, else "other"
    event: Mapping[str, Any] = field(repr=False)  # the checked event, as forwarded


def action_label(action: str) -> str:
    return action if action in _ACTION_SET else OTHER_ACTION


def _metadata(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise InvalidRequest("metadata must be an object of strings")
    if len(value) > MAX_METADATA_KEYS:
        raise InvalidRequest(f"metadata has more than {MAX_METADATA_KEYS} keys")
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY:
            raise InvalidRequest(f"metadata keys are at most {MAX_METADATA_KEY} characters")
        if not isinstance(item, str) or len(item) > MAX_METADATA_VALUE:
            raise InvalidRequest(f"metadata values are strings of at most {MAX_METADATA_VALUE} characters")


def parse_stats(body: Any) -> tuple[tuple[StatsEvent, ...], bool]:
    """Check a /stats body: one event or an array of up to 200 of one app. Returns (events, was_a_batch)."""
    batch = isinstance(body, list)
    raw = body if batch else [body]
    if not raw:
        raise InvalidRequest("the batch is empty")
    if len(raw) > MAX_STATS_EVENTS:
        raise InvalidRequest(f"a batch holds at most {MAX_STATS_EVENTS} events")
    events = []
    for i, item in enumerate(raw):
        where = f"event {i}: " if batch else ""
        try:
            info = parse_info(item, stats=True)
            action = _string(item, "action", required=False, max_len=64)
            timestamp = item.get("timestamp")
            if timestamp is not None and (not isinstance(timestamp, int) or isinstance(timestamp, bool)):
                raise InvalidRequest("timestamp must be an integer (milliseconds)")
            _metadata(item.get("metadata"))
        except InvalidRequest as exc:
            raise InvalidRequest(f"{where}{exc}") from None
        event = dict(info.fields)
        for key in ("action", "timestamp", "metadata"):
            if item.get(key) is not None:
                event[key] = item[key]
        events.append(StatsEvent(info, action, action_label(action), event))
    if len({e.info.app_id for e in events}) > 1:
        raise InvalidRequest("all events of a batch must have the same app_id")
    return tuple(events), batch


def stats_ok(count: int, batch: bool) -> dict[str, Any]:
    """The official backend's answer to accepted stats."""
    if not batch:
        return {"status": "ok"}
    return {"status": "ok", "results": [{"status": "ok", "index": i} for i in range(count)]}
