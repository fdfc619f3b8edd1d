"""The gateway as a TLS client of its HTTPS origins: which suites it offers, in which order, and what it refuses.

The gateway decrypts every bundle byte from the origin and encrypts it again to the device, so it offers
AES-128-GCM first (cheaper per byte than AES-256-GCM) in TLS 1.3 and TLS 1.2; an origin that follows the client's
order (OpenSSL's and nginx's default) picks it. The suites read here are the ones the origin's end of a real
handshake reports. Each preference has its twin: an origin that offers only AES-256-GCM still works, and the same
origin picks AES-256-GCM for Python's default client, so the preference is the gateway's doing. The set of suites is
Python's default set (nothing weaker), and certificate checks stay: an origin with a weaker suite only, or with a
certificate of another CA, is refused.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from gateway.config import HttpsOriginConfig
from gateway.tls import ORIGIN_TLS13_SUITES, libssl, upstream_context
from tests.origin_server import HttpsOrigin
from tests.support import APP_ID, Pki, https_request, run_gateway, tls_server, write_config

AES128_TLS12 = re.compile(r"ECDHE-(ECDSA|RSA)-AES128-GCM-SHA256")


@pytest.fixture(scope="module")
def origin_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("origin-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


def origin_context(
    ca: trustme.CA, *, tls13: str | None = None, tls12: str | None = None, max_tls: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """An origin's server context where the client's order decides (OpenSSL's and nginx's default; Python's server
    contexts prefer their own order), narrowed on request."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    if tls13 is not None:
        libssl().set_ciphersuites(ctx, tls13)
    if tls12 is not None:
        ctx.set_ciphers(f"{tls12}:@SECLEVEL=0")  # so that only the gateway can be the one refusing
    if max_tls is not None:
        ctx.maximum_version = max_tls
    return ctx


def negotiated(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[str, str]:
    """(suite, version) as the origin's end of one handshake reports them; raises if the handshake fails."""
    seen: list[tuple[str, str]] = []

    def answer(tls: ssl.SSLSocket) -> None:
        cipher, version = tls.cipher(), tls.version()
        assert cipher is not None and version is not None
        seen.append((cipher[0], version))
        tls.sendall(b"k")  # after the append: the client reads this byte, then `seen` holds the suite

    with (
        tls_server(server, answer) as port,
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        client.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.recv(1) == b"k"
    return seen[0]


@pytest.fixture(scope="module")
def gateway_side(origin_ca: tuple[trustme.CA, Path]) -> ssl.SSLContext:
    return upstream_context(HttpsOriginConfig(type="https", url="https://127.0.0.1/", ca=origin_ca[1]))


def test_the_origin_context_offers_pythons_default_suites_with_aes128_gcm_first(gateway_side: ssl.SSLContext) -> None:
    ours = [c["name"] for c in gateway_side.get_ciphers()]
    default = [c["name"] for c in ssl.create_default_context().get_ciphers()]
    assert sorted(ours) == sorted(default)  # the same set: no suite added, none dropped
    assert ours[:3] == ORIGIN_TLS13_SUITES.split(":") == ["TLS_AES_128_GCM_SHA256", *ours[1:3]]
    assert all(AES128_TLS12.fullmatch(name) for name in ours[3:5])
    assert gateway_side.verify_mode == ssl.CERT_REQUIRED and gateway_side.check_hostname
    assert gateway_side.minimum_version == ssl.TLSVersion.TLSv1_2


def test_tls13_origin_picks_aes128_gcm_for_the_gateway_and_aes256_for_pythons_default(
    origin_ca: tuple[trustme.CA, Path], gateway_side: ssl.SSLContext
) -> None:
    ca, ca_pem = origin_ca
    server = origin_context(ca)
    assert negotiated(server, gateway_side) == ("TLS_AES_128_GCM_SHA256", "TLSv1.3")
    assert negotiated(server, ssl.create_default_context(cafile=str(ca_pem))) == ("TLS_AES_256_GCM_SHA384", "TLSv1.3")


@pytest.mark.parametrize("suite", ["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"])
def test_tls13_origin_without_aes128_still_gets_its_suite(
    origin_ca: tuple[trustme.CA, Path], gateway_side: ssl.SSLContext, suite: str
) -> None:
    assert negotiated(origin_context(origin_ca[0], tls13=suite), gateway_side) == (suite, "TLSv1.3")


def test_tls12_origin_picks_ecdhe_aes128_gcm(origin_ca: tuple[trustme.CA, Path], gateway_side: ssl.SSLContext) -> None:
    ca, ca_pem = origin_ca
    server = origin_context(ca, max_tls=ssl.TLSVersion.TLSv1_2)
    suite, version = negotiated(server, gateway_side)
    assert AES128_TLS12.fullmatch(suite) and version == "TLSv1.2"
    suite, _ = negotiated(server, ssl.create_default_context(cafile=str(ca_pem)))
    assert "AES256-GCM" in suite  # the twin: Python's default order


def test_tls12_origin_with_aes256_gcm_only_still_works(
    origin_ca: tuple[trustme.CA, Path], gateway_side: ssl.SSLContext
) -> None:
    server = origin_context(
        origin_ca[0], tls12="ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384", max_tls=ssl.TLSVersion.TLSv1_2
    )
    suite, version = negotiated(server, gateway_side)
    assert suite.endswith("-AES256-GCM-SHA384") and version == "TLSv1.2"


@pytest.mark.parametrize("weak", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-CCM"])
def test_origin_with_only_a_weaker_tls12_suite_is_refused(
    origin_ca: tuple[trustme.CA, Path], gateway_side: ssl.SSLContext, weak: str
) -> None:
    """SHA-1 CBC and CCM suites were never offered (Python's default excludes them); preferring AES-128 added none.
    The twin: a client that offers the suite gets it from the same origin."""
    ca, ca_pem = origin_ca
    server = origin_context(ca, tls12=weak, max_tls=ssl.TLSVersion.TLSv1_2)
    with pytest.raises((ssl.SSLError, OSError)):
        negotiated(server, gateway_side)
    lax = ssl.create_default_context(cafile=str(ca_pem))
    lax.set_ciphers(f"{weak}:@SECLEVEL=0")
    assert negotiated(server, lax) == (weak, "TLSv1.2")


def test_origin_with_a_certificate_of_another_ca_is_refused(gateway_side: ssl.SSLContext) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        negotiated(origin_context(trustme.CA()), gateway_side)


# -- end to end: a bundle through `ota-gateway serve` ------------------------------------------------------------


@pytest.fixture
def two_origins(tmp_path: Path) -> Iterator[tuple[HttpsOrigin, HttpsOrigin]]:
    with (
        HttpsOrigin(_mkdir(tmp_path / "default")) as default,
        HttpsOrigin(_mkdir(tmp_path / "aes256"), tls13_suites="TLS_AES_256_GCM_SHA384") as aes256,
    ):
        yield default, aes256


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_bundles_come_over_aes128_gcm_and_from_an_aes256_only_origin_too(
    tmp_path: Path, pki: Pki, two_origins: tuple[HttpsOrigin, HttpsOrigin]
) -> None:
    default, aes256 = two_origins
    data = os.urandom(300 * 1024)
    apps = []
    for app, origin in ((APP_ID, default), ("com.example.aes256", aes256)):
        origin.publish(app, "1.0.0", data)
        apps.append(
            {
                "app_id": app,
                "origin": "cdn" if origin is default else "strict",
                "channels": {"default": "production", "allowed": ["production"]},
                "clients": [{"name": "fleet", "issuer": ["ca"]}],
            }
        )
    origins = {"cdn": default.origin_config(), "strict": aes256.origin_config()}
    with run_gateway(write_config(tmp_path / "gw", pki, origins=origins, apps=apps)) as gw:
        for app in (APP_ID, "com.example.aes256"):
            answer = https_request(f"{gw.base_url}/bundles/{app}/1.0.0.zip", pki.client_context(pki.client))
            assert (answer.status, answer.body == data) == (200, True)
    assert default.state.ciphers and set(default.state.ciphers) == {("TLS_AES_128_GCM_SHA256", "TLSv1.3")}
    assert aes256.state.ciphers and set(aes256.state.ciphers) == {("TLS_AES_256_GCM_SHA384", "TLSv1.3")}
