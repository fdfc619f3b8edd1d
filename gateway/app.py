"""The aiohttp applications: the public mTLS app (routes, identity and audit middleware) and the admin app.

Owns routing and the request envelope: every request gets the runtime's current snapshot (config, policies,
origins, keys; `state_keys.Snapshot`), which it uses to its end even if a reload replaces it meanwhile, its client
identity (from the TLS peer certificate, derived once per certificate), one audit record that handlers annotate
(app, version, origin, detail), and HSTS.
The envelope never records an outcome itself: what the handler returns or raises goes to `gateway/recorder.py`,
which answers refusals (problem details, Capgo-shaped JSON on the Capgo routes), writes the audit line and counts
the request once. Top-down: listener -> envelope -> handler -> core plan -> origin / verifier -> recorder.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from gateway.answers import problem_response
from gateway.audit import AuditRecord
from gateway.config import Config, TlsListener
from gateway.core.connguard import fd_pressure
from gateway.core.names import host_of
from gateway.core.reasons import Reason, Refusal, for_http_error
from gateway.handlers.bundles import get_bundle
from gateway.handlers.channel import channel_self
from gateway.handlers.stats import get_stats, post_stats
from gateway.handlers.ticket_download import get_ticket_bundle
from gateway.handlers.updates import get_updates, post_manifest_size, post_updates
from gateway.listener import LowLevelRecorder
from gateway.metrics import exposition_registry
from gateway.peer import connection_memo, resolve_peer
from gateway.recorder import RECORDER, Recorder
from gateway.state_keys import AUDIT_KEY, PEER_KEY, RUNTIME, SNAPSHOT_KEY, Runtime, Snapshot

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger("ota_gateway.http")


_ROUTE_LABELS = {"bundle", "updates", "stats", "channel", "ticket"}
_LABEL_OF: dict[str | None, str] = {}  # route name -> the route label it counts under (a handful of names)


def _route_label(request: web.Request) -> str:
    route = request.match_info.route
    name = route.name if route is not None else None
    label = _LABEL_OF.get(name)
    if label is None:
        label = (name or "").partition("_")[0]  # updates_size counts as updates
        label = _LABEL_OF[name] = label if label in _ROUTE_LABELS else "other"
    return label


_NO_PEER = object()


def _peer_ip(request: web.Request) -> str | None:
    """The client's address as the audit line names it, read once per connection."""
    memo = connection_memo(request)
    ip = memo.get("ip", _NO_PEER)
    if ip is _NO_PEER:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        ip = memo["ip"] = str(peer[0]) if peer else None
    return cast("str | None", ip)


def envelope_for(rt: Runtime, recorder: Recorder) -> Middleware:
    """The one middleware of the public app: snapshot, identity, the audit gate, the handler, the recorder.

    One coroutine (not one per concern) and its runtime and recorder bound here, not looked up per request."""

    @web.middleware
    async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
        snap = request[SNAPSHOT_KEY] = rt.snapshot  # taken once: the request keeps it across a reload
        started = time.monotonic()
        route = _route_label(request)
        record = AuditRecord(route, request.method, request.path[:256], peer=_peer_ip(request))
        request[AUDIT_KEY] = record
        live = rt.live
        live.active += 1
        resp: web.StreamResponse
        try:
            peer = resolve_peer(request, snap, rt.metrics)
            request[PEER_KEY] = peer
            record.set_identity(peer.identity)
            record.via_proxy = peer.via_proxy
            if rt.audit.failing:
                _audit_gate(snap)
            resp = await handler(request)
        except BaseException as exc:  # the recorder answers it, or records it and has it re-raised
            answer = recorder.settle(record, route, started, exc)
            if answer is None:
                raise
            resp = answer
        finally:
            live.active -= 1
        recorder.finish(record, route, started, resp)
        return resp

    return envelope


def _audit_gate(snap: Snapshot) -> None:
    """With `audit.on_failure: fail_closed`, no request is served while the audit log cannot be written.

    Inside the envelope, so the refusal is counted and its own audit line attempted: the first one that gets
    written ends the failure (as does the periodic probe), and requests are served again.
    """
    if snap.config.audit.on_failure == "fail_closed":
        raise Refusal(Reason.AUDIT_UNAVAILABLE, "the audit log cannot be written (audit.on_failure: fail_closed)")


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "ota-gateway"


def low_level_headers(
    snap: Snapshot, *, tls: bool, sockname: object = None, listener: TlsListener | None = None
) -> dict[str, str]:
    """Server (and on TLS listeners HSTS) for an answer; the `hsts_max_age` of `listener` if given, else of the
    listener `sockname` (the local address the connection came in on) belongs to, else of the first listener (parser
    errors)."""
    headers = {"Server": "ota-gateway"}
    max_age = (listener or _listener_for(snap, sockname)).hsts_max_age
    if tls and max_age:
        headers["Strict-Transport-Security"] = f"max-age={max_age}"
    return headers


def _listener_for(snap: Snapshot, sockname: object) -> TlsListener:
    """The TLS listener bound to `sockname` (host, port, ...): same port, and same address unless only one matches."""
    listeners = snap.config.listeners
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        host, port = sockname[0], sockname[1]
        same_port = [lst for lst in listeners if lst.port == port]
        exact = [lst for lst in same_port if lst.address == host]
        if exact or same_port:
            return (exact or same_port)[0]
    return listeners[0]


_BY_LISTENER: dict[str, tuple[Config, tuple[tuple[str, str], ...]]] = {}  # listener name -> (its config, headers)


def _connection_headers(request: web.Request, snap: Snapshot, memo: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The constant headers of the listener the request's connection came in on: those of the listener named by
    the TLS listener that handed the connection over (made once per name and config, for every connection after),
    else (a listener renamed by a reload, or a connection from elsewhere) of the one bound to its local address."""
    name = memo.get("listener")
    if name is not None:
        config = snap.config
        made = _BY_LISTENER.get(name)
        if made is not None and made[0] is config:
            return made[1]
        listener = next((lst for lst in config.listeners if lst.name == name), None)
        if listener is not None:
            headers = tuple(low_level_headers(snap, tls=True, listener=listener).items())
            _BY_LISTENER[name] = (config, headers)
            return headers
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return tuple(low_level_headers(snap, tls=True, sockname=sockname).items())


async def _hsts(request: web.Request, response: web.StreamResponse) -> None:
    snap = request.get(SNAPSHOT_KEY) or request.app[RUNTIME].snapshot  # the request's own, once the envelope ran
    memo = connection_memo(request)  # the headers of the connection's listener, kept while its config is current
    cached = memo.get("headers")
    if cached is None or cached[0] is not snap.config:
        cached = memo["headers"] = (snap.config, _connection_headers(request, snap, memo))
    headers = response.headers
    for name, value in cached[1]:
        headers.setdefault(name, value)
    headers["Server"] = "ota-gateway"


def recorder_for(rt: Runtime) -> Recorder:
    """The runtime's recorder (metrics and audit log live as long as the runtime)."""
    return Recorder(rt.metrics, rt.audit, lambda: rt.live.shutting_down)


def low_level_recorder(rt: Runtime) -> LowLevelRecorder:
    """Where the listener reports an answer it gave before the application saw a request (see listener.py)."""
    return recorder_for(rt).low_level


def create_app(runtime: Runtime) -> web.Application:
    """The public application served on the mTLS listeners."""
    recorder = recorder_for(runtime)
    app = web.Application(middlewares=[envelope_for(runtime, recorder)], client_max_size=64 * 1024)
    app[RUNTIME] = runtime
    app[RECORDER] = recorder
    app.router.add_get(r"/bundles/{app_id}/{version}.zip", get_bundle, name="bundle", allow_head=False)
    # the Capgo updater protocol (docs/capgo-protocol.md) and the downloads its answers hand out
    app.router.add_post("/updates", post_updates, name="updates")
    app.router.add_get("/updates", get_updates, allow_head=False)
    app.router.add_post("/updates/manifest_size", post_manifest_size, name="updates_size")
    app.router.add_post("/stats", post_stats, name="stats")
    app.router.add_get("/stats", get_stats, allow_head=False)
    app.router.add_route("*", "/channel_self", channel_self, name="channel")
    app.router.add_get("/bundles/t/{ticket}/{filename}", get_ticket_bundle, name="ticket", allow_head=False)
    app.on_response_prepare.append(_hsts)
    return app


def descriptor_usage() -> tuple[int, int] | None:
    """(open file descriptors, RLIMIT_NOFILE soft limit) of this process; None where /proc is missing."""
    import os
    import resource

    try:
        count = len(os.listdir("/proc/self/fd")) - 1  # without the descriptor listdir itself holds
    except OSError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return (count, soft) if soft > 0 else None


async def _metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    fds = descriptor_usage()
    if fds is not None:
        rt.metrics.open_fds_ratio.set(fds[0] / fds[1])
    if "application/openmetrics-text" in request.headers.get("Accept", ""):
        body = generate_openmetrics(exposition_registry(rt.metrics.registry))  # type: ignore[no-untyped-call]
        return web.Response(body=body, headers={"Content-Type": OPENMETRICS_TYPE})
    return web.Response(
        body=generate_latest(exposition_registry(rt.metrics.registry)), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


ORIGIN_FAILURE_WINDOW = 60.0  # an origin whose last answer within this many seconds was a failure is not ready


def readiness(rt: Runtime, now: dt.datetime, monotonic: float, fds: tuple[int, int] | None = None) -> list[str]:
    """Why the gateway should not get traffic now; empty when it is ready. `fds`: (open descriptors, limit)."""
    problems = []
    snap, live = rt.snapshot, rt.live
    if live.shutting_down:
        problems.append("shutting down")
    if fds is not None and fd_pressure(*fds):
        problems.append(f"open file descriptors at {fds[0]} of the limit {fds[1]}")
    for material in snap.material.values():
        for exp in material.expiries:
            if exp.kind != "crl" and exp.not_after <= now:
                problems.append(f"{exp.kind} {exp.name} expired at {exp.not_after:%Y-%m-%dT%H:%M:%SZ}")
            elif exp.not_before is not None and now < exp.not_before:
                problems.append(f"{exp.kind} {exp.name} is not valid before {exp.not_before:%Y-%m-%dT%H:%M:%SZ}")
        for crl in material.revocation.stale_lists(now):
            if material.revocation.expired_mode == "fail_closed":
                problems.append(f"CRL {crl.source} of {crl.ca_name} is past its nextUpdate (fail_closed)")
    for name, (ok, when, detail) in sorted(live.origin_health.items()):
        if not ok and monotonic - when < ORIGIN_FAILURE_WINDOW:
            problems.append(f"origin {name} failing: {detail}")
    if live.state_fault.failing:  # until an operation or the periodic probe succeeds
        problems.append(live.state_fault.describe(monotonic))
    if rt.audit.failing and snap.config.audit.on_failure == "fail_closed":
        problems.append(rt.audit.fault.describe(monotonic) + " (fail_closed: requests are refused)")
    return problems


async def _readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    fds = descriptor_usage()
    if fds is not None:
        rt.metrics.open_fds_ratio.set(fds[0] / fds[1])
    problems = readiness(rt, dt.datetime.now(dt.UTC), time.monotonic(), fds)
    snap = rt.snapshot
    body = {
        "status": "not ready" if problems else "ready",
        "reasons": problems,
        "apps": len(snap.policies.apps),
        "origins": sorted(snap.origins),
        "last_reload_ok": rt.live.last_reload_ok,
    }
    return web.json_response(body, status=503 if problems else 200)


@web.middleware
async def _admin_problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404 and 405 (text/plain) as problem details, like every other error answer, each with the
    reason for its status (`reasons.for_http_error`) and a detail that says what happened (never the client's
    bytes)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            detail = "no such path: the admin listener serves /metrics, /healthz and /readyz"
        elif exc.status == 405:
            detail = "method not allowed: /metrics, /healthz and /readyz answer GET and HEAD only (see Allow)"
        else:
            detail = exc.reason or "request refused"
        resp = problem_response(for_http_error(exc.status), detail, exc.status)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp


def create_admin_app(runtime: Runtime) -> web.Application:
    """Plain-HTTP admin application (loopback by default): /metrics, /healthz, /readyz."""
    app = web.Application(middlewares=[_admin_problems])
    app[RUNTIME] = runtime
    app.on_response_prepare.append(_server_header)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


def create_plain_app(runtime: Runtime, https_port: int) -> web.Application:
    """The optional plain-HTTP listener: 308 to https for GET/HEAD, 426 with problem details otherwise.

    It never contacts an origin and never reads a body. The redirect keeps the path and query and names the
    TLS port; the host comes from the Host header only when it is a plain host name or address.
    """

    async def answer(request: web.Request) -> web.StreamResponse:
        host = host_of(request.host or "") or "localhost"
        target = f"https://{host}:{https_port}{request.rel_url}"
        if request.method in ("GET", "HEAD"):
            runtime.metrics.plain_http.labels("redirect").inc()
            return web.Response(status=308, headers={"Location": target, "Cache-Control": "no-store"})
        runtime.metrics.plain_http.labels("upgrade_required").inc()
        resp = problem_response(Reason.NOT_HTTPS, f"plain HTTP is refused; use {target}", 426)
        resp.headers["Upgrade"] = "TLS/1.2, HTTP/1.1"
        resp.headers["Connection"] = "Upgrade, close"  # no HSTS here: it is ignored over plain HTTP (RFC 6797 8.1)
        return resp

    app = web.Application(client_max_size=1024)
    app.router.add_route("*", "/{tail:.*}", answer)
    app.on_response_prepare.append(_server_header)
    return app
