"""The observability scenario of the metrics issue, end to end: a scripted session against a real gateway in front
of a Capgo-style origin (good download, tampered download, downgrade offer, a handshake without a client
certificate, a device's update_fail, a policy reload), asserted as exact counter deltas between two scrapes, then
the same scrape through `promtool check metrics` and the alert rules' expressions evaluated on it."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.capgo_env import CapgoEnv, capgo_env
from tests.support import APP_ID, Pki, capgo_call, device_body, https_request, wait_until


def scrape(env: CapgoEnv) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(env.gw.scrape()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


@pytest.fixture
def env(tmp_path: Path, pki: Pki) -> Iterator[CapgoEnv]:
    with capgo_env(tmp_path, pki) as env:
        yield env


def test_scripted_session_moves_exactly_the_expected_counters(env: CapgoEnv) -> None:
    before = scrape(env)

    # 1. a good update: check, then download through the ticket
    env.offer(APP_ID, "1.1.0")
    good = env.new_version(APP_ID, "1.0.0")
    assert https_request(good["url"], env.ctx()).status == 200

    # 2. a tampered bundle: the origin flips a byte in the middle; the download never completes
    env.offer(APP_ID, "1.1.0", name="tampered.zip")
    env.origin.state.modes[f"{APP_ID}/tampered.zip"] = "flip:30000"
    bad = env.new_version(APP_ID, "1.0.0")
    try:
        https_request(bad["url"], env.ctx())
        raise AssertionError("a tampered download completed")
    except (OSError, Exception) as exc:  # IncompleteRead or a reset: anything but a complete body
        assert not isinstance(exc, AssertionError)

    # 3. a downgrade: the origin offers 1.1.0 to a device on 2.0.0
    assert env.check(device_body(APP_ID, "2.0.0")).json()["kind"] == "up_to_date"

    # 4. a handshake without a client certificate
    ctx = env.pki.client_context(None)
    with socket.create_connection(("127.0.0.1", env.gw.port)) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert tls.recv(1) == b""
        except (ssl.SSLError, ConnectionError):
            pass

    # 5. a device reports that the new bundle failed to start
    stat = {**device_body(APP_ID, "1.1.0"), "old_version_name": "1.0.0", "action": "update_fail"}
    assert capgo_call(f"{env.gw.base_url}/stats", env.ctx(), stat).status == 200

    # 6. a policy reload by SIGHUP
    policy = env.gw.config_path.parent / "policies" / "apps.yaml"
    doc = yaml.safe_load(policy.read_text())
    doc["apps"][0]["channels"]["allowed"] = ["production"]
    policy.write_text(yaml.safe_dump(doc))
    env.gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: any("reloaded" in line for line in env.gw.stderr_lines), 10)

    after = scrape(env)

    def d(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert d("ota_gateway_update_answers_total", kind="new_version") == 2
    assert d("ota_gateway_update_answers_total", kind="up_to_date") == 1
    assert d("ota_gateway_refusals_total", reason="downgrade") == 1
    assert d("ota_gateway_download_tickets_total", result="issued") == 2
    assert d("ota_gateway_download_tickets_total", result="refused") == 0
    assert d("ota_gateway_bundle_verifications_total", result="passed") == 1
    assert d("ota_gateway_bundle_verifications_total", result="checksum_mismatch") == 1
    assert d("ota_gateway_refusals_total", reason="checksum_mismatch") == 1
    assert d("ota_gateway_tls_handshake_failures_total", listener="main", cause="no_cert") == 1
    assert d("ota_gateway_device_events_total", app=APP_ID, action="update_fail") == 1
    assert d("ota_gateway_config_reloads_total", result="success") == 1
    assert d("ota_gateway_config_reloads_total", result="failure") == 0
    for reason in ("rollback", "below_floor", "signature_invalid", "ticket_invalid", "identity_not_allowed"):
        assert d("ota_gateway_refusals_total", reason=reason) == 0, reason
    assert after[("ota_gateway_downloads_in_flight", ())] == 0

    # the same scrape is valid exposition by Prometheus' own linter
    promtool = shutil.which("promtool")
    assert promtool
    lint = subprocess.run([promtool, "check", "metrics"], input=env.gw.scrape(), capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_every_metric_the_rules_and_dashboard_use_is_exported(env: CapgoEnv) -> None:
    """A rule or panel on a misspelled metric would never fire or show anything: every `ota_gateway_*` name in
    deploy/ must appear in a live scrape (label sets are created at start, so the names exist before traffic)."""
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    used = set()
    for path in (deploy / "alerts.yml", deploy / "grafana-dashboard.json"):
        used |= set(re.findall(r"ota_gateway_[a-z0-9_]+", path.read_text()))
    assert len(used) >= 10
    exported = set()
    for family in text_string_to_metric_families(env.gw.scrape()):  # families are exported even without samples
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        exported |= {family.name + suffix for suffix in suffixes}
    missing = sorted(u for u in used if u not in exported)
    assert not missing, missing
