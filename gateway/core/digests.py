"""Digests for the verifier that hash what the device will check, not the bytes on the wire.

Owns the digest pipelines of `core/verify.py`'s `Digest` protocol: SHA-256 of the bytes as served (plain bundles),
SHA-256 after AES-128-CBC decryption with PKCS#7 padding checked at the end (Capgo encrypted bundles: the device
compares the checksum with the *plain* zip), SHA-256 after Brotli decompression (delta manifest `.br` files), and,
for an app with `verification.zip_scan`, SHA-256 of a zip that `core/zipscan.py` reads as it is hashed (the plain
bytes: after decryption).
The client still receives the bytes as served; these only decide whether they are the right ones. A stream that
does not decode (bad padding, length not a multiple of the block, unfinished Brotli stream) yields `INVALID`,
which never equals a SHA-256, so the verifier fails it as a checksum mismatch. Pure: keys are passed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

import brotli as _brotli
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.core.reasons import Reason, Refusal
from gateway.core.verify import Digest
from gateway.core.zipscan import ZipRules, ZipScanner

INVALID = "invalid-encoding"


class Decompressor(Protocol):
    def process(self, data: bytes | memoryview, /) -> bytes: ...

    def is_finished(self) -> bool: ...


class DecryptingDigest:
    """AES-128-CBC decrypts what it is fed and passes the plain bytes to `inner`; the padding is checked last."""

    def __init__(self, aes_key: bytes, iv: bytes, inner: Digest) -> None:
        if len(aes_key) != 16 or len(iv) != 16:
            raise ValueError("AES-128 key and IV must be 16 bytes each")
        self._decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
        self._unpadder = sym_padding.PKCS7(128).unpadder()  # keeps the last block back until finalize
        self._inner = inner
        self._result: str | None = None

    def update(self, data: bytes | memoryview, /) -> None:
        if self._result is None:
            self._inner.update(self._unpadder.update(self._decryptor.update(data)))

    def hexdigest(self) -> str:
        if self._result is None:
            try:
                tail = self._unpadder.update(self._decryptor.finalize()) + self._unpadder.finalize()
            except ValueError:  # not a whole number of blocks, or bad PKCS#7 padding
                self._result = INVALID
            else:
                self._inner.update(tail)
                self._result = self._inner.hexdigest()
        return self._result


class DecompressingDigest:
    """Decompresses what it is fed and passes the result to `inner`; an unfinished stream is `INVALID`."""

    def __init__(self, decompressor: Decompressor, inner: Digest) -> None:
        self._decompressor = decompressor
        self._inner = inner
        self._failed = False

    def update(self, data: bytes | memoryview, /) -> None:
        if self._failed:
            return
        try:
            self._inner.update(self._decompressor.process(data))
        except Exception:  # the decoder's own error type; any of them means "not this file"
            self._failed = True

    def hexdigest(self) -> str:
        if self._failed or not self._decompressor.is_finished():
            return INVALID
        return self._inner.hexdigest()


class ScanningDigest:
    """Hashes what it is fed and lets a `ZipScanner` read the same bytes. The scan is judged after the digest: a
    body whose digest is not the expected one is left to the verifier (`checksum_mismatch`: bytes the publisher
    never made), and only a body with the right digest is refused for what it holds (`zip_content`), by raising
    `Refusal` from `hexdigest()`, which the verifier turns into its failure before the held-back tail is released."""

    def __init__(self, rules: ZipRules, expected: str) -> None:
        self._sha = hashlib.sha256()
        self._scanner = ZipScanner(rules)
        self._expected = expected

    def update(self, data: bytes | memoryview, /) -> None:
        self._sha.update(data)
        self._scanner.feed(data)

    def hexdigest(self) -> str:
        actual = self._sha.hexdigest()
        problem = self._scanner.finish()
        if problem is not None and actual == self._expected:
            raise Refusal(Reason.ZIP_CONTENT, f"verification.zip_scan: {problem}")
        return actual


def _brotli_decompressor() -> Decompressor:
    decompressor: Any = _brotli.Decompressor()
    return decompressor  # type: ignore[no-any-return]


def pipeline(
    *,
    aes: tuple[bytes, bytes] | None = None,
    brotli: bool = False,
    decompressor_factory: Callable[[], Decompressor] | None = None,
    zip_scan: tuple[ZipRules, str] | None = None,
) -> Callable[[], Digest]:
    """A digest factory for `Verifier`: SHA-256 of the bytes after decryption (`aes=(key, iv)`) and decompression;
    with `zip_scan=(rules, expected sha256)` the plain bytes are also scanned as a zip (`ScanningDigest`)."""
    if aes is None and not brotli and zip_scan is None:
        return hashlib.sha256  # the bytes as served (every plain download): no factory to build
    make_decompressor = decompressor_factory or _brotli_decompressor

    def factory() -> Digest:
        digest: Digest = hashlib.sha256() if zip_scan is None else ScanningDigest(*zip_scan)
        if brotli:
            digest = DecompressingDigest(make_decompressor(), digest)
        if aes is not None:
            digest = DecryptingDigest(aes[0], aes[1], digest)
        return digest

    return factory
