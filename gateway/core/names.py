"""Shapes of the names that reach the gateway from clients and indexes: app ids, versions, file names, hex digests.

Pure checks. A name that passes here is safe to use in a file path below an origin's root and in a URL path.
"""

from __future__ import annotations

import re

# reverse-domain app id, as the Capgo backend requires (com.example.app)
APP_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_][A-Za-z0-9_-]*)+$")
# a version as it appears in URLs and indexes: semver-like characters only, no path separators
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
CHANNEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# a Host header value: a name or bracketed IPv6 address, optionally with a port
_HOST_RE = re.compile(r"(?P<host>[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?")
_FILE_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}$")
_LOWER_HEX_RE = re.compile(r"[0-9a-f]+")  # ASCII only: an explicit range never matches other digits


def is_app_id(value: str) -> bool:
    return len(value) <= 128 and APP_ID_RE.fullmatch(value) is not None


def is_version(value: str) -> bool:
    return VERSION_RE.fullmatch(value) is not None and ".." not in value


def is_channel(value: str) -> bool:
    return CHANNEL_RE.fullmatch(value) is not None


def is_relative_file(value: str) -> bool:
    """A relative path of plain parts (no `..`, no absolute path, no backslash), at most 4 levels deep."""
    parts = value.split("/")
    return 0 < len(parts) <= 4 and all(_FILE_PART_RE.fullmatch(p) and p not in (".", "..") for p in parts)


def host_of(value: str) -> str | None:
    """The host part of a Host header (port dropped), or None unless it is a plain name or address."""
    match = _HOST_RE.fullmatch(value)
    return match.group("host") if match else None


def is_lower_hex(value: object, length: int | None = None) -> bool:
    """A non-empty string of lowercase hex digits (`length` of them when given): the one form digests, checksums
    and certificate fingerprints take inside the gateway."""
    return (
        isinstance(value, str)
        and (length is None or len(value) == length)
        and _LOWER_HEX_RE.fullmatch(value) is not None  # not set(value) <= ...: a set per call costs 2-4x more
    )
