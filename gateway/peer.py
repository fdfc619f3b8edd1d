"""Who is asking: the `Peer` of a request, from its TLS client certificate or, behind a trusted front proxy,
from the identity header that proxy sends.

Owns the trust decision for identity headers. Only a TLS client whose certificate matches a configured front
proxy pin may speak for a device; its header must carry a certificate issued directly by one of the configured
client CAs, valid now, made for client authentication and not revoked. From any other client the identity headers
are ignored (the gateway never forwards a client's headers) and the attempt is counted.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from gateway.core.forwarded import CLIENT_CERT, IDENTITY_HEADERS, XFCC, parse_client_cert, parse_xfcc
from gateway.core.identity import ClientIdentity, identity_from_der
from gateway.core.policy import Peer
from gateway.core.reasons import Reason, Refusal
from gateway.metrics import Metrics
from gateway.state_keys import Snapshot


def connection_memo(request: web.BaseRequest) -> dict[str, Any]:
    """What the application derived from the request's connection once, kept for the connection's life (its
    client certificate, peer address, listener headers): the `memo` of the gateway's listeners' connections
    (`listener.GuardedRequestHandler`); a fresh, empty dict on any other connection (nothing kept)."""
    memo: dict[str, Any] | None = getattr(request.protocol, "memo", None)
    return {} if memo is None else memo


def peer_der(request: web.BaseRequest, memo: dict[str, Any] | None = None) -> bytes | None:
    """The client certificate (DER) of the request's connection, read once: `getpeercert(binary_form=True)` encodes
    it anew on every call. The gateway's listeners put the one their handshake checks read in the connection's memo;
    a connection's certificate cannot change (renegotiation is off, gateway/tls.py; TLS 1.3 has none). `memo`: the
    request's `connection_memo`, if the caller has it already."""
    if memo is None:
        memo = connection_memo(request)
    if "der" in memo:
        return cast("bytes | None", memo["der"])
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der: bytes | None = ssl_object.getpeercert(binary_form=True)
    if der is not None:
        memo["der"] = der
    return der


def _forwarded_identity(snap: Snapshot, der: bytes, now: dt.datetime) -> tuple[ClientIdentity, str]:
    try:
        identity = identity_from_der(der)
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise Refusal(Reason.BAD_REQUEST, "forwarded client certificate is not a valid certificate") from None
    entry = snap.cas.get(identity.issuer)
    if entry is None:
        raise Refusal(Reason.UNTRUSTED_CERT, "forwarded client certificate is not from a configured client CA")
    ca_name, ca_cert = entry
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise Refusal(Reason.UNTRUSTED_CERT, "forwarded client certificate does not verify against its CA") from None
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise Refusal(Reason.UNTRUSTED_CERT, "forwarded client certificate is expired or not yet valid")
    if not identity.client_auth_eku:
        raise Refusal(Reason.UNTRUSTED_CERT, "forwarded client certificate is not made for client authentication")
    return identity, ca_name


def resolve_peer(request: web.Request, snap: Snapshot, metrics: Metrics) -> Peer:
    """The request's `Peer`, judged against the request's snapshot (CAs, front proxy pins, CRLs)."""
    memo = connection_memo(request)
    der = peer_der(request, memo)
    if der is None:
        raise Refusal(Reason.NO_CLIENT_CERT, "a client certificate is required")
    now = dt.datetime.now(dt.UTC)
    direct = memo.get("peer")  # (snapshot, Peer) of a connection that is no front proxy, judged once per snapshot
    if direct is not None and direct[0] is snap:
        proxy, peer = None, cast(Peer, direct[1])
    else:
        identity = identity_from_der(der)
        proxy = snap.front_proxy(identity)
        if proxy is None:
            peer = Peer(identity, snap.cas.get(identity.issuer, (None, None))[0])
            memo["peer"] = (snap, peer)
    if proxy is None:
        headers = request.headers
        for name in IDENTITY_HEADERS:  # a loop, not any() over a generator: this runs on every request
            if name in headers:
                metrics.spoofed_identity_headers.inc()
                break
    else:
        name = CLIENT_CERT if proxy.header == "client-cert" else XFCC
        value = request.headers.get(name)
        if not value:
            raise Refusal(Reason.NO_CLIENT_CERT, f"front proxy {proxy.name} sent no {name} header")
        try:
            forwarded = parse_client_cert(value) if proxy.header == "client-cert" else parse_xfcc(value)
        except ValueError as exc:
            raise Refusal(Reason.BAD_REQUEST, f"{name} from front proxy {proxy.name}: {exc}") from None
        device, ca_name = _forwarded_identity(snap, forwarded, now)
        peer = Peer(device, ca_name, via_proxy=proxy.name)
    why = snap.revoked(peer.identity, now)
    if why:
        raise Refusal(Reason.REVOKED, why)
    return peer
