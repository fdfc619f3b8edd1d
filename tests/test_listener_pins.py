"""Listener-wide client pins, through a real `serve`: a pinned client passes, another client of the same CA is cut
off right after the handshake and counted with cause "pin"; two pins at once during a rotation."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from gateway.publish import add_release
from tests.support import APP_ID, Pki, https_request, refused_request, run_gateway, write_config


def _config(tmp_path: Path, pki: Pki, capgo_dir: Path, **pins: list[str]) -> Path:
    origin = tmp_path / "origin"
    origin.mkdir()
    shutil.copy(capgo_dir / "app_1.0.0.zip", tmp_path / "b.zip")
    add_release(origin, APP_ID, "1.0.0", "production", tmp_path / "b.zip")
    cfg = write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})
    doc = yaml.safe_load(cfg.read_text())
    doc["listeners"][0].update(pins)
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


def test_spki_pin_admits_the_pinned_client_and_cuts_off_the_other(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    cfg = _config(tmp_path, pki, capgo_dir, client_spki_pins=[pki.client.spki])
    url_path = f"/bundles/{APP_ID}/1.0.0.zip"
    with run_gateway(cfg) as gw:
        answer = https_request(gw.base_url + url_path, pki.client_context(pki.client))
        assert answer.status == 200 and answer.body == (capgo_dir / "app_1.0.0.zip").read_bytes()
        refused_request(gw.base_url + url_path, pki.client_context(pki.client2))  # same CA, other key
        assert gw.metric("ota_gateway_tls_handshake_failures_total", listener="main", cause="pin") == 1
        assert gw.metric("ota_gateway_tls_handshakes_total", listener="main") == 1


def test_two_pins_during_a_rotation(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    cfg = _config(tmp_path, pki, capgo_dir, client_cert_sha256=[pki.client.sha256, pki.client2.sha256.upper()])
    url = f"/bundles/{APP_ID}/1.0.0.zip"
    with run_gateway(cfg) as gw:
        for who in (pki.client, pki.client2):
            assert https_request(gw.base_url + url, pki.client_context(who)).status == 200
        refused_request(gw.base_url + url, pki.client_context(pki.no_eku_client))
        refused_request(gw.base_url + url, pki.client_context(pki.expired_client))
        assert gw.metric("ota_gateway_tls_handshake_failures_total", listener="main", cause="pin") == 0
        assert gw.metric("ota_gateway_tls_handshake_failures_total", listener="main", cause="purpose") == 1
        assert gw.metric("ota_gateway_tls_handshake_failures_total", listener="main", cause="expired") == 1
