"""`ota-gateway device`, the device simulator, run as a subprocess against a real gateway: what a user runs as a
smoke test against a deployment. Exit 0 for an installed update or up-to-date, 1 for a refusal or failure."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.device import key_id
from tests.capgo_env import SECURE_APP, CapgoEnv, capgo_env
from tests.support import APP_ID, CAPGO_FIXTURES, Pki, capgo_fixture


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[CapgoEnv]:
    with capgo_env(tmp_path_factory.mktemp("capgo-device"), pki) as env:
        yield env


def device(env: CapgoEnv, app: str, version: str, *extra: str) -> subprocess.CompletedProcess[str]:
    pki = env.pki
    args = ["--gateway", env.gw.base_url, "--ca", str(pki.ca_pem), "--cert", str(pki.client.cert)]
    args += ["--key", str(pki.client.key), "--app", app, "--version", version, *extra]
    return subprocess.run(
        [sys.executable, "-m", "gateway", "device", *args], capture_output=True, text=True, timeout=60, check=False
    )


def stats_actions(env: CapgoEnv) -> list[str]:
    return [e["action"] for path, _, body, _ in env.origin.state.capgo_calls if path == "/stats" for e in body]


def test_encrypted_update_end_to_end(env: CapgoEnv, tmp_path: Path) -> None:
    env.offer(SECURE_APP, "1.1.0", encrypted=True)
    out = tmp_path / "bundle.zip"
    run = device(env, SECURE_APP, "1.0.0", "--public-key", str(CAPGO_FIXTURES / "key.pub"), "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "updated 1.0.0 -> 1.1.0" in run.stdout
    assert hashlib.sha256(out.read_bytes()).hexdigest() == capgo_fixture("1.1.0")["checksum"]
    _, _, sent, agent = next(c for c in env.origin.state.capgo_calls if c[0] == "/updates")
    assert sent["key_id"] == key_id((CAPGO_FIXTURES / "key.pub").read_bytes()) and len(sent["key_id"]) == 20
    assert agent == f"CapacitorUpdater/8.51.14 ({SECURE_APP}) android/14"
    assert stats_actions(env)[-2:] == ["download_complete", "set"]


def test_plain_update_and_up_to_date(env: CapgoEnv) -> None:
    env.offer(APP_ID, "1.1.0")
    run = device(env, APP_ID, "1.0.0")
    assert run.returncode == 0 and "updated 1.0.0 -> 1.1.0" in run.stdout
    run = device(env, APP_ID, "2.0.0")
    assert run.returncode == 0 and "up_to_date: no_new_version_available" in run.stdout


def test_tampered_bundle_fails_and_reports(env: CapgoEnv) -> None:
    env.offer(SECURE_APP, "1.1.0", encrypted=True, name="device-tampered.enc.zip")
    env.origin.state.modes[f"{SECURE_APP}/device-tampered.enc.zip"] = "flip:40000"
    run = device(env, SECURE_APP, "1.0.0", "--public-key", str(CAPGO_FIXTURES / "key.pub"))
    assert run.returncode == 1
    assert "failed: download_fail" in run.stdout
    assert stats_actions(env)[-1] == "download_fail"


def test_refusal_exits_non_zero(env: CapgoEnv) -> None:
    env.offer(SECURE_APP, "1.1.0")  # unsigned: refused at the update check
    run = device(env, SECURE_APP, "1.0.0", "--public-key", str(CAPGO_FIXTURES / "key.pub"))
    assert run.returncode == 1 and "failed: signature_invalid" in run.stdout


def test_fail_with_reports_that_failure_after_a_good_download(env: CapgoEnv) -> None:
    env.offer(APP_ID, "1.1.0")
    run = device(env, APP_ID, "1.0.0", "--fail-with", "update_fail")
    assert run.returncode == 1 and "failed: update_fail: simulated on 1.1.0" in run.stdout, run.stdout
    assert stats_actions(env)[-1] == "update_fail"
    run = device(env, APP_ID, "1.0.0", "--fail-with", "app_moved_to_foreground")  # not a failure action
    assert run.returncode == 2 and "--fail-with" in run.stderr
