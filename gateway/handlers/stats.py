"""POST /stats: device events (one, or a batch of up to 200), checked, counted and passed on.

A thin shell: check the events (`core/capgo.py`), admit the client to the app, apply the rate limit, forward them
to the HTTPS origin's stats endpoint (`stats_path`) or, without one, only count them, then count each event by app
and action (`ota_gateway_device_events_total`; an unknown action is `other`) and, for an app with a rollout or
halt block, per device and release (`handlers/rollout.py`, which may halt it), and answer as the backend does. An
origin's 4xx is passed on (the plugin drops the batch); an unreachable or failing origin gets a 502, which the
plugin retries, and the events are not counted until they are accepted.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.answers import capgo_json
from gateway.core.capgo import InvalidRequest, parse_stats, stats_ok
from gateway.core.plans import server_answer
from gateway.core.policy import admit
from gateway.core.reasons import Refusal
from gateway.handlers.capgo_common import call_origin, invalid, rate_limit, read_json
from gateway.handlers.rollout import count_events
from gateway.recorder import RECORDER
from gateway.state_keys import RUNTIME, request_audit, request_peer, request_snapshot

BODY_LIMIT = 2 * 1024 * 1024  # 200 events with their metadata


async def get_stats(request: web.Request) -> web.StreamResponse:
    """GET /stats: the official backend's liveness answer."""
    return capgo_json({"status": "ok"})


async def post_stats(request: web.Request) -> web.StreamResponse:
    rt, snap = request.app[RUNTIME], request_snapshot(request)
    record = request_audit(request)
    peer = request_peer(request)
    try:
        events, batch = parse_stats(await read_json(request, BODY_LIMIT))
    except InvalidRequest as exc:
        raise invalid(exc) from None
    app_id = events[0].info.app_id
    record.app = app_id
    app = admit(snap.policies, peer, app_id)
    await rate_limit(rt, snap, "stats", app, peer, app.rate_limits.stats_per_minute)
    origin = snap.origins[app.origin]
    record.origin = origin.name
    answer: Any = stats_ok(len(events), batch)
    api = origin.endpoint("stats")
    if api is not None:
        payload = [dict(e.event) for e in events] if batch else dict(events[0].event)
        status, body = await call_origin(rt, api.origin, api.path, request, peer, payload=payload)
        verdict = server_answer("stats", status, body, origin=origin.name)
        if isinstance(verdict, Refusal):
            raise verdict
        if verdict == "pass_on":
            return capgo_json(body, status)  # the backend refused the batch: the plugin drops it
        if isinstance(body, dict | list):
            answer = body
    rt.metrics.app_events(app.app_id)
    for event in events:
        rt.metrics.device_events.labels(app.app_id, event.label).inc()
    record.detail = f"{len(events)} event(s)"
    halted = await count_events(rt, snap, request.app[RECORDER], app, peer, events)
    if halted:
        record.detail += f"; halted {', '.join(halted)}"
    return capgo_json(answer)
