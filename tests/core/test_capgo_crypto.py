"""Capgo v2 cryptography (core/capgo_crypto.py) against artifacts made by the real Capgo CLI.

`tests/fixtures/capgo` (made by tools/make_capgo_fixtures.sh) holds an RSA-2048 key pair from `capgo key create`,
plain zips, the zips as `capgo bundle encrypt` encrypted them, and the checksum and session key the CLI printed.
PKCS#1 v1.5 type-1 padding and AES-CBC are deterministic, so the publisher side must reproduce the CLI's output byte
for byte.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core.capgo_crypto import (
    CapgoCryptoError,
    decrypt_bundle,
    encrypt_bundle,
    make_session_key,
    open_session_key,
    private_encrypt,
    recover_checksum,
    sign_checksum,
)
from tests.support import CAPGO_FIXTURES


@dataclass(frozen=True)
class Fixture:
    version: str
    checksum: str
    encrypted_checksum: str
    session_key: str
    plain: bytes
    encrypted: bytes


def _load() -> list[Fixture]:
    entries = json.loads((CAPGO_FIXTURES / "fixtures.json").read_text())
    return [
        Fixture(
            e["version"],
            e["checksum"],
            e["encrypted_checksum"],
            e["iv_session_key"],
            (CAPGO_FIXTURES / e["zip"]).read_bytes(),
            (CAPGO_FIXTURES / e["encrypted_zip"]).read_bytes(),
        )
        for e in entries
    ]


FIXTURES = _load()
IDS = [f.version for f in FIXTURES]


@pytest.fixture(scope="module")
def private_key(capgo_dir: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key((capgo_dir / "key").read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


@pytest.fixture(scope="module")
def public_key(capgo_dir: Path) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key((capgo_dir / "key.pub").read_bytes())
    assert isinstance(key, rsa.RSAPublicKey)
    return key


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_the_fixtures_are_what_the_readme_says() -> None:
    assert IDS == ["1.0.0", "1.1.0", "2.0.0"]
    for f in FIXTURES:
        assert hashlib.sha256(f.plain).hexdigest() == f.checksum
        assert len(f.encrypted_checksum) == 512
        assert f.plain[:2] == b"PK"


def test_key_pub_is_the_public_half_of_key(private_key: rsa.RSAPrivateKey, public_key: rsa.RSAPublicKey) -> None:
    assert private_key.public_key().public_numbers() == public_key.public_numbers()
    assert public_key.key_size == 2048


@pytest.mark.parametrize("f", FIXTURES, ids=IDS)
def test_recover_checksum_gives_the_plain_zip_digest(f: Fixture, public_key: rsa.RSAPublicKey) -> None:
    assert recover_checksum(public_key, f.encrypted_checksum) == f.checksum


@pytest.mark.parametrize("f", FIXTURES, ids=IDS)
def test_session_key_opens_and_decrypts_the_cli_bundle(f: Fixture, public_key: rsa.RSAPublicKey) -> None:
    aes_key, iv = open_session_key(public_key, f.session_key)
    assert len(aes_key) == 16 and len(iv) == 16
    assert iv == base64.b64decode(f.session_key.split(":")[0])
    assert decrypt_bundle(f.encrypted, aes_key, iv) == f.plain


@pytest.mark.parametrize("f", FIXTURES, ids=IDS)
def test_sign_checksum_reproduces_the_cli_exactly(f: Fixture, private_key: rsa.RSAPrivateKey) -> None:
    assert sign_checksum(private_key, f.checksum) == f.encrypted_checksum


@pytest.mark.parametrize("f", FIXTURES, ids=IDS)
def test_publisher_side_reproduces_session_key_and_bundle(
    f: Fixture, private_key: rsa.RSAPrivateKey, public_key: rsa.RSAPublicKey
) -> None:
    aes_key, iv = open_session_key(public_key, f.session_key)
    assert make_session_key(private_key, aes_key, iv) == f.session_key
    assert encrypt_bundle(f.plain, aes_key, iv) == f.encrypted


def test_round_trip_with_fresh_material(private_key: rsa.RSAPrivateKey, public_key: rsa.RSAPublicKey) -> None:
    aes_key, iv = bytes(range(16)), bytes(range(16, 32))
    plain = b"PK\x03\x04" + bytes(1000)
    session = make_session_key(private_key, aes_key, iv)
    assert open_session_key(public_key, session) == (aes_key, iv)
    assert decrypt_bundle(encrypt_bundle(plain, aes_key, iv), aes_key, iv) == plain
    digest = hashlib.sha256(plain).hexdigest()
    assert recover_checksum(public_key, sign_checksum(private_key, digest)) == digest


# --- refusals ---------------------------------------------------------------------------------------------------


def test_checksum_signed_by_another_key_does_not_open(
    other_key: rsa.RSAPrivateKey, public_key: rsa.RSAPublicKey
) -> None:
    forged = sign_checksum(other_key, FIXTURES[0].checksum)
    assert recover_checksum(other_key.public_key(), forged) == FIXTURES[0].checksum
    with pytest.raises(CapgoCryptoError, match="does not open with this public key"):
        recover_checksum(public_key, forged)


def test_session_key_made_by_another_key_does_not_open(
    other_key: rsa.RSAPrivateKey, public_key: rsa.RSAPublicKey
) -> None:
    forged = make_session_key(other_key, bytes(16), bytes(16))
    with pytest.raises(CapgoCryptoError, match="does not open with this public key"):
        open_session_key(public_key, forged)


def test_fixture_checksum_does_not_open_with_another_public_key(other_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(CapgoCryptoError):
        recover_checksum(other_key.public_key(), FIXTURES[0].encrypted_checksum)


def test_tampered_checksum_does_not_open(public_key: rsa.RSAPublicKey) -> None:
    good = FIXTURES[0].encrypted_checksum
    tampered = good[:100] + ("0" if good[100] != "0" else "1") + good[101:]
    with pytest.raises(CapgoCryptoError):
        recover_checksum(public_key, tampered)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("zz" * 256, "not hex"),
        ("", "does not open"),
        ("00" * 255, "does not open"),  # one byte short of an RSA-2048 block
        ("ff" * 256, "does not open"),  # larger than the modulus
        ("00" * 256, "does not open"),
    ],
)
def test_malformed_checksums(value: str, message: str, public_key: rsa.RSAPublicKey) -> None:
    with pytest.raises(CapgoCryptoError, match=message):
        recover_checksum(public_key, value)


def test_checksum_block_must_hold_a_sha256(private_key: rsa.RSAPrivateKey, public_key: rsa.RSAPublicKey) -> None:
    block = private_encrypt(private_key, bytes(20)).hex()  # opens, but holds a SHA-1-sized value
    with pytest.raises(CapgoCryptoError, match="holds 20 bytes"):
        recover_checksum(public_key, block)


def _session(iv: bytes, block: bytes) -> str:
    return f"{base64.b64encode(iv).decode()}:{base64.b64encode(block).decode()}"


def test_malformed_session_keys(private_key: rsa.RSAPrivateKey, public_key: rsa.RSAPublicKey) -> None:
    good = FIXTURES[0].session_key
    iv_b64, block_b64 = good.split(":")
    block = base64.b64decode(block_b64)
    cases = {
        "": "must be '<iv base64>:<rsa block base64>'",
        block_b64: "must be '<iv base64>:<rsa block base64>'",
        f"{iv_b64}:{block_b64}:x": "must be '<iv base64>:<rsa block base64>'",
        f"{iv_b64}!:{block_b64}": "not base64",
        f"{iv_b64}:{block_b64[:-1]}": "not base64",
        f"{iv_b64}:{block_b64} ": "not base64",
        _session(bytes(15), block): "IV is 15 bytes",
        _session(bytes(32), block): "IV is 32 bytes",
        f"{iv_b64}:": "does not open",
        _session(bytes(16), block[:-1]): "does not open",
        _session(bytes(16), bytes(256)): "does not open",
        _session(bytes(16), private_encrypt(private_key, bytes(32))): "holds 32 bytes, not an AES-128 key",
        _session(bytes(16), private_encrypt(private_key, b"")): "holds 0 bytes",
    }
    for value, message in cases.items():
        with pytest.raises(CapgoCryptoError) as info:
            open_session_key(public_key, value)
        assert message in str(info.value), value


def test_make_session_key_needs_16_byte_key_and_iv(private_key: rsa.RSAPrivateKey) -> None:
    for key, iv in [(bytes(15), bytes(16)), (bytes(16), bytes(17)), (bytes(32), bytes(16))]:
        with pytest.raises(CapgoCryptoError, match="16 bytes"):
            make_session_key(private_key, key, iv)


def test_private_encrypt_refuses_data_too_long(private_key: rsa.RSAPrivateKey) -> None:
    private_encrypt(private_key, bytes(256 - 11))
    with pytest.raises(CapgoCryptoError, match="too long"):
        private_encrypt(private_key, bytes(256 - 10))


def test_bundle_that_does_not_decrypt(public_key: rsa.RSAPublicKey) -> None:
    f = FIXTURES[0]
    aes_key, iv = open_session_key(public_key, f.session_key)
    with pytest.raises(CapgoCryptoError, match="bad padding"):
        decrypt_bundle(f.encrypted[:-1], aes_key, iv)  # not a whole number of blocks
    wrong = bytes(b ^ 0xFF for b in aes_key)
    with pytest.raises(CapgoCryptoError, match="bad padding"):
        decrypt_bundle(f.encrypted, wrong, iv)


def test_a_wrong_iv_garbles_only_the_first_block(public_key: rsa.RSAPublicKey) -> None:
    # CBC: the IV only affects the first block, which is why the plain digest must be checked too
    f = FIXTURES[0]
    aes_key, iv = open_session_key(public_key, f.session_key)
    assert iv != bytes(16)
    out = decrypt_bundle(f.encrypted, aes_key, bytes(16))
    assert out[16:] == f.plain[16:] and out[:16] != f.plain[:16]
    assert hashlib.sha256(out).hexdigest() != f.checksum


def test_capgo_crypto_error_is_a_value_error() -> None:
    assert issubclass(CapgoCryptoError, ValueError)
