"""The listener judged by a TLS scanner, as an operator would: sslyze against Mozilla's "intermediate" profile.

sslyze lives in its own virtual environment (`.venv-scan`, made by `make test`), because it pins an older
`cryptography` than the gateway. The negative twin scans a deliberately weak TLS server, so a scanner that
passed everything would fail this test.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import certs
from gateway.publish import add_release
from tests.support import APP_ID, ROOT, Pki, run_gateway, tls_server, write_config

SCAN_PYTHON = ROOT / ".venv-scan" / "bin" / "python"
SCRIPT = ROOT / "tests" / "tools" / "tls_scan.py"


def scan(port: int, ca: Path, cert: Path, key: Path) -> dict[str, object]:
    assert SCAN_PYTHON.exists(), "sslyze's venv is missing: `make test` creates .venv-scan"
    out = subprocess.run(
        [str(SCAN_PYTHON), str(SCRIPT), "127.0.0.1", str(port), str(ca), str(cert), str(key)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.strip(), out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_gateway_is_mozilla_intermediate_compliant(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    dev = tmp_path / "dev"
    certs.init(dev)  # the material `make run` uses: server certificate valid < 366 days
    origin = tmp_path / "origin"
    origin.mkdir()
    add_release(origin, APP_ID, "1.0.0", "production", capgo_dir / "app_1.0.0.zip")
    cfg = write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})
    text = cfg.read_text()
    text = text.replace(str(pki.server.cert), str(dev / "server.pem")).replace(
        str(pki.server.key), str(dev / "server.key")
    )
    text = text.replace(str(pki.ca_pem), str(dev / "ca.pem"))
    cfg.write_text(text)
    with run_gateway(cfg) as gw:
        result = scan(gw.port, dev / "ca.pem", dev / "client.pem", dev / "client.key")
    assert result["problems"] == {}, result
    assert result["compliant"] is True
    assert result["tls_versions"] == ["tls_1_2", "tls_1_3"]


@pytest.fixture
def weak_server(pki: Pki) -> Iterator[int]:
    """A TLS server that accepts TLS 1.0 and CBC/SHA-1 suites: what the scanner must refuse."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():  # deliberately deprecated: this server exists to be judged weak
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.load_cert_chain(pki.server.cert, pki.server.key)

    def answer(tls: ssl.SSLSocket) -> None:
        tls.recv(1024)
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    with tls_server(ctx, answer, timeout=2) as port:
        yield port


def test_scanner_refuses_a_weak_server(weak_server: int, pki: Pki) -> None:
    result = scan(weak_server, pki.ca_pem, pki.client.cert, pki.client.key)
    assert result["compliant"] is False
    assert "tls_1_0" in result["tls_versions"]
