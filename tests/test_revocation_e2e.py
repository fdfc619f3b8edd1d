"""Revocation end to end through a real `ota-gateway serve`: a client revoked by CRL is refused at the handshake,
then admitted again once the CRL is replaced and reloaded (SIGHUP, file change; PEM and DER); a CRL past its
nextUpdate fails closed or keeps serving as configured."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gateway.publish import add_release
from tests.support import (
    APP_ID,
    Pki,
    edit_config,
    https_request,
    make_crl,
    metric_value,
    refused_request,
    run_gateway,
    wait_until,
    write_config,
    write_crl,
)

BUNDLE = "1.1.0"


def _setup(tmp_path: Path, pki: Pki, capgo_dir: Path, crl_file: Path, **listener: Any) -> Path:
    origin = tmp_path / "origin"
    origin.mkdir()
    add_release(origin, APP_ID, BUNDLE, "production", capgo_dir / "app_1.1.0.zip")
    reload_cfg = listener.pop("reload", {"watch": False})
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"reload": reload_cfg},
    )

    def edit(config: dict[str, Any]) -> None:
        config["listeners"][0]["client_ca"] = [{"file": str(pki.ca_pem), "name": "ca", "crl": [str(crl_file)]}]
        config["listeners"][0].update(listener)

    return edit_config(cfg, edit)


def _url(base: str) -> str:
    return f"{base}/bundles/{APP_ID}/{BUNDLE}.zip"


def _admitted(gw: Any, pki: Pki, who: Any, capgo_dir: Path) -> bool:
    answer = https_request(_url(gw.base_url), pki.client_context(who))
    assert answer.status == 200, answer
    assert answer.body == (capgo_dir / "app_1.1.0.zip").read_bytes()
    return True


def _revoked_count(gw: Any) -> float:
    return gw.metric("ota_gateway_tls_handshake_failures_total", listener="main", cause="revoked")


def _reloads(gw: Any, result: str) -> float:
    return gw.metric("ota_gateway_config_reloads_total", result=result)


def test_revoked_client_refused_then_admitted_after_sighup(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    crl_file = write_crl(tmp_path / "crl.pem", make_crl(pki, [pki.client]))
    cfg = _setup(tmp_path, pki, capgo_dir, crl_file)
    with run_gateway(cfg) as gw:
        refused_request(_url(gw.base_url), pki.client_context(pki.client))
        assert wait_until(lambda: _revoked_count(gw) == 1)
        assert _admitted(gw, pki, pki.client2, capgo_dir)  # same CA, not listed
        # no HTTP answer was given, so there is no audit line for the revoked client
        assert wait_until(lambda: len(gw.audit()) == 1)
        assert gw.audit()[0]["identity_sha256"] == pki.client2.sha256

        # client2 keeps a connection open across the reload that revokes it
        keep = http.client.HTTPSConnection("127.0.0.1", gw.port, context=pki.client_context(pki.client2), timeout=10)
        try:
            keep.request("GET", f"/bundles/{APP_ID}/{BUNDLE}.zip")
            first = keep.getresponse()
            assert first.status == 200 and first.read() == (capgo_dir / "app_1.1.0.zip").read_bytes()

            write_crl(crl_file, make_crl(pki, [pki.client2]))  # a new CRL: client admitted, client2 revoked
            assert _reloads(gw, "success") == 0
            gw.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: _reloads(gw, "success") == 1)
            # the CRL is checked per request too: the open connection gets no more bundles
            keep.request("GET", f"/bundles/{APP_ID}/{BUNDLE}.zip")
            again = keep.getresponse()
            answer = again.read()
            assert again.status == 403 and json.loads(answer)["reason"] == "revoked"
            assert str(crl_file) not in answer.decode() and str(crl_file.parent) not in answer.decode()
        finally:
            keep.close()
        assert _admitted(gw, pki, pki.client, capgo_dir)
        refused_request(_url(gw.base_url), pki.client_context(pki.client2))
        assert wait_until(lambda: _revoked_count(gw) == 2)
        assert gw.metric("ota_gateway_config_last_reload_success") == 1
        assert _reloads(gw, "failure") == 0


def test_der_crl_replaced_and_picked_up_by_file_change(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    crl_file = write_crl(tmp_path / "ca.crl", make_crl(pki, [pki.client]), der=True)
    cfg = _setup(tmp_path, pki, capgo_dir, crl_file, reload={"interval": 0.5})
    with run_gateway(cfg) as gw:
        refused_request(_url(gw.base_url), pki.client_context(pki.client))
        assert wait_until(lambda: _revoked_count(gw) == 1)
        assert _admitted(gw, pki, pki.client2, capgo_dir)

        write_crl(crl_file, make_crl(pki, []), der=True)  # no signal: the watcher sees the new file
        assert wait_until(lambda: _reloads(gw, "success") == 1, timeout=10)
        assert _admitted(gw, pki, pki.client, capgo_dir)
        assert _revoked_count(gw) == 1


def test_crl_from_another_ca_is_a_config_error(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    """A CRL must be signed by the CA it is configured for; a forged one fails the reload and changes nothing."""
    crl_file = write_crl(tmp_path / "crl.pem", make_crl(pki, [pki.client]))
    cfg = _setup(tmp_path, pki, capgo_dir, crl_file)
    with run_gateway(cfg) as gw:
        refused_request(_url(gw.base_url), pki.client_context(pki.client))
        crl_file.write_bytes(b"-----BEGIN X509 CRL-----\nnot a crl\n-----END X509 CRL-----\n")
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _reloads(gw, "failure") == 1)
        assert gw.metric("ota_gateway_config_last_reload_success") == 0
        refused_request(_url(gw.base_url), pki.client_context(pki.client))  # the old CRL is still in force
        assert _admitted(gw, pki, pki.client2, capgo_dir)
        failed = [line for line in gw.stderr_lines if "reload" in line and "failed" in line]
        assert len(failed) == 1 and str(crl_file) in failed[0], failed


@pytest.mark.parametrize("mode", ["fail_closed", "keep_serving"])
def test_expired_crl(tmp_path: Path, pki: Pki, capgo_dir: Path, mode: str) -> None:
    now = dt.datetime.now(dt.UTC)
    next_update = (now - dt.timedelta(hours=1)).replace(microsecond=0)
    crl = make_crl(pki, [pki.client], next_update=next_update, last_update=now - dt.timedelta(days=2))
    crl_file = write_crl(tmp_path / "crl.pem", crl)
    cfg = _setup(tmp_path, pki, capgo_dir, crl_file, crl_expired=mode)
    with run_gateway(cfg) as gw:
        assert wait_until(lambda: metric_value(gw, "ota_gateway_crl_stale", {"name": "ca"}) == 1)
        expiry = metric_value(gw, "ota_gateway_certificate_expiry_timestamp_seconds", {"kind": "crl", "name": "ca"})
        assert expiry == next_update.timestamp()
        refused_request(_url(gw.base_url), pki.client_context(pki.client))  # listed: refused either way
        if mode == "fail_closed":
            refused_request(_url(gw.base_url), pki.client_context(pki.client2))
            assert wait_until(lambda: _revoked_count(gw) == 2)
        else:
            assert _admitted(gw, pki, pki.client2, capgo_dir)
            assert wait_until(lambda: _revoked_count(gw) == 1)
        stale_lines = [line for line in gw.stderr_lines if "past its nextUpdate" in line]
        assert len(stale_lines) == 1 and str(crl_file) in stale_lines[0], gw.stderr_lines
        assert ("refused" if mode == "fail_closed" else "keep_serving") in stale_lines[0]
        ready = urllib.request.Request(f"{gw.admin_url}/readyz")
        try:
            with urllib.request.urlopen(ready, timeout=5) as resp:
                status, body = resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            status, body = exc.code, json.loads(exc.read())
            exc.close()
        if mode == "fail_closed":  # every client of the CA is refused: take this instance out of rotation
            assert status == 503 and any("nextUpdate" in r for r in body["reasons"]), body
        else:
            assert status == 200, body


def _stale(gw: Any) -> float:
    return metric_value(gw, "ota_gateway_crl_stale", {"name": "ca"})


def test_stale_crl_recovers_after_reload(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    """A fresh CRL (or dropping the CRL from the config) ends the stale state at once; the gauge follows."""
    now = dt.datetime.now(dt.UTC)
    crl = make_crl(pki, [], next_update=now - dt.timedelta(hours=1), last_update=now - dt.timedelta(days=2))
    crl_file = write_crl(tmp_path / "crl.pem", crl)
    cfg = _setup(tmp_path, pki, capgo_dir, crl_file, reload={"watch": False, "interval": 0.5})
    with run_gateway(cfg) as gw:
        assert wait_until(lambda: _stale(gw) == 1)
        refused_request(_url(gw.base_url), pki.client_context(pki.client2))

        write_crl(crl_file, make_crl(pki, []))
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _reloads(gw, "success") == 1)
        assert _admitted(gw, pki, pki.client2, capgo_dir)
        assert wait_until(lambda: _stale(gw) == 0)

        # stale again, then the operator removes the CRL from the config altogether
        write_crl(crl_file, crl)
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _reloads(gw, "success") == 2)
        assert wait_until(lambda: _stale(gw) == 1)

        def drop_crl(config: dict[str, Any]) -> None:
            config["listeners"][0]["client_ca"] = [{"file": str(pki.ca_pem), "name": "ca"}]

        edit_config(cfg, drop_crl)
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: _reloads(gw, "success") == 3)
        assert _admitted(gw, pki, pki.client2, capgo_dir)
        assert wait_until(lambda: _stale(gw) == 0), "ota_gateway_crl_stale still reports a CRL that is gone"
