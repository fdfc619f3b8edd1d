"""Observability from outside: a scripted scenario against a real gateway, asserted as exact counter deltas from
/metrics scrapes; the exposition passes `promtool check metrics`; OpenMetrics on request; `--workers 2` sums."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.publish import add_release
from tests.support import APP_ID, GatewayProcess, Pki, run_gateway, wait_until, write_config

BUNDLE = os.urandom(3 * 1024 * 1024 + 17)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def delta(before: dict, after: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def download(gw: GatewayProcess, pki: Pki, version: str) -> tuple[int, int]:
    """(status, bytes received); a cut-off transfer returns the bytes that arrived."""
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=pki.client_context(pki.client), timeout=10)
    try:
        conn.request("GET", f"/bundles/{APP_ID}/{version}.zip")
        resp = conn.getresponse()
        got = 0
        try:
            while chunk := resp.read(65536):
                got += len(chunk)
        except http.client.IncompleteRead as exc:
            got += len(exc.partial)
        return resp.status, got
    finally:
        conn.close()


@pytest.fixture
def gateway(tmp_path: Path, pki: Pki) -> Iterator[GatewayProcess]:
    origin = tmp_path / "origin"
    origin.mkdir()
    bundle = tmp_path / "b.zip"
    import zipfile

    with zipfile.ZipFile(bundle, "w") as zf:
        zf.writestr("assets/blob.bin", BUNDLE)
    add_release(origin, APP_ID, "1.0.0", "production", bundle)
    add_release(origin, APP_ID, "1.1.0", "production", bundle)
    stored = origin / APP_ID / "1.1.0.zip"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF  # tampered at the origin after publishing
    stored.write_bytes(bytes(data))
    cfg = write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})
    with run_gateway(cfg) as gw:
        yield gw


def test_scenario_counter_deltas(gateway: GatewayProcess, pki: Pki) -> None:
    gw = gateway
    before = samples(gw.scrape())

    status, got = download(gw, pki, "1.0.0")  # good
    good_size = (gw.config_path.parent.parent / "origin" / APP_ID / "1.0.0.zip").stat().st_size
    assert (status, got) == (200, good_size)

    status, got_bad = download(gw, pki, "1.1.0")  # tampered: cut off
    assert status == 200 and got_bad < good_size

    with socket.create_connection(("127.0.0.1", gw.port)) as raw:  # no client certificate
        ctx = pki.client_context(None)
        with pytest.raises((ssl.SSLError, ConnectionError)), ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            if not tls.recv(1):
                raise ConnectionError("closed without an answer")

    policy = gw.config_path.parent / "policies" / "apps.yaml"
    doc = yaml.safe_load(policy.read_text())
    doc["apps"][0]["channels"]["allowed"] = ["production"]
    policy.write_text(yaml.safe_dump(doc))
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: any("reloaded" in line for line in gw.stderr_lines), 10)

    after = samples(gw.scrape())
    d = lambda name, **kw: delta(before, after, name, **kw)  # noqa: E731
    assert d("ota_gateway_requests_total", route="bundle", outcome="ok") == 1
    assert d("ota_gateway_requests_total", route="bundle", outcome="aborted") == 1
    assert d("ota_gateway_bundle_verifications_total", result="passed") == 1
    assert d("ota_gateway_bundle_verifications_total", result="checksum_mismatch") == 1
    assert d("ota_gateway_refusals_total", reason="checksum_mismatch") == 1
    assert sum(d("ota_gateway_refusals_total", reason=r) for r in ("no_client_cert", "bad_request")) == 0
    assert d("ota_gateway_tls_handshakes_total", listener="main") == 2
    assert d("ota_gateway_tls_handshake_failures_total", listener="main", cause="no_cert") == 1
    assert d("ota_gateway_config_reloads_total", result="success") == 1
    assert d("ota_gateway_config_reloads_total", result="failure") == 0
    assert after[("ota_gateway_config_last_reload_success", ())] == 1
    assert d("ota_gateway_bundle_bytes_sent_total") == good_size + got_bad
    assert after[("ota_gateway_downloads_in_flight", ())] == 0


def test_exposition_passes_promtool(gateway: GatewayProcess, pki: Pki) -> None:
    download(gateway, pki, "1.0.0")
    download(gateway, pki, "1.1.0")
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by `make test` (Debian package prometheus)"
    text = gateway.scrape()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    # a linter that accepts anything proves nothing: the same tool refuses a broken exposition
    bad = subprocess.run(
        [promtool, "check", "metrics"], input="ota_gateway_bad counter\n", capture_output=True, text=True, timeout=30
    )
    assert bad.returncode != 0


def test_openmetrics_when_asked(gateway: GatewayProcess) -> None:
    req = urllib.request.Request(
        f"{gateway.admin_url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")
    with urllib.request.urlopen(f"{gateway.admin_url}/metrics", timeout=5) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")


def test_no_label_value_comes_from_the_client(gateway: GatewayProcess, pki: Pki) -> None:
    marker = "evil" + hashlib.sha256(b"x").hexdigest()[:8]
    conn = http.client.HTTPSConnection("127.0.0.1", gateway.port, context=pki.client_context(pki.client), timeout=10)
    try:
        for path in (f"/bundles/{marker}/1.0.0.zip", f"/bundles/com.{marker}.app/1.0.0.zip", f"/{marker}"):
            conn.request("GET", path, headers={"User-Agent": marker, "X-App": marker})
            resp = conn.getresponse()
            resp.read()
            assert resp.status in (400, 404)
    finally:
        conn.close()
    text = gateway.scrape()
    assert marker not in text
    assert samples(text)[("ota_gateway_refusals_total", (("reason", "app_unknown"),))] == 1


def test_readyz_and_healthz(gateway: GatewayProcess) -> None:
    with urllib.request.urlopen(f"{gateway.admin_url}/healthz", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"{gateway.admin_url}/readyz", timeout=5) as resp:
        assert resp.status == 200


def test_readyz_503_when_the_origin_fails(tmp_path: Path, pki: Pki) -> None:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    dead = port.getsockname()[1]
    port.close()
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca_pem.read_bytes())
    cfg = write_config(
        tmp_path / "gw", pki, origins={"cdn": {"type": "https", "url": f"https://127.0.0.1:{dead}/", "ca": str(ca)}}
    )
    with run_gateway(cfg) as gw:
        status, _ = download(gw, pki, "1.0.0")
        assert status == 502
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{gw.admin_url}/readyz", timeout=5)
        body = err.value.read().decode()
        err.value.close()
        assert err.value.code == 503
        assert "origin cdn failing" in body


def test_workers_share_the_port_and_one_scrape_sums_them(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    shutil.copy(capgo_dir / "app_1.0.0.zip", tmp_path / "z.zip")
    add_release(origin, APP_ID, "1.0.0", "production", tmp_path / "z.zip")
    cfg = write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})
    with run_gateway(cfg, "--workers", "2") as gw:
        children = subprocess.run(["pgrep", "-P", str(gw.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2
        n = 8
        for _ in range(n):  # each a new connection: the kernel spreads them over the workers
            assert download(gw, pki, "1.0.0")[0] == 200
        assert wait_until(
            lambda: (
                samples(gw.scrape()).get(("ota_gateway_requests_total", (("outcome", "ok"), ("route", "bundle")))) == n
            )
        )
        assert samples(gw.scrape())[("ota_gateway_downloads_in_flight", ())] == 0
        code = gw.stop()
    assert code == 0
