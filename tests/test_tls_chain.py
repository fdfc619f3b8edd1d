"""The server certificate chain on the wire is the listener's `cert` file, as it is (gateway/tls.py).

OpenSSL, left to itself, builds a server chain from the verify store when the certificate file holds only the
leaf: with a server certificate issued by a client CA (the dev PKI, many private PKIs) every handshake verified the
server's own certificate and sent that CA along. Read with `openssl s_client -showcerts`: the gateway sends the
leaf alone from a leaf-only file, and leaf plus intermediate from a file that holds both (the chain of the file is
still sent, and clients that trust only the root still verify it). Twin: a TLS server with Python's defaults and the
same leaf-only file sends two certificates, so the count below would see the CA if the gateway sent it.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.publish import add_release
from tests.support import (
    APP_ID,
    CAPGO_FIXTURES,
    GatewayProcess,
    Pki,
    edit_config,
    run_gateway,
    tls_server,
    write_config,
)

PATH = f"/bundles/{APP_ID}/1.1.0.zip"

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")


def _sent_chain(port: int, pki: Pki) -> tuple[list[str], str]:
    """Subjects of the certificates the server sent (leaf first), and s_client's output; one GET, the client trusts
    only the root CA."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-showcerts"]
    cmd += ["-CAfile", str(pki.ca_pem), "-cert", str(pki.client.cert), "-key", str(pki.client.key), "-ign_eof"]
    request = f"GET {PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    out = subprocess.run(cmd, input=request, capture_output=True, timeout=15, check=False).stdout.decode("latin-1")
    return re.findall(r"^\s*\d+ s:(.*)$", out, flags=re.M), out


def _unit(pem: Path) -> str:
    """The organizational unit of a certificate's subject: trustme makes it unique per certificate."""
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value)


@pytest.fixture(scope="module")
def chained_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A server certificate from an intermediate CA under the test root: its file holds leaf and intermediate."""
    directory = tmp_path_factory.mktemp("chained")
    leaf = pki.ca.create_child_ca().issue_cert("localhost", "127.0.0.1")
    cert, key = directory / "server-chain.pem", directory / "server-chain.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    assert len(leaf.cert_chain_pems) == 2
    return cert, key


def _gateway(base: Path, pki: Pki, cert: Path | None = None, key: Path | None = None) -> Iterator[GatewayProcess]:
    origin = base / "origin"
    origin.mkdir()
    add_release(origin, APP_ID, "1.1.0", "production", CAPGO_FIXTURES / "app_1.1.0.zip")
    cfg = write_config(base / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})
    if cert is not None:

        def use(config: dict[str, Any]) -> None:
            config["listeners"][0].update(cert=str(cert), key=str(key))

        edit_config(cfg, use)
    with run_gateway(cfg) as proc:
        yield proc


def test_gateway_sends_the_leaf_alone_from_a_leaf_only_file(pki: Pki, tmp_path: Path) -> None:
    # the server certificate is issued by the client CA the listener trusts: OpenSSL could build [leaf, CA] from it
    for gw in _gateway(tmp_path, pki):
        subjects, out = _sent_chain(gw.port, pki)
        assert "HTTP/1.1 200" in out, out[-2000:]
        assert len(subjects) == 1 and _unit(pki.ca_pem) not in subjects[0], out[-3000:]


def test_server_with_python_defaults_sends_the_ca_along(pki: Pki) -> None:
    """Twin: the same files in a context with OpenSSL's default chain building send two certificates."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server.cert, pki.server.key)
    ctx.load_verify_locations(cafile=str(pki.ca_pem))
    ctx.verify_mode = ssl.CERT_REQUIRED

    def answer(tls: ssl.SSLSocket) -> None:
        request = b""
        while b"\r\n\r\n" not in request and (chunk := tls.recv(4096)):
            request += chunk
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    with tls_server(ctx, answer) as port:
        subjects, out = _sent_chain(port, pki)
    assert "HTTP/1.1 200" in out, out[-2000:]
    assert len(subjects) == 2, out[-3000:]


def test_gateway_sends_the_intermediate_of_its_file(
    pki: Pki, chained_server: tuple[Path, Path], tmp_path: Path
) -> None:
    for gw in _gateway(tmp_path, pki, *chained_server):
        subjects, out = _sent_chain(gw.port, pki)
        assert "Verify return code: 0 (ok)" in out and "HTTP/1.1 200" in out, out[-2000:]
        # leaf and intermediate; the root is the client's to have
        assert len(subjects) == 2 and not any(_unit(pki.ca_pem) in s for s in subjects), out[-3000:]


def test_admin_context_sends_its_chain_as_it_is(pki: Pki) -> None:
    """The admin listener's mTLS context (served by asyncio's own TLS) has the same setting; twin: Python's default
    server context builds chains."""
    from gateway.config import AdminTls
    from gateway.tls import _LibSsl, admin_context, libssl

    ctx = admin_context(AdminTls(cert=pki.server.cert, key=pki.server.key, client_ca=[pki.ca_pem]))
    assert libssl().mode(ctx) & _LibSsl.MODE_NO_AUTO_CHAIN
    assert not libssl().mode(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)) & _LibSsl.MODE_NO_AUTO_CHAIN
