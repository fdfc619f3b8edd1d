"""Pin shapes (core/pins.py): base64 SPKI SHA-256 pins and hex certificate SHA-256 pins."""

from __future__ import annotations

import base64
import hashlib

import pytest

from gateway.core.pins import check_spki_pin, normalize_cert_sha256

DIGEST = hashlib.sha256(b"spki").digest()
PIN = base64.b64encode(DIGEST).decode()
HEX = DIGEST.hex()


def test_good_spki_pin_is_returned_unchanged() -> None:
    assert check_spki_pin(PIN) == PIN
    assert len(PIN) == 44 and PIN.endswith("=")


@pytest.mark.parametrize(
    ("pin", "message"),
    [
        ("", "decode to 32 bytes, got 0"),
        (base64.b64encode(DIGEST[:31]).decode(), "decode to 32 bytes, got 31"),
        (base64.b64encode(DIGEST + b"x").decode(), "decode to 32 bytes, got 33"),
        (base64.b64encode(hashlib.sha1(b"x").digest()).decode(), "got 20"),
        ("not base64!", "must be base64"),
        (PIN.rstrip("="), "must be base64"),  # padding is required
        (" " + PIN, "must be base64"),
        (PIN + "\n", "must be base64"),
        (base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(), "must be base64"),  # urlsafe alphabet is not accepted
        (HEX, "got 48"),  # hex is valid base64 text, but of 48 bytes
        ("sha256/" + PIN, "must be base64"),  # the HPKP/OkHttp prefix is not part of the pin
    ],
)
def test_bad_spki_pins(pin: str, message: str) -> None:
    with pytest.raises(ValueError, match="SPKI pin") as info:
        check_spki_pin(pin)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "pin",
    [
        HEX,
        HEX.upper(),
        ":".join(HEX[i : i + 2] for i in range(0, 64, 2)),
        ":".join(HEX.upper()[i : i + 2] for i in range(0, 64, 2)),
    ],
)
def test_cert_pin_is_normalized_to_lowercase_hex(pin: str) -> None:
    assert normalize_cert_sha256(pin) == HEX


@pytest.mark.parametrize("pin", ["", HEX[:-1], HEX + "0", "g" * 64, PIN, HEX[:62] + " 0", "0x" + HEX[2:]])
def test_bad_cert_pins(pin: str) -> None:
    with pytest.raises(ValueError, match="64 hex characters"):
        normalize_cert_sha256(pin)
