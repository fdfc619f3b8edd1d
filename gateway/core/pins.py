"""Certificate pins: the two pin forms the gateway accepts, checked for shape.

An SPKI pin is the base64 SHA-256 of a SubjectPublicKeyInfo (Envoy `verify_certificate_spki`); a certificate pin
is the hex SHA-256 of the DER certificate (Envoy `verify_certificate_hash`, colons allowed).
"""

from __future__ import annotations

import base64
import binascii

from gateway.core.names import is_lower_hex


def check_spki_pin(pin: str) -> str:
    """Return `pin` if it is base64 of 32 bytes, else raise ValueError."""
    try:
        raw = base64.b64decode(pin, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"SPKI pin must be base64 of a SHA-256 digest, got {pin!r}") from None
    if len(raw) != 32:
        raise ValueError(f"SPKI pin must decode to 32 bytes, got {len(raw)} from {pin!r}")
    return pin


def normalize_cert_sha256(pin: str) -> str:
    """Return the lowercase hex form of a certificate SHA-256 pin (colons removed), else raise ValueError."""
    value = pin.replace(":", "").lower()
    if not is_lower_hex(value, 64):
        raise ValueError(f"certificate pin must be 64 hex characters (colons allowed), got {pin!r}")
    return value
