"""JSON problem details (RFC 9457) for refusals on non-Capgo routes."""

from __future__ import annotations

import json

from aiohttp import web

from gateway.core.reasons import Reason


def problem_response(reason: Reason, detail: str, status: int | None = None) -> web.Response:
    code = status or reason.status
    body = {
        "type": f"urn:ota-gateway:reason:{reason.label}",
        "title": reason.label.replace("_", " "),
        "status": code,
        "detail": detail,
        "reason": reason.label,
    }
    return web.Response(
        status=code,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/problem+json",
        headers={"Cache-Control": "no-store"},
    )
