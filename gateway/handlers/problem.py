"""JSON problem details (RFC 9457) for refusals on non-Capgo routes."""

from __future__ import annotations

import json

from aiohttp import web

from gateway.core.reasons import Reason


def problem_body(reason: Reason, detail: str, status: int) -> bytes:
    """The problem document, for answers written below aiohttp's response objects (listener timeouts)."""
    body = {
        "type": f"urn:ota-gateway:reason:{reason.label}",
        "title": reason.label.replace("_", " "),
        "status": status,
        "detail": detail,
        "reason": reason.label,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def problem_response(reason: Reason, detail: str, status: int | None = None) -> web.Response:
    code = status or reason.status
    return web.Response(
        status=code,
        body=problem_body(reason, detail, code),
        content_type="application/problem+json",
        headers={"Cache-Control": "no-store"},
    )
