"""The answers the gateway writes itself, in their two shapes: JSON problem details (RFC 9457) on every route but
the Capgo ones, and Capgo JSON (`error`, `message`, `kind`; `Cache-Control: no-store`) on /updates, /stats and
/channel_self. `refusal_response` picks the shape by route, for handlers and for the recorder alike.

Below the handlers and the recorder: imports only the core and aiohttp, never a handler, origin or store.
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from gateway.core.capgo import error_body, kind_for
from gateway.core.jsonsafe import compact_json
from gateway.core.reasons import Reason, Refusal

CAPGO_ROUTES = frozenset({"updates", "stats", "channel"})


class RateLimited(Refusal):
    """Too many requests from one identity: answered 429 with Retry-After (the plugin honours it)."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(Reason.RATE_LIMITED, f"too many requests; retry after {self.retry_after} s")


def problem_body(reason: Reason, detail: str, status: int) -> bytes:
    """The problem document, for answers written below aiohttp's response objects (listener timeouts)."""
    body = {
        "type": f"urn:ota-gateway:reason:{reason.label}",
        "title": reason.label.replace("_", " "),
        "status": status,
        "detail": detail,
        "reason": reason.label,
    }
    return compact_json(body).encode()


def problem_response(reason: Reason, detail: str, status: int | None = None) -> web.Response:
    code = status or reason.status
    return web.Response(
        status=code,
        body=problem_body(reason, detail, code),
        content_type="application/problem+json",
        headers={"Cache-Control": "no-store"},
    )


def capgo_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=compact_json(body).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def refusal_response(route: str, refusal: Refusal, status: int | None = None) -> web.Response:
    """The answer to a refusal: Capgo-shaped on Capgo routes, problem details elsewhere."""
    if route not in CAPGO_ROUTES:
        return problem_response(refusal.reason, refusal.detail, status)
    error = "invalid_request" if refusal.reason is Reason.BAD_REQUEST else refusal.reason.label
    headers = {}
    if isinstance(refusal, RateLimited):
        headers["Retry-After"] = str(refusal.retry_after)
    body = error_body(error, refusal.detail, kind_for(refusal.reason))
    return capgo_json(body, status or refusal.reason.status, headers)
