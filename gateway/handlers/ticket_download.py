"""GET /bundles/t/{ticket}/{filename}: a download that an update answer handed out, verified on the way.

A thin shell: open the ticket (`core/tickets.py`: signature, expiry, identity), re-admit the client to the app,
build the digest pipeline (`core/digests.py`: for a Capgo encrypted bundle the AES key is recovered from the
session key with the app's public key, the bytes are decrypted in flight and the plain zip's SHA-256 compared with
the digest inside the signed checksum; the client gets the encrypted bytes unchanged), then stream through
`handlers/bundles.stream_verified`. `Range: bytes=N-` gets a 206 of exactly those bytes, still verified; any
other range form gets a 416, never a 200.
"""

from __future__ import annotations

import re
import time

from aiohttp import web
from yarl import URL

from gateway.core import digests
from gateway.core.capgo_crypto import CapgoCryptoError, open_session_key, recover_checksum
from gateway.core.locations import location_problem
from gateway.core.policy import AppPolicy, admit
from gateway.core.reasons import Reason, Refusal
from gateway.core.releases import Release
from gateway.core.review import load_public_keys
from gateway.core.tickets import Ticket, TicketError, open_ticket
from gateway.core.verify import Expectation
from gateway.handlers.bundles import Delivery, stream_verified
from gateway.origins import HttpsOrigin
from gateway.state_keys import RUNTIME, request_audit, request_peer

_RANGE_RE = re.compile(r"^bytes=(\d{1,15})-$")
_UNSATISFIABLE = -1


def _range_from(header: str | None) -> int | None:
    """N of `bytes=N-`; None without a Range header; `_UNSATISFIABLE` for any other form."""
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip())
    return int(match.group(1)) if match else _UNSATISFIABLE


def _aes_key(ticket: Ticket, app: AppPolicy) -> tuple[bytes, bytes] | None:
    """The bundle's AES key and IV, recovered with one of the app's public keys (the one that signed it)."""
    if ticket.session_key is None:
        return None
    for key in load_public_keys(app.verification.public_keys):
        try:
            if ticket.checksum is not None and recover_checksum(key, ticket.checksum) != ticket.sha256:
                continue
            return open_session_key(key, ticket.session_key)
        except CapgoCryptoError:
            continue
    raise Refusal(Reason.SIGNATURE_INVALID, "the bundle's session key does not open with a public key of the app")


async def get_ticket_bundle(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    record = request_audit(request)
    peer = request_peer(request)
    record.path = f"/bundles/t/.../{request.match_info['filename'][:128]}"  # the audit log never holds a ticket
    try:
        ticket = open_ticket(
            request.match_info["ticket"], rt.ticket_keys(), now=time.time(), identity=peer.identity.sha256
        )
    except TicketError as exc:
        rt.metrics.tickets.labels("refused").inc()
        raise Refusal(Reason.TICKET_INVALID, str(exc)) from None
    record.app, record.version = ticket.app_id, ticket.version
    app = admit(rt.policies, peer, ticket.app_id)
    origin = rt.origins.get(ticket.origin)
    if origin is None or origin.name != app.origin:
        rt.metrics.tickets.labels("refused").inc()
        raise Refusal(Reason.TICKET_INVALID, f"the ticket's origin {ticket.origin!r} no longer serves {app.app_id}")
    record.origin = origin.name
    problem = None if isinstance(origin, HttpsOrigin) else location_problem(ticket.location, None)
    if problem is not None:  # a directory origin serves only files inside the app's own folder
        rt.metrics.tickets.labels("refused").inc()
        raise Refusal(Reason.TICKET_INVALID, f"the ticket's location is refused: {problem[1]}")
    range_from = _range_from(request.headers.get("Range"))
    if range_from == _UNSATISFIABLE:
        raise Refusal(Reason.RANGE_NOT_SATISFIABLE, "only a single open-ended range (bytes=N-) is served")
    factory = digests.pipeline(aes=_aes_key(ticket, app), brotli=(ticket.file_name or "").endswith(".br"))
    limit = min(
        rt.config.limits.max_bundle_bytes, app.verification.max_bundle_bytes or rt.config.limits.max_bundle_bytes
    )
    if ticket.size is not None and ticket.size > limit:
        raise Refusal(Reason.SIZE_EXCEEDED, f"the bundle is {ticket.size} bytes, above the limit of {limit}")
    expect = Expectation(ticket.sha256, ticket.size, max_bytes=limit)
    if isinstance(origin, HttpsOrigin):
        body_cm = origin.open_url(URL(ticket.location), peer)
    else:
        release = Release(ticket.version, "", ticket.location, ticket.size or 1, ticket.sha256)
        body_cm = origin.open(ticket.app_id, release, rt.config.limits.chunk_size, peer)
    rt.metrics.tickets.labels("redeemed").inc()
    content_type = "application/zip" if ticket.file_name is None else "application/octet-stream"
    delivery = Delivery(factory, range_from, content_type)
    return await stream_verified(request, rt, body_cm, expect, origin.name, time.monotonic(), delivery)
