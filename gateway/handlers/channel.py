"""/channel_self: a device sets (POST), reads (PUT), lists (GET) or unsets (DELETE) its channel.

A thin shell: check the info object (`core/capgo.py`; GET carries it as query parameters), admit the client to
the app; `core/plans.channel_self_problem` refuses self-setting when the app's policy forbids it
(`channels.self_set`, counted as `channel_not_allowed`) or names a channel the policy does not allow. Then forward
to the HTTPS origin's channel endpoint (`channel_path`). Without one the gateway answers reads from the policy (the
app's allowed channels and default) and refuses writes, which it has nowhere to keep. Answers are the backend's JSON.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.answers import capgo_json
from gateway.core.capgo import InvalidRequest, Kind, error_body, parse_info
from gateway.core.plans import channel_self_problem, current_channel, server_answer
from gateway.core.policy import AppPolicy, admit
from gateway.core.reasons import Reason, Refusal
from gateway.handlers.capgo_common import call_origin, invalid, read_json
from gateway.recorder import Answered
from gateway.state_keys import RUNTIME, request_audit, request_peer, request_snapshot

BODY_LIMIT = 16 * 1024
_BOOLS = {"true": True, "false": False}


def _from_query(query: Any) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key in query:
        value = query.get(key)
        body[key] = _BOOLS.get(value.lower(), value) if key in ("is_emulator", "is_prod") and value else value
    return body


def _refuse_set(problem: Refusal) -> Answered:
    """The backend's refusal of a self-set channel (HTTP 400), with the `kind` the plugin needs."""
    body = error_body("channel_set_from_plugin_not_allowed", problem.detail, Kind.BLOCKED)
    return Answered(problem, capgo_json(body, 400))


def _local(request: web.Request, app: AppPolicy, default_channel: str | None) -> web.Response:
    if request.method == "GET":
        channels = app.channels
        return capgo_json(
            [
                {"id": i + 1, "name": name, "public": name == channels.default, "allow_self_set": channels.self_set}
                for i, name in enumerate(channels.allowed)
            ]
        )
    if request.method == "PUT":
        current = current_channel(app, default_channel)
        return capgo_json({"channel": current, "status": "default", "allowSet": app.channels.self_set})
    message = "the app's origin has no channel endpoint (channel_path): the gateway cannot keep a device's channel"
    return capgo_json(error_body("channel_self_unsupported", message, Kind.FAILED), 400)


async def channel_self(request: web.Request) -> web.StreamResponse:
    rt, snap = request.app[RUNTIME], request_snapshot(request)
    record = request_audit(request)
    peer = request_peer(request)
    if request.method not in ("GET", "PUT", "POST", "DELETE"):
        raise Refusal(Reason.BAD_REQUEST, f"method {request.method} is not used on /channel_self")
    body = _from_query(request.query) if request.method == "GET" else await read_json(request, BODY_LIMIT)
    try:
        device = parse_info(body)
    except InvalidRequest as exc:
        raise invalid(exc) from None
    record.app = device.app_id
    app = admit(snap.policies, peer, device.app_id)
    problem = channel_self_problem(app, request.method, body.get("channel"))
    if problem is not None:
        if problem.reason is Reason.CHANNEL_NOT_ALLOWED:
            raise _refuse_set(problem)
        raise problem
    origin = snap.origins[app.origin]
    record.origin = origin.name
    api = origin.endpoint("channel")
    if api is None:
        return _local(request, app, device.default_channel)
    if request.method == "GET":
        query = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in device.fields.items()}
        status, answer = await call_origin(rt, api.origin, api.path, request, peer, method="GET", query=query)
    else:
        payload = dict(device.fields)
        status, answer = await call_origin(
            rt, api.origin, api.path, request, peer, method=request.method, payload=payload
        )
    verdict = server_answer("channel", status, answer, origin=origin.name)
    if isinstance(verdict, Refusal):
        raise verdict
    return capgo_json(answer, status)
