"""Staged rollouts and release halting against a real `serve` process: 2,000 simulated devices over one keep-alive
mTLS session, failure stats that halt a release, a noisy device and a non-admitted identity that cannot, the
operator's `release status|halt|resume`, and two gateways on one real redis-server that agree within a second."""

from __future__ import annotations

import http.client
import json
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.publish import add_release
from tests.support import (
    APP_ID,
    GatewayProcess,
    Pki,
    device_body,
    make_zip,
    redis_server,
    run_gateway,
    wait_until,
    write_config,
)

VERSIONS = ("1.1.0", "1.2.0", "1.3.0")
HEADERS = {"Content-Type": "application/json; charset=utf-8", "User-Agent": f"CapacitorUpdater/8.51.14 ({APP_ID})"}


def ids(n: int, seed: int = 0) -> list[str]:
    return [str(uuid.UUID(int=(seed << 64) + i * 104729 + 1)) for i in range(n)]


class Session:
    """One keep-alive mTLS connection for many simulated devices (each a device_id in the body)."""

    def __init__(self, gw: GatewayProcess, pki: Pki, who: Any = None) -> None:
        self.conn = http.client.HTTPSConnection(
            "127.0.0.1", gw.port, context=pki.client_context(who or pki.client), timeout=30
        )

    def post(self, path: str, payload: Any) -> tuple[int, Any]:
        self.conn.request("POST", path, body=json.dumps(payload).encode(), headers=HEADERS)
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())

    def check(self, device_id: str, version: str = "1.1.0") -> str:
        """The version offered to this device, or the answer's kind."""
        status, answer = self.post("/updates", device_body(version=version, device_id=device_id))
        assert status == 200, answer
        return str(answer.get("version") or answer["kind"])

    def stats(self, device_id: str, version: str, *actions: str) -> None:
        events = [{**device_body(version=version, device_id=device_id), "action": a} for a in actions]
        status, answer = self.post("/stats", events)
        assert status == 200, answer

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    root = tmp_path / "origin"
    root.mkdir()
    for version in VERSIONS:
        add_release(root, APP_ID, version, "production", make_zip(tmp_path / f"{version}.zip", 256))
    return root


def app_policy(percent: float, **extra: Any) -> dict[str, Any]:
    return {
        "app_id": APP_ID,
        "origin": "local",
        "channels": {"default": "production", "allowed": ["production"]},
        "clients": [{"name": "fleet", "issuer": ["ca"], "san_dns": ["device-1.example.app"]}],
        "rate_limits": {"updates_per_minute": 100000, "stats_per_minute": 100000},
        "rollout": {"identity": "device", "releases": {"1.3.0": {"percent": percent}}},
        "halt": {"failure_ratio": 0.2, "min_devices": 20, "window": "1h"},
        **extra,
    }


def config(
    directory: Path, pki: Pki, origin: Path, percent: float, state: dict[str, Any] | None = None, **app: Any
) -> Path:
    return write_config(
        directory,
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        apps=[app_policy(percent, **app)],
        extra={"reload": {"interval": 0.3}, **({"state": state} if state else {})},
    )


def set_percent(cfg: Path, gw: GatewayProcess, percent: float) -> None:
    policy = cfg.parent / "policies" / "apps.yaml"
    doc = yaml.safe_load(policy.read_text())
    doc["apps"][0]["rollout"]["releases"]["1.3.0"]["percent"] = percent
    before = gw.metric("ota_gateway_config_reloads_total", result="success")
    policy.write_text(yaml.safe_dump(doc))
    assert wait_until(lambda: gw.metric("ota_gateway_config_reloads_total", result="success") > before, timeout=10)


def within_binomial_bounds(hits: int, n: int, p: float) -> bool:
    return abs(hits / n - p) <= 4 * math.sqrt(p * (1 - p) / n)


def release_cli(cfg: Path, action: str, version: str = "1.3.0") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "release",
            action,
            "--config",
            str(cfg),
            "--app",
            APP_ID,
            "--version",
            version,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_2000_devices_at_10_then_50_percent(tmp_path: Path, pki: Pki, origin: Path) -> None:
    cfg = config(tmp_path / "gw", pki, origin, 10)
    devices = ids(2000)
    with run_gateway(cfg) as gw:
        session = Session(gw, pki)
        try:
            first = {d: session.check(d) for d in devices}
            assert set(first.values()) == {"1.3.0", "1.2.0"}  # out of the rollout: the release before it
            at10 = {d for d, v in first.items() if v == "1.3.0"}
            assert within_binomial_bounds(len(at10), len(devices), 0.10), len(at10)
            assert {d for d in devices if session.check(d) == "1.3.0"} == at10  # sticky
            set_percent(cfg, gw, 50)
            at50 = {d for d in devices if session.check(d) == "1.3.0"}
        finally:
            session.close()
        assert at10 < at50 and within_binomial_bounds(len(at50), len(devices), 0.50), len(at50)
        held = gw.metric("ota_gateway_rollout_held_back_total", app=APP_ID, cause="not_in_rollout")
        assert held == 2 * (len(devices) - len(at10)) + len(devices) - len(at50)


def test_with_certificate_identity_one_certificate_is_one_device(tmp_path: Path, pki: Pki, origin: Path) -> None:
    cfg = config(tmp_path / "gw", pki, origin, 50, rollout={"releases": {"1.3.0": {"percent": 50}}})  # default identity
    with run_gateway(cfg) as gw:
        session = Session(gw, pki)
        try:
            answers = {session.check(d) for d in ids(200, seed=3)}
            assert len(answers) == 1  # 200 claimed device ids: all in or all out, together
            got = answers.pop()
            # many failing "devices" behind one certificate are one failing device: no halt
            for d in ids(60, seed=4):
                session.stats(d, "1.3.0", "download_complete", "set")
            for d in ids(30, seed=4):
                session.stats(d, "1.3.0", "update_fail")
            assert session.check(ids(1, seed=5)[0]) == got
            marker = "7.7.7-evil" + uuid.uuid4().hex[:8]  # a version nobody published: no state, no label
            session.stats(ids(1)[0], marker, *["update_fail"] * 20)
        finally:
            session.close()
        assert gw.metric("ota_gateway_release_halts_total", app=APP_ID) == 0
        assert marker not in gw.scrape()
    assert "0 tried, 0 failed" in release_cli(cfg, "status", version=marker).stdout
    status = release_cli(cfg, "status")
    assert "1 tried, 1 failed" in status.stdout, status.stdout


def test_failures_halt_the_release_and_resume_restores_it(tmp_path: Path, pki: Pki, origin: Path) -> None:
    cfg = config(tmp_path / "gw", pki, origin, 50)
    with run_gateway(cfg) as gw:
        session, stranger = Session(gw, pki), Session(gw, pki, pki.client2)
        try:
            updated = [d for d in ids(200, seed=1) if session.check(d) == "1.3.0"]
            assert len(updated) >= 60
            for d in updated:
                session.stats(d, "1.3.0", "download_complete", "set")
            noisy = updated[0]
            for _ in range(5):  # one noisy device sending many failures is one failing device
                session.stats(noisy, "1.3.0", *["update_fail"] * 50)
            # an identity no rule admits: refused, and its failures count nothing
            for d in updated[1:40]:
                status, _ = stranger.post(
                    "/stats", [{**device_body(version="1.3.0", device_id=d), "action": "set_fail"}]
                )
                assert status == 403
            assert session.check(updated[1]) == "1.3.0"
            assert not [a for a in gw.audit() if a["route"] == "release"]
            failing = updated[: math.ceil(0.2 * len(updated))]
            for d in failing[1:-1]:
                session.stats(d, "1.3.0", "update_fail")
            assert session.check(updated[1]) == "1.3.0"  # one failing device short of 20 %
            session.stats(failing[-1], "1.3.0", "checksum_fail")
            assert session.check(updated[1]) == "1.2.0"  # halted: later checks get the release before it
            assert session.check("6f1c2f7e-3f5a-4c2e-9a55-0b1f7e9d2c11", version="1.2.0") == "up_to_date"
        finally:
            session.close()
            stranger.close()
        assert gw.metric("ota_gateway_release_halted", app=APP_ID, version="1.3.0") == 1
        assert gw.metric("ota_gateway_release_halts_total", app=APP_ID) == 1
        halts = [a for a in gw.audit() if a["route"] == "release"]
        assert len(halts) == 1 and halts[0]["method"] == "HALT" and halts[0]["version"] == "1.3.0"
        expected = f"halted automatically: {len(failing)} of {len(updated)} devices failed"
        assert halts[0]["detail"].startswith(expected), halts[0]
        assert halts[0]["identity_sha256"] == pki.client.sha256

        status = release_cli(cfg, "status")
        assert status.returncode == 0 and "HALTED: halted automatically" in status.stdout, status.stdout
        assert f"{len(updated)} tried, {len(failing)} failed" in status.stdout and "50 % of devices" in status.stdout
        resumed = release_cli(cfg, "resume")
        assert resumed.returncode == 0 and "1.3.0: resumed" in resumed.stdout and "0 tried, 0 failed" in resumed.stdout
        session = Session(gw, pki)
        try:
            assert wait_until(lambda: session.check(updated[1]) == "1.3.0", timeout=3)  # the cache is at most 1 s old
            assert gw.metric("ota_gateway_release_halted", app=APP_ID, version="1.3.0") == 0
            halted = release_cli(cfg, "halt")
            assert halted.returncode == 0 and "1.3.0: halted" in halted.stdout
            assert wait_until(lambda: session.check(updated[1]) == "1.2.0", timeout=3)
        finally:
            session.close()
        lines = [(a["method"], a["detail"]) for a in gw.audit() if a["route"] == "release"]
        assert [m for m, _ in lines] == ["HALT", "RESUME", "HALT"] and "by operator" in lines[-1][1]


def test_release_cli_user_errors(tmp_path: Path, pki: Pki, origin: Path) -> None:
    cfg = config(tmp_path / "gw", pki, origin, 10)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "release",
            "status",
            "--config",
            str(cfg),
            "--app",
            "com.nope.app",
            "--version",
            "1.0.0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and out.stderr.strip() == "ota-gateway: no policy names app 'com.nope.app'"
    bad = release_cli(cfg, "halt", version="latest")
    assert bad.returncode == 2 and "--version must be a semantic version" in bad.stderr and bad.stdout == ""


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def test_two_gateways_on_one_redis_agree_within_a_second(
    tmp_path: Path, pki: Pki, origin: Path, redis_url: str
) -> None:
    state = {"redis_url": redis_url}
    one = config(tmp_path / "one", pki, origin, 30, state=state, halt={"min_devices": 5, "failure_ratio": 0.5})
    two = config(tmp_path / "two", pki, origin, 30, state=state, halt={"min_devices": 5, "failure_ratio": 0.5})
    with run_gateway(one) as gw1, run_gateway(two) as gw2:
        s1, s2 = Session(gw1, pki), Session(gw2, pki)
        try:
            devices = ids(100, seed=7)
            assert [s1.check(d) for d in devices] == [s2.check(d) for d in devices]  # the same cohort
            updated = [d for d in devices if s1.check(d) == "1.3.0"][:6]
            for d in updated[:3]:  # counted on host one ...
                s1.stats(d, "1.3.0", "set")
            for d in updated[3:]:  # ... and on host two: one count
                s2.stats(d, "1.3.0", "set", "update_fail")
            halted_at = time.monotonic()
            assert wait_until(lambda: s1.check(updated[0]) == "1.2.0", timeout=3)  # halted by host two, seen by one
            assert s2.check(updated[0]) == "1.2.0"
            assert time.monotonic() - halted_at < 3
            assert release_cli(one, "resume").returncode == 0
            assert wait_until(lambda: s1.check(updated[0]) == s2.check(updated[0]) == "1.3.0", timeout=3)
        finally:
            s1.close()
            s2.close()
        assert gw1.metric("ota_gateway_release_halts_total", app=APP_ID) == 0
        assert gw2.metric("ota_gateway_release_halts_total", app=APP_ID) == 1


def test_in_front_of_an_update_server_the_answer_is_replaced_from_its_index(tmp_path: Path, pki: Pki) -> None:
    from tests.capgo_env import capgo_env
    from tests.support import CAPGO_FIXTURES, capgo_fixture, https_request

    other, third = "com.example.other", "com.example.third"
    rules = {"clients": [{"name": "fleet", "issuer": ["ca"]}], "channels": {"default": "production"}}
    held = {"releases": {"2.0.0": {"percent": 0}}}  # nobody is in the rollout of 2.0.0 yet
    apps = [
        {"app_id": APP_ID, "origin": "capgo", **rules, "rollout": held},
        {"app_id": other, "origin": "capgo", **rules, "rollout": held, "halt": {"offer_previous": False}},
        {"app_id": third, "origin": "capgo", **rules, "rollout": held, "versions": {"blocked_versions": ["1.1.0"]}},
    ]
    with capgo_env(tmp_path, pki, apps) as env:
        for app in (APP_ID, other, third):
            env.offer(app, "2.0.0")  # what the update server answers
            env.origin.publish(app, "1.1.0", (CAPGO_FIXTURES / capgo_fixture("1.1.0")["zip"]).read_bytes())
        answer = env.check(device_body(APP_ID, "1.0.0")).json()
        assert answer["version"] == "1.1.0", answer  # the newest release the index knows, newer than the device
        got = https_request(answer["url"], env.ctx())
        assert got.status == 200 and got.body == (CAPGO_FIXTURES / capgo_fixture("1.1.0")["zip"]).read_bytes()
        answer = env.check(device_body(APP_ID, "1.1.0")).json()
        assert answer["kind"] == "up_to_date" and "staged rollout" in answer["message"], answer
        answer = env.check(device_body(other, "1.0.0")).json()
        assert answer["kind"] == "up_to_date", answer  # offer_previous: false
        answer = env.check(device_body(third, "1.0.0")).json()
        assert answer["kind"] == "up_to_date" and "1.1.0 is a blocked version" in answer["message"], answer
        assert env.gw.metric("ota_gateway_rollout_held_back_total", app=APP_ID, cause="not_in_rollout") == 2
