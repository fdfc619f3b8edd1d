"""The optional plain-HTTP listener never serves and never reaches the origin: 308 to https for GET/HEAD, 426 with
problem details otherwise. Every TLS answer carries Strict-Transport-Security."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.origin_server import HttpsOrigin
from tests.support import (
    APP_ID,
    Pki,
    edit_config,
    free_port,
    https_request,
    run_gateway,
    wait_until,
    write_config,
)


def _curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """Run curl; return status, headers (lowercase names) and body."""
    proc = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "-D", "-", "-o", "-", *args], capture_output=True, check=True, timeout=20
    )
    head, _, body = proc.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def test_plain_http_redirects_refuses_and_never_reaches_the_origin(
    tmp_path: Path, pki: Pki, https_origin: HttpsOrigin, capgo_dir: Path
) -> None:
    https_origin.publish(APP_ID, "1.1.0", (capgo_dir / "app_1.1.0.zip").read_bytes())
    plain_port, tls_port = free_port(), free_port()
    cfg = write_config(
        tmp_path / "gw",
        pki,
        port=tls_port,
        origins={"cdn": https_origin.origin_config()},
        extra={"plain_http": {"enabled": True, "address": "127.0.0.1", "port": plain_port}},
    )
    with run_gateway(cfg) as gw:
        plain = f"http://127.0.0.1:{plain_port}"
        path = f"/bundles/{APP_ID}/1.1.0.zip?channel=beta&x=%20y"

        status, headers, _ = _curl(f"{plain}{path}")
        assert status == 308
        assert headers["location"] == f"https://127.0.0.1:{tls_port}{path}"
        assert "strict-transport-security" not in headers  # meaningless over plain HTTP (RFC 6797 8.1)

        status, headers, _ = _curl("-I", f"{plain}/updates")
        assert status == 308 and headers["location"] == f"https://127.0.0.1:{tls_port}/updates"

        status, headers, _ = _curl("-H", "Host: ota.example.com:80", f"{plain}/x")
        assert status == 308 and headers["location"] == f"https://ota.example.com:{tls_port}/x"
        status, headers, _ = _curl("-H", "Host: evil.example/@x", f"{plain}/x")
        assert status == 308 and headers["location"] == f"https://localhost:{tls_port}/x"

        for method in ("POST", "PUT", "DELETE"):
            status, headers, body = _curl("-X", method, "--data-binary", '{"app_id": "com.example.app"}', plain + path)
            assert status == 426, (method, status, body)
            assert headers["content-type"].startswith("application/problem+json")
            problem = json.loads(body)
            assert problem["reason"] == "not_https" and problem["status"] == 426
            assert f"https://127.0.0.1:{tls_port}" in problem["detail"]
            assert headers["upgrade"].startswith("TLS/")
            assert "location" not in headers

        assert gw.metric("ota_gateway_plain_http_requests_total", answer="redirect") == 4
        assert gw.metric("ota_gateway_plain_http_requests_total", answer="upgrade_required") == 3
        assert gw.audit() == []  # nothing was decided about a client; no identity, no audit line
    assert https_origin.state.requests == []  # the origin saw nothing at all
    assert https_origin.state.headers == []


def test_every_tls_answer_carries_hsts(tmp_path: Path, pki: Pki, https_origin: HttpsOrigin, capgo_dir: Path) -> None:
    https_origin.publish(APP_ID, "1.1.0", (capgo_dir / "app_1.1.0.zip").read_bytes())
    apps = [
        {
            "app_id": APP_ID,
            "origin": "cdn",
            "clients": [{"name": "one-device", "issuer": ["ca"], "san_dns": ["device-1.example.app"]}],
        }
    ]
    cfg = write_config(tmp_path / "gw", pki, origins={"cdn": https_origin.origin_config()}, apps=apps)

    def edit(config: dict[str, Any]) -> None:
        config["listeners"][0]["hsts_max_age"] = 600

    edit_config(cfg, edit)
    with run_gateway(cfg) as gw:
        ok, other = pki.client_context(pki.client), pki.client_context(pki.client2)
        answers = {
            "ok": https_request(f"{gw.base_url}/bundles/{APP_ID}/1.1.0.zip", ok),
            "identity_not_allowed": https_request(f"{gw.base_url}/bundles/{APP_ID}/1.1.0.zip", other),
            "app_unknown": https_request(f"{gw.base_url}/bundles/com.example.nope/1.1.0.zip", ok),
            "release_unknown": https_request(f"{gw.base_url}/bundles/{APP_ID}/7.7.7.zip", ok),
            "bad_request": https_request(f"{gw.base_url}/bundles/{APP_ID}/1..1.zip", ok),
            "not_found": https_request(f"{gw.base_url}/nothing/here", ok),
            "method": https_request(f"{gw.base_url}/bundles/{APP_ID}/1.1.0.zip", ok, method="DELETE"),
        }
        statuses = {name: a.status for name, a in answers.items()}
        assert statuses == {
            "ok": 200,
            "identity_not_allowed": 403,
            "app_unknown": 404,
            "release_unknown": 404,
            "bad_request": 400,
            "not_found": 404,
            "method": 405,
        }
        for name, answer in answers.items():
            assert answer.headers.get("strict-transport-security") == "max-age=600", name
        for name in ("identity_not_allowed", "app_unknown", "release_unknown", "bad_request"):
            assert answers[name].json()["reason"] == name


def test_each_listener_sends_its_own_hsts_max_age(
    tmp_path: Path, pki: Pki, https_origin: HttpsOrigin, capgo_dir: Path
) -> None:
    https_origin.publish(APP_ID, "1.1.0", (capgo_dir / "app_1.1.0.zip").read_bytes())
    cfg = write_config(tmp_path / "gw", pki, origins={"cdn": https_origin.origin_config()})
    second_port = free_port()

    def edit(config: dict[str, Any]) -> None:
        first = config["listeners"][0]
        first["hsts_max_age"] = 600
        config["listeners"].append({**first, "name": "second", "port": second_port, "hsts_max_age": 0})

    edit_config(cfg, edit)
    with run_gateway(cfg) as gw:
        ctx = pki.client_context(pki.client)
        urls = {"first": gw.base_url, "second": f"https://127.0.0.1:{second_port}"}
        for path in (f"/bundles/{APP_ID}/1.1.0.zip", "/nothing/here"):
            answers = {name: https_request(f"{base}{path}", ctx) for name, base in urls.items()}
            assert answers["first"].headers.get("strict-transport-security") == "max-age=600", path
            assert "strict-transport-security" not in answers["second"].headers, path  # 0 turns it off
            assert answers["second"].headers.get("server") == "ota-gateway"


def test_a_reload_changes_hsts_on_a_connection_kept_open_across_it(
    tmp_path: Path, pki: Pki, https_origin: HttpsOrigin, capgo_dir: Path
) -> None:
    """A connection keeps its listener's headers between requests (worked out once), but only while the config they
    came from is current: after a reload that changes `hsts_max_age`, the next answer on the same connection
    carries the new value."""
    https_origin.publish(APP_ID, "1.1.0", (capgo_dir / "app_1.1.0.zip").read_bytes())
    cfg = write_config(tmp_path / "gw", pki, origins={"cdn": https_origin.origin_config()})

    def hsts(seconds: int) -> Callable[[dict[str, Any]], None]:
        def edit(config: dict[str, Any]) -> None:
            config["listeners"][0]["hsts_max_age"] = seconds

        return edit

    edit_config(cfg, hsts(600))
    with run_gateway(cfg) as gw:
        keep = http.client.HTTPSConnection("127.0.0.1", gw.port, context=pki.client_context(pki.client), timeout=10)
        try:
            seen = []
            for _ in range(2):
                keep.request("GET", f"/bundles/{APP_ID}/1.1.0.zip")
                answer = keep.getresponse()
                answer.read()
                seen.append(answer.getheader("strict-transport-security"))
            edit_config(cfg, hsts(1200))
            gw.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: gw.metric("ota_gateway_config_reloads_total", result="success") == 1)
            keep.request("GET", f"/bundles/{APP_ID}/1.1.0.zip")
            answer = keep.getresponse()
            answer.read()
            seen.append(answer.getheader("strict-transport-security"))
        finally:
            keep.close()
    assert seen == ["max-age=600", "max-age=600", "max-age=1200"]
