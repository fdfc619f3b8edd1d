"""Digest pipelines (core/digests.py): the verifier checks what the device will check, on the real Capgo fixtures.

An encrypted bundle is verified against the digest inside its signed checksum by decrypting in flight; the bytes
released are the encrypted ones, unchanged; any flipped byte, a cut-off block or bad padding never completes.
"""

from __future__ import annotations

import hashlib
import zlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core import digests
from gateway.core.capgo_crypto import encrypt_bundle, open_session_key, recover_checksum
from gateway.core.reasons import Reason
from gateway.core.verify import Expectation, Verifier
from tests.core.verifying import random_chunks, run
from tests.support import CAPGO_FIXTURES, capgo_fixture

FX = capgo_fixture("1.1.0")
ENCRYPTED = (CAPGO_FIXTURES / FX["encrypted_zip"]).read_bytes()
PLAIN = (CAPGO_FIXTURES / FX["zip"]).read_bytes()


def public_key() -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key((CAPGO_FIXTURES / "key.pub").read_bytes())
    assert isinstance(key, rsa.RSAPublicKey)
    return key


AES = open_session_key(public_key(), FX["iv_session_key"])
DIGEST = recover_checksum(public_key(), FX["encrypted_checksum"])


def chunks(data: bytes, seed: int) -> list[bytes]:
    return random_chunks(data, seed, largest=5000)


@pytest.mark.parametrize("seed", range(5))
def test_encrypted_fixture_verifies_against_its_signed_digest(seed: int) -> None:
    assert FX["checksum"] == DIGEST
    verifier = Verifier(Expectation(DIGEST, len(ENCRYPTED)), digest_factory=digests.pipeline(aes=AES))
    released, refusal = run(verifier, chunks(ENCRYPTED, seed))
    assert refusal is None
    assert released == ENCRYPTED  # the client gets the encrypted bytes unchanged


@pytest.mark.parametrize("at", [0, 15, 16, 30000, len(ENCRYPTED) - 17, len(ENCRYPTED) - 1])
def test_any_flipped_byte_never_completes(at: int) -> None:
    bad = ENCRYPTED[:at] + bytes([ENCRYPTED[at] ^ 0x01]) + ENCRYPTED[at + 1 :]
    verifier = Verifier(Expectation(DIGEST, len(bad)), digest_factory=digests.pipeline(aes=AES))
    released, refusal = run(verifier, chunks(bad, at))
    assert refusal is not None and refusal.reason is Reason.CHECKSUM_MISMATCH
    assert len(released) < len(bad)


def test_cut_block_and_bad_padding_are_invalid() -> None:
    cut = digests.pipeline(aes=AES)()
    cut.update(ENCRYPTED[:-1])
    assert cut.hexdigest() == digests.INVALID
    aes_key, iv = AES
    unpadded = encrypt_bundle(PLAIN, aes_key, iv)[:-16]  # whole blocks, but the padding block is gone
    digest = digests.pipeline(aes=AES)()
    digest.update(unpadded)
    assert digest.hexdigest() == digests.INVALID
    assert digest.hexdigest() == digests.INVALID  # repeatable


def test_range_hashes_the_skipped_prefix() -> None:
    verifier = Verifier(Expectation(DIGEST, len(ENCRYPTED)), send_from=5000, digest_factory=digests.pipeline(aes=AES))
    released, refusal = run(verifier, chunks(ENCRYPTED, 9))
    assert refusal is None and released == ENCRYPTED[5000:]


class _Zlib:
    """zlib behind the decompressor interface, standing in for Brotli in tests."""

    def __init__(self) -> None:
        self._d = zlib.decompressobj()

    def process(self, data: bytes) -> bytes:
        return self._d.decompress(data)

    def is_finished(self) -> bool:
        return self._d.eof


def test_decompressed_then_hashed_and_unfinished_streams_are_invalid() -> None:
    compressed = zlib.compress(PLAIN)
    factory = digests.pipeline(brotli=True, decompressor_factory=_Zlib)
    verifier = Verifier(Expectation(FX["checksum"], len(compressed)), digest_factory=factory)
    released, refusal = run(verifier, chunks(compressed, 3))
    assert refusal is None and released == compressed
    short = factory()
    short.update(compressed[:-10])
    assert short.hexdigest() == digests.INVALID
    garbage = factory()
    garbage.update(b"not zlib at all")
    assert garbage.hexdigest() == digests.INVALID


def test_decrypt_then_decompress() -> None:
    aes_key, iv = AES
    data = encrypt_bundle(zlib.compress(PLAIN), aes_key, iv)
    factory = digests.pipeline(aes=AES, brotli=True, decompressor_factory=_Zlib)
    digest = factory()
    digest.update(data)
    assert digest.hexdigest() == FX["checksum"]


def test_real_brotli_files_are_hashed_after_decompression() -> None:
    import brotli

    compressed = brotli.compress(PLAIN)
    verifier = Verifier(Expectation(FX["checksum"], len(compressed)), digest_factory=digests.pipeline(brotli=True))
    released, refusal = run(verifier, chunks(compressed, 5))
    assert refusal is None and released == compressed
    damaged = bytearray(compressed)
    damaged[len(damaged) // 2] ^= 0x01
    verifier = Verifier(Expectation(FX["checksum"], len(damaged)), digest_factory=digests.pipeline(brotli=True))
    released, refusal = run(verifier, chunks(bytes(damaged), 5))
    assert refusal is not None and released != bytes(damaged)


# --- verification.zip_scan: the plain zip is scanned as it is hashed -------------------------------------------


def _slip_zip() -> bytes:
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("index.html", b"<html></html>")
        zf.writestr("../../escape.js", b"alert(1)")
    return out.getvalue()


@pytest.mark.parametrize("seed", range(3))
def test_a_scanned_bundle_that_escapes_is_refused_before_its_tail_and_its_twin_passes(seed: int) -> None:
    from gateway.core.zipscan import ZipRules

    bad = _slip_zip()
    sha = hashlib.sha256(bad).hexdigest()
    scan = digests.pipeline(zip_scan=(ZipRules(), sha))
    released, refusal = run(Verifier(Expectation(sha, len(bad)), digest_factory=scan), chunks(bad, seed))
    assert refusal is not None and refusal.reason is Reason.ZIP_CONTENT and "'..' component" in refusal.detail
    assert len(released) < len(bad)  # the tail was never released
    # the twin: the same bundle without the scan passes whole
    released, refusal = run(Verifier(Expectation(sha, len(bad))), chunks(bad, seed))
    assert refusal is None and released == bad


def test_a_scanned_bundle_with_the_wrong_digest_is_a_checksum_mismatch_first() -> None:
    from gateway.core.zipscan import ZipRules

    bad = _slip_zip()
    wrong = "ab" * 32
    scan = digests.pipeline(zip_scan=(ZipRules(), wrong))
    _, refusal = run(Verifier(Expectation(wrong, len(bad)), digest_factory=scan), chunks(bad, 1))
    assert refusal is not None and refusal.reason is Reason.CHECKSUM_MISMATCH


def test_an_encrypted_bundle_is_scanned_after_decryption() -> None:
    from gateway.core.zipscan import ZipRules

    # the fixture passes the scan (its plain zip is clean); an encrypted zip-slip bundle is refused
    ok = Verifier(
        Expectation(DIGEST, len(ENCRYPTED)), digest_factory=digests.pipeline(aes=AES, zip_scan=(ZipRules(), DIGEST))
    )
    released, refusal = run(ok, chunks(ENCRYPTED, 2))
    assert refusal is None and released == ENCRYPTED
    bad = _slip_zip()
    encrypted = encrypt_bundle(bad, *AES)
    sha = hashlib.sha256(bad).hexdigest()
    scan = digests.pipeline(aes=AES, zip_scan=(ZipRules(), sha))
    released, refusal = run(Verifier(Expectation(sha, len(encrypted)), digest_factory=scan), chunks(encrypted, 2))
    assert refusal is not None and refusal.reason is Reason.ZIP_CONTENT
    assert len(released) < len(encrypted)
