"""`ota-gateway device`: a device simulator that does what the Capgo plugin does, over mutual TLS.

Owns the client side of the Capgo protocol as the Android plugin speaks it (capgo-protocol.md): the update check
with the plugin's body and User-Agent, the download of `url` (Dalvik User-Agent), the checksum check the plugin
makes (with a public key and a session key: AES-key recovery, AES-128-CBC decryption, RSA-recovered digest;
otherwise the SHA-256 of the bytes), and the stats it posts (`download_complete` + `set`, or `download_fail`,
`decrypt_fail`, `checksum_fail`, `checksum_required`, `unzip_fail`; or, with `--fail-with ACTION`, that failure
after a good download, to show a release being halted). It prints the outcome and returns the exit
code: 0 for an installed update, an up-to-date answer or a builtin reset; 1 for a refusal or any failure.
It is the smoke test to run against a deployment; the end-to-end tests run it as a subprocess too.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import ssl
import time
import urllib.parse
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core import capgo_crypto

PLUGIN_VERSION = "8.51.14"
OS_VERSION = "14"
DOWNLOAD_AGENT = f"Dalvik/2.1.0 (Linux; U; Android {OS_VERSION})"
MAX_DOWNLOAD = 1024 * 1024 * 1024


class DeviceError(Exception):
    """A failure the plugin would report with a stats action."""

    def __init__(self, action: str, message: str) -> None:
        super().__init__(message)
        self.action = action


@dataclass(frozen=True)
class DeviceOptions:
    gateway: str
    cert: Path
    key: Path
    app_id: str
    version: str
    ca: Path | None = None
    public_key: Path | None = None
    channel: str | None = None
    device_id: str | None = None
    platform: str = "android"
    out: Path | None = None
    timeout: float = 60.0
    fail_with: str | None = None  # report this failure action after a verified download (a bundle that fails on it)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def key_id(pem: bytes) -> str:
    """The plugin's `key_id`: the first 20 base64 characters of the public key (PEM body)."""
    lines = [line.strip() for line in pem.decode().splitlines() if line.strip() and not line.startswith("-----")]
    return "".join(lines)[:20]


def _no_passphrase() -> str:
    """An encrypted --key: refused at once, instead of OpenSSL asking for its passphrase on the terminal."""
    raise ValueError("the key is encrypted")


class Device:
    def __init__(self, opts: DeviceOptions, say: Callable[[str], None] = print) -> None:
        self.opts = opts
        self.say = say
        self.base = urllib.parse.urlsplit(opts.gateway.rstrip("/"))
        if self.base.scheme != "https" or not self.base.hostname:
            raise ValueError(f"--gateway must be https://host[:port], got {opts.gateway!r}")
        files = (("--ca", opts.ca), ("--cert", opts.cert), ("--key", opts.key), ("--public-key", opts.public_key))
        for option, path in files:
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{option}: no such file: {path}")
        try:
            self.ctx = ssl.create_default_context(cafile=str(opts.ca) if opts.ca else None)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--ca {opts.ca}: not a PEM certificate bundle ({exc})") from None
        try:
            self.ctx.load_cert_chain(opts.cert, opts.key, password=_no_passphrase)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"--cert {opts.cert}, --key {opts.key}: not a PEM certificate and its unencrypted private key ({exc})"
            ) from None
        self.public_pem = opts.public_key.read_bytes() if opts.public_key else None
        self.public_key: rsa.RSAPublicKey | None = None
        if self.public_pem is not None:
            loaded = serialization.load_pem_public_key(self.public_pem)
            if not isinstance(loaded, rsa.RSAPublicKey):
                raise ValueError("--public-key must be a Capgo RSA public key")
            self.public_key = loaded
        self.device_id = opts.device_id or str(uuid.uuid4())
        self.received: int | None = None  # body bytes of the last download, whole or cut off (None: none tried)

    def info(self, version_name: str) -> dict[str, Any]:
        """The info object the plugin sends with every request."""
        body: dict[str, Any] = {
            "platform": self.opts.platform,
            "device_id": self.device_id,
            "app_id": self.opts.app_id,
            "custom_id": "",
            "version_build": self.opts.version,
            "version_code": "1",
            "version_os": OS_VERSION,
            "version_name": version_name,
            "plugin_version": PLUGIN_VERSION,
            "is_emulator": False,
            "is_prod": True,
        }
        if self.opts.platform == "android":
            body["install_source"] = "google_play"
        if self.opts.channel:
            body["defaultChannel"] = self.opts.channel
        if self.public_pem is not None:
            body["key_id"] = key_id(self.public_pem)
        return body

    def _request(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise DeviceError("download_fail", f"refusing a url that is not https: {url[:100]}")
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=self.ctx, timeout=self.opts.timeout)
        try:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request(method, target or "/", body=body, headers=headers)
            resp = conn.getresponse()
            if (resp.length or 0) > MAX_DOWNLOAD:
                raise DeviceError("download_fail", f"the answer declares {resp.length} bytes")
            data = resp.read()  # raises IncompleteRead when the body ends before its Content-Length
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def _api(self, path: str, payload: Any) -> Reply:
        headers = {
            "Content-Type": "application/json; charset=utf-8",  # as OkHttp sends it
            "User-Agent": f"CapacitorUpdater/{PLUGIN_VERSION} ({self.opts.app_id}) {self.opts.platform}/{OS_VERSION}",
        }
        url = urllib.parse.urlunsplit((self.base.scheme, self.base.netloc, self.base.path + path, "", ""))
        return self._request("POST", url, json.dumps(payload).encode(), headers)

    def post_stats(self, version_name: str, old_version_name: str, actions: list[str]) -> None:
        now = int(time.time() * 1000)
        events = [
            {**self.info(version_name), "old_version_name": old_version_name, "action": action, "timestamp": now}
            for action in actions
        ]
        try:
            reply = self._api("/stats", events)
        except (OSError, http.client.HTTPException, DeviceError) as exc:
            self.say(f"stats: not sent ({exc})")
            return
        self.say(f"stats: {', '.join(actions)} -> HTTP {reply.status}")

    def _download(self, url: str) -> bytes:
        self.received = 0
        try:
            reply = self._request("GET", url, None, {"User-Agent": DOWNLOAD_AGENT})
        except http.client.IncompleteRead as exc:
            self.received = len(exc.partial)
            raise DeviceError("download_fail", f"download cut off after {len(exc.partial)} bytes") from None
        except (OSError, http.client.HTTPException) as exc:
            raise DeviceError("download_fail", f"download failed: {type(exc).__name__}: {exc}") from None
        self.received = len(reply.body)
        if reply.status != 200:
            raise DeviceError("download_fail", f"download answered HTTP {reply.status}: {reply.body[:200]!r}")
        return reply.body

    def _verify(self, data: bytes, checksum: str, session_key: str) -> tuple[bytes, str]:
        """What the plugin checks; returns (plain zip, its SHA-256)."""
        plain, expected = data, checksum
        if self.public_key is not None and session_key:
            try:
                aes_key, iv = capgo_crypto.open_session_key(self.public_key, session_key)
                plain = capgo_crypto.decrypt_bundle(data, aes_key, iv)
            except capgo_crypto.CapgoCryptoError as exc:
                raise DeviceError("decrypt_fail", f"cannot decrypt the bundle: {exc}") from None
            try:
                expected = capgo_crypto.recover_checksum(self.public_key, checksum)
            except capgo_crypto.CapgoCryptoError as exc:
                raise DeviceError("checksum_fail", f"the checksum does not open with the public key: {exc}") from None
        elif self.public_key is not None and not checksum:
            raise DeviceError("checksum_required", "the app has a public key and the answer has no checksum")
        digest = hashlib.sha256(plain).hexdigest()
        if checksum and digest != expected:
            raise DeviceError("checksum_fail", f"sha256 {digest} does not match the checksum {expected}")
        if not zipfile.is_zipfile(io.BytesIO(plain)):
            raise DeviceError("unzip_fail", "the bundle is not a zip file")
        return plain, digest

    def run(self) -> int:
        old = self.opts.version
        try:
            reply = self._api("/updates", self.info(old))
        except (OSError, http.client.HTTPException, DeviceError) as exc:
            self.say(f"failed: update check: {type(exc).__name__}: {exc}")
            return 1
        if reply.status == 429:
            self.say(f"rate limited: retry after {reply.headers.get('retry-after', '?')} s")
            return 1
        try:
            answer = json.loads(reply.body)
        except ValueError:
            self.say(f"failed: update check answered HTTP {reply.status} without JSON")
            return 1
        if not isinstance(answer, dict):
            self.say(f"failed: update check answered HTTP {reply.status}: {answer!r}")
            return 1
        if "error" in answer:
            kind = answer.get("kind", "failed")
            self.say(f"{kind}: {answer.get('error')}: {answer.get('message', '')}")
            return 0 if kind == "up_to_date" and reply.status == 200 else 1
        version = answer.get("version")
        if version == "builtin":
            self.say("reset to the builtin bundle")
            self.post_stats("builtin", old, ["reset"])
            return 0
        url, checksum = answer.get("url"), answer.get("checksum") or ""
        session_key = answer.get("session_key") or ""
        if not isinstance(version, str) or not isinstance(url, str) or not isinstance(checksum, str):
            self.say(f"failed: the answer is not a new version: {answer!r}")
            return 1
        self.say(f"offered {version} (from {old})")
        try:
            plain, digest = self._verify(self._download(url), checksum, str(session_key))
        except DeviceError as exc:
            self.say(f"failed: {exc.action}: {exc}")
            self.post_stats(version, old, [exc.action])
            return 1
        if self.opts.fail_with is not None:  # as if the bundle failed on the device (e.g. no notifyAppReady())
            self.say(f"failed: {self.opts.fail_with}: simulated on {version} (from {old})")
            self.post_stats(version, old, [self.opts.fail_with])
            return 1
        if self.opts.out is not None:
            self.opts.out.write_bytes(plain)
        self.say(f"updated {old} -> {version}: {len(plain)} bytes, sha256 {digest} verified")
        self.post_stats(version, old, ["download_complete", "set"])
        return 0
