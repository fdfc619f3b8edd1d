"""Per-app bundle URL patterns: an offer belongs to the app that asked.

Owns the `bundle_urls` patterns of a policy (`https://cdn.example.com/apps/{app_id}/`): their validation when the
policy loads (`parse_pattern`, a ValueError naming what is wrong) and the match of an offered URL against them
(`belongs`). A pattern is an https URL prefix ending in `/`; `{app_id}` stands for the app's id. An offered URL
belongs to the app when its scheme, host and port equal the pattern's and its path, with dot segments resolved,
starts with the pattern's path. Paths with encoded slashes, backslashes or encoded dots are never taken to belong
(servers disagree on what they mean). The query is not looked at (signed CDN URLs carry one).

This stops an update server (or whoever controls it) from answering app A's check with app B's bundle from the
same host; per-app signing keys (`verification.public_keys`) are the stronger defence. Pure.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable

PLACEHOLDER = "{app_id}"
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|2e)", re.IGNORECASE)
_PATH_CHARS = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, str, int]:
    port = parts.port or 443
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, as HTTP clients apply it before sending the request."""
    out: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        elif segment == ".":
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/".join(out) or "/"


def parse_pattern(raw: str) -> str:
    """Check one pattern; return it unchanged, or raise ValueError saying what is wrong."""
    try:
        parts = urllib.parse.urlsplit(raw)
        _ = parts.port
    except ValueError:
        raise ValueError(f"not a URL: {raw!r}") from None
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"must be an https://host/path/ URL, got {raw!r}")
    if parts.username or parts.password or parts.query or parts.fragment or "?" in raw or "#" in raw:
        raise ValueError(f"must hold no credentials, query or fragment: {raw!r}")
    path = parts.path.replace(PLACEHOLDER, "app")
    if not path.endswith("/") or not _PATH_CHARS.fullmatch(path) or "{" in path or "}" in path:
        raise ValueError(f"the path must end with '/' and may hold only plain characters and {PLACEHOLDER}: {raw!r}")
    if _remove_dot_segments(path) != path or "//" in path or "%" in path:
        raise ValueError(f"the path must have no '.', '..', empty or encoded segments: {raw!r}")
    return raw


def belongs(url: str, patterns: Iterable[str], app_id: str) -> bool:
    """Does `url` lie below one of `patterns` (with `{app_id}` filled in)?"""
    try:
        parts = urllib.parse.urlsplit(url)
        origin = _origin(parts)
    except ValueError:
        return False
    if parts.username or parts.password or "\\" in parts.path or _ENCODED_SEPARATOR.search(parts.path):
        return False
    path = _remove_dot_segments(parts.path)
    for pattern in patterns:
        wanted = urllib.parse.urlsplit(pattern.replace(PLACEHOLDER, app_id))
        if _origin(wanted) == origin and path.startswith(wanted.path):
            return True
    return False
