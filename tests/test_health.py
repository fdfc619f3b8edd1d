"""`ota-gateway health`: a real `serve` subprocess probed by the installed command, over plain HTTP and over the
admin listener's mTLS. Exit 0 healthy, 1 unhealthy or unreachable, 2 a config problem; one line of output."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.publish import add_release
from tests.support import APP_ID, Pki, edit_config, https_request, run_gateway, write_config

SCRIPT = Path(sys.executable).parent / "ota-gateway"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gateway"]


def health(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, "health", "--config", str(config), *args], capture_output=True, text=True, timeout=30
    )


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    out = (proc.stdout + proc.stderr).strip()
    assert out.count("\n") == 0, out
    return out


def directory_config(tmp_path: Path, pki: Pki, capgo_dir: Path, **extra: Any) -> Path:
    origin = tmp_path / "origin"
    origin.mkdir()
    shutil.copy(capgo_dir / "app_1.0.0.zip", tmp_path / "b.zip")
    add_release(origin, APP_ID, "1.0.0", "production", tmp_path / "b.zip")
    return write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}}, **extra)


def test_plain_admin_healthy_then_gone(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    cfg = directory_config(tmp_path, pki, capgo_dir)
    with run_gateway(cfg) as gw:
        live = health(cfg)
        assert live.returncode == 0, live.stderr
        assert one_line(live) == f"ota-gateway: http://127.0.0.1:{gw.admin_port}/healthz: 200 alive"
        ready = health(cfg, "--ready")
        assert ready.returncode == 0, ready.stderr
        assert one_line(ready) == f"ota-gateway: http://127.0.0.1:{gw.admin_port}/readyz: 200 ready"
    gone = health(cfg)
    assert gone.returncode == 1
    assert "cannot connect" in one_line(gone)


def test_not_ready_while_the_origin_fails(tmp_path: Path, pki: Pki) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cdn = {"type": "https", "url": f"https://127.0.0.1:{dead}/", "ca": str(pki.ca_pem)}
    cfg = write_config(tmp_path / "gw", pki, origins={"cdn": cdn})
    with run_gateway(cfg) as gw:
        assert health(cfg, "--ready").returncode == 0  # no origin answer yet
        answer = https_request(f"{gw.base_url}/bundles/{APP_ID}/1.0.0.zip", pki.client_context(pki.client))
        assert answer.status == 502
        ready = health(cfg, "--ready")
        assert ready.returncode == 1
        assert "503 not ready: origin cdn failing" in one_line(ready)
        assert health(cfg).returncode == 0  # alive all the same


def admin_tls(pki: Pki, **over: str) -> dict[str, Any]:
    tls: dict[str, Any] = {
        "cert": str(pki.server.cert),
        "key": str(pki.server.key),
        "client_ca": [str(pki.ca_pem)],
        "health_cert": str(pki.client.cert),
        "health_key": str(pki.client.key),
    }
    return {**tls, **over}


def test_mtls_admin(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    cfg = directory_config(tmp_path, pki, capgo_dir, extra={"admin": {"tls": admin_tls(pki)}})
    with run_gateway(cfg) as gw:
        live = health(cfg)
        assert live.returncode == 0, live.stdout + live.stderr
        assert one_line(live) == f"ota-gateway: https://127.0.0.1:{gw.admin_port}/healthz: 200 alive"
        assert health(cfg, "--ready").returncode == 0

        # negative twins, with a second config naming the same listener
        def probe_with(**over: str) -> subprocess.CompletedProcess[str]:
            other = tmp_path / "other" / "gateway.yaml"
            other.parent.mkdir(exist_ok=True)
            other.write_text(cfg.read_text())
            edit_config(other, lambda c: c["admin"].update(tls=admin_tls(pki, **over)))
            return health(other)

        rogue = probe_with(health_cert=str(pki.rogue_client.cert), health_key=str(pki.rogue_client.key))
        assert rogue.returncode == 1
        assert "refused the health certificate" in one_line(rogue)
        impostor = probe_with(cert=str(pki.client2.cert))  # the listener's certificate is not this one
        assert impostor.returncode == 1
        assert "a certificate other than admin.tls.cert" in one_line(impostor)
    assert health(cfg).returncode == 1


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["admin"].update(enabled=False), "admin.enabled: the admin listener is disabled"),
        (lambda c: c["admin"].update(prot=1), "admin.prot: unknown key"),
        (lambda c: c["admin"].update(tls={"cert": "server.pem"}), "admin.tls.cert: file not found"),
    ],
)
def test_config_errors_exit_2(tmp_path: Path, pki: Pki, capgo_dir: Path, edit: Any, expected: str) -> None:
    cfg = directory_config(tmp_path, pki, capgo_dir)
    edit_config(cfg, edit)
    proc = health(cfg)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_mtls_without_a_health_certificate_is_a_config_error(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    tls = admin_tls(pki)
    del tls["health_cert"], tls["health_key"]
    cfg = directory_config(tmp_path, pki, capgo_dir, extra={"admin": {"tls": tls}})
    proc = health(cfg)
    assert proc.returncode == 2
    assert "admin.tls.health_cert/health_key are not" in one_line(proc)
    half = admin_tls(pki)
    del half["health_key"]
    edit_config(cfg, lambda c: c["admin"].update(tls=half))
    proc = health(cfg)
    assert proc.returncode == 2 and "health_cert and health_key go together" in proc.stderr


def test_missing_config_is_exit_2(tmp_path: Path) -> None:
    proc = health(tmp_path / "nope.yaml")
    assert proc.returncode == 2
    assert "nope.yaml" in one_line(proc) and "cannot read" in proc.stderr
