"""Publishing releases into a directory origin: `ota-gateway release add`.

Owns writing a bundle and its entry into `<origin>/<app_id>/releases.yaml`: size and SHA-256 of the stored file,
and, with a Capgo v2 private key, the bundle encrypted as `capgo bundle encrypt` does it, the encrypted checksum
of the plain zip and the session key. The index is replaced atomically (write, then rename). Files and folders
follow the process umask (0644 and 0755 under umask 022), so a gateway running as another user can read them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core import capgo_crypto
from gateway.core.names import is_app_id, is_channel, is_version
from gateway.core.releases import (
    CapgoSignature,
    Release,
    ReleaseIndex,
    ReleaseIndexError,
    index_document,
    parse_index,
)


class PublishError(Exception):
    """A user error while publishing; the message is one line."""


def _load_capgo_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PublishError(f"{path}: not a readable unencrypted PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PublishError(f"{path}: a Capgo v2 key is an RSA private key")
    return key


def read_index(app_dir: Path, app_id: str) -> ReleaseIndex:
    path = app_dir / "releases.yaml"
    if not path.exists():
        return ReleaseIndex(app_id, ())
    try:
        return parse_index(app_id, yaml.safe_load(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ReleaseIndexError) as exc:
        raise PublishError(f"{path}: {exc}") from None


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 whatever the umask; a plain open would not
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_release(
    origin: Path,
    app_id: str,
    version: str,
    channel: str,
    bundle: Path,
    *,
    capgo_key: Path | None = None,
    replace: bool = False,
) -> Release:
    if not is_app_id(app_id):
        raise PublishError(f"app id must be reverse-domain (com.example.app): {app_id!r}")
    if not is_version(version):
        raise PublishError(f"not a valid version: {version!r}")
    if not is_channel(channel):
        raise PublishError(f"not a valid channel name: {channel!r}")
    if not origin.is_dir():
        raise PublishError(f"origin directory not found: {origin}")
    try:
        plain = bundle.read_bytes()
    except OSError as exc:
        raise PublishError(f"{bundle}: {exc.strerror}") from None
    if not zipfile.is_zipfile(bundle):
        raise PublishError(f"{bundle}: not a zip file")
    app_dir = origin / app_id
    app_dir.mkdir(exist_ok=True)
    index = read_index(app_dir, app_id)
    if index.find(version) is not None and not replace:
        raise PublishError(f"{app_id} {version} is already published (use --replace to overwrite)")
    capgo = None
    stored = plain
    file_name = f"{version}.zip"
    if capgo_key is not None:
        key = _load_capgo_key(capgo_key)
        aes_key, iv = os.urandom(16), os.urandom(16)
        stored = capgo_crypto.encrypt_bundle(plain, aes_key, iv)
        capgo = CapgoSignature(
            checksum=capgo_crypto.sign_checksum(key, hashlib.sha256(plain).hexdigest()),
            session_key=capgo_crypto.make_session_key(key, aes_key, iv),
        )
        file_name = f"{version}.enc.zip"
    release = Release(
        version=version,
        channel=channel,
        file=file_name,
        size=len(stored),
        sha256=hashlib.sha256(stored).hexdigest(),
        capgo=capgo,
    )
    _write_atomic(app_dir / file_name, stored)
    others = tuple(r for r in index.releases if r.version != version)
    new_index = ReleaseIndex(app_id, (*others, release))
    text = yaml.safe_dump(index_document(new_index), sort_keys=False, width=1000)
    _write_atomic(app_dir / "releases.yaml", text.encode())
    return release
