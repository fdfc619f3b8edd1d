"""What the Capgo routes (/updates, /stats, /channel_self) share: bodies, rate limits, upstream calls.

Bodies are read with a per-route size cap, the rate limit is counted per identity (`RateLimited`, a 429 with
Retry-After), and the update server's endpoints are called with the gateway's own identity headers. The shape of
the answers (Capgo JSON with `error`, `message` and `kind`; `invalid_request` for a malformed body) is
`gateway/answers.py`'s. Client strings never become metric labels.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from aiohttp import web

from gateway.answers import RateLimited
from gateway.core.capgo import InvalidRequest
from gateway.core.jsonsafe import JsonRejected, compact_json, loads_bounded
from gateway.core.policy import AppPolicy, Peer
from gateway.core.reasons import Reason, Refusal
from gateway.core.statecheck import Trip, TripResult
from gateway.origins import HttpsOrigin, OriginBusy, OriginError
from gateway.state import StateError
from gateway.state_keys import Runtime, Snapshot

RATE_WINDOW = 60.0
_UA_RE = re.compile(r"^[\x20-\x7e]{1,256}$")


async def read_json(request: web.Request, limit: int) -> Any:
    """The request body as JSON, at most `limit` bytes; a malformed or oversized body is `bad_request`."""
    if request.content_length is not None and request.content_length > limit:
        raise Refusal(Reason.BAD_REQUEST, f"the body is larger than {limit} bytes")
    content = request.content
    data: bytes | bytearray
    if content.is_eof():  # the whole body came with the request (a device's check, usually): taken as it is
        data = content.read_nowait()
    else:
        data = bytearray()
        async for chunk in content.iter_any():
            data += chunk
            if len(data) > limit:
                break
    if len(data) > limit:
        raise Refusal(Reason.BAD_REQUEST, f"the body is larger than {limit} bytes")
    try:
        return loads_bounded(data)
    except JsonRejected as exc:
        raise Refusal(Reason.BAD_REQUEST, _json_problem(exc)) from None


def _json_problem(exc: JsonRejected) -> str:
    # a decoder message names a position; the client needs no more than "not JSON" (and never its own bytes)
    return "the body is not JSON" if str(exc).startswith("not JSON") else f"the body is refused: {exc}"


def invalid(exc: InvalidRequest) -> Refusal:
    return Refusal(Reason.BAD_REQUEST, str(exc))


async def rate_limit(
    rt: Runtime,
    snap: Snapshot,
    route: str,
    app: AppPolicy,
    peer: Peer,
    per_minute: int,
    *,
    mark: tuple[str, str] | None = None,
) -> TripResult:
    """Count one request of this identity on this route and app; raise `RateLimited` past the policy's limit.

    With `mark` (app id, channel), the same trip to the store reads that channel's high-water mark
    (`core/statecheck.py`); `high_water()` takes it from the result. A failing state store (already counted and
    reported by `GuardedState`) lets the request pass with `state.rate_limit_on_failure: fail_open`, the default,
    and refuses it (`state_error`) with `fail_closed`.
    """
    fail_open = snap.config.state.rate_limit_on_failure != "fail_closed"
    key = f"{route}|{app.app_id}|{peer.identity.sha256}"
    trip = Trip(key, per_minute, RATE_WINDOW, time.time(), mark, read_after_failed_count=fail_open)
    result = await rt.state.check(trip)
    if result.count_error is not None:
        if not fail_open:
            raise StateError("hit") from result.count_error
    elif result.retry is not None:
        raise RateLimited(result.retry)
    return result


def high_water(result: TripResult) -> str | None:
    """The high-water mark read in a request's trip to the store (`rate_limit` with `mark`); `StateError` if the
    read failed."""
    if result.mark_error is not None:
        raise StateError("high_water") from result.mark_error
    if not result.mark_read:
        raise RuntimeError("the trip to the state store read no high-water mark")
    return result.mark


def upstream_headers(request: web.Request) -> dict[str, str]:
    """Headers for a Capgo endpoint of the origin: JSON, and the device's User-Agent when it is plain text."""
    headers = {"Content-Type": "application/json"}
    agent = request.headers.get("User-Agent", "")
    if _UA_RE.fullmatch(agent):
        headers["User-Agent"] = agent
    return headers


async def call_origin(
    rt: Runtime,
    origin: HttpsOrigin,
    path: str,
    request: web.Request,
    peer: Peer,
    *,
    method: str = "POST",
    payload: Any = None,
    query: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """Call a Capgo endpoint of an HTTPS origin; (status, parsed JSON or None). Unreachable: `origin_error`."""
    url = origin.url(path)
    if query:
        url = url.with_query(query)
    body = None if payload is None else compact_json(payload).encode()
    try:
        status, data = await origin.exchange(method, url, body=body, headers=upstream_headers(request), peer=peer)
    except OriginBusy as exc:  # healthy but busy: the device is told to wait as long as the origin asked
        raise RateLimited(exc.retry_after) from None
    except OriginError as exc:
        rt.origin_failed(origin.name, str(exc))
        raise Refusal(exc.reason, str(exc)) from None
    rt.origin_ok(origin.name)
    try:
        return status, json.loads(data) if data else None
    except (ValueError, UnicodeDecodeError):
        return status, None
