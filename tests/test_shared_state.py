"""Two gateway hosts sharing one Redis state store (`state.redis_url`), through real `serve` processes and a real
redis-server: the channel high-water mark and the rate-limit budget are the same on both; a Redis not up yet at start
is a store failure the gateway recovers from by itself; a url that can never work is a config error at start."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support import (
    APP_ID,
    Pki,
    RedisServer,
    capgo_call,
    capgo_origin,
    device_body,
    redis_server,
    run_gateway,
    wait_until,
    write_config,
)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def _config(directory: Path, pki: Pki, origin: Path, redis_url: str, **app: object) -> Path:
    apps = [
        {
            "app_id": APP_ID,
            "origin": "local",
            "channels": {"default": "production", "allowed": ["production"]},
            "clients": [{"name": "fleet", "issuer": ["ca"]}],
            **app,
        }
    ]
    return write_config(
        directory,
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        apps=apps,
        extra={"state": {"redis_url": redis_url}},
    )


@pytest.fixture
def origin(tmp_path: Path, capgo_dir: Path) -> Path:
    return capgo_origin(tmp_path / "origin", capgo_dir)


def test_two_hosts_share_the_rate_limit_budget(tmp_path: Path, pki: Pki, origin: Path, redis_url: str) -> None:
    limits = {"rate_limits": {"updates_per_minute": 2, "stats_per_minute": 2}}
    one = _config(tmp_path / "one", pki, origin, redis_url, **limits)
    two = _config(tmp_path / "two", pki, origin, redis_url, **limits)
    with run_gateway(one) as gw1, run_gateway(two) as gw2:
        ctx = pki.client_context(pki.client)
        assert capgo_call(f"{gw1.base_url}/updates", ctx, device_body()).status == 200
        assert capgo_call(f"{gw2.base_url}/updates", ctx, device_body()).status == 200
        third = capgo_call(f"{gw1.base_url}/updates", ctx, device_body())  # the budget is spent on both hosts
        assert third.status == 429 and int(third.headers["retry-after"]) >= 1
        other = capgo_call(f"{gw2.base_url}/updates", pki.client_context(pki.client2), device_body())
        assert other.status == 200  # another identity has its own budget


def test_a_mark_set_on_one_host_holds_on_the_other(tmp_path: Path, pki: Pki, origin: Path, redis_url: str) -> None:
    one = _config(tmp_path / "one", pki, origin, redis_url)
    two = _config(tmp_path / "two", pki, origin, redis_url)
    with run_gateway(one) as gw1, run_gateway(two) as gw2:
        ctx = pki.client_context(pki.client)
        offered = capgo_call(f"{gw1.base_url}/updates", ctx, device_body(version="1.0.0")).json()
        assert offered["version"] == "1.1.0"  # host one offers 1.1.0: the channel's mark is now 1.1.0
        # the publisher removes 1.1.0 from the index: host two may not lower the channel to 1.0.0 on its own
        index = origin / APP_ID / "releases.yaml"
        doc = yaml.safe_load(index.read_text())
        doc["releases"] = [r for r in doc["releases"] if r["version"] == "1.0.0"]
        index.write_text(yaml.safe_dump(doc))
        answer = capgo_call(f"{gw2.base_url}/updates", ctx, device_body(version="0.9.0")).json()
        assert answer["kind"] == "blocked" and answer["error"] == "rollback", answer
        assert gw2.metric("ota_gateway_refusals_total", reason="rollback") == 1


def test_a_gateway_up_before_redis_serves_not_ready_and_recovers_by_itself(
    tmp_path: Path, pki: Pki, origin: Path
) -> None:
    """A reboot that starts the gateway before Redis: it starts (an exit 2 would never be retried by systemd's
    RestartPreventExitStatus=2), /readyz names the failing store, update checks answer `state_error` meanwhile, and
    the probe brings it back once a real redis-server comes up: one line when it fails, one when it recovers."""
    server = RedisServer()  # its port chosen, not started yet
    cfg = _config(tmp_path / "gw", pki, origin, server.url)
    doc = yaml.safe_load(cfg.read_text())
    doc["state"]["probe_interval"] = 0.5
    cfg.write_text(yaml.safe_dump(doc))
    try:
        with run_gateway(cfg) as gw:
            status, body = gw.readyz()
            assert status == 503 and any("state store failing" in r for r in body["reasons"]), body
            ctx = pki.client_context(pki.client)
            meanwhile = capgo_call(f"{gw.base_url}/updates", ctx, device_body(version="1.0.0"))
            assert meanwhile.status == 200 and meanwhile.json()["error"] == "state_error", meanwhile.json()
            server.start()
            assert wait_until(lambda: gw.readyz()[0] == 200, timeout=15), gw.readyz()
            offered = capgo_call(f"{gw.base_url}/updates", ctx, device_body(version="1.0.0")).json()
            assert offered["version"] == "1.1.0", offered
            failing = [line for line in gw.stderr_lines if "state store failing" in line]
            recovered = [line for line in gw.stderr_lines if "state store recovered" in line]
            assert len(failing) == 1 and len(recovered) == 1, gw.stderr_lines
            assert not any("Traceback" in line for line in gw.stderr_lines)
    finally:
        server.stop()


def test_a_redis_url_that_can_never_work_is_a_one_line_config_error(tmp_path: Path, pki: Pki, origin: Path) -> None:
    cfg = _config(tmp_path / "gw", pki, origin, "redis://127.0.0.1:notaport/0")
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0] and "state.redis_url: not a usable Redis url" in lines[0], lines
