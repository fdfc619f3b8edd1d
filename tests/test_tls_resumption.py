"""TLS session resumption is off on the wire, in both versions, as gateway/tls.py and the README say; and the key
exchange groups are Mozilla "intermediate"'s, X25519 first (no HelloRetryRequest for a default client).

Each case offers the session of a first connection on a second one, with Python's ssl module and with
`openssl s_client -sess_out/-sess_in`, and asserts a full handshake ("New"). The negative twin runs the same client
code against a plain TLS server that does resume (Python's defaults: a session cache, TLS 1.3 tickets), so a client
that could not resume at all would fail the twin. The gateway runs once per event loop (uvloop and asyncio).
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.publish import add_release
from gateway.tls import libssl
from tests.support import APP_ID, CAPGO_FIXTURES, GatewayProcess, Pki, run_gateway, tls_server, write_config

PATH = f"/bundles/{APP_ID}/1.1.0.zip"
IO_TIMEOUT = 5.0
VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
VERSION_IDS = ["tls1.2", "tls1.3"]

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp(f"resume-{request.param}")
    origin = base / "origin"
    origin.mkdir()
    add_release(origin, APP_ID, "1.1.0", "production", CAPGO_FIXTURES / "app_1.1.0.zip")
    cfg = write_config(base / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})
    args = () if request.param == "uvloop" else ("--no-uvloop",)
    with run_gateway(cfg, *args) as proc:
        yield proc


@pytest.fixture(scope="module")
def resuming_server(pki: Pki) -> Iterator[int]:
    """A TLS server that resumes sessions (Python's server defaults: session cache on, two TLS 1.3 tickets) and
    requires the same client certificates: what the client code below must see resuming."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server.cert, pki.server.key)
    ctx.load_verify_locations(cafile=str(pki.ca_pem))
    ctx.verify_mode = ssl.CERT_REQUIRED
    assert libssl().session_cache_mode(ctx) != 0 and ctx.num_tickets > 0

    def answer(tls: ssl.SSLSocket) -> None:
        request = b""
        while b"\r\n\r\n" not in request and (chunk := tls.recv(4096)):
            request += chunk
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    with tls_server(ctx, answer, IO_TIMEOUT) as port:
        yield port


def _get(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession | None]:
    """One GET with Connection: close, offering `session`: (was it resumed, the session to offer next)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(f"GET {PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        return tls.session_reused, tls.session  # TLS 1.3: a ticket, if any, came with the answer


def _second_connection_resumed(port: int, ctx: ssl.SSLContext) -> bool:
    resumed, session = _get(port, ctx, None)
    assert not resumed
    assert session is not None
    return _get(port, ctx, session)[0]


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_python_client_never_resumes_on_the_gateway(gw: GatewayProcess, pki: Pki, version: ssl.TLSVersion) -> None:
    ctx = pki.client_context(pki.client, max_tls=version)
    ctx.minimum_version = version
    assert _second_connection_resumed(gw.port, ctx) is False
    assert _second_connection_resumed(gw.port, ctx) is False  # nor on a third try


@pytest.mark.parametrize("version", VERSIONS, ids=VERSION_IDS)
def test_same_python_client_resumes_on_a_resuming_server(
    resuming_server: int, pki: Pki, version: ssl.TLSVersion
) -> None:
    """Twin: the client code above does resume where the server allows it."""
    ctx = pki.client_context(pki.client, max_tls=version)
    ctx.minimum_version = version
    assert _second_connection_resumed(resuming_server, ctx) is True


def _s_client(port: int, pki: Pki, version: str, *opts: str) -> str:
    """`openssl s_client` with the allowed client's certificate, one GET with Connection: close; its stdout."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", version]
    cmd += ["-CAfile", str(pki.ca_pem), "-cert", str(pki.client.cert), "-key", str(pki.client.key)]
    request = f"GET {PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    out = subprocess.run([*cmd, "-ign_eof", *opts], input=request, capture_output=True, timeout=15, check=False)
    return out.stdout.decode(errors="replace")


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_gets_nothing_to_resume_from_the_gateway(
    gw: GatewayProcess, pki: Pki, version: str, tmp_path: Path
) -> None:
    sess = tmp_path / "sess.pem"
    first = _s_client(gw.port, pki, version, "-sess_out", str(sess))
    assert "HTTP/1.1 200" in first and "\nNew, TLSv1." in first, first[-2000:]
    # s_client saves a session only if it can be resumed: TLS 1.2 with a session ID, TLS 1.3 with a ticket
    assert not sess.exists()
    if version == "-tls1_2":
        assert "    Session-ID: \n" in first, first[-2000:]  # the ServerHello carried no session ID


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_resumes_on_a_resuming_server(resuming_server: int, pki: Pki, version: str, tmp_path: Path) -> None:
    """Twin: the same openssl commands save a session and report "Reused" where the server resumes."""
    sess = tmp_path / "sess.pem"
    first = _s_client(resuming_server, pki, version, "-sess_out", str(sess))
    assert "HTTP/1.1 200" in first and "\nNew, TLSv1." in first, first[-2000:]
    assert sess.exists() and sess.stat().st_size > 0
    second = _s_client(resuming_server, pki, version, "-sess_in", str(sess))
    assert "HTTP/1.1 200" in second and "\nReused, TLSv1." in second, second[-2000:]


# -- key exchange groups ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("group", "temp_key"), [("X25519", "X25519"), ("P-256", "prime256v1"), ("P-384", "secp384r1")])
def test_mozilla_intermediate_groups_are_accepted(gw: GatewayProcess, pki: Pki, group: str, temp_key: str) -> None:
    for version in ("-tls1_2", "-tls1_3"):
        # TLS 1.2 clients name in the same list the curves they verify ECDSA with: the server's key is on P-256
        groups = f"{group}:P-256" if version == "-tls1_2" and group != "P-256" else group
        out = _s_client(gw.port, pki, version, "-groups", groups)
        assert "HTTP/1.1 200" in out, out[-2000:]
        if version == "-tls1_3":  # TLS 1.2: the server's order picks the curve among the client's
            assert f"Server Temp Key: {temp_key}" in out or f"Server Temp Key: ECDH, {temp_key}" in out, out[-2000:]


@pytest.mark.parametrize("group", ["X448", "P-521", "ffdhe2048"])
def test_groups_outside_the_profile_are_refused(gw: GatewayProcess, pki: Pki, group: str) -> None:
    out = _s_client(gw.port, pki, "-tls1_3", "-groups", group)
    assert "HTTP/1.1" not in out


def _server_hellos(port: int, pki: Pki, groups: str) -> int:
    out = _s_client(port, pki, "-tls1_3", "-groups", groups, "-msg")
    assert "HTTP/1.1 200" in out, out[-2000:]
    return out.count(", ServerHello")  # a HelloRetryRequest is a second ServerHello message


def test_default_client_gets_no_hello_retry_request(gw: GatewayProcess, pki: Pki) -> None:
    # OpenSSL's own default list (X25519 first, one key share), as curl, Python and most clients send it
    assert _server_hellos(gw.port, pki, "X25519:P-256:X448:P-521:P-384") == 1


def test_key_share_for_an_unsupported_group_gets_a_hello_retry_request(gw: GatewayProcess, pki: Pki) -> None:
    """Twin: a first key share the gateway does not take costs a HelloRetryRequest, and the count above shows it."""
    assert _server_hellos(gw.port, pki, "X448:X25519") == 2


# -- the contexts themselves ------------------------------------------------------------------------------------------


def test_admin_context_has_the_same_settings(pki: Pki) -> None:
    """The admin listener's mTLS context (served by asyncio's own TLS) resumes nothing either."""
    from gateway.config import AdminTls
    from gateway.tls import admin_context

    ctx = admin_context(AdminTls(cert=pki.server.cert, key=pki.server.key, client_ca=[pki.ca_pem]))
    assert libssl().session_cache_mode(ctx) == 0
    assert ctx.num_tickets == 0 and ctx.options & ssl.OP_NO_TICKET
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    # twin: a server context with Python's defaults has its session cache on and sends tickets
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert libssl().session_cache_mode(plain) != 0 and plain.num_tickets > 0
