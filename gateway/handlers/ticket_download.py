"""GET /bundles/t/{ticket}/{filename}: a download that an update answer handed out, verified on the way.

A thin shell: `core/plans.py` redeems the ticket (signature, expiry, identity) and plans the download (the client
admitted again, the ticket's origin and location confined to the app's origin, the Range form, the session key of
an encrypted bundle recovered with the app's public key, the size cap); the handler opens the origin and streams
through `handlers/bundles.stream_verified`. For a Capgo encrypted bundle the bytes are decrypted in flight and the
plain zip's SHA-256 compared with the digest inside the signed checksum; the client gets the encrypted bytes
unchanged. `Range: bytes=N-` gets a 206 of exactly those bytes, still verified; any other range form gets a 416,
never a 200.
"""

from __future__ import annotations

import time

from aiohttp import web

from gateway.core.plans import plan_ticket_download, redeem_ticket
from gateway.core.reasons import Reason, Refusal
from gateway.handlers.bundles import stream_verified
from gateway.state_keys import RUNTIME, request_audit, request_peer, request_snapshot


async def get_ticket_bundle(request: web.Request) -> web.StreamResponse:
    rt, snap = request.app[RUNTIME], request_snapshot(request)
    record = request_audit(request)
    peer = request_peer(request)
    record.path = f"/bundles/t/.../{request.match_info['filename'][:128]}"  # the audit log never holds a ticket
    ticket = redeem_ticket(request.match_info["ticket"], snap.ticket_keys, now=time.time(), peer=peer)
    if isinstance(ticket, Refusal):
        rt.metrics.ticket_count["refused"].inc()
        raise ticket
    record.app, record.version, record.origin = ticket.app_id, ticket.version, ticket.origin
    hosts = {name: o.hosts for name, o in snap.origins.items()}
    plan = plan_ticket_download(
        ticket,
        snap.policies,
        peer,
        origin_hosts=hosts,
        max_bundle_bytes=snap.config.limits.max_bundle_bytes,
        range_header=request.headers.get("Range"),
    )
    if isinstance(plan, Refusal):
        if plan.reason is Reason.TICKET_INVALID:
            rt.metrics.ticket_count["refused"].inc()
        raise plan
    origin = snap.origins[plan.origin]
    size = plan.expect.size
    body_cm = origin.open(plan.app_id, plan.location, snap.config.limits.chunk_size, peer, size_hint=size)
    rt.metrics.ticket_count["redeemed"].inc()
    return await stream_verified(request, rt, body_cm, plan, time.monotonic())
