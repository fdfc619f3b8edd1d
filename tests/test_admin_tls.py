"""The admin listener with its own mTLS (`admin.tls`): a scraper with a client certificate of the admin CA gets
/metrics; without one, or with a certificate of another CA, it gets nothing."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from gateway.publish import add_release
from tests.support import (
    APP_ID,
    GatewayProcess,
    Pki,
    https_request,
    refused_request,
    run_gateway,
    wait_until,
    write_config,
)


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


def test_connections_to_the_admin_tls_port_count_from_accept_and_a_scraper_gets_in(
    tmp_path: Path, pki: Pki, capgo_dir: Path
) -> None:
    """With `admin.tls` the event loop did the handshake before the connection was counted: TCP connections that
    never start TLS were held to no cap, and 300 of them took every descriptor of a gateway limited to 256 (mTLS
    downloads failed, and the scraper too). They count against `admin.max_connections` from accept; at the cap the
    oldest one that has no request being answered is closed for the new one, so the flood churns within the cap and
    a scraper with a certificate gets in. The twin: without a certificate the scraper still gets nothing."""
    origin = tmp_path / "origin"
    origin.mkdir()
    shutil.copy(capgo_dir / "app_1.0.0.zip", tmp_path / "b.zip")
    add_release(origin, APP_ID, "1.0.0", "production", tmp_path / "b.zip")
    admin_tls = {"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": [str(pki.ca_pem)]}
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"admin": {"tls": admin_tls, "max_connections": 4}},
    )
    with run_gateway(cfg, nofile=256) as gw:
        silent = [socket.create_connection(("127.0.0.1", gw.admin_port), timeout=10) for _ in range(300)]
        try:
            assert wait_until(lambda: gw_fds(gw) < 100, timeout=5), gw_fds(gw)
            bundle = https_request(f"{gw.base_url}/bundles/{APP_ID}/1.0.0.zip", pki.client_context(pki.client))
            assert bundle.status == 200 and bundle.body == (tmp_path / "b.zip").read_bytes()
            url = f"https://127.0.0.1:{gw.admin_port}/metrics"
            scrape = https_request(url, pki.client_context(pki.client))
            assert scrape.status == 200 and b'ota_gateway_connections_open{listener="admin"} 4.0' in scrape.body
            refused_request(url, pki.client_context(None))
        finally:
            for sock in silent:
                sock.close()


def gw_fds(gw: GatewayProcess) -> int:
    return len(os.listdir(f"/proc/{gw.proc.pid}/fd"))
