"""The admin listener with its own mTLS (`admin.tls`): a scraper with a client certificate of the admin CA gets
/metrics; without one, or with a certificate of another CA, it gets nothing."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.publish import add_release
from tests.support import (
    APP_ID,
    Answer,
    GatewayProcess,
    Pki,
    https_request,
    refused_request,
    run_gateway,
    wait_until,
    write_atomic,
    write_config,
)


def _admin_tls_config(tmp_path: Path, pki: Pki, capgo_dir: Path, **admin: object) -> Path:
    """A gateway config with one release in a directory origin and an mTLS admin listener (the server's certificate,
    the test CA's clients), plus `admin` keys."""
    origin = tmp_path / "origin"
    origin.mkdir()
    shutil.copy(capgo_dir / "app_1.0.0.zip", tmp_path / "b.zip")
    add_release(origin, APP_ID, "1.0.0", "production", tmp_path / "b.zip")
    admin_tls = {"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": [str(pki.ca_pem)]}
    return write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"admin": {"tls": admin_tls, **admin}},
    )


def test_admin_mtls(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    cfg = _admin_tls_config(tmp_path, pki, capgo_dir)
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
    cfg = _admin_tls_config(tmp_path, pki, capgo_dir, max_connections=4)
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


def _answers(url: str, ctx: ssl.SSLContext) -> Answer | None:
    try:
        return https_request(url, ctx, timeout=5)
    except (OSError, http.client.HTTPException):
        return None


@pytest.mark.parametrize("trigger", ["watch", "sighup"])
def test_admin_certificate_and_cas_follow_a_reload(tmp_path: Path, pki: Pki, trigger: str) -> None:
    """A rotated admin certificate (cert-manager writes a new file) is presented on new connections after a reload,
    so `ota-gateway health`, which accepts exactly the certificate in admin.tls.cert, keeps passing; and a client CA
    replaced in admin.tls.client_ca stops admitting the old CA's scrapers (the twin: the new CA's are admitted)."""
    adm = tmp_path / "admin"
    adm.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(pki.dir / name, adm / name)
    shutil.copy(pki.ca_pem, adm / "ca.pem")
    admin_tls = {
        "cert": str(adm / "server.pem"),
        "key": str(adm / "server.key"),
        "client_ca": [str(adm / "ca.pem")],
        "health_cert": str(pki.client.cert),
        "health_key": str(pki.client.key),
    }
    reload = {"watch": trigger == "watch", "interval": 0.3}
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(tmp_path)}},
        extra={"admin": {"tls": admin_tls}, "reload": reload},
    )

    def health() -> int:
        cmd = [sys.executable, "-m", "gateway", "health", "--config", str(cfg), "--timeout", "5"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).returncode

    with run_gateway(cfg) as gw:
        url = f"https://127.0.0.1:{gw.admin_port}/healthz"
        assert health() == 0
        rotated = pki.ca.issue_cert("localhost", "127.0.0.1")
        write_atomic(adm / "server.pem", b"".join(blob.bytes() for blob in rotated.cert_chain_pems))
        write_atomic(adm / "server.key", rotated.private_key_pem.bytes())
        new_sha = hashlib.sha256(ssl.PEM_cert_to_DER_cert(rotated.cert_chain_pems[0].bytes().decode())).hexdigest()

        def presented_new() -> bool:
            if trigger == "sighup":
                gw.proc.send_signal(signal.SIGHUP)
            answer = _answers(url, pki.client_context(pki.client))
            return answer is not None and answer.server_sha256 == new_sha

        assert wait_until(presented_new, timeout=15, interval=0.5), "the admin listener kept the old certificate"
        assert health() == 0
        write_atomic(adm / "ca.pem", pki.rogue_ca_pem.read_bytes())

        def old_ca_refused() -> bool:
            if trigger == "sighup":
                gw.proc.send_signal(signal.SIGHUP)
            return _answers(url, pki.client_context(pki.client)) is None

        assert wait_until(old_ca_refused, timeout=15, interval=0.5), (
            "a CA removed from admin.tls.client_ca still admits"
        )
        answer = _answers(url, pki.client_context(pki.rogue_client))
        assert answer is not None and answer.status == 200
