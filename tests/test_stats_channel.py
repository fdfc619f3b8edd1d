"""POST /stats and /channel_self end to end: checked, counted, forwarded to the Capgo-style origin, answered like
the official backend; and the same routes in front of a directory origin (counted and answered locally)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.capgo_env import LIMITED_APP, CapgoEnv, capgo_env, default_apps
from tests.support import APP_ID, Pki, capgo_call, device_body, https_request, metric_value, run_gateway, write_config


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[CapgoEnv]:
    with capgo_env(tmp_path_factory.mktemp("capgo-stats"), pki) as env:
        yield env


def event(action: str, app: str = APP_ID, **extra: Any) -> dict[str, Any]:
    return {**device_body(app, "1.1.0"), "old_version_name": "1.0.0", "action": action, **extra}


def events_of(env: CapgoEnv, app: str, action: str) -> float:
    return metric_value(env.gw, "ota_gateway_device_events_total", {"app": app, "action": action})


def test_stats_batch_is_forwarded_and_counted(env: CapgoEnv) -> None:
    batch = [
        event("download_complete", timestamp=1700000000000),
        event("checksum_fail", metadata={"file": "index.js"}),
        event("checksum_fail"),
        event("something_new"),
    ]
    answer = capgo_call(f"{env.gw.base_url}/stats", env.ctx(), batch)
    assert answer.status == 200
    assert answer.json() == {"status": "ok", "results": [{"status": "ok", "index": i} for i in range(4)]}
    path, method, forwarded, agent = env.origin.state.capgo_calls[-1]
    assert (path, method, len(forwarded)) == ("/stats", "POST", 4)
    assert forwarded[1]["metadata"] == {"file": "index.js"} and forwarded[0]["timestamp"] == 1700000000000
    assert agent.startswith("CapacitorUpdater/")
    assert events_of(env, APP_ID, "checksum_fail") == 2
    assert events_of(env, APP_ID, "download_complete") == 1
    assert events_of(env, APP_ID, "other") == 1  # an unknown action never becomes a label
    assert "something_new" not in env.gw.scrape()


def test_single_event_answers_status_ok(env: CapgoEnv) -> None:
    answer = capgo_call(f"{env.gw.base_url}/stats", env.ctx(), event("update_fail"))
    assert (answer.status, answer.json()) == (200, {"status": "ok"})
    assert events_of(env, APP_ID, "update_fail") == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "the batch is empty"),
        ([event("set")] * 201, "a batch holds at most 200 events"),
        ([event("set"), event("set", app="com.example.secure")], "all events of a batch must have the same app_id"),
        (event("set", metadata={f"k{i}": "v" for i in range(31)}), "metadata has more than 30 keys"),
        (event("set", metadata={"k": "v" * 2049}), "metadata values are strings of at most 2048"),
        (event("set", metadata={"k" * 65: "v"}), "metadata keys are at most 64"),
        ([event("set"), {**event("set"), "is_prod": "yes"}], "event 1: is_prod must be a boolean"),
        ({**event("set"), "version_os": None}, "version_os is required"),
    ],
)
def test_malformed_stats_get_capgo_shaped_400s(env: CapgoEnv, body: Any, message: str) -> None:
    answer = capgo_call(f"{env.gw.base_url}/stats", env.ctx(), body)
    assert answer.status == 400
    doc = answer.json()
    assert (doc["error"], doc["kind"]) == ("invalid_request", "failed") and doc["message"].startswith(message)


def test_stats_rate_limit(env: CapgoEnv) -> None:
    url = f"{env.gw.base_url}/stats"
    assert [capgo_call(url, env.ctx(), event("set", app=LIMITED_APP)).status for _ in range(2)] == [200, 200]
    answer = capgo_call(url, env.ctx(), event("set", app=LIMITED_APP))
    assert answer.status == 429 and int(answer.headers["retry-after"]) >= 1
    assert answer.json()["error"] == "rate_limited"


def test_channel_self_set_is_refused_when_the_policy_forbids_it(env: CapgoEnv) -> None:
    calls = len(env.origin.state.capgo_calls)
    answer = capgo_call(f"{env.gw.base_url}/channel_self", env.ctx(), {**device_body(), "channel": "beta"})
    assert answer.status == 400
    assert answer.json()["error"] == "channel_set_from_plugin_not_allowed" and answer.json()["kind"] == "blocked"
    assert len(env.origin.state.capgo_calls) == calls  # never reached the origin
    assert env.gw.metric("ota_gateway_refusals_total", reason="channel_not_allowed") >= 1


def test_channel_self_is_forwarded(env: CapgoEnv) -> None:
    url = f"{env.gw.base_url}/channel_self"
    env.origin.state.channel_answer = {"status": "ok", "allowSet": True}
    answer = capgo_call(url, env.ctx(), {**device_body(LIMITED_APP), "channel": "beta"})
    assert (answer.status, answer.json()) == (200, {"status": "ok", "allowSet": True})
    assert env.origin.state.capgo_calls[-1][:2] == ("/channel_self", "POST")
    assert env.origin.state.capgo_calls[-1][2]["channel"] == "beta"
    nightly = capgo_call(url, env.ctx(), {**device_body(LIMITED_APP), "channel": "nightly"})
    assert nightly.status == 400  # a channel the policy does not allow
    env.origin.state.channel_answer = {"channel": "production", "status": "default"}
    answer = capgo_call(url, env.ctx(), device_body(), method="PUT")
    assert answer.json() == {"channel": "production", "status": "default"}
    env.origin.state.channel_answer = [{"id": 1, "name": "production", "public": True, "allow_self_set": False}]
    query = "&".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in device_body().items())
    listed = https_request(f"{url}?{query}", env.ctx())
    assert listed.json()[0]["name"] == "production"
    path, method, params, _ = env.origin.state.capgo_calls[-1]
    assert (path, method, params["is_prod"], params["app_id"]) == ("/channel_self", "GET", "true", APP_ID)


def test_directory_origin_counts_stats_and_answers_channels_itself(tmp_path: Path, pki: Pki) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    apps = default_apps("local")[:1]
    cfg = write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}}, apps=apps)
    with run_gateway(cfg) as gw:
        ctx = pki.client_context(pki.client)
        answer = capgo_call(f"{gw.base_url}/stats", ctx, [event("download_fail"), event("set")])
        assert answer.json()["results"][1] == {"status": "ok", "index": 1}
        assert metric_value(gw, "ota_gateway_device_events_total", {"app": APP_ID, "action": "download_fail"}) == 1
        current = capgo_call(f"{gw.base_url}/channel_self", ctx, device_body(defaultChannel="beta"), method="PUT")
        assert current.json() == {"channel": "beta", "status": "default", "allowSet": False}
        listed = https_request(
            f"{gw.base_url}/channel_self?" + "&".join(f"{k}={str(v).lower()}" for k, v in device_body().items()),
            ctx,
        )
        assert [c["name"] for c in listed.json()] == ["production", "beta"]
        assert listed.json()[0]["public"] is True
        bad = https_request(f"{gw.base_url}/channel_self?app_id=x", ctx)
        assert bad.status == 400 and json.loads(bad.body)["error"] == "invalid_request"


def test_manifest_size_estimate_is_checked_and_passed_to_the_update_server(env: CapgoEnv) -> None:
    url = f"{env.gw.base_url}/updates/manifest_size"
    manifest = [{"file_name": "index.html", "file_hash": "ab" * 32, "download_url": "https://x/y", "extra": "no"}]
    answer = capgo_call(url, env.ctx(), {**device_body(APP_ID, "1.0.0"), "version": "1.1.0", "manifest": manifest})
    assert answer.status == 200
    assert answer.json() == {"version": "1.1.0", "sizes": {"index.html": 1000}}
    assert answer.headers["cache-control"] == "no-store"
    path, method, forwarded, _ = env.origin.state.capgo_calls[-1]
    assert (path, method, forwarded["version"]) == ("/updates/manifest_size", "POST", "1.1.0")
    assert forwarded["manifest"] == [{k: v for k, v in manifest[0].items() if k != "extra"}]
    calls = len(env.origin.state.capgo_calls)
    bad = capgo_call(url, env.ctx(), {**device_body(APP_ID, "1.0.0"), "version": "1.1.0", "manifest": "all"})
    assert bad.status == 400 and bad.json()["error"] == "invalid_request" and bad.json()["kind"] == "failed"
    assert len(env.origin.state.capgo_calls) == calls  # a malformed request never reaches the update server


def test_an_origin_that_asks_devices_to_wait_is_passed_on_as_429(env: CapgoEnv) -> None:
    env.origin.state.busy_retry_after = "120"
    try:
        for route, body in (("updates", device_body(APP_ID, "1.0.0")), ("stats", event("set"))):
            answer = capgo_call(f"{env.gw.base_url}/{route}", env.ctx(), body)
            assert answer.status == 429, (route, answer.body)
            assert answer.headers["retry-after"] == "120"
            assert answer.json()["error"] == "rate_limited" and answer.json()["kind"] == "failed"
    finally:
        env.origin.state.busy_retry_after = None
    assert capgo_call(f"{env.gw.base_url}/updates", env.ctx(), device_body(APP_ID, "1.0.0")).status == 200
