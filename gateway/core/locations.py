"""Where a bundle may come from: an https URL on one of the app's origin hosts, or a file below the app's folder
of a directory origin.

Owns that one check, used when an update answer is reviewed (`core/review.py`: the url the origin offers) and
again when a download is planned (`core/plans.py`: the location a ticket names). Pure: the hosts are passed in.
"""

from __future__ import annotations

import urllib.parse

from gateway.core.names import is_relative_file
from gateway.core.reasons import Reason

MAX_URL = 2048


def url_problem(url: object, hosts: frozenset[str]) -> tuple[Reason, str] | None:
    """Why `url` is not an https URL on one of `hosts` (lowercase) without user or password; None when it is."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL:
        return Reason.ORIGIN_ERROR, "the answer has no usable url"
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises on a malformed port
    except ValueError:
        return Reason.ORIGIN_ERROR, "the answer's url is malformed"
    if parts.scheme != "https":
        return Reason.NOT_HTTPS, "the bundle url is not https"
    if host is None or host.lower() not in hosts or parts.username or parts.password:
        return Reason.FOREIGN_HOST, "the bundle url is not on a host of the app's origin"
    return None


def location_problem(location: str, hosts: frozenset[str] | None) -> tuple[Reason, str] | None:
    """Why `location` cannot be fetched from an origin with these `hosts` (None: a directory origin, where a
    location is a relative file below the app's folder); None when it can."""
    if hosts is None:
        if is_relative_file(location):
            return None
        return Reason.FOREIGN_HOST, "the location is not a file below the app's folder of the origin"
    return url_problem(location, hosts)
