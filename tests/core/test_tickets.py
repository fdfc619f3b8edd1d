"""Download tickets (core/tickets.py): bound to identity, expiry and content; any change is refused."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from gateway.core.tickets import MAX_TOKEN_LENGTH, Ticket, TicketError, TicketKey, open_ticket, seal

KEY = TicketKey("k1", b"s" * 32)
NEW = TicketKey("k2", b"n" * 32)
ME = "ab" * 32
NOW = 1_800_000_000.0
TICKET = Ticket(
    app_id="com.example.app",
    version="1.1.0",
    sha256="cd" * 32,
    origin="capgo",
    location="https://origin.example/com.example.app/1.1.0.zip",
    identity=ME,
    expires=int(NOW) + 3600,
)
FULL = dataclasses.replace(
    TICKET, size=1234, checksum="ef" * 256, session_key="aXY=:YmxvY2s=", file_name="assets/index.js.br"
)


@pytest.mark.parametrize("ticket", [TICKET, FULL])
def test_round_trip(ticket: Ticket) -> None:
    token = seal(ticket, KEY)
    assert len(token) < MAX_TOKEN_LENGTH
    assert all(c.isalnum() or c in "._-" for c in token)  # one URL path segment, no escaping
    assert open_ticket(token, [KEY], now=NOW, identity=ME) == ticket


def test_rotation_by_adding_a_key() -> None:
    old_token = seal(TICKET, KEY)
    new_token = seal(TICKET, NEW)
    assert open_ticket(old_token, [NEW, KEY], now=NOW, identity=ME) == TICKET
    assert open_ticket(new_token, [NEW, KEY], now=NOW, identity=ME) == TICKET
    with pytest.raises(TicketError, match="unknown key id"):
        open_ticket(old_token, [NEW], now=NOW, identity=ME)


def test_other_identity_is_refused() -> None:
    with pytest.raises(TicketError, match="another client certificate"):
        open_ticket(seal(TICKET, KEY), [KEY], now=NOW, identity="00" * 32)


def test_expired_is_refused() -> None:
    token = seal(TICKET, KEY)
    with pytest.raises(TicketError, match="expired"):
        open_ticket(token, [KEY], now=TICKET.expires, identity=ME)


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_every_altered_character_is_refused() -> None:
    """Every position of the token, changed to every other character a URL segment of a ticket may hold (and to
    one it may not): nothing opens, not even the unused low bits of the last base64 character of the MAC."""
    token = seal(FULL, KEY)
    assert open_ticket(token, [KEY], now=NOW, identity=ME) == FULL
    tried = 0
    for i, original in enumerate(token):
        for replacement in B64URL + ".\u00e9":
            if replacement == original:
                continue
            altered = token[:i] + replacement + token[i + 1 :]
            with pytest.raises(TicketError):
                open_ticket(altered, [KEY], now=NOW, identity=ME)
            tried += 1
    assert tried == len(token) * (len(B64URL) + 1)  # every position, every other character


def test_unused_bits_of_the_last_mac_character_are_signed() -> None:
    """32 MAC bytes are 43 base64 characters whose last one carries 2 unused bits: a token differing only there
    decodes to the same MAC bytes, and must still be refused, because the MAC is compared as the text sealed."""
    token = seal(TICKET, KEY)
    last = B64URL.index(token[-1])
    twin = token[:-1] + B64URL[last ^ 1]
    assert base64.urlsafe_b64decode(twin.rsplit(".", 1)[1] + "=") == base64.urlsafe_b64decode(
        token.rsplit(".", 1)[1] + "="
    )
    with pytest.raises(TicketError, match="signature"):
        open_ticket(twin, [KEY], now=NOW, identity=ME)


def test_same_key_id_other_secret_is_refused() -> None:
    with pytest.raises(TicketError, match="signature"):
        open_ticket(seal(TICKET, TicketKey("k1", b"x" * 32)), [KEY], now=NOW, identity=ME)


@pytest.mark.parametrize("token", ["", "v1", "v2.k1.e30.AAAA", "v1.k1.!!!.AAAA", "v1.k1.e30." + "A" * 43, "x" * 5000])
def test_garbage_is_refused(token: str) -> None:
    with pytest.raises(TicketError):
        open_ticket(token, [KEY], now=NOW, identity=ME)


def test_keys_and_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        TicketKey("k1", b"short")
    with pytest.raises(ValueError, match="key id"):
        TicketKey("bad id", b"s" * 32)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        seal(dataclasses.replace(TICKET, sha256="XY"), KEY)


@pytest.mark.parametrize(
    "ticket",
    [TICKET, FULL, dataclasses.replace(TICKET, size=7), dataclasses.replace(FULL, checksum=None, file_name=None)],
)
def test_a_token_is_the_sorted_compact_json_and_the_hmac_of_it(ticket: Ticket) -> None:
    """The payload is built with its keys already in order and MACed with a copy of a keyed HMAC: the token must
    be exactly json.dumps(sort_keys=True) of the fields and HMAC-SHA256 over `v1.<key id>.<payload>`, so tickets
    sealed by an older gateway (or another worker) and this one are the same text."""
    import hashlib
    import hmac
    import json

    prefix, key_id, payload, mac = seal(ticket, KEY).split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert (
        payload
        == base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode())
        .rstrip(b"=")
        .decode()
    )
    signed = f"{prefix}.{key_id}.{payload}".encode()
    assert mac == base64.urlsafe_b64encode(hmac.new(KEY.secret, signed, hashlib.sha256).digest()).rstrip(b"=").decode()
    # twin: the same ticket under another secret (the keyed HMAC is kept per secret) has another MAC
    assert seal(ticket, TicketKey("k1", b"t" * 32)).split(".")[3] != mac
