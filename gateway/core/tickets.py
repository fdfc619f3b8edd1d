"""Download tickets: stateless, expiring, HMAC-SHA256-signed tokens that a bundle URL carries.

Owns the ticket's fields, its compact URL-safe encoding and its checks. A ticket names everything the download
needs and nothing the client may choose: app, version, the expected SHA-256 (of the plain file), the size if known,
the Capgo encrypted checksum and session key if any, the origin (a name from gateway.yaml) and the location on it,
the SHA-256 of the client certificate it was issued to, and its expiry. Any gateway instance holding the key can
serve it; a ticket that is altered, expired, signed by an unknown key or presented by another identity is refused.

Keys carry ids: a ticket names the id of the key that signed it, so keys rotate by adding a new key (which signs)
and removing the old one after the ticket lifetime. Pure: the caller passes the keys and the current time.

Format: `v1.<key id>.<payload>.<mac>`, payload and mac base64url without padding; the MAC is HMAC-SHA256 over
`v1.<key id>.<payload>`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.core.jsonsafe import compact_json
from gateway.core.names import is_lower_hex

PREFIX = "v1"
KEY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MIN_SECRET_BYTES = 32
MAX_TOKEN_LENGTH = 4096
_TOKEN_RE = re.compile(r"[A-Za-z0-9_.-]+")  # ASCII only: the MAC is over these exact characters


class TicketError(ValueError):
    """A ticket that must not be honoured; the message says why (for the audit log, not for the client)."""


@dataclass(frozen=True, slots=True)
class TicketKey:
    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not KEY_ID_RE.fullmatch(self.key_id):
            raise ValueError(f"ticket key id must be 1-32 characters of [A-Za-z0-9_-], got {self.key_id!r}")
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"ticket key {self.key_id}: secret must be at least {MIN_SECRET_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class Ticket:
    app_id: str
    version: str
    sha256: str  # expected SHA-256 of the file after decryption (and Brotli decompression for `.br` files)
    origin: str  # origin name in gateway.yaml
    location: str  # file below a directory origin's app folder, or an https URL on the origin
    identity: str  # SHA-256 of the client certificate the ticket was issued to
    expires: int  # Unix seconds
    size: int | None = None  # size of the file as the origin serves it, if known
    checksum: str | None = None  # Capgo encrypted checksum (hex RSA block)
    session_key: str | None = None  # Capgo `<iv b64>:<rsa block b64>`
    file_name: str | None = None  # a delta manifest entry's file name (`.br`: compressed)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise TicketError("ticket is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TicketError("ticket is not base64url") from None


@functools.lru_cache(maxsize=16)
def _keyed(secret: bytes) -> hmac.HMAC:
    """HMAC-SHA256 with `secret` set up once (its padded key hashed): each MAC is a copy of it, about half the cost of
    `hmac.new` per ticket. Keys are few (the current one and those kept for rotation)."""
    return hmac.new(secret, digestmod=hashlib.sha256)


def _mac(secret: bytes, signed: str) -> bytes:
    mac = _keyed(secret).copy()
    mac.update(signed.encode("ascii"))
    return mac.digest()


def _check_fields(ticket: Ticket) -> None:
    """A ticket about to be sealed with fields of the wrong shape is a bug in the caller."""
    if not is_lower_hex(ticket.sha256, 64) or not is_lower_hex(ticket.identity, 64):
        raise ValueError("ticket sha256 and identity must be 64 lowercase hex characters")
    if ticket.checksum is not None and not (is_lower_hex(ticket.checksum) and len(ticket.checksum) % 2 == 0):
        raise ValueError("ticket checksum must be lowercase hex bytes")


def seal(ticket: Ticket, key: TicketKey) -> str:
    """Encode and sign `ticket` with `key`."""
    _check_fields(ticket)
    # built with its keys in sorted order, then the gateway's compact encoder: the text of json.dumps(doc,
    # separators=(",", ":"), sort_keys=True) without an encoder built and a sort per ticket
    doc: dict[str, Any] = {"a": ticket.app_id}
    if ticket.checksum is not None:
        doc["c"] = _b64(bytes.fromhex(ticket.checksum))
    doc["e"] = ticket.expires
    if ticket.file_name is not None:
        doc["f"] = ticket.file_name
    doc["h"] = _b64(bytes.fromhex(ticket.sha256))
    doc["i"] = _b64(bytes.fromhex(ticket.identity))
    if ticket.session_key is not None:
        doc["k"] = ticket.session_key
    doc["l"] = ticket.location
    doc["o"] = ticket.origin
    if ticket.size is not None:
        doc["s"] = ticket.size
    doc["v"] = ticket.version
    payload = _b64(compact_json(doc).encode())
    signed = f"{PREFIX}.{key.key_id}.{payload}"
    return f"{signed}.{_b64(_mac(key.secret, signed))}"


def _str(doc: dict[str, Any], name: str, *, optional: bool = False) -> str | None:
    value = doc.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise TicketError(f"ticket field {name} is missing or not a string")
    return value


def _int(doc: dict[str, Any], name: str, *, optional: bool = False) -> int | None:
    value = doc.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise TicketError(f"ticket field {name} is missing or not a positive integer")
    return value


def _decode(payload: str) -> Ticket:
    try:
        doc = json.loads(_unb64(payload))
    except (ValueError, UnicodeDecodeError):
        raise TicketError("ticket payload is not JSON") from None
    if not isinstance(doc, dict) or set(doc) - set("avholiesckf"):
        raise TicketError("ticket payload has unknown fields")
    digest, identity = _unb64(_str(doc, "h") or ""), _unb64(_str(doc, "i") or "")
    if len(digest) != 32 or len(identity) != 32:
        raise TicketError("ticket digest or identity is not a SHA-256")
    checksum = _str(doc, "c", optional=True)
    return Ticket(
        app_id=_str(doc, "a") or "",
        version=_str(doc, "v") or "",
        sha256=digest.hex(),
        origin=_str(doc, "o") or "",
        location=_str(doc, "l") or "",
        identity=identity.hex(),
        expires=_int(doc, "e") or 0,
        size=_int(doc, "s", optional=True),
        checksum=None if checksum is None else _unb64(checksum).hex(),
        session_key=_str(doc, "k", optional=True),
        file_name=_str(doc, "f", optional=True),
    )


def open_ticket(token: str, keys: Sequence[TicketKey], *, now: float, identity: str) -> Ticket:
    """Check `token` and return its ticket; raise `TicketError` if it is not valid for `identity` at `now`."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise TicketError("ticket is too long")
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != PREFIX or not _TOKEN_RE.fullmatch(token):
        raise TicketError("not a ticket of this gateway")
    _, key_id, payload, mac = parts
    key = next((k for k in keys if k.key_id == key_id), None)
    if key is None:
        raise TicketError(f"ticket signed with unknown key id {key_id[:32]!r}")
    # compared as text, exactly as sealed: decoding first would let the unused low bits of the last base64
    # character change without changing the MAC bytes
    expected = _b64(_mac(key.secret, f"{PREFIX}.{key_id}.{payload}"))
    if not hmac.compare_digest(mac.encode("ascii"), expected.encode("ascii")):
        raise TicketError("ticket signature does not match (altered or forged)")
    ticket = _decode(payload)
    if now >= ticket.expires:
        raise TicketError(f"ticket expired {int(now - ticket.expires)} s ago")
    if not hmac.compare_digest(ticket.identity, identity):
        raise TicketError("ticket was issued to another client certificate")
    return ticket
