"""Capgo v2 bundle cryptography: the publisher's operations and the public-key recovery.

Capgo signs with RSA PKCS#1 v1.5 *private-key encryption* (block type 1, no DigestInfo): the encrypted checksum is
that operation over the 32 raw bytes of the plain zip's SHA-256, and the session key is the same operation over a
random AES-128 key, sent as `<iv base64>:<block base64>`; the bundle is AES-128-CBC with PKCS#7 padding.
Anyone with the public key recovers digest and AES key, so this authenticates the publisher; it hides nothing.

Pure: randomness (AES key, IV) is passed in by the caller.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


class CapgoCryptoError(ValueError):
    """A checksum or session key that is malformed or does not open with the public key."""


def private_encrypt(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    """RSA PKCS#1 v1.5 type-1 padding of `data`, raised to the private exponent (what Node's privateEncrypt does).

    `cryptography` only signs with a DigestInfo; Capgo's format has none, so the padding is built here.
    """
    numbers = key.private_numbers()
    n, d = numbers.public_numbers.n, numbers.d
    size = (n.bit_length() + 7) // 8
    if len(data) > size - 11:
        raise CapgoCryptoError("data too long for the RSA key")
    block = b"\x00\x01" + b"\xff" * (size - 3 - len(data)) + b"\x00" + data
    return pow(int.from_bytes(block, "big"), d, n).to_bytes(size, "big")


def public_decrypt(key: rsa.RSAPublicKey, block: bytes) -> bytes:
    """Recover what `private_encrypt` wrapped; raise `CapgoCryptoError` if the block is not for this key."""
    try:
        return key.recover_data_from_signature(block, padding.PKCS1v15(), None)
    except (InvalidSignature, ValueError) as exc:
        raise CapgoCryptoError("RSA block does not open with this public key") from exc


def sign_checksum(key: rsa.RSAPrivateKey, sha256_hex: str) -> str:
    """The encrypted checksum of a plain zip: 512 hex characters for RSA-2048."""
    return private_encrypt(key, bytes.fromhex(sha256_hex)).hex()


def recover_checksum(key: rsa.RSAPublicKey, encrypted_hex: str) -> str:
    """The plain SHA-256 (hex) inside an encrypted checksum."""
    try:
        block = bytes.fromhex(encrypted_hex)
    except ValueError as exc:
        raise CapgoCryptoError("encrypted checksum is not hex") from exc
    digest = public_decrypt(key, block)
    if len(digest) != 32:
        raise CapgoCryptoError(f"encrypted checksum holds {len(digest)} bytes, not a SHA-256 digest")
    return digest.hex()


def make_session_key(key: rsa.RSAPrivateKey, aes_key: bytes, iv: bytes) -> str:
    if len(aes_key) != 16 or len(iv) != 16:
        raise CapgoCryptoError("AES-128 key and IV must be 16 bytes each")
    block = private_encrypt(key, aes_key)
    return f"{base64.b64encode(iv).decode()}:{base64.b64encode(block).decode()}"


def open_session_key(key: rsa.RSAPublicKey, session_key: str) -> tuple[bytes, bytes]:
    """(aes_key, iv) from `<iv b64>:<block b64>`."""
    parts = session_key.split(":")
    if len(parts) != 2:
        raise CapgoCryptoError("session key must be '<iv base64>:<rsa block base64>'")
    try:
        iv = base64.b64decode(parts[0], validate=True)
        block = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CapgoCryptoError("session key is not base64") from exc
    if len(iv) != 16:
        raise CapgoCryptoError(f"session key IV is {len(iv)} bytes, not 16")
    aes_key = public_decrypt(key, block)
    if len(aes_key) != 16:
        raise CapgoCryptoError(f"session key holds {len(aes_key)} bytes, not an AES-128 key")
    return aes_key, iv


def encrypt_bundle(plain: bytes, aes_key: bytes, iv: bytes) -> bytes:
    padder = sym_padding.PKCS7(128).padder()
    encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
    return encryptor.update(padder.update(plain) + padder.finalize()) + encryptor.finalize()


def decrypt_bundle(cipher: bytes, aes_key: bytes, iv: bytes) -> bytes:
    decryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).decryptor()
    unpadder = sym_padding.PKCS7(128).unpadder()
    try:
        return unpadder.update(decryptor.update(cipher) + decryptor.finalize()) + unpadder.finalize()
    except ValueError as exc:
        raise CapgoCryptoError("bundle does not decrypt (bad padding)") from exc
