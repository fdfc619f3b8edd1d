"""End to end through a real `ota-gateway serve`: one good download from each origin kind, and the 'no cert' twin."""

from __future__ import annotations

import hashlib
import shutil
import ssl
import urllib.request
from pathlib import Path

import pytest

from gateway.publish import add_release
from tests.origin_server import HttpsOrigin
from tests.support import APP_ID, Pki, run_gateway, write_config


def _fetch(url: str, ctx: ssl.SSLContext) -> bytes:
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        return bytes(resp.read())


def test_directory_origin_download(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    add_release(origin, APP_ID, "1.1.0", "production", capgo_dir / "app_1.1.0.zip")
    cfg = write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})
    with run_gateway(cfg) as gw:
        body = _fetch(f"{gw.base_url}/bundles/{APP_ID}/1.1.0.zip", pki.client_context(pki.client))
        assert body == (capgo_dir / "app_1.1.0.zip").read_bytes()
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            _fetch(f"{gw.base_url}/bundles/{APP_ID}/1.1.0.zip", pki.client_context(None))


def test_https_origin_download(tmp_path: Path, pki: Pki, https_origin: HttpsOrigin, capgo_dir: Path) -> None:
    data = (capgo_dir / "app_1.1.0.enc.zip").read_bytes()
    https_origin.publish(APP_ID, "1.1.0", data)
    cfg = write_config(tmp_path / "gw", pki, origins={"cdn": https_origin.origin_config()})
    with run_gateway(cfg) as gw:
        body = _fetch(f"{gw.base_url}/bundles/{APP_ID}/1.1.0.zip", pki.client_context(pki.client))
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()
    assert shutil.which("curl")
