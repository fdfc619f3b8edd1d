"""Front-proxy mode end to end: a pinned front proxy may speak for a device in an RFC 9440 Client-Cert or an Envoy
x-forwarded-client-cert header; from anyone else those headers are ignored and counted; what the origin learns
about the client is set by the gateway alone."""

from __future__ import annotations

import http.client
import json
import signal
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.core.forwarded import client_cert_value, xfcc_value
from gateway.core.identity import identity_from_der
from tests.origin_server import HttpsOrigin
from tests.support import (
    APP_ID,
    CertFiles,
    GatewayProcess,
    Pki,
    edit_config,
    https_request,
    leaf_certificate,
    run_gateway,
    wait_until,
    write_config,
)

URL_PATH = f"/bundles/{APP_ID}/1.1.0.zip"


def _der(files: CertFiles) -> bytes:
    return leaf_certificate(files).public_bytes(serialization.Encoding.DER)


def _pem_param(files: CertFiles) -> str:
    return urllib.parse.quote(leaf_certificate(files).public_bytes(serialization.Encoding.PEM).decode(), safe="")


def _start(tmp_path: Path, pki: Pki, origin: HttpsOrigin, header: str, forward: str) -> Path:
    return write_config(
        tmp_path / "gw",
        pki,
        origins={"cdn": origin.origin_config(forward_identity=forward)},
        extra={"front_proxies": [{"name": "edge", "cert_sha256": [pki.client2.sha256], "header": header}]},
    )


def _audit_after(gw: GatewayProcess, count: int) -> dict[str, Any]:
    assert wait_until(lambda: len(gw.audit()) >= count), gw.audit()
    return gw.audit()[count - 1]


def _origin_bundle_headers(origin: HttpsOrigin) -> list[list[tuple[str, str]]]:
    return [headers for path, headers in origin.state.headers if path.endswith(".zip")]


def _values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


def _spoofed(gw: GatewayProcess) -> float:
    return gw.metric("ota_gateway_spoofed_identity_headers_total")


@pytest.fixture
def published(https_origin: HttpsOrigin, capgo_dir: Path) -> bytes:
    data = (capgo_dir / "app_1.1.0.zip").read_bytes()
    https_origin.publish(APP_ID, "1.1.0", data)
    return data


def test_client_cert_header(tmp_path: Path, pki: Pki, https_origin: HttpsOrigin, published: bytes) -> None:
    cfg = _start(tmp_path, pki, https_origin, "client-cert", "client-cert")
    device_value = client_cert_value(_der(pki.client))
    spoof_value = client_cert_value(_der(pki.client2))
    with run_gateway(cfg) as gw:
        url = gw.base_url + URL_PATH
        proxy = pki.client_context(pki.client2)

        # the proxy speaks for the device
        answer = https_request(url, proxy, headers={"Client-Cert": device_value})
        assert answer.status == 200 and answer.body == published
        record = _audit_after(gw, 1)
        assert record["identity_sha256"] == pki.client.sha256 and record["via_proxy"] == "edge"
        sent = _origin_bundle_headers(https_origin)
        assert len(sent) == 1 and _values(sent[0], "Client-Cert") == [device_value]

        # a device that is not a proxy claims another identity: ignored, counted, never forwarded
        assert _spoofed(gw) == 0
        answer = https_request(
            url,
            pki.client_context(pki.client),
            headers={"Client-Cert": spoof_value, "X-Forwarded-Client-Cert": 'Hash=00;Subject="CN=admin"'},
        )
        assert answer.status == 200 and answer.body == published
        record = _audit_after(gw, 2)
        assert record["identity_sha256"] == pki.client.sha256 and "via_proxy" not in record
        assert _spoofed(gw) == 1
        sent = _origin_bundle_headers(https_origin)
        assert len(sent) == 2
        assert _values(sent[1], "Client-Cert") == [device_value]  # the TLS identity, set by the gateway
        assert _values(sent[1], "X-Forwarded-Client-Cert") == []
        assert _values(sent[1], "Client-Cert-Chain") == []

        # what the proxy forwards must be a device certificate of a configured CA, valid now
        for who, reason in ((pki.rogue_client, "untrusted_cert"), (pki.expired_client, "untrusted_cert")):
            answer = https_request(url, proxy, headers={"Client-Cert": client_cert_value(_der(who))})
            assert answer.status == 403 and answer.json()["reason"] == reason, answer
            assert answer.headers["content-type"] == "application/problem+json"
        answer = https_request(url, proxy, headers={"Client-Cert": "not-a-byte-sequence"})
        assert answer.status == 400 and answer.json()["reason"] == "bad_request"
        answer = https_request(url, proxy)
        assert answer.status == 401 and answer.json()["reason"] == "no_client_cert"
        # an XFCC header is not what this proxy is configured to send
        xfcc = f'Cert="{_pem_param(pki.client)}"'
        answer = https_request(url, proxy, headers={"X-Forwarded-Client-Cert": xfcc})
        assert answer.status == 401 and answer.json()["reason"] == "no_client_cert"
        assert gw.metric("ota_gateway_refusals_total", reason="untrusted_cert") == 2

        # the origin never saw a value the clients sent, nor the proxy's own identity
        every = [v for headers in _origin_bundle_headers(https_origin) for v in _values(headers, "Client-Cert")]
        assert len(_origin_bundle_headers(https_origin)) == 2
        assert spoof_value not in every and every == [device_value, device_value]


def test_xfcc_header(tmp_path: Path, pki: Pki, https_origin: HttpsOrigin, published: bytes) -> None:
    cfg = _start(tmp_path, pki, https_origin, "xfcc", "xfcc")
    device = identity_from_der(_der(pki.client))
    with run_gateway(cfg) as gw:
        url = gw.base_url + URL_PATH
        proxy = pki.client_context(pki.client2)
        incoming = (
            f'By=spiffe://cdn/edge-1;Hash=ff;Subject="CN=someone, else";Cert="{_pem_param(pki.client2)}",'
            f'By=spiffe://cdn/edge-2;Hash={device.sha256};Subject="{device.subject}";Cert="{_pem_param(pki.client)}"'
        )
        answer = https_request(url, proxy, headers={"X-Forwarded-Client-Cert": incoming})
        assert answer.status == 200 and answer.body == published
        record = _audit_after(gw, 1)
        assert record["identity_sha256"] == pki.client.sha256 and record["via_proxy"] == "edge"
        sent = _origin_bundle_headers(https_origin)
        assert _values(sent[0], "X-Forwarded-Client-Cert") == [xfcc_value(device)]
        assert _values(sent[0], "X-Forwarded-Client-Cert")[0].startswith(f'Hash={device.sha256};Subject="')
        assert _values(sent[0], "Client-Cert") == []

        # a forwarded certificate from a CA the gateway does not trust
        rogue = f'Hash=00;Cert="{_pem_param(pki.rogue_client)}"'
        answer = https_request(url, proxy, headers={"X-Forwarded-Client-Cert": rogue})
        assert answer.status == 403 and answer.json()["reason"] == "untrusted_cert"
        answer = https_request(url, proxy, headers={"X-Forwarded-Client-Cert": 'Hash=00;Subject="CN=x'})
        assert answer.status == 400 and answer.json()["reason"] == "bad_request"

        # from a non-proxy the header is ignored: the TLS identity counts, and is what the origin learns
        leaf = pki.ca.issue_cert("device-3.example.app")
        third = CertFiles(tmp_path / "device-3.pem", tmp_path / "device-3.key")
        leaf.cert_chain_pems[0].write_to_path(str(third.cert))
        leaf.private_key_pem.write_to_path(str(third.key))
        third_identity = identity_from_der(_der(third))
        answer = https_request(url, pki.client_context(third), headers={"X-Forwarded-Client-Cert": incoming})
        assert answer.status == 200 and answer.body == published
        record = _audit_after(gw, 4)
        assert record["identity_sha256"] == third_identity.sha256 and "via_proxy" not in record
        assert _spoofed(gw) == 1
        sent = _origin_bundle_headers(https_origin)
        assert len(sent) == 2
        assert _values(sent[1], "X-Forwarded-Client-Cert") == [xfcc_value(third_identity)]
        assert all(incoming not in v for headers in sent for _, v in headers)


def test_a_reload_that_makes_a_connected_client_a_front_proxy_applies_to_its_open_connection(
    tmp_path: Path, pki: Pki, https_origin: HttpsOrigin, published: bytes
) -> None:
    """A connection's verdict (direct client or front proxy) is kept between its requests only while the snapshot
    it came from is current: after a reload pins this client as a front proxy, the next request on the same
    connection must forward a device identity (401 without one); before the reload the same request was served."""
    cfg = _start(tmp_path, pki, https_origin, "client-cert", "client-cert")
    with run_gateway(cfg) as gw:
        keep = http.client.HTTPSConnection("127.0.0.1", gw.port, context=pki.client_context(pki.client), timeout=10)
        try:
            keep.request("GET", URL_PATH)
            first = keep.getresponse()
            assert first.status == 200 and first.read() == published

            def pin_moves(config: dict[str, Any]) -> None:
                config["front_proxies"][0]["cert_sha256"] = [pki.client.sha256]

            edit_config(cfg, pin_moves)
            gw.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: gw.metric("ota_gateway_config_reloads_total", result="success") == 1)
            keep.request("GET", URL_PATH)
            again = keep.getresponse()
            assert again.status == 401 and json.loads(again.read())["reason"] == "no_client_cert"
        finally:
            keep.close()
