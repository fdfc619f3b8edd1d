"""The admin listener with its own mTLS (`admin.tls`): a scraper with a client certificate of the admin CA gets
/metrics; without one, or with a certificate of another CA, it gets nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

from gateway.publish import add_release
from tests.support import APP_ID, Pki, https_request, refused_request, run_gateway, write_config


def test_admin_mtls(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    shutil.copy(capgo_dir / "app_1.0.0.zip", tmp_path / "b.zip")
    add_release(origin, APP_ID, "1.0.0", "production", tmp_path / "b.zip")
    admin_tls = {"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": [str(pki.ca_pem)]}
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"admin": {"tls": admin_tls}},
    )
    with run_gateway(cfg) as gw:
        assert any(line.startswith("ota-gateway: admin on https://") for line in gw.stderr_lines)
        url = f"https://127.0.0.1:{gw.admin_port}/metrics"
        answer = https_request(url, pki.client_context(pki.client))
        assert answer.status == 200 and b"ota_gateway_requests_total" in answer.body
        refused_request(url, pki.client_context(None))
        rogue = pki.client_context(pki.rogue_client)
        refused_request(url, rogue)
