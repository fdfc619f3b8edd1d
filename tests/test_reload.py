"""Reloads end to end through a real `ota-gateway serve`: the server certificate rotated by a symlink swap under
load with zero failed requests; policies reloaded by file change; a broken reload (invalid policy, a key that does
not match its certificate) keeps the last good state, says so in one line and is visible in the metrics; a request
in flight across a SIGHUP reload finishes with the snapshot it began with (ticket keys, public url)."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from gateway.publish import add_release
from tests.capgo_env import default_apps, gateway_config
from tests.origin_server import HttpsOrigin
from tests.support import (
    APP_ID,
    CAPGO_FIXTURES,
    GatewayProcess,
    Pki,
    capgo_call,
    capgo_fixture,
    device_body,
    edit_config,
    https_request,
    make_zip,
    run_gateway,
    wait_until,
    write_config,
)

OTHER_APP = "com.example.second"


def _server_files(pki: Pki, folder: Path) -> str:
    """A fresh server certificate from the test CA in `folder`; returns its SHA-256."""
    folder.mkdir(parents=True)
    leaf = pki.ca.issue_cert("localhost", "127.0.0.1")
    (folder / "server.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(folder / "server.key"))
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _swap_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` in one rename, as Kubernetes and cert-manager update mounted secrets."""
    tmp = link.with_name(f".{link.name}.new")
    tmp.symlink_to(target)
    os.replace(tmp, link)


def _origin(tmp_path: Path, capgo_dir: Path, *apps: str) -> Path:
    origin = tmp_path / "origin"
    origin.mkdir(exist_ok=True)
    for app in apps:
        add_release(origin, app, "1.1.0", "production", capgo_dir / "app_1.1.0.zip")
    return origin


def _reloads(gw: GatewayProcess, result: str) -> float:
    return gw.metric("ota_gateway_config_reloads_total", result=result)


def _policy(app_id: str) -> dict[str, Any]:
    return {"app_id": app_id, "origin": "local", "clients": [{"name": "fleet", "issuer": ["ca"]}]}


# ---- server certificate rotation under load ---------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["file_change", "sighup"])
def test_server_cert_symlink_swap_under_load(tmp_path: Path, pki: Pki, trigger: str) -> None:
    certs = tmp_path / "certs"
    v1, v2 = _server_files(pki, certs / "v1"), _server_files(pki, certs / "v2")
    (certs / "current").symlink_to("v1")
    origin = tmp_path / "origin"
    origin.mkdir()
    bundle = make_zip(tmp_path / "big.zip", 2 * 1024 * 1024)
    add_release(origin, APP_ID, "2.0.0", "production", bundle)
    digest = hashlib.sha256((origin / APP_ID / "2.0.0.zip").read_bytes()).hexdigest()
    reload_cfg = {"interval": 0.5} if trigger == "file_change" else {"watch": False}
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"reload": reload_cfg},
    )

    def edit(config: dict[str, Any]) -> None:
        config["listeners"][0]["cert"] = str(certs / "current" / "server.pem")
        config["listeners"][0]["key"] = str(certs / "current" / "server.key")

    edit_config(cfg, edit)
    url_path = f"/bundles/{APP_ID}/2.0.0.zip"
    with run_gateway(cfg) as gw:
        url = gw.base_url + url_path
        ctx = pki.client_context(pki.client)
        failures: list[str] = []
        seen: list[tuple[float, str]] = []
        lock = threading.Lock()
        stop = threading.Event()

        def worker() -> int:
            done = 0
            while not stop.is_set():
                started = time.monotonic()
                try:
                    answer = https_request(url, ctx, timeout=20)  # a new connection (and handshake) every time
                except Exception as exc:
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    if answer.status != 200 or hashlib.sha256(answer.body).hexdigest() != digest:
                        failures.append(f"HTTP {answer.status}, {len(answer.body)} bytes")
                    seen.append((started, answer.server_sha256))
                done += 1
            return done

        # a keep-alive connection opened before the swap must go on working after it, with the old certificate
        keep = http.client.HTTPSConnection("127.0.0.1", gw.port, context=ctx, timeout=20)
        try:
            keep.request("GET", url_path)
            first = keep.getresponse()
            assert first.status == 200 and hashlib.sha256(first.read()).hexdigest() == digest
            with ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(worker) for _ in range(8)]
                try:
                    began = time.monotonic()
                    time.sleep(1.0)
                    swapped_at = time.monotonic()
                    _swap_symlink(certs / "current", "v2")
                    if trigger == "sighup":
                        gw.proc.send_signal(signal.SIGHUP)
                    reloaded = wait_until(lambda: _reloads(gw, "success") == 1, timeout=5)
                    reloaded_at = time.monotonic()
                    # keep the load on for a while after the reload: about 3 s in all, at least 1 s after it
                    time.sleep(max(1.0, began + 3.0 - reloaded_at))
                finally:
                    stop.set()
                completed = sum(f.result() for f in futures)
            assert reloaded, gw.stderr_lines
            keep.request("GET", url_path)
            again = keep.getresponse()
            assert again.status == 200 and hashlib.sha256(again.read()).hexdigest() == digest
            assert keep.sock is not None
            assert hashlib.sha256(keep.sock.getpeercert(binary_form=True)).hexdigest() == v1
        finally:
            keep.close()
        assert failures == [], failures[:5]
        assert completed >= 16, completed
        assert {fp for t, fp in seen if t < swapped_at} == {v1}
        assert {fp for t, fp in seen if t > reloaded_at} == {v2}
        assert https_request(url, ctx).server_sha256 == v2
        assert _reloads(gw, "failure") == 0


# ---- policies -----------------------------------------------------------------------------------------------------


def test_policy_reload_by_file_change_adds_an_app(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    origin = _origin(tmp_path, capgo_dir, APP_ID, OTHER_APP)
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        apps=[_policy(APP_ID)],
        extra={"reload": {"interval": 0.5}},
    )
    with run_gateway(cfg) as gw:
        ctx = pki.client_context(pki.client)
        answer = https_request(f"{gw.base_url}/bundles/{OTHER_APP}/1.1.0.zip", ctx)
        assert answer.status == 404 and answer.json()["reason"] == "app_unknown"
        # a second file, written next to the first
        (cfg.parent / "policies" / "second.yaml").write_text(yaml.safe_dump({"apps": [_policy(OTHER_APP)]}))
        assert wait_until(lambda: _reloads(gw, "success") == 1, timeout=10), gw.stderr_lines
        answer = https_request(f"{gw.base_url}/bundles/{OTHER_APP}/1.1.0.zip", ctx)
        assert answer.status == 200 and answer.body == (capgo_dir / "app_1.1.0.zip").read_bytes()
        assert https_request(f"{gw.base_url}/bundles/{APP_ID}/1.1.0.zip", ctx).status == 200
        assert any("reloaded (file change)" in line for line in gw.stderr_lines)


def test_sighup_with_broken_policy_keeps_the_old_policies(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    origin = _origin(tmp_path, capgo_dir, APP_ID, OTHER_APP)
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        apps=[_policy(APP_ID)],
        extra={"reload": {"watch": False}},
    )
    policy = cfg.parent / "policies" / "apps.yaml"
    with run_gateway(cfg) as gw:
        ctx = pki.client_context(pki.client)
        assert gw.metric("ota_gateway_config_last_reload_success") == 1
        # the new file adds an app, but one key is misspelt: nothing of it may take effect
        broken = {"apps": [_policy(APP_ID), {**_policy(OTHER_APP), "chanels": {"default": "production"}}]}
        policy.write_text(yaml.safe_dump(broken, sort_keys=False))
        bad_line = next(i for i, line in enumerate(policy.read_text().splitlines(), 1) if "chanels" in line)
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _reloads(gw, "failure") == 1), gw.stderr_lines
        assert gw.metric("ota_gateway_config_last_reload_success") == 0
        assert _reloads(gw, "success") == 0

        answer = https_request(f"{gw.base_url}/bundles/{APP_ID}/1.1.0.zip", ctx)
        assert answer.status == 200 and answer.body == (capgo_dir / "app_1.1.0.zip").read_bytes()
        answer = https_request(f"{gw.base_url}/bundles/{OTHER_APP}/1.1.0.zip", ctx)
        assert answer.status == 404 and answer.json()["reason"] == "app_unknown"

        failed = [line for line in gw.stderr_lines if "reload" in line]
        assert len(failed) == 1, gw.stderr_lines
        assert f"{policy}:{bad_line}:" in failed[0] and "chanels" in failed[0], failed[0]
        assert "keeping the last good state" in failed[0]

        # fixing the file and signalling again recovers
        policy.write_text(yaml.safe_dump({"apps": [_policy(APP_ID), _policy(OTHER_APP)]}))
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _reloads(gw, "success") == 1)
        assert gw.metric("ota_gateway_config_last_reload_success") == 1
        assert https_request(f"{gw.base_url}/bundles/{OTHER_APP}/1.1.0.zip", ctx).status == 200


def test_sighup_with_key_not_matching_certificate_keeps_the_old_certificate(tmp_path: Path, pki: Pki) -> None:
    tls = tmp_path / "tls"
    old = _server_files(pki, tls)
    origin = tmp_path / "origin"
    origin.mkdir()
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"reload": {"watch": False}},
    )

    def edit(config: dict[str, Any]) -> None:
        config["listeners"][0]["cert"] = str(tls / "server.pem")
        config["listeners"][0]["key"] = str(tls / "server.key")

    edit_config(cfg, edit)
    with run_gateway(cfg) as gw:
        ctx = pki.client_context(pki.client)
        url = f"{gw.base_url}/bundles/{APP_ID}/9.9.9.zip"
        assert https_request(url, ctx).server_sha256 == old
        # a new certificate arrives, but with the key of another one
        new_cert = trustme.CA().issue_cert("localhost", "127.0.0.1")
        (tls / "server.pem").write_bytes(new_cert.cert_chain_pems[0].bytes())
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _reloads(gw, "failure") == 1), gw.stderr_lines
        assert gw.metric("ota_gateway_config_last_reload_success") == 0
        answer = https_request(url, ctx)
        assert answer.server_sha256 == old
        assert answer.status == 404 and "strict-transport-security" in answer.headers
        failed = [line for line in gw.stderr_lines if "reload" in line]
        assert len(failed) == 1, gw.stderr_lines
        assert str(tls / "server.key") in failed[0] and "does not match" in failed[0], failed[0]
        key_line = next(i for i, line in enumerate(cfg.read_text().splitlines(), 1) if line.strip().startswith("key:"))
        assert f"{cfg}:{key_line}: listeners[0].key: " in failed[0], failed[0]


# ---- requests in flight keep their snapshot ---------------------------------------------------------------------


def test_an_update_check_in_flight_across_a_sighup_finishes_under_its_snapshot(tmp_path: Path, pki: Pki) -> None:
    """The origin holds an update check open while a SIGHUP reload moves the signing ticket key (k1 -> k2) and the
    public url: the held check is answered with a k1 ticket at the old address (the snapshot it began with), a check
    after the reload with a k2 ticket at the new one (the twin)."""
    tmp_path.mkdir(exist_ok=True)
    k1, k2 = tmp_path / "k1.secret", tmp_path / "k2.secret"
    k1.write_text("a" * 64)
    k2.write_text("b" * 64)
    with HttpsOrigin(tmp_path) as origin:
        cfg = gateway_config(tmp_path / "gw", pki, origin, default_apps(), k1)
        edit_config(cfg, lambda c: c.update(reload={"watch": False}))
        fx = capgo_fixture("1.1.0")
        url = f"{origin.url}{APP_ID}/{fx['zip']}"
        origin.state.files[f"{APP_ID}/{fx['zip']}"] = (CAPGO_FIXTURES / fx["zip"]).read_bytes()
        origin.state.update_answers[APP_ID] = {"version": "1.1.0", "url": url, "checksum": fx["checksum"]}
        with run_gateway(cfg) as gw:
            ctx = pki.client_context(pki.client)
            origin.state.updates_gate = threading.Event()
            with ThreadPoolExecutor(1) as pool:
                held = pool.submit(capgo_call, f"{gw.base_url}/updates", ctx, device_body(APP_ID, "1.0.0"))
                try:
                    assert wait_until(lambda: len(origin.state.capgo_calls) == 1, timeout=10)

                    def move(config: dict[str, Any]) -> None:
                        keys = [{"id": "k2", "secret_file": str(k2)}, {"id": "k1", "secret_file": str(k1)}]
                        config["tickets"] = {"keys": keys, "public_url": "https://updates.example:8443"}

                    edit_config(cfg, move)
                    gw.proc.send_signal(signal.SIGHUP)
                    assert wait_until(lambda: _reloads(gw, "success") == 1, timeout=10), gw.stderr_lines
                finally:
                    origin.state.updates_gate.set()
                answer = held.result(timeout=20)
            assert answer.status == 200, answer.body
            old_url = answer.json()["url"]
            assert old_url.startswith(f"{gw.base_url}/bundles/t/v1.k1."), old_url
            fresh = capgo_call(f"{gw.base_url}/updates", ctx, device_body(APP_ID, "1.0.0"))
            assert fresh.json()["url"].startswith("https://updates.example:8443/bundles/t/v1.k2."), fresh.body
            # the ticket handed out in flight still opens: k1 verifies in the new snapshot
            download = https_request(old_url, ctx)
            assert download.status == 200 and download.body == (CAPGO_FIXTURES / fx["zip"]).read_bytes()


# ---- an HTTPS origin's CA file --------------------------------------------------------------------------------


def test_an_origin_ca_file_changed_in_place_is_reloaded_in_both_directions(
    tmp_path: Path, pki: Pki, https_origin: HttpsOrigin
) -> None:
    """The origin's config names the same `ca` path before and after, but the file's content changed: trust
    removed (a CA that signs nothing of the origin's) must stop the next download, and trust restored must bring
    it back, by the file watcher and by SIGHUP alike. An origin kept because its config compares equal would go on
    trusting what the file no longer says."""
    data = make_zip(tmp_path / "b.zip", 20_000).read_bytes()
    https_origin.publish(APP_ID, "1.1.0", data)
    trusted = tmp_path / "trusted-origin-ca.pem"
    trusted.write_bytes(https_origin.ca_pem.read_bytes())
    other = trustme.CA()
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"cdn": {**https_origin.origin_config(), "ca": str(trusted), "index_ttl": 0}},
        extra={"reload": {"interval": 0.5}},
    )
    url = f"{{}}/bundles/{APP_ID}/1.1.0.zip"
    with run_gateway(cfg) as gw:
        ctx = pki.client_context(pki.client)
        assert https_request(url.format(gw.base_url), ctx).body == data

        other.cert_pem.write_to_path(str(trusted))  # the watcher sees it
        assert wait_until(lambda: _reloads(gw, "success") == 1, timeout=10), gw.stderr_lines
        answer = https_request(url.format(gw.base_url), ctx)
        assert answer.status == 502 and answer.json()["reason"] == "origin_error", answer.body
        assert "certificate" in answer.json()["detail"].lower()

        trusted.write_bytes(https_origin.ca_pem.read_bytes())
        gw.proc.send_signal(signal.SIGHUP)  # at once, before the watcher's next look
        assert wait_until(lambda: _reloads(gw, "success") >= 2, timeout=10), gw.stderr_lines
        answer = https_request(url.format(gw.base_url), ctx)
        assert answer.status == 200 and answer.body == data


def test_a_worker_other_than_slot_0_logs_reload_failures_as_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """While the worker in slot 0 is dead or restarting (a broken config on disk), the others must not log a failed
    reload at debug only: warnings are logged by every worker, a success by slot 0 alone."""
    from gateway import workers
    from gateway.reload import _alike

    monkeypatch.setenv(workers.WORKER_ENV, "1")
    monkeypatch.setenv(workers.SLOT_ENV, "1")
    assert _alike(logging.WARNING) == logging.WARNING
    assert _alike(logging.INFO) == logging.DEBUG
    monkeypatch.setenv(workers.SLOT_ENV, "0")
    assert (_alike(logging.WARNING), _alike(logging.INFO)) == (logging.WARNING, logging.INFO)


def test_a_change_that_lands_while_a_reload_reads_is_reloaded_next(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editor's second write (truncate, then write; or two saves) can land while a reload is reading the files:
    the reload then swaps in what it read, and the watcher must still see the later write as a change. It took the
    files' stamps again after the load, so that write counted as seen and the half-written policy stayed in force
    until the next edit. The twin: the write before the load is in force after that reload."""
    import asyncio

    from gateway import reload as reload_mod
    from gateway.runner import build_runtime

    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(tmp_path)}},
        extra={"reload": {"watch": True, "interval": 0.2}},
    )
    policy = cfg.parent / "policies" / "apps.yaml"
    first = yaml.safe_load(policy.read_text())["apps"][0]
    apps = [first, {**first, "app_id": "com.example.second"}, {**first, "app_id": "com.example.third"}]
    rt = build_runtime(reload_mod.load_all(cfg))
    real_load = reload_mod._load_for_reload
    writes = iter([apps[2:], None])

    def load_then_edit(path: Path) -> Any:
        loaded = real_load(path)
        later = next(writes)
        if later is not None:  # the editor's next write, after the reload read the files
            policy.write_text(yaml.safe_dump({"apps": [first, *later]}))
        return loaded

    monkeypatch.setattr(reload_mod, "_load_for_reload", load_then_edit)

    async def main() -> set[str]:
        reloader = reload_mod.Reloader(cfg, rt)
        watcher = asyncio.get_running_loop().create_task(reloader.watch())
        try:
            policy.write_text(yaml.safe_dump({"apps": apps[:2]}))
            for _ in range(50):
                await asyncio.sleep(0.1)
                if "com.example.third" in rt.snapshot.policies.apps:
                    break
            return set(rt.snapshot.policies.apps)
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await reloader.close()

    try:
        in_force = asyncio.run(main())
    finally:
        rt.audit.close()
    assert in_force == {first["app_id"], "com.example.third"}, in_force
