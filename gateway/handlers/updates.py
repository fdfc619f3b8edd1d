"""POST /updates: a device's update check, asked of the origin and reviewed before the device sees the answer.

A thin shell: check the body (`core/capgo.py`), plan the check (`core/plans.plan_update`: admission, channel),
apply the rate limit, get an answer (the HTTPS origin's Capgo update endpoint, `updates_path`, or else the newest
release of the device's channel in the origin's release index), review it (`core/review.py`) against the policy and
the channel high-water mark in the state store, hold back an offer that the device's staged rollout or a halt
excludes (`core/plans.plan_staged`, `plan_fallback`: the release before it from the index, or up to date), then
hand out download tickets in place of the origin's urls (`core/plans.plan_offer`). Every answer is Capgo-shaped
JSON with `Cache-Control: no-store`; a refused offer is HTTP 200 with `error`, `message` and `kind`, as the plugin
expects.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from aiohttp import web

from gateway.answers import RateLimited, capgo_json
from gateway.core.capgo import DeviceInfo, InvalidRequest, Kind, parse_info
from gateway.core.plans import Fallback, plan_fallback, plan_offer, plan_staged, plan_update, server_answer
from gateway.core.policy import AppPolicy, Peer, admit
from gateway.core.reasons import Reason, Refusal
from gateway.core.releases import Release
from gateway.core.review import (
    Builtin,
    Decline,
    Offer,
    Outcome,
    Served,
    index_answer,
    load_public_keys,
    review_answer,
)
from gateway.core.statecheck import must_record
from gateway.handlers.capgo_common import call_origin, high_water, invalid, rate_limit, read_json
from gateway.handlers.rollout import current_halts
from gateway.origins import Origin, OriginError, ReleaseNotFound
from gateway.recorder import RECORDER, Answered, Recorder
from gateway.state import StateError
from gateway.state_keys import RUNTIME, Runtime, request_audit, request_peer, request_snapshot

BODY_LIMIT = 64 * 1024


async def get_updates(request: web.Request) -> web.StreamResponse:
    """GET /updates: the official backend's liveness answer."""
    return capgo_json({"status": "ok"})


async def _ask(
    rt: Runtime, origin: Origin, app: AppPolicy, device: DeviceInfo, channel: str, request: web.Request, peer: Peer
) -> tuple[Any, frozenset[str] | None, Served | None]:
    """(answer, hosts its urls may name, what the index knows of the file)."""
    api = origin.endpoint("updates")
    if api is not None:
        status, answer = await call_origin(rt, api.origin, api.path, request, peer, payload=dict(device.fields))
        verdict = server_answer("updates", status, answer, origin=origin.name)
        if isinstance(verdict, Refusal):
            rt.origin_failed(origin.name, f"update endpoint answered HTTP {status}")
            raise verdict
        return answer, origin.hosts, None
    try:
        index = await origin.index(app.app_id)
    except ReleaseNotFound as exc:
        raise Refusal(Reason.RELEASE_UNKNOWN, f"no release index for {app.app_id}") from exc
    except OriginError as exc:
        rt.origin_failed(origin.name, str(exc))
        raise Refusal(exc.reason, str(exc)) from exc
    answer, release = index_answer(index, channel, device)
    if release is None:
        return answer, None, None
    return _locate(origin, app, release, answer)


def _locate(
    origin: Origin, app: AppPolicy, release: Release, answer: dict[str, Any]
) -> tuple[dict[str, Any], frozenset[str] | None, Served]:
    """An index release's answer with the location of its file on the origin."""
    answer["url"] = origin.locate(app.app_id, release.file)
    return answer, origin.hosts, Served(release.sha256, release.size)


async def _staged(
    rt: Runtime,
    recorder: Recorder,
    app: AppPolicy,
    origin: Origin,
    device: DeviceInfo,
    channel: str,
    peer: Peer,
    offer: Offer,
) -> Fallback | None:
    """None if the offer may go to this device; else what it gets instead (`core/plans.plan_staged` and
    `plan_fallback`: the release before it that it may have, from the release index, or up to date)."""
    halts = await current_halts(rt, recorder, app)
    held = plan_staged(app, offer, cert_sha256=peer.identity.sha256, device_id=device.device_id, halts=halts)
    if held is None:
        return None
    recorder.held_back(app.app_id, held.cause)
    index = None
    if held.look_back:
        try:
            index = await origin.index(app.app_id)
        except OriginError:
            index = None  # no release to fall back to: the device is up to date
    locate = functools.partial(origin.locate, app.app_id)
    return plan_fallback(held, app, device, channel, index, locate=locate, hosts=origin.hosts)


def _tickets(
    rt: Runtime, request: web.Request, app: AppPolicy, origin: Origin, offer: Offer, peer: Peer, served: Served | None
) -> dict[str, Any]:
    """The answer with the gateway's ticket urls in place of the origin's (`core/plans.plan_offer`)."""
    snap = request_snapshot(request)
    planned = plan_offer(
        offer,
        served,
        app_id=app.app_id,
        origin=origin.name,
        peer=peer,
        key=snap.ticket_keys[0],
        now=time.time(),
        ttl=snap.config.tickets.ttl,
        public_url=snap.config.tickets.public_url,
        host_header=request.headers.get("Host"),
    )
    if isinstance(planned, Refusal):
        raise planned
    rt.metrics.ticket_count["issued"].inc(planned.tickets)
    return planned.body


def _answered(rt: Runtime, kind: str) -> None:
    """Count an update check's answer by kind (`ota_gateway_update_answers_total`), through the bound child."""
    metrics = rt.metrics
    (metrics.update_answer_count.get(kind) or metrics.update_answers.labels(kind)).inc()


def _decline(request: web.Request, rt: Runtime, outcome: Decline) -> web.Response:
    """No new version: HTTP 200 with `error`, `message` and `kind`; raised as `Answered` when it refuses for a
    reason (the recorder counts it), returned when the device is simply up to date."""
    _answered(rt, outcome.kind.value)
    response = capgo_json(outcome.body())
    if outcome.reason is not None:
        raise Answered(Refusal(outcome.reason, outcome.message), response)
    request_audit(request).detail = outcome.message
    return response


async def _answer(
    request: web.Request,
    rt: Runtime,
    app: AppPolicy,
    channel: str,
    origin: Origin,
    outcome: Outcome,
    peer: Peer,
    served: Served | None,
    mark: str | None = None,
) -> web.Response:
    """The answer to a check; an offer is recorded in the state store when it moves `mark`, the channel's
    high-water mark it was reviewed against (`core/statecheck.must_record`; without one it always is)."""
    record = request_audit(request)
    if isinstance(outcome, Decline):
        return _decline(request, rt, outcome)
    if isinstance(outcome, Builtin):
        _answered(rt, "builtin")
        return capgo_json({"version": "builtin"})
    body = _tickets(rt, request, app, origin, outcome, peer, served)
    if must_record(mark, outcome.version, outcome.lowers_channel):
        await rt.state.record_offer(app.app_id, channel, outcome.version, lower=outcome.lowers_channel)
    record.detail = f"offered {outcome.version}"
    _answered(rt, "new_version")
    return capgo_json(body)


async def post_updates(request: web.Request) -> web.StreamResponse:
    try:
        return await _update_check(request)
    except StateError as exc:  # like a failing origin: a distinct failure for the plugin, never a fake answer
        return _decline(request, request.app[RUNTIME], Decline(exc.reason.label, exc.detail, Kind.FAILED, exc.reason))


async def _update_check(request: web.Request) -> web.StreamResponse:
    rt, snap = request.app[RUNTIME], request_snapshot(request)
    record = request_audit(request)
    peer = request_peer(request)
    try:
        device = parse_info(await read_json(request, BODY_LIMIT))
    except InvalidRequest as exc:
        raise invalid(exc) from None
    record.app, record.version = device.app_id, device.version_name
    plan = plan_update(snap.policies, peer, device)
    if isinstance(plan, Refusal):
        raise plan
    app, channel = plan.app, plan.channel
    # one trip to the store: the rate limit counted, and the channel's high-water mark read for the review
    mark = None if plan.decline is not None else (app.app_id, channel)
    trip = await rate_limit(rt, snap, "updates", app, peer, app.rate_limits.updates_per_minute, mark=mark)
    origin = snap.origins[plan.origin]
    record.origin = origin.name
    outcome: Outcome
    if plan.decline is not None:
        return await _answer(request, rt, app, channel, origin, plan.decline, peer, None)
    try:
        answer, hosts, served = await _ask(rt, origin, app, device, channel, request, peer)
    except RateLimited:
        raise  # the origin asked devices to wait: a 429 with its Retry-After, which the plugin honours
    except Refusal as refusal:  # the origin failed: a distinct failure for the plugin, never a fake "up to date"
        outcome = Decline(refusal.reason.label, refusal.detail, Kind.FAILED, refusal.reason)
        return await _answer(request, rt, app, channel, origin, outcome, peer, None)
    outcome = review_answer(
        answer,
        device,
        app,
        public_keys=load_public_keys(app.verification.public_keys),
        high_water=(floor := high_water(trip)),
        hosts=hosts,
        served=served,
    )
    staged = None
    if isinstance(outcome, Offer):
        staged = await _staged(rt, request.app[RECORDER], app, origin, device, channel, peer, outcome)
    if staged is None:
        return await _answer(request, rt, app, channel, origin, outcome, peer, served, floor)
    try:
        response = await _answer(request, rt, app, channel, origin, staged.outcome, peer, staged.served, floor)
    except Answered as answered:
        answered.detail = f"{answered.detail}; {staged.why}"
        raise
    record.detail = f"{record.detail}; {staged.why}"
    return response


MANIFEST_BODY_LIMIT = 1024 * 1024
MAX_SIZE_ENTRIES = 10_000


def _size_request(raw: Any) -> tuple[str, list[dict[str, str]]]:
    """The `version` and `manifest` of a size-estimate request, checked; raise InvalidRequest otherwise."""
    version, manifest = raw.get("version"), raw.get("manifest")
    if not isinstance(version, str) or not 0 < len(version) <= 64:
        raise InvalidRequest("version must be a string of at most 64 characters")
    if not isinstance(manifest, list) or len(manifest) > MAX_SIZE_ENTRIES:
        raise InvalidRequest(f"manifest must be a list of at most {MAX_SIZE_ENTRIES} entries")
    entries = []
    for entry in manifest:
        if not isinstance(entry, dict) or not all(isinstance(v, str) and len(v) <= 1024 for v in entry.values()):
            raise InvalidRequest("manifest entries must be objects of strings")
        entries.append({k: v for k, v in entry.items() if k in ("file_name", "file_hash", "download_url")})
    return version, entries


async def post_manifest_size(request: web.Request) -> web.StreamResponse:
    """POST /updates/manifest_size: the plugin's download-size estimate, passed to the update server.

    It moves no bundle, so there is nothing to verify: the body is checked, the client admitted and rate-limited
    like an update check, and only the known fields are forwarded. An app whose origin has no update endpoint
    gets a Capgo-shaped 404.
    """
    rt, snap = request.app[RUNTIME], request_snapshot(request)
    record = request_audit(request)
    peer = request_peer(request)
    try:
        raw = await read_json(request, MANIFEST_BODY_LIMIT)
        device = parse_info(raw)
        version, manifest = _size_request(raw)
    except InvalidRequest as exc:
        raise invalid(exc) from None
    record.app, record.version = device.app_id, version
    app = admit(snap.policies, peer, device.app_id)
    await rate_limit(rt, snap, "updates", app, peer, app.rate_limits.updates_per_minute)
    origin = snap.origins[app.origin]
    record.origin = origin.name
    api = origin.endpoint("updates")
    if api is None:
        return capgo_json(
            {
                "error": "not_found",
                "message": "this app's origin has no update server for size estimates",
                "kind": "failed",
            },
            404,
        )
    path = api.path.rstrip("/") + "/manifest_size"
    payload = {**device.fields, "version": version, "manifest": manifest}
    status, answer = await call_origin(rt, api.origin, path, request, peer, payload=payload)
    verdict = server_answer("manifest_size", status, answer, origin=origin.name)
    if isinstance(verdict, Refusal):
        raise verdict
    return capgo_json(answer, status)
