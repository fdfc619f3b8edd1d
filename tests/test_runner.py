"""Graceful shutdown of a real `ota-gateway serve` (runner.py): SIGTERM with a download in flight.

The origin is an HTTPS test origin that spreads the bundle over a few seconds ("slow:<seconds>"). A download that
ends within `limits.shutdown_grace` completes, correct, and the process exits 0; one that would outlast the grace
is cut (the client never holds a complete body), the process exits 3 and the audit line says aborted/shutdown.
Once SIGTERM has arrived, the listener accepts no new connection.
"""

from __future__ import annotations

import hashlib
import http.client
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.origin_server import HttpsOrigin
from tests.support import APP_ID, CAPGO_FIXTURES, GatewayProcess, Pki, run_gateway, wait_until, write_config

BUNDLE = (CAPGO_FIXTURES / "app_1.1.0.zip").read_bytes()
PATH = f"/bundles/{APP_ID}/1.1.0.zip"


class Download(threading.Thread):
    """One bundle download in a thread, read piece by piece so that the test sees when bytes start flowing."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        super().__init__(name="test-download", daemon=True)
        self.port = port
        self.ctx = ctx
        self.status = 0
        self.declared: int | None = None
        self.body = b""
        self.error: BaseException | None = None
        self.first_bytes = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=20)
        try:
            conn.request("GET", PATH)
            resp = conn.getresponse()
            self.status = resp.status
            self.declared = int(resp.headers["Content-Length"])
            while True:
                piece = resp.read1(4096)
                if not piece:
                    break
                self.body += piece
                self.first_bytes.set()
        except (OSError, http.client.HTTPException) as exc:
            self.error = exc
        finally:
            conn.close()
            self.first_bytes.set()

    @property
    def complete(self) -> bool:
        return self.error is None and self.declared == len(self.body)


def start_download(gw: GatewayProcess, pki: Pki) -> Download:
    download = Download(gw.port, pki.client_context(pki.client))
    download.start()
    assert download.first_bytes.wait(15), "no bytes arrived"
    assert download.status == 200 and not download.complete, (download.status, download.error)
    return download


def setup(tmp_path: Path, pki: Pki, origin: HttpsOrigin, seconds: float, **limits: Any) -> Path:
    origin.publish(APP_ID, "1.1.0", BUNDLE)
    origin.state.modes[f"{APP_ID}/1.1.0.zip"] = f"slow:{seconds}"
    return write_config(tmp_path / "gw", pki, origins={"cdn": origin.origin_config()}, extra={"limits": limits})


def draining(gw: GatewayProcess) -> bool:
    return any("shutting down" in line for line in gw.stderr_lines)


def connect_refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def bundle_audit(gw: GatewayProcess) -> dict[str, Any]:
    records = [r for r in gw.audit() if r.get("route") == "bundle"]
    assert len(records) == 1, records
    return records[0]


def test_sigterm_lets_a_download_within_the_grace_finish(tmp_path: Path, pki: Pki, https_origin: HttpsOrigin) -> None:
    config = setup(tmp_path, pki, https_origin, 2.0, shutdown_grace=10)
    with run_gateway(config) as gw:
        assert connect_refused(gw.port) is False
        download = start_download(gw, pki)
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: draining(gw), 5), gw.stderr_lines

        # draining: the listener is closed to new connections, the admin side says not ready
        assert connect_refused(gw.port)
        assert gw.readyz()[0] == 503
        assert download.is_alive()

        download.join(15)
        assert download.complete, (download.error, len(download.body), download.declared)
        assert hashlib.sha256(download.body).digest() == hashlib.sha256(BUNDLE).digest()
        assert gw.proc.wait(15) == 0
        assert time.monotonic() - started < 8
    assert any("stopped cleanly" in line for line in gw.stderr_lines), gw.stderr_lines
    record = bundle_audit(gw)
    assert (record["outcome"], record["status"], record["bytes"]) == ("ok", 200, len(BUNDLE))


def test_sigterm_cuts_a_download_longer_than_the_grace(tmp_path: Path, pki: Pki, https_origin: HttpsOrigin) -> None:
    config = setup(tmp_path, pki, https_origin, 8.0, shutdown_grace=1)
    with run_gateway(config) as gw:
        download = start_download(gw, pki)
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: draining(gw), 5), gw.stderr_lines
        assert connect_refused(gw.port)

        download.join(15)
        assert not download.is_alive()
        elapsed = time.monotonic() - started
        assert not download.complete
        assert download.declared == len(BUNDLE)
        assert 0 < len(download.body) < len(BUNDLE)
        assert BUNDLE.startswith(download.body)  # what arrived is a true prefix; the tail never does
        assert gw.proc.wait(15) == 3
        assert elapsed < 6  # grace (1 s) plus aiohttp's own shutdown timeout (1 s), not the 8 s of the body
    assert any("aborted after the grace period" in line for line in gw.stderr_lines), gw.stderr_lines
    record = bundle_audit(gw)
    assert (record["outcome"], record["reason"], record["status"]) == ("aborted", "shutdown", 200)
    assert record["bytes"] == len(download.body)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_idle_gateway_stops_at_once(tmp_path: Path, pki: Pki, https_origin: HttpsOrigin, sig: int) -> None:
    config = setup(tmp_path, pki, https_origin, 1.0, shutdown_grace=30)
    with run_gateway(config) as gw:
        started = time.monotonic()
        assert gw.stop(sig) == 0
        assert time.monotonic() - started < 5  # no request in flight: the grace is not waited out
        assert connect_refused(gw.port)
