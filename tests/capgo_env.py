"""A Capgo test bed: a scriptable HTTPS origin with Capgo endpoints, the real Capgo fixtures on it, and a real
`ota-gateway serve` in front, with three apps: a plain one, one with the fixtures' public key in its policy, and
one with tight rate limits.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.origin_server import HttpsOrigin
from tests.support import (
    APP_ID,
    CAPGO_FIXTURES,
    Answer,
    CertFiles,
    GatewayProcess,
    Pki,
    capgo_call,
    capgo_fixture,
    device_body,
    run_gateway,
    write_config,
)

SECURE_APP = "com.example.secure"
LIMITED_APP = "com.example.limited"


def default_apps(origin: str = "capgo", **secure_versions: Any) -> list[dict[str, Any]]:
    clients = [{"name": "fleet", "issuer": ["ca"]}]
    channels = {"default": "production", "allowed": ["production", "beta"]}
    return [
        {"app_id": APP_ID, "origin": origin, "channels": channels, "clients": clients},
        {
            "app_id": SECURE_APP,
            "origin": origin,
            "channels": channels,
            "clients": clients,
            "verification": {"public_keys": [(CAPGO_FIXTURES / "key.pub").read_text()]},
            **({"versions": secure_versions} if secure_versions else {}),
        },
        {
            "app_id": LIMITED_APP,
            "origin": origin,
            "channels": {**channels, "self_set": True},
            "clients": clients,
            "rate_limits": {"updates_per_minute": 2, "stats_per_minute": 2},
        },
    ]


@dataclass
class CapgoEnv:
    origin: HttpsOrigin
    gw: GatewayProcess
    pki: Pki
    ticket_key: tuple[str, bytes]

    def ctx(self, who: CertFiles | None = None) -> ssl.SSLContext:
        return self.pki.client_context(who or self.pki.client)

    def check(self, body: dict[str, Any], who: CertFiles | None = None) -> Answer:
        return capgo_call(f"{self.gw.base_url}/updates", self.ctx(who), body)

    def host(self, app: str, name: str, data: bytes, mode: str | None = None) -> str:
        """Put a file on the origin; return its URL."""
        self.origin.state.files[f"{app}/{name}"] = data
        if mode is not None:
            self.origin.state.modes[f"{app}/{name}"] = mode
        return f"{self.origin.url}{app}/{name}"

    def manifest_entry(self, app: str, path: str, data: bytes, mode: str | None = None) -> dict[str, str]:
        """A delta-manifest entry for `assets/<path>`: `data` put on the origin (misbehaving in `mode`), its SHA-256."""
        url = self.host(app, path, data, mode)
        return {"file_name": f"assets/{path}", "file_hash": hashlib.sha256(data).hexdigest(), "download_url": url}

    def offer(self, app: str, version: str, *, encrypted: bool = False, name: str | None = None, **over: Any) -> None:
        """Make the origin answer update checks of `app` with a fixture version (plain or encrypted)."""
        fx = capgo_fixture(version)
        data = (CAPGO_FIXTURES / (fx["encrypted_zip"] if encrypted else fx["zip"])).read_bytes()
        url = self.host(app, name or (fx["encrypted_zip"] if encrypted else fx["zip"]), data)
        answer = {
            "version": version,
            "url": url,
            "checksum": fx["encrypted_checksum"] if encrypted else fx["checksum"],
            "session_key": fx["iv_session_key"] if encrypted else "",
            **over,
        }
        self.origin.state.update_answers[app] = answer

    def new_version(self, app: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
        """An update check that must be answered with a new version; the answer's JSON."""
        answer = self.check(device_body(app, version, **extra))
        assert answer.status == 200, answer.body
        doc: dict[str, Any] = answer.json()
        assert "error" not in doc, doc
        return doc


def gateway_config(directory: Path, pki: Pki, origin: HttpsOrigin, apps: list[dict[str, Any]], key_file: Path) -> Path:
    return write_config(
        directory,
        pki,
        origins={
            "capgo": origin.origin_config(updates_path="updates", stats_path="stats", channel_path="channel_self")
        },
        apps=apps,
        extra={"tickets": {"keys": [{"id": "k1", "secret_file": str(key_file)}]}},
    )


@contextlib.contextmanager
def capgo_env(directory: Path, pki: Pki, apps: list[dict[str, Any]] | None = None) -> Iterator[CapgoEnv]:
    directory.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32).encode()
    key_file = directory / "ticket.secret"
    key_file.write_bytes(secret)
    with HttpsOrigin(directory) as origin:
        cfg = gateway_config(directory / "gw", pki, origin, apps or default_apps(), key_file)
        with run_gateway(cfg) as gw:
            yield CapgoEnv(origin, gw, pki, ("k1", secret))
