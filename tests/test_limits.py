"""Listener limits against a real `serve` subprocess and misbehaving peers: header, body and keep-alive timeouts on
every listener, answers to malformed HTTP, and connection caps (listener.py, core/connguard.py).

Every limit has its twin: a peer just inside it is served normally. The gateway runs with short limits (1 s header,
1.5 s body and idle); assertions leave 3x headroom.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.publish import add_release
from tests.origin_server import HttpsOrigin
from tests.support import (
    APP_ID,
    GatewayProcess,
    Pki,
    capgo_origin,
    device_body,
    free_port,
    https_request,
    make_zip,
    run_gateway,
    wait_until,
    write_config,
)

HEADER, BODY, IDLE = 1.0, 1.5, 1.5
LIMITS = {"header_timeout": HEADER, "body_timeout": BODY, "keepalive_timeout": IDLE, "shutdown_grace": 2}


def mtls(gw: GatewayProcess, pki: Pki) -> ssl.SSLSocket:
    """A new mTLS connection to the gateway's main listener, as the test PKI's client."""
    raw = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    return pki.client_context(pki.client).wrap_socket(raw, server_hostname="localhost")


def get_once(gw: GatewayProcess, pki: Pki, path: str) -> tuple[int, dict[str, str], bytes]:
    """One GET of `path` on a new mTLS connection, which is closed after the answer."""
    sock = mtls(gw, pki)
    try:
        sock.sendall(request("GET", path))
        return one_response(sock)
    finally:
        sock.close()


@dataclass
class Env:
    gw: GatewayProcess
    pki: Pki
    plain_port: int

    def tls(self) -> ssl.SSLSocket:
        return mtls(self.gw, self.pki)

    def plain(self, port: int) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        return self.gw.metric(name, **labels)


def publish(tmp_path: Path, capgo_dir: Path) -> Path:
    return capgo_origin(tmp_path / "origin", capgo_dir, ("1.1.0",))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, pki: Pki, capgo_dir: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("limits")
    origin = publish(tmp, capgo_dir)
    plain_port = free_port()
    cfg = write_config(
        tmp / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"limits": LIMITS, "plain_http": {"enabled": True, "port": plain_port}},
    )
    with run_gateway(cfg) as gw:
        yield Env(gw, pki, plain_port)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (or `timeout`); and the seconds that took."""
    started = time.monotonic()
    data = b""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError, ssl.SSLError):
        pass
    return data, time.monotonic() - started


def trickle(sock: socket.socket, data: bytes, interval: float) -> None:
    """Send `data` one byte every `interval` seconds; stop as soon as the server sends something or closes."""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return
        if select.select([sock], [], [], interval)[0]:
            return


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: localhost",
        *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items()),
    ]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def updates_request(body: bytes, length: int | None = None) -> bytes:
    head = (
        "POST /updates HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


def one_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response with a Content-Length body from a keep-alive connection."""
    data = b""
    sock.settimeout(10)
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    status, headers, body = parse(data)
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return status, headers, body


# --- header timeout --------------------------------------------------------------------------------------------


def _oldest_closed_others_held(socks: list[socket.socket]) -> None:
    """The first (oldest) of `socks` was closed by the gateway, the others are still open; then all are closed."""
    socks[0].settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert socks[0].recv(1) == b""
    for sock in socks[1:]:
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)
    for sock in socks:
        sock.close()


def test_slowloris_headers_on_the_tls_listener_get_408_and_are_counted(env: Env) -> None:
    before = env.metric("ota_gateway_timeouts_total", listener="main", cause="header")
    audit_before = len(env.gw.audit())
    sock = env.tls()
    sock.sendall(b"GET /updates HTTP/1.1\r\nHost: localhost\r\n")
    started = time.monotonic()
    trickle(sock, b"X" * 40, 0.1)  # one header byte every 0.1 s, until the gateway answers
    raw, _ = read_until_closed(sock, 5)
    elapsed = time.monotonic() - started
    sock.close()
    status, headers, body = parse(raw)
    assert status == 408
    assert headers["content-type"] == "application/problem+json"
    assert headers["server"] == "ota-gateway"
    assert headers["strict-transport-security"].startswith("max-age=")
    assert json.loads(body)["reason"] == "request_timeout"
    assert elapsed < HEADER * 3
    assert env.metric("ota_gateway_timeouts_total", listener="main", cause="header") == before + 1
    assert wait_until(lambda: len(env.gw.audit()) > audit_before)
    line = env.gw.audit()[-1]
    assert (line["status"], line["reason"], line["outcome"]) == (408, "request_timeout", "refused")


def test_slowloris_headers_on_a_reused_keepalive_connection_get_408_in_time(env: Env) -> None:
    # the timers a keep-alive connection's phases share (one is re-armed, not one per request) still hold the
    # header deadline of the next request
    sock = env.tls()
    sock.sendall(request("GET", "/updates"))
    assert one_response(sock)[0] == 200  # the twin: a whole request on this connection is served
    time.sleep(HEADER * 0.6)  # the first request's header timer is still armed, for a deadline before the next's
    sock.sendall(b"GET /updates HTTP/1.1\r\nHost: localhost\r\n")
    started = time.monotonic()
    trickle(sock, b"X" * 40, 0.1)
    raw, _ = read_until_closed(sock, 5)
    elapsed = time.monotonic() - started
    sock.close()
    assert parse(raw)[0] == 408
    assert HEADER * 0.9 < elapsed < HEADER * 3  # from this request's first byte, not from the first request's


def test_headers_sent_slowly_but_within_the_timeout_are_served(env: Env) -> None:
    sock = env.tls()
    for byte in request("GET", "/updates"):
        sock.sendall(bytes([byte]))
        time.sleep(HEADER / 200)  # about 40 bytes: the whole request in ~0.2 s
    status, _, body = one_response(sock)
    sock.close()
    assert status == 200 and json.loads(body) == {"status": "ok"}


@pytest.mark.parametrize("which", ["plain_http", "admin"])
def test_plain_and_admin_listeners_have_the_header_timeout_too(env: Env, which: str) -> None:
    port = env.plain_port if which == "plain_http" else env.gw.admin_port
    before = env.metric("ota_gateway_timeouts_total", listener=which, cause="header")
    sock = env.plain(port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    raw, elapsed = read_until_closed(sock, 10)
    sock.close()
    status, headers, body = parse(raw)
    assert status == 408 and json.loads(body)["reason"] == "request_timeout"
    assert "strict-transport-security" not in headers  # plain HTTP
    assert elapsed < HEADER * 3
    assert env.metric("ota_gateway_timeouts_total", listener=which, cause="header") == before + 1
    # the twin: a complete request is answered
    sock = env.plain(port)
    sock.sendall(request("GET", "/healthz"))
    status, _, _ = one_response(sock)
    sock.close()
    assert status == (308 if which == "plain_http" else 200)


# --- body timeout ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["ten_bytes_then_silence", "one_byte_at_a_time"])
def test_a_slow_request_body_gets_408_on_the_capgo_route(env: Env, pattern: str) -> None:
    before = env.metric("ota_gateway_timeouts_total", listener="main", cause="body")
    body = json.dumps(device_body(APP_ID, "1.0.0")).encode()
    sock = env.tls()
    sock.sendall(updates_request(b"", length=len(body)))
    started = time.monotonic()
    if pattern == "ten_bytes_then_silence":
        sock.sendall(body[:10])
    else:
        trickle(sock, body[: int(BODY * 3 / 0.25)], 0.25)
    raw, _ = read_until_closed(sock, 10)
    elapsed = time.monotonic() - started
    sock.close()
    status, headers, answer = parse(raw)
    assert status == 408
    doc = json.loads(answer)
    assert (doc["error"], doc["kind"]) == ("request_timeout", "failed")
    assert headers["connection"] == "close"
    assert elapsed < BODY * 3
    assert env.metric("ota_gateway_timeouts_total", listener="main", cause="body") == before + 1
    line = env.gw.audit()[-1]
    assert (line["route"], line["status"], line["reason"]) == ("updates", 408, "request_timeout")


def test_a_body_sent_in_pieces_within_the_timeout_is_served(env: Env) -> None:
    body = json.dumps(device_body(APP_ID, "1.0.0")).encode()
    sock = env.tls()
    sock.sendall(updates_request(body[:10], length=len(body)))
    time.sleep(BODY / 3)
    sock.sendall(body[10:])
    status, _, answer = one_response(sock)
    sock.close()
    assert status == 200
    assert json.loads(answer)["version"] == "1.1.0"


# --- keep-alive idle -------------------------------------------------------------------------------------------


def test_an_idle_keepalive_connection_is_closed_quietly_and_counted(env: Env) -> None:
    before = env.metric("ota_gateway_timeouts_total", listener="main", cause="idle")
    sock = env.tls()
    sock.sendall(request("GET", "/updates"))
    assert one_response(sock)[0] == 200
    time.sleep(IDLE / 3)
    sock.sendall(request("GET", "/updates"))  # the twin: used again within the idle timeout, it still works
    assert one_response(sock)[0] == 200
    raw, elapsed = read_until_closed(sock, 10)
    sock.close()
    assert raw == b""  # no 408: nothing was asked
    assert elapsed < IDLE * 3
    assert env.metric("ota_gateway_timeouts_total", listener="main", cause="idle") == before + 1


# --- malformed HTTP --------------------------------------------------------------------------------------------

MALFORMED = {
    "bad_request_line": b"SECRET-ECHO\r\n\r\n",
    "header_without_colon": b"GET /x HTTP/1.1\r\nHost: a\r\nX-SECRET-ECHO\r\n\r\n",
    "oversized_header": b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: SECRET-ECHO" + b"S" * 10_000 + b"\r\n\r\n",
    "bad_chunk_size": b"POST /updates HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nSECRET-ECHO\r\n\r\n",
    "bad_method": b"G\x01T / HTTP/1.1\r\nHost: SECRET-ECHO\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_http_gets_problem_details_without_echo_audited_and_counted(env: Env, case: str) -> None:
    refusals = env.metric("ota_gateway_refusals_total", reason="bad_request")
    audit_before = len(env.gw.audit())
    log_before = len(env.gw.stderr_lines)
    sock = env.tls()
    sock.sendall(MALFORMED[case])
    raw, _ = read_until_closed(sock, 10)
    sock.close()
    status, headers, body = parse(raw)
    assert status == 400
    assert b"SECRET" not in raw
    assert headers["content-type"] in ("application/problem+json", "application/json")
    assert headers["server"] == "ota-gateway"
    assert "strict-transport-security" in headers
    doc = json.loads(body)
    assert doc.get("reason", doc.get("error")) in ("bad_request", "invalid_request")
    assert env.metric("ota_gateway_refusals_total", reason="bad_request") == refusals + 1
    assert wait_until(lambda: len(env.gw.audit()) == audit_before + 1)
    assert env.gw.audit()[-1]["status"] == 400
    new_log = env.gw.stderr_lines[log_before:]
    assert not any("Traceback" in line for line in new_log)
    assert len([line for line in new_log if "malformed" in line]) <= 1


@pytest.mark.parametrize(
    ("listener", "method", "path", "status"),
    [
        ("main", "GET", "/updates", 200),
        ("main", "POST", f"/bundles/{APP_ID}/1.1.0.zip", 405),
        ("main", "GET", "/nothing/here", 404),
        ("plain_http", "POST", "/updates", 426),
        ("admin", "GET", "/healthz", 200),
        ("admin", "GET", "/nothing/here", 404),
    ],
)
def test_an_unknown_expectation_is_ignored_never_a_plain_text_417_echoing_it(
    env: Env, listener: str, method: str, path: str, status: int
) -> None:
    """aiohttp answers `Expect: <anything but 100-continue>` itself, before any middleware: a text/plain 417 that
    echoes the header, neither audited nor counted. The gateway ignores an expectation it does not know (RFC 9110
    10.1.1 allows it) and answers the request as it would without one."""
    sock = {
        "main": env.tls,
        "plain_http": lambda: env.plain(env.plain_port),
        "admin": lambda: env.plain(env.gw.admin_port),
    }[listener]()
    sock.sendall(request(method, path, Expect="SECRET-ECHO", Connection="close"))
    raw, _ = read_until_closed(sock, 10)
    sock.close()
    got, headers, _ = parse(raw)
    assert got == status, raw[:300]
    assert b"SECRET" not in raw
    assert "text/plain" not in headers.get("content-type", "")


@pytest.mark.parametrize(
    ("method", "path", "status", "detail"),
    [
        ("GET", "/nothing/here", 404, "no such path: "),
        ("POST", "/metrics", 405, "method not allowed: "),
    ],
)
def test_the_admin_listener_answers_errors_as_problem_details_and_names_no_library(
    env: Env, method: str, path: str, status: int, detail: str
) -> None:
    """Each status says what happened: a 405 is not told to look for another path."""
    sock = env.plain(env.gw.admin_port)
    sock.sendall(request(method, path, Connection="close"))
    raw, _ = read_until_closed(sock, 10)
    sock.close()
    got, headers, body = parse(raw)
    assert got == status
    assert headers["content-type"] == "application/problem+json"
    doc = json.loads(body)
    assert doc["reason"] == "not_found"  # the closed set's closest for both (the status tells them apart)
    assert doc["detail"].startswith(detail) and doc["status"] == status
    assert ("allow" in headers) == (status == 405)
    assert headers["server"] == "ota-gateway"  # not aiohttp's name and version


def test_the_admin_listener_twin_serves_metrics_as_before(env: Env) -> None:
    sock = env.plain(env.gw.admin_port)
    sock.sendall(request("GET", "/metrics", Connection="close"))
    raw, _ = read_until_closed(sock, 10)
    sock.close()
    got, headers, body = parse(raw)
    assert got == 200 and headers["content-type"].startswith("text/plain; version=")
    assert b"ota_gateway_requests_total" in body
    assert headers["server"] == "ota-gateway"


def test_expect_100_continue_still_gets_its_interim_answer(env: Env) -> None:
    """The twin: the one expectation HTTP/1.1 defines is met, then the request is answered."""
    sock = env.tls()
    body = b"{}"
    sock.sendall(
        b"POST /updates HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n"
    )
    sock.settimeout(10)
    interim = sock.recv(65536)
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
    sock.sendall(body)
    raw, _ = read_until_closed(sock, 10)
    sock.close()
    rest = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :] + raw
    status, _, answer = parse(rest)
    assert status == 400 and json.loads(answer)["error"] == "invalid_request"  # {} is no update check


# --- connection caps -------------------------------------------------------------------------------------------


def test_handshake_caps_close_new_connections_while_established_clients_keep_working(
    tmp_path: Path, pki: Pki, capgo_dir: Path
) -> None:
    origin = publish(tmp_path, capgo_dir)
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"limits": {"max_handshakes_per_address": 5, "max_connections": 12, "max_handshakes": 100}},
    )
    with run_gateway(cfg) as gw:
        established = mtls(gw, pki)
        established.sendall(request("GET", "/updates"))
        assert one_response(established)[0] == 200
        # ten TCP connections that never start TLS: five are held (per-address cap), five closed at once
        stalled = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(10)]
        assert wait_until(
            lambda: (
                gw.metric("ota_gateway_connections_refused_total", listener="main", cause="max_handshakes_per_address")
                == 5
            )
        )
        closed = 0
        for sock in stalled:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed == 5
        established.sendall(request("GET", f"/bundles/{APP_ID}/1.1.0.zip"))
        status, _, body = one_response(established)
        assert status == 200 and body == (capgo_dir / "app_1.1.0.zip").read_bytes()
        for sock in stalled:
            sock.close()
        # the overall cap: 12 per worker, the established connection included
        assert wait_until(lambda: gw.metric("ota_gateway_connections_open", listener="main") == 1)
        flood = []
        # from other loopback addresses, so that the per-address cap does not bite first
        for i in range(15):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i}", 0))
            s.connect(("127.0.0.1", gw.port))
            flood.append(s)
        assert wait_until(
            lambda: gw.metric("ota_gateway_connections_refused_total", listener="main", cause="max_connections") == 4
        )
        established.sendall(request("GET", "/updates"))
        assert one_response(established)[0] == 200
        for sock in flood:
            sock.close()
        established.close()


@pytest.mark.parametrize(
    ("limits", "cause"),
    [
        ({"max_handshakes": 6, "max_handshakes_per_address": 100}, "max_handshakes"),
        ({"max_handshakes": 100, "max_handshakes_per_address": 6}, "max_handshakes_per_address"),
    ],
)
def test_silent_connections_at_a_handshake_cap_make_room_for_a_new_client(
    tmp_path: Path, pki: Pki, capgo_dir: Path, limits: dict[str, int], cause: str
) -> None:
    """TCP connections that never start TLS fill the handshake cap, and new ones keep coming as each times out: had
    the cap refused every newcomer, a client would not get in at all. At the cap the oldest handshake in progress
    (from the same address, for the per-address cap) is closed for the new connection."""
    origin = publish(tmp_path, capgo_dir)
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"limits": limits},
    )
    with run_gateway(cfg) as gw:
        silent = []
        for _ in range(6):
            silent.append(socket.create_connection(("127.0.0.1", gw.port), timeout=10))
            time.sleep(0.05)  # in order: the first is the oldest
        assert wait_until(lambda: gw.metric("ota_gateway_connections_open", listener="main") == 6)
        status, _, body = get_once(gw, pki, f"/bundles/{APP_ID}/1.1.0.zip")
        assert status == 200 and body == (capgo_dir / "app_1.1.0.zip").read_bytes()
        assert gw.metric("ota_gateway_connections_refused_total", listener="main", cause=cause) == 1
        failures = "ota_gateway_tls_handshake_failures_total"  # the closed handshake is `aborted`, on either loop
        assert wait_until(lambda: gw.metric(failures, listener="main", cause="aborted") == 1)
        assert gw.metric(failures, listener="main", cause="no_cert") == 0  # uvloop's start_tls returned: no cert
        _oldest_closed_others_held(silent)


def test_at_both_handshake_caps_no_other_addresses_handshake_is_closed_for_nothing(
    tmp_path: Path, pki: Pki, capgo_dir: Path
) -> None:
    """Both caps reached: three silent handshakes from 127.0.0.2 (the oldest), three from 127.0.0.1, at most six
    in all and three per address. A client from 127.0.0.1 gets in by closing the oldest of its own address; the
    other address's handshakes stay (closing one of those would leave the client refused by its address's cap)."""
    origin = publish(tmp_path, capgo_dir)
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"limits": {"max_handshakes": 6, "max_handshakes_per_address": 3}},
    )
    with run_gateway(cfg) as gw:
        silent = []
        for source in ["127.0.0.2"] * 3 + ["127.0.0.1"] * 3:
            sock = socket.socket()
            sock.settimeout(10)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", gw.port))
            silent.append(sock)
            time.sleep(0.05)  # in order: the first is the oldest
        assert wait_until(lambda: gw.metric("ota_gateway_connections_open", listener="main") == 6)
        status = get_once(gw, pki, "/updates")[0]
        assert status == 200
        refused = "ota_gateway_connections_refused_total"
        assert gw.metric(refused, listener="main", cause="max_handshakes_per_address") == 1
        assert gw.metric(refused, listener="main", cause="max_handshakes") == 0
        silent[3].settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert silent[3].recv(1) == b""  # the oldest of the client's own address was closed
        for sock in silent[:3] + silent[4:]:  # every other one is still held
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
        for sock in silent:
            sock.close()


def _connect_many(port: int, count: int, first: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        with contextlib.suppress(OSError):
            s.sendall(first)
        socks.append(s)
    return socks


def test_partial_header_flood_on_plain_http_under_1024_fds_leaves_mtls_downloads_working(
    tmp_path: Path, pki: Pki, capgo_dir: Path
) -> None:
    origin = publish(tmp_path, capgo_dir)
    plain_port = free_port()
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"plain_http": {"enabled": True, "port": plain_port}},  # default limits
    )
    with run_gateway(cfg, nofile=1024) as gw:
        assert any("open-files limit 1024" in line for line in gw.stderr_lines)
        flood = _connect_many(plain_port, 1100, b"GET / HTTP/1.1\r\nHost: x\r\n")
        try:
            assert wait_until(
                lambda: (
                    gw.metric(
                        "ota_gateway_connections_refused_total", listener="plain_http", cause="listener_max_connections"
                    )
                    > 900
                ),
                timeout=15,
            )
            for _ in range(3):  # new mTLS connections, while the flood is held
                status, _, body = get_once(gw, pki, f"/bundles/{APP_ID}/1.1.0.zip")
                assert status == 200 and body == (capgo_dir / "app_1.1.0.zip").read_bytes()
            assert gw.metric("ota_gateway_connections_open", listener="plain_http") == 128
        finally:
            for s in flood:
                s.close()


def test_downloads_that_each_hold_an_origin_connection_never_run_the_gateway_out_of_descriptors(
    tmp_path: Path, pki: Pki, https_origin: HttpsOrigin
) -> None:
    """Every download holds a second descriptor besides its client's (the origin connection, or the bundle file of
    a directory origin). With the default cap, clients that each start a download and keep it open (the origin
    sends half, then waits) fill the open-files limit: handshakes then fail, the origin cannot be reached, and the
    admin listener that would show it is unreachable. The default cap leaves a descriptor per connection for that."""
    import resource

    from gateway.core.connguard import auto_max_connections

    nofile = 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))  # this process holds both ends
    https_origin.publish(APP_ID, "1.1.0", bytes(256 * 1024))
    https_origin.state.modes[f"{APP_ID}/1.1.0.zip"] = "stall_watch"
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"cdn": https_origin.origin_config(read_timeout=60)},
        extra={"limits": {"origin_min_rate": 0, "shutdown_grace": 1}},  # only the cap bounds the stalled downloads
    )
    held: list[ssl.SSLSocket] = []
    answers: dict[str, int] = {}
    with run_gateway(cfg, nofile=nofile) as gw:
        try:
            for _ in range(auto_max_connections(nofile) + 40):
                try:
                    sock = mtls(gw, pki)
                    sock.sendall(request("GET", f"/bundles/{APP_ID}/1.1.0.zip"))
                    head = sock.recv(12)
                except OSError:
                    answers["no answer"] = answers.get("no answer", 0) + 1
                    continue
                status = head.decode("latin-1") or "closed"
                answers[status] = answers.get(status, 0) + 1
                held.append(sock)
            scrape = gw.scrape()  # the admin listener still answers while every download is held
            assert "ota_gateway_downloads_in_flight " in scrape
            assert answers.get("HTTP/1.1 200", 0) >= auto_max_connections(nofile) - 2, answers
            assert set(answers) <= {"HTTP/1.1 200", "no answer", "closed"}, answers  # never a 502 or 500
            assert gw.metric("ota_gateway_connections_refused_total", listener="main", cause="max_connections") > 0
            assert not [line for line in gw.stderr_lines if "Too many open files" in line]
        finally:
            for sock in held:
                sock.close()
        assert wait_until(lambda: gw.metric("ota_gateway_downloads_in_flight") == 0, timeout=15)


def test_readyz_reports_descriptors_at_80_percent_of_the_limit(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    origin = publish(tmp_path, capgo_dir)
    plain_port = free_port()
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={
            "plain_http": {"enabled": True, "port": plain_port, "max_connections": 1000},
            "limits": {"max_connections": 1000, "header_timeout": 60},
        },
    )
    with run_gateway(cfg, nofile=256) as gw:
        status, doc = gw.readyz()
        assert status == 200, doc
        assert gw.metric("ota_gateway_open_fds_ratio") < 0.8
        flood = _connect_many(plain_port, 190, b"GET / HTTP/1.1\r\n")
        try:
            assert wait_until(lambda: gw.metric("ota_gateway_connections_open", listener="plain_http") == 190)
            status, doc = gw.readyz()
            assert status == 503
            assert any("open file descriptors" in r for r in doc["reasons"]), doc
            assert gw.metric("ota_gateway_open_fds_ratio") >= 0.8
        finally:
            for s in flood:
                s.close()
        assert wait_until(lambda: gw.readyz()[0] == 200)


# --- churn -----------------------------------------------------------------------------------------------------


def _vmrss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _aborted_downloads(port: int, path: str, ctx: ssl.SSLContext, count: int, concurrency: int) -> int:
    """Downloads cut with a TCP RST after the first 64 KiB; returns how many got that far."""
    sem = asyncio.Semaphore(concurrency)
    done = 0

    async def one() -> None:
        nonlocal done
        async with sem:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
            writer.write(request("GET", path))
            await reader.readexactly(64 * 1024)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            done += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return done


def test_rss_after_1000_aborted_downloads_comes_back_within_32_mib(tmp_path: Path, pki: Pki) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    bundle = make_zip(tmp_path / "big.zip", 2 * 1024 * 1024)
    add_release(origin, APP_ID, "2.0.0", "production", bundle)
    cfg = write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})
    path = f"/bundles/{APP_ID}/2.0.0.zip"
    with run_gateway(cfg) as gw:
        ctx = pki.client_context(pki.client)
        for _ in range(20):
            assert https_request(f"{gw.base_url}{path}", ctx).status == 200
        warm = _vmrss_kib(gw.proc.pid)
        assert asyncio.run(_aborted_downloads(gw.port, path, ctx, 1000, 24)) == 1000  # below the per-address cap
        grown: list[int] = []
        assert wait_until(lambda: grown.append(_vmrss_kib(gw.proc.pid) - warm) or grown[-1] < 32 * 1024, timeout=20), (
            f"RSS {warm} KiB warm, +{grown[-1]} KiB after 1,000 aborted downloads"
        )
        assert https_request(f"{gw.base_url}{path}", ctx).status == 200


@pytest.mark.parametrize("which", ["admin", "plain_http"])
def test_partial_header_connections_at_a_listener_cap_make_room_for_a_new_request(
    tmp_path: Path, pki: Pki, capgo_dir: Path, which: str
) -> None:
    """Connections that send part of a request head and stop fill the admin (or plain-HTTP) listener's cap, and an
    attacker renews each as it times out: the listener was closed to every newcomer, so /healthz, /readyz and
    /metrics went dark while 32 such connections per worker were held (on Kubernetes, where the admin port is on the
    pod's address for the kubelet's probes, a liveness probe failing into restarts). At the cap the oldest
    connection that waits for a request is closed for the new one; the others stay held."""
    origin = publish(tmp_path, capgo_dir)
    port = free_port()
    section = {"admin": {"max_connections": 4}, "plain_http": {"enabled": True, "port": port, "max_connections": 4}}
    cfg = write_config(
        tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}}, extra=section
    )
    with run_gateway(cfg) as gw:
        port = gw.admin_port if which == "admin" else port
        held = []
        for _ in range(4):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            held[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            time.sleep(0.05)  # in order: the first is the oldest
        assert wait_until(lambda: gw.metric("ota_gateway_connections_open", listener=which) == 4)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status = one_response(sock)[0]
        assert status == (200 if which == "admin" else 308)
        refused = gw.metric("ota_gateway_connections_refused_total", listener=which, cause="listener_max_connections")
        assert refused == 1
        _oldest_closed_others_held(held)


@pytest.mark.parametrize("which", ["plain_http", "admin"])
def test_a_client_that_half_closes_after_its_requests_gets_every_answer(env: Env, which: str) -> None:
    """A plain-HTTP client that ends its side once its request is out (shutdown(SHUT_WR), `nc -N`, some health
    checkers) still gets its answers, then the connection closes; it got none (aiohttp closed at the end of stream).
    The twin: one that half-closes in the middle of a request head is closed at once, not held to the header
    timeout."""
    port = env.plain_port if which == "plain_http" else env.gw.admin_port
    sock = env.plain(port)
    sock.sendall(request("GET", "/healthz") * 2)  # two, pipelined
    sock.shutdown(socket.SHUT_WR)
    raw, elapsed = read_until_closed(sock, 5)
    sock.close()
    assert raw.count(b"HTTP/1.1 308" if which == "plain_http" else b"HTTP/1.1 200") == 2, raw[:300]
    assert elapsed < 3
    sock = env.plain(port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    sock.shutdown(socket.SHUT_WR)
    raw, elapsed = read_until_closed(sock, 5)
    sock.close()
    assert raw == b"" and elapsed < HEADER, (raw[:200], elapsed)
