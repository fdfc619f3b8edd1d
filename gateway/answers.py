"""The answers the gateway writes itself, in their two shapes: JSON problem details (RFC 9457) on every route but
the Capgo ones, and Capgo JSON (`error`, `message`, `kind`; `Cache-Control: no-store`) on /updates, /stats and
/channel_self. `refusal_response` picks the shape by route, for handlers and for the recorder alike.

Below the handlers and the recorder: imports only the core and aiohttp, never a handler, origin or store.
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

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


# the constant headers of problem details and Capgo JSON answers, copied per answer (a ready CIMultiDict with the
# Content-Type set: aiohttp's `content_type=` argument and a plain dict cost twice as much per Response)
_PROBLEM_HEADERS = CIMultiDict({"Content-Type": "application/problem+json", "Cache-Control": "no-store"})
_JSON_HEADERS = CIMultiDict({"Content-Type": "application/json", "Cache-Control": "no-store"})


def problem_response(reason: Reason, detail: str, status: int | None = None) -> web.Response:
    code = status or reason.status
    headers = CIMultiDict(_PROBLEM_HEADERS)
    return web.Response(status=code, body=problem_body(reason, detail, code), headers=headers)


def capgo_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    answer_headers = CIMultiDict(_JSON_HEADERS)
    if headers:
        answer_headers.update(headers)
    return web.Response(status=status, body=compact_json(body).encode(), headers=answer_headers)


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
