"""The mTLS listener through a real `ota-gateway serve`: who gets in, who does not, and how each refusal is counted.

Every positive case has its negative twin. Clients are real: Python's ssl module, curl and `openssl s_client`.
After each case the admin /metrics is scraped and the exact change of `ota_gateway_tls_handshakes_total` and of
`ota_gateway_tls_handshake_failures_total{cause=...}` is asserted (every other cause must stay unchanged).
The gateway runs once per module and event loop (uvloop, the default, and the stdlib loop with --no-uvloop).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import shutil
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.core.handshake import CAUSES
from gateway.publish import add_release
from tests.support import APP_ID, CAPGO_FIXTURES, CertFiles, GatewayProcess, Pki, run_gateway, wait_until, write_config

BUNDLE = CAPGO_FIXTURES / "app_1.1.0.zip"
PATH = f"/bundles/{APP_ID}/1.1.0.zip"
HANDSHAKE_TIMEOUT = 1.0
IO_TIMEOUT = 5.0
OK = "handshakes"  # key of the successful-handshake counter in `_counts`

pytestmark = pytest.mark.skipif(not (shutil.which("curl") and shutil.which("openssl")), reason="needs curl, openssl")


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def gw(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[GatewayProcess]:
    with _gateway(request.param, tmp_path_factory, pki, HANDSHAKE_TIMEOUT) as proc:
        yield proc


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def slow_gw(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[GatewayProcess]:
    """The same gateway with a handshake timeout no loaded machine reaches: for tests that tell an alert from the
    end of stream a timed-out handshake gets."""
    with _gateway(request.param, tmp_path_factory, pki, 10.0) as proc:
        yield proc


@contextlib.contextmanager
def _gateway(
    loop: str, tmp_path_factory: pytest.TempPathFactory, pki: Pki, handshake_timeout: float
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp(f"tls-{loop}")
    origin = base / "origin"
    origin.mkdir()
    add_release(origin, APP_ID, "1.1.0", "production", BUNDLE)
    cfg = write_config(base / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})
    doc = yaml.safe_load(cfg.read_text())
    doc["listeners"][0]["handshake_timeout"] = handshake_timeout
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    args = () if loop == "uvloop" else ("--no-uvloop",)
    with run_gateway(cfg, *args) as proc:
        yield proc


# -- metrics ----------------------------------------------------------------------------------------------------------


def _counts(gw: GatewayProcess) -> dict[str, float]:
    """Successful handshakes (key `OK`) and failures by cause on the main listener, from one scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {OK: 0.0, **dict.fromkeys(CAUSES, 0.0)}
    for family in text_string_to_metric_families(gw.scrape()):
        for sample in family.samples:
            if sample.labels.get("listener") != "main":
                continue
            if sample.name == "ota_gateway_tls_handshakes_total":
                counts[OK] = sample.value
            elif sample.name == "ota_gateway_tls_handshake_failures_total":
                counts[sample.labels["cause"]] = sample.value
    return counts


def _assert_delta(gw: GatewayProcess, before: dict[str, float], **expected: int) -> None:
    """The counters moved by exactly `expected` (cause=n, handshakes=n) and nothing else moved."""
    want = {key: float(expected.get(key, 0)) for key in before}
    unknown = set(expected) - set(before)
    assert not unknown, f"unknown counter keys {unknown}"

    def delta() -> dict[str, float]:
        after = _counts(gw)
        return {key: after[key] - before[key] for key in before}

    wait_until(lambda: delta() == want, timeout=3)
    got = delta()
    assert got == want, {k: v for k, v in got.items() if v or want[k]}


# -- clients ----------------------------------------------------------------------------------------------------------


def _request(*, close: bool = True) -> bytes:
    conn = "close" if close else "keep-alive"
    return f"GET {PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: {conn}\r\n\r\n".encode()


def _read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    return bytes(data)


def _split_responses(data: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each HTTP/1.1 response in `data` (Content-Length framed)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        out.append((status, rest[:length]))
        data = rest[length:]
    return out


def _https_get(gw: GatewayProcess, ctx: ssl.SSLContext) -> tuple[bytes, bytes]:
    """One request over a fresh connection: (server certificate DER, raw response up to EOF)."""
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=IO_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(_request())
        return der, _read_all(tls)


def _refused(gw: GatewayProcess, ctx: ssl.SSLContext) -> str:
    """Try one request that must never be answered; return the stage that failed ("handshake" or "exchange")."""
    stage = "handshake"
    received = b""
    try:
        with (
            socket.create_connection(("127.0.0.1", gw.port), timeout=IO_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            stage = "exchange"
            tls.sendall(_request())
            received = _read_all(tls)
    except TimeoutError:
        raise AssertionError(f"the gateway neither answered nor closed the connection ({stage})") from None
    except (ssl.SSLError, ConnectionError):
        pass
    assert b"HTTP/" not in received, received[:200]
    return stage


def _run(cmd: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=15, check=False)


def _s_client(gw: GatewayProcess, pki: Pki, who: CertFiles | None, *opts: str) -> subprocess.CompletedProcess[bytes]:
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{gw.port}", "-servername", "localhost"]
    cmd += ["-CAfile", str(pki.ca_pem), "-verify_return_error", "-ign_eof", *opts]
    if who is not None:
        cmd += ["-cert", str(who.cert), "-key", str(who.key)]
    return _run(cmd, _request())


def _curl(gw: GatewayProcess, pki: Pki, who: CertFiles | None, out: Path) -> subprocess.CompletedProcess[bytes]:
    cmd = ["curl", "-sS", "--max-time", "10", "--cacert", str(pki.ca_pem), "-o", str(out), "-w", "%{http_code}"]
    if who is not None:
        cmd += ["--cert", str(who.cert), "--key", str(who.key)]
    return _run([*cmd, f"{gw.base_url}{PATH}"])


# -- allowed client ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls_max", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_allowed_client_gets_exact_bytes(gw: GatewayProcess, pki: Pki, tls_max: ssl.TLSVersion) -> None:
    before = _counts(gw)
    _, raw = _https_get(gw, pki.client_context(pki.client, max_tls=tls_max))
    [(status, body)] = _split_responses(raw)
    assert status == 200
    assert body == BUNDLE.read_bytes()
    _assert_delta(gw, before, handshakes=1)


def test_server_presents_configured_certificate(gw: GatewayProcess, pki: Pki) -> None:
    der, _ = _https_get(gw, pki.client_context(pki.client))
    assert hashlib.sha256(der).hexdigest() == pki.server.sha256
    # twin: a client that trusts only another CA refuses this server before sending anything
    ctx = ssl.create_default_context(cafile=str(pki.rogue_ca_pem))
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    with pytest.raises(ssl.SSLCertVerificationError):
        _https_get(gw, ctx)


def test_curl_allowed_client(gw: GatewayProcess, pki: Pki, tmp_path: Path) -> None:
    before = _counts(gw)
    out = tmp_path / "bundle.zip"
    result = _curl(gw, pki, pki.client, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"200"
    assert out.read_bytes() == BUNDLE.read_bytes()
    _assert_delta(gw, before, handshakes=1)


def test_curl_without_client_cert_gets_no_response(gw: GatewayProcess, pki: Pki, tmp_path: Path) -> None:
    before = _counts(gw)
    out = tmp_path / "bundle.zip"
    result = _curl(gw, pki, None, out)
    assert result.returncode != 0
    assert result.stdout == b"000"  # no HTTP status ever arrived
    assert not out.exists() or out.read_bytes() == b""
    _assert_delta(gw, before, no_cert=1)


# -- refused clients, TLS 1.2 and TLS 1.3 -----------------------------------------------------------------------------

REFUSED = [
    ("none", "no_cert", True),
    ("rogue_client", "untrusted", True),
    ("expired_client", "expired", True),
    ("server_only_eku_client", "purpose", True),
    # OpenSSL accepts a certificate without EKU; the gateway checks clientAuth after the handshake
    ("no_eku_client", "purpose", False),
]


@pytest.mark.parametrize("tls_max", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize(("who", "cause", "openssl_refuses"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_client_gets_no_response(
    gw: GatewayProcess, pki: Pki, who: str, cause: str, openssl_refuses: bool, tls_max: ssl.TLSVersion
) -> None:
    before = _counts(gw)
    cert = None if who == "none" else getattr(pki, who)
    stage = _refused(gw, pki.client_context(cert, max_tls=tls_max))
    if tls_max == ssl.TLSVersion.TLSv1_2 and openssl_refuses:
        assert stage == "handshake"  # TLS 1.2: the server's verdict comes before the client's handshake ends
    _assert_delta(gw, before, **{cause: 1})


ALERTS = {  # the alert the client reads, by who it is and the TLS version (None: the gateway's own check, no alert)
    ("none", "tls1.2"): "SSLV3_ALERT_HANDSHAKE_FAILURE",
    ("none", "tls1.3"): "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    ("rogue_client", "tls1.2"): "TLSV1_ALERT_UNKNOWN_CA",
    ("rogue_client", "tls1.3"): "TLSV1_ALERT_UNKNOWN_CA",
    ("expired_client", "tls1.2"): "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    ("expired_client", "tls1.3"): "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    ("server_only_eku_client", "tls1.2"): "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    ("server_only_eku_client", "tls1.3"): "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    ("client", "tls1.2"): None,  # the twin: admitted, no alert
    ("client", "tls1.3"): None,
}


def _alert(gw: GatewayProcess, ctx: ssl.SSLContext) -> str | None:
    """The reason of the TLS alert the client reads (in the handshake, or on its first read), or None: answered."""
    try:
        with (
            socket.create_connection(("127.0.0.1", gw.port), timeout=IO_TIMEOUT) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(_request())
            received = _read_all(tls)
    except ssl.SSLError as exc:
        return str(exc.reason)
    assert received.startswith(b"HTTP/1.1 200"), received[:100]
    return None


@pytest.mark.parametrize(("who", "version"), sorted(ALERTS))
def test_a_refused_handshake_sends_the_client_its_alert(
    slow_gw: GatewayProcess, pki: Pki, who: str, version: str
) -> None:
    """OpenSSL's verdict on the client certificate reaches the client as the TLS alert that names it (certificate
    required, unknown CA, expired, unsupported certificate), on both event loops, instead of a bare end of stream
    (asyncio and uvloop drop a failed handshake's alert unless the gateway sends it first)."""
    cert = None if who == "none" else getattr(pki, who)
    tls_max = ssl.TLSVersion.TLSv1_2 if version == "tls1.2" else ssl.TLSVersion.TLSv1_3
    assert _alert(slow_gw, pki.client_context(cert, max_tls=tls_max)) == ALERTS[(who, version)]


def test_an_old_protocol_is_closed_without_an_alert(slow_gw: GatewayProcess, pki: Pki) -> None:
    """Protocol failures stay a bare close, as TLS scanners expect (core/handshake.alert_tells_client)."""
    ctx = pki.client_context(pki.client)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    assert _alert(slow_gw, ctx) == "UNEXPECTED_EOF_WHILE_READING"


# -- protocol versions and ciphers ------------------------------------------------------------------------------------


def test_python_tls11_client_is_refused(gw: GatewayProcess, pki: Pki) -> None:
    ctx = pki.client_context(pki.client)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is deprecated, that is the point
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that only the server can be the one refusing
    before = _counts(gw)
    assert _refused(gw, ctx) == "handshake"
    _assert_delta(gw, before, protocol=1)


@pytest.mark.parametrize(
    ("opts", "protocol", "cipher"),
    [
        (["-tls1_3"], "TLSv1.3", None),
        (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"], "TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"),
        (["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"], "TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305"),
    ],
    ids=["tls1.3", "tls1.2-aes-gcm", "tls1.2-chacha20"],
)
def test_openssl_modern_client_succeeds(
    gw: GatewayProcess, pki: Pki, opts: list[str], protocol: str, cipher: str | None
) -> None:
    before = _counts(gw)
    result = _s_client(gw, pki, pki.client, *opts)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert f"New, {protocol}, Cipher is {cipher or ''}".encode() in result.stdout
    assert b"HTTP/1.1 200 OK" in result.stdout
    _assert_delta(gw, before, handshakes=1)


@pytest.mark.parametrize(
    "opts",
    [
        ["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
        ["-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"],
        # ECDSA-compatible TLS 1.2 suites outside Mozilla "intermediate" (CBC, SHA-1/SHA-2 MAC, no AEAD)
        ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0"],
        ["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA384:@SECLEVEL=0"],
        # no forward secrecy (and RSA key exchange, which an ECDSA server cannot do anyway)
        ["-tls1_2", "-cipher", "AES128-SHA:@SECLEVEL=0"],
    ],
    ids=["tls1.1", "tls1.0", "ecdhe-aes128-sha", "ecdhe-aes256-sha384", "aes128-sha"],
)
def test_openssl_old_protocol_or_weak_cipher_is_refused(gw: GatewayProcess, pki: Pki, opts: list[str]) -> None:
    before = _counts(gw)
    result = _s_client(gw, pki, pki.client, *opts)
    assert result.returncode != 0
    assert b"HTTP/1.1" not in result.stdout
    # the server saw the ClientHello and refused it (a client-side refusal would never reach it)
    _assert_delta(gw, before, protocol=1)


def test_plain_http_to_tls_port_gets_no_http_answer(gw: GatewayProcess) -> None:
    before = _counts(gw)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=IO_TIMEOUT) as raw:
        raw.sendall(_request())
        try:
            received = _read_all(raw)
        except ConnectionResetError:
            received = b""
    assert not received.startswith(b"HTTP/")
    _assert_delta(gw, before, protocol=1)


# -- handshake timeout ------------------------------------------------------------------------------------------------


def test_silent_client_is_disconnected_after_handshake_timeout(gw: GatewayProcess) -> None:
    before = _counts(gw)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=IO_TIMEOUT + HANDSHAKE_TIMEOUT) as raw:
        started = time.monotonic()
        try:
            received = raw.recv(1024)
        except ConnectionResetError:
            received = b""
        elapsed = time.monotonic() - started
    assert received == b""
    assert HANDSHAKE_TIMEOUT * 0.8 <= elapsed < HANDSHAKE_TIMEOUT + 2, elapsed
    _assert_delta(gw, before, timeout=1)


def test_client_that_handshakes_promptly_is_not_timed_out(gw: GatewayProcess, pki: Pki) -> None:
    """Twin of the timeout case: a connection held open after a prompt handshake is served past the timeout."""
    before = _counts(gw)
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=IO_TIMEOUT) as raw,
        pki.client_context(pki.client).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        time.sleep(HANDSHAKE_TIMEOUT + 0.5)
        tls.sendall(_request())
        [(status, body)] = _split_responses(_read_all(tls))
    assert status == 200
    assert body == BUNDLE.read_bytes()
    _assert_delta(gw, before, handshakes=1)


# -- bytes that arrive with the end of the handshake ------------------------------------------------------------------


def _pipelined(gw: GatewayProcess, ctx: ssl.SSLContext, payload: bytes) -> bytes:
    """Handshake through memory BIOs so that the client's last handshake flight and `payload` go in one send."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    received = bytearray()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=IO_TIMEOUT) as raw:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    raw.sendall(outgoing.read())
                data = raw.recv(65536)
                assert data, "connection closed during the handshake"
                incoming.write(data)
        tls.write(payload)
        raw.sendall(outgoing.read())  # TLS 1.3: client Certificate..Finished and the requests in one write
        while True:
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                data = raw.recv(65536)
                if not data:
                    break
                incoming.write(data)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


@pytest.mark.parametrize("tls_max", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_requests_sent_with_the_handshake_are_all_answered(
    gw: GatewayProcess, pki: Pki, tls_max: ssl.TLSVersion
) -> None:
    before = _counts(gw)
    payload = _request(close=False) + _request(close=False) + _request(close=True)
    try:
        received = _pipelined(gw, pki.client_context(pki.client, max_tls=tls_max), payload)
    except TimeoutError:
        raise AssertionError("requests sent right after the handshake were lost") from None
    responses = _split_responses(received)
    assert [status for status, _ in responses] == [200, 200, 200]
    assert all(body == BUNDLE.read_bytes() for _, body in responses)
    _assert_delta(gw, before, handshakes=1)


def test_pipelined_requests_from_a_refused_client_are_not_answered(gw: GatewayProcess, pki: Pki) -> None:
    """Twin: a client without clientAuth EKU that sends requests with its Finished gets none of them answered."""
    before = _counts(gw)
    payload = _request(close=False) + _request(close=True)
    try:
        received = _pipelined(gw, pki.client_context(pki.no_eku_client), payload)
    except (ssl.SSLError, ConnectionError):
        received = b""
    except TimeoutError:
        raise AssertionError("the gateway neither answered nor closed the connection") from None
    assert b"HTTP/" not in received
    _assert_delta(gw, before, purpose=1)


def test_a_min_tls_1_3_listener_refuses_a_tls_1_2_client_and_serves_tls_1_3(tmp_path: Path, pki: Pki) -> None:
    """`listeners[].min_tls: "1.3"` as a client sees it: a TLS 1.2 handshake is refused (counted as `protocol`),
    the same client over TLS 1.3 is served."""
    origin = tmp_path / "origin"
    origin.mkdir()
    add_release(origin, APP_ID, "1.1.0", "production", BUNDLE)
    cfg = write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})
    doc = yaml.safe_load(cfg.read_text())
    doc["listeners"][0]["min_tls"] = "1.3"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    with run_gateway(cfg) as gw13:
        before = _counts(gw13)
        old = _s_client(gw13, pki, pki.client, "-tls1_2")
        assert b"HTTP/1.1" not in old.stdout and old.returncode != 0
        _assert_delta(gw13, before, protocol=1)
        before = _counts(gw13)
        new = _s_client(gw13, pki, pki.client, "-tls1_3")
        assert b"New, TLSv1.3, Cipher is" in new.stdout and b"HTTP/1.1 200 OK" in new.stdout
        _assert_delta(gw13, before, handshakes=1)


# -- client certificates that OpenSSL accepts and Python cannot read --------------------------------------------------


def _odd_client(
    pki: Pki,
    directory: Path,
    name: str,
    subject: x509.Name,
    *,
    sans: list[x509.GeneralName] | None = None,
    patch: tuple[bytes, bytes] | None = None,
) -> ssl.SSLContext:
    """A client certificate signed by the test CA (clientAuth, as `certs.make_leaf` makes them) with `subject` and
    `sans`; `patch` replaces bytes of the signed part by others of the same length before it is signed, for names no
    certificate builder writes (a DNS name that is not text)."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    der = cert.public_bytes(serialization.Encoding.DER)
    if patch is not None:
        old, new = patch
        assert len(old) == len(new) and cert.tbs_certificate_bytes.count(old) == 1
        tbs = cert.tbs_certificate_bytes.replace(old, new)
        signature = ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        ecdsa_sha256 = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))
        der = _der(0x30, tbs + ecdsa_sha256 + _der(0x03, b"\x00" + signature))
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_text(ssl.DER_cert_to_PEM_cert(der))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pki.client_context(CertFiles(cert_path, key_path))


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    length = bytes([size]) if size < 0x80 else bytes([0x80 | 2]) + size.to_bytes(2, "big")
    return bytes([tag]) + length + body


def _cn(value: str, kind: _ASN1Type) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value, kind)])


def test_a_certificate_the_gateway_cannot_parse_is_refused_not_held_open(
    gw: GatewayProcess, pki: Pki, tmp_path: Path
) -> None:
    """A CN written as a PrintableString with '_' (outside that type's alphabet, yet issued by real CAs) passes
    OpenSSL's checks, but the gateway cannot read the certificate (cryptography refuses it). The connection is
    closed at once and counted (cause `other`); it was kept open, uncounted and without a deadline, buffering all the
    client sent (1.2 GB in 8 s). The twin: the same name as a UTF8String is served."""
    before = _counts(gw)
    name = _cn("device-1", _ASN1Type.PrintableString)  # the builder refuses '_' there: written in afterwards
    _refused(gw, _odd_client(pki, tmp_path, "printable", name, patch=(b"device-1", b"device_1")))
    _assert_delta(gw, before, other=1)
    before = _counts(gw)
    _, answer = _https_get(gw, _odd_client(pki, tmp_path, "utf8", _cn("device_1", _ASN1Type.UTF8String)))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    _assert_delta(gw, before, handshakes=1)


def test_a_certificate_name_the_event_loop_cannot_decode_is_refused_quietly(
    gw: GatewayProcess, pki: Pki, tmp_path: Path
) -> None:
    """A DNS name that is not UTF-8 in a CA-signed certificate: the event loop's getpeercert() fails at the end of the
    handshake. The handshake is counted (cause `other`), and nothing is logged above debug (it was an unretrieved
    task exception and the loop's own report, each with a traceback, and no count). The twin: a text name is served."""
    before, lines = _counts(gw), len(gw.stderr_lines)
    san = [x509.DNSName("xxxx.example.app")]
    _refused(
        gw,
        _odd_client(
            pki, tmp_path, "bytes", _cn("d", _ASN1Type.UTF8String), sans=san, patch=(b"xxxx", b"\xff\xfe\x00\n")
        ),
    )
    _assert_delta(gw, before, other=1)
    assert gw.stderr_lines[lines:] == []
    before = _counts(gw)
    _, answer = _https_get(gw, _odd_client(pki, tmp_path, "text", _cn("d", _ASN1Type.UTF8String), sans=san))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
    _assert_delta(gw, before, handshakes=1)
