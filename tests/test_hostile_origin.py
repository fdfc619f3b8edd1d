"""Hostile origins and clients against a real `ota-gateway serve` (issue 8, items 1, 2 and 8).

Misbehaving peers are real: the scriptable aiohttp origin (`tests/origin_server.py`: a body at 1 byte per 0.2 s,
bytes past Content-Length, a close mid-body, an endless release index), a raw TLS server that sends its headers a
byte at a time or answers garbage, and raw TLS clients with a 4 KiB receive buffer that stop reading. Every limit
has its passing twin. Limits are set low in the test config so that each case takes seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import aiohttp
import pytest

from gateway.core.tickets import Ticket, TicketKey, seal
from gateway.origins import OriginError
from tests.capgo_env import CapgoEnv, capgo_env, default_apps
from tests.origin_server import HttpsOrigin
from tests.support import (
    APP_ID,
    GatewayProcess,
    Pki,
    capgo_call,
    device_body,
    https_request,
    run_gateway,
    wait_until,
    write_config,
)

LIMITS = {"origin_min_rate": 2000, "client_min_rate": 50_000, "rate_window": 1.0}


def audit_for(gw: GatewayProcess, path_part: str) -> dict[str, Any]:
    assert wait_until(lambda: any(path_part in r["path"] for r in gw.audit()), timeout=10)
    return [r for r in gw.audit() if path_part in r["path"]][-1]


def refusals(gw: GatewayProcess, reason: str) -> float:
    return gw.metric("ota_gateway_refusals_total", reason=reason)


def verifications(gw: GatewayProcess, result: str) -> float:
    return gw.metric("ota_gateway_bundle_verifications_total", result=result)


def origin_errors(gw: GatewayProcess, origin: str = "cdn") -> float:
    return gw.metric("ota_gateway_origin_errors_total", origin=origin)


def overruns(gw: GatewayProcess, origin: str = "cdn") -> float:
    return gw.metric("ota_gateway_origin_overruns_total", origin=origin)


def raw_get(gw: GatewayProcess, pki: Pki, path: str, timeout: float = 20) -> tuple[bytes, bytes, BaseException | None]:
    """GET on a fresh TLS connection, read to the end: (head, body, what ended it if not a clean close)."""
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)
    data = b""
    ended: BaseException | None = None
    with pki.client_context(pki.client).wrap_socket(sock, server_hostname="localhost") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        try:
            while chunk := tls.recv(65536):
                data += chunk
        except (OSError, ssl.SSLError) as exc:
            ended = exc
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body, ended


# ---- an HTTPS origin with a release index: slow bodies, bytes past Content-Length, endless indexes ----------------


@pytest.fixture(scope="module")
def cdn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsOrigin]:
    with HttpsOrigin(tmp_path_factory.mktemp("cdn")) as origin:
        yield origin


@pytest.fixture(scope="module")
def gw(cdn: HttpsOrigin, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    origin = cdn.origin_config(total_timeout=2, index_ttl=0)
    with _cdn_gateway(tmp_path_factory.mktemp("gw"), pki, origin, LIMITS, APP_ID, "com.example.huge") as process:
        yield process


@contextlib.contextmanager
def _cdn_gateway(
    base: Path, pki: Pki, origin: dict[str, Any], limits: dict[str, Any], *app_ids: str
) -> Iterator[GatewayProcess]:
    """A gateway whose apps all come from the HTTPS origin `cdn`, production channel, the test CA's clients."""
    apps = [
        {
            "app_id": app,
            "origin": "cdn",
            "channels": {"default": "production", "allowed": ["production"]},
            "clients": [{"name": "fleet", "issuer": ["ca"]}],
        }
        for app in app_ids
    ]
    cfg = write_config(base, pki, origins={"cdn": origin}, apps=apps, extra={"limits": limits})
    with run_gateway(cfg) as process:
        yield process


def _publish(cdn: HttpsOrigin, version: str, size: int, mode: str) -> bytes:
    """Random bytes published as APP_ID's `version` bundle, served in `mode`; returns them."""
    data = os.urandom(size)
    cdn.publish(APP_ID, version, data)
    cdn.state.modes[f"{APP_ID}/{version}.zip"] = mode
    return data


def test_an_origin_below_the_minimum_rate_is_cut_and_the_tail_never_sent(
    gw: GatewayProcess, cdn: HttpsOrigin, pki: Pki
) -> None:
    data = _publish(cdn, "2.0.0", 4000, "trickle:0.2")  # 5 bytes/s, the minimum is 2000
    before = (refusals(gw, "origin_too_slow"), verifications(gw, "origin_too_slow"), origin_errors(gw))
    started = time.monotonic()
    _head, body, _ = raw_get(gw, pki, f"/bundles/{APP_ID}/2.0.0.zip")
    assert time.monotonic() - started < 10  # one window of 1 s, with a wide margin
    assert len(body) < len(data)  # never the whole file, never its tail
    record = audit_for(gw, "/2.0.0.zip")
    assert (record["outcome"], record["reason"]) == ("aborted", "origin_too_slow")
    assert "origin_min_rate" in record["detail"]
    after = (refusals(gw, "origin_too_slow"), verifications(gw, "origin_too_slow"), origin_errors(gw))
    assert after == (before[0] + 1, before[1] + 1, before[2] + 1)
    assert wait_until(lambda: f"{APP_ID}/2.0.0.zip" in cdn.state.disconnects, timeout=10)  # the origin was let go


def test_an_origin_above_the_minimum_rate_is_served_whole(gw: GatewayProcess, cdn: HttpsOrigin, pki: Pki) -> None:
    data = _publish(cdn, "2.0.1", 64 * 1024, "slow:2.5")  # ~26 KB/s for 2.5 s: slower than total_timeout, fast enough
    answer = https_request(f"{gw.base_url}/bundles/{APP_ID}/2.0.1.zip", pki.client_context(pki.client), timeout=20)
    assert answer.status == 200 and answer.body == data
    assert audit_for(gw, "/2.0.1.zip")["outcome"] == "ok"


def test_a_small_body_below_the_minimum_rate_is_cut_after_one_window_and_sends_nothing(
    gw: GatewayProcess, cdn: HttpsOrigin, pki: Pki
) -> None:
    """A body smaller than one window's worth of the minimum rate (1,500 of 2,000 bytes) is read whole before the
    answer starts, the origin given one window for all of it: a trickle is cut there, and the client gets nothing."""
    _publish(cdn, "2.0.2", 1500, "trickle:0.2")  # 5 bytes/s
    before = (refusals(gw, "origin_too_slow"), verifications(gw, "origin_too_slow"), origin_errors(gw))
    started = time.monotonic()
    head, body, _ = raw_get(gw, pki, f"/bundles/{APP_ID}/2.0.2.zip")
    assert time.monotonic() - started < 10  # one window of 1 s, with a wide margin
    assert (head, body) == (b"", b"")  # not even the status line
    record = audit_for(gw, "/2.0.2.zip")
    assert (record["outcome"], record["reason"], record["bytes"]) == ("aborted", "origin_too_slow", 0)
    assert "below limits.origin_min_rate (2000 bytes/s)" in record["detail"]
    after = (refusals(gw, "origin_too_slow"), verifications(gw, "origin_too_slow"), origin_errors(gw))
    assert after == (before[0] + 1, before[1] + 1, before[2] + 1)
    assert wait_until(lambda: f"{APP_ID}/2.0.2.zip" in cdn.state.disconnects, timeout=10)  # the origin was let go


def test_a_small_body_within_one_window_is_served_whole(gw: GatewayProcess, cdn: HttpsOrigin, pki: Pki) -> None:
    data = _publish(cdn, "2.0.3", 1500, "slow:0.3")  # 20 pieces over 0.3 s, the window is 1 s
    answer = https_request(f"{gw.base_url}/bundles/{APP_ID}/2.0.3.zip", pki.client_context(pki.client), timeout=20)
    assert answer.status == 200 and answer.body == data
    assert audit_for(gw, "/2.0.3.zip")["outcome"] == "ok"


@pytest.fixture(scope="module")
def quiet_cdn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpsOrigin]:
    with HttpsOrigin(tmp_path_factory.mktemp("quiet-cdn")) as origin:
        yield origin


@pytest.fixture(scope="module")
def quick_read_gw(
    quiet_cdn: HttpsOrigin, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """`read_timeout` 1 s on the origin and no minimum rate: only the read timeout can cut a silent body."""
    origin = quiet_cdn.origin_config(total_timeout=2, index_ttl=0, read_timeout=1)
    limits = {**LIMITS, "origin_min_rate": 0}
    with _cdn_gateway(tmp_path_factory.mktemp("gw-read"), pki, origin, limits, APP_ID) as process:
        yield process


def test_a_body_that_falls_silent_is_cut_at_read_timeout(
    quick_read_gw: GatewayProcess, quiet_cdn: HttpsOrigin, pki: Pki
) -> None:
    cdn = quiet_cdn
    data = _publish(cdn, "2.2.0", 256 * 1024, "stall_watch")  # half the body, then silence for up to a minute
    started = time.monotonic()
    _head, body, _ = raw_get(quick_read_gw, pki, f"/bundles/{APP_ID}/2.2.0.zip")
    assert time.monotonic() - started < 15  # read_timeout 1 s, with a wide margin
    assert len(body) < len(data) // 2 + 1  # never past what the origin sent, never the tail
    record = audit_for(quick_read_gw, "/2.2.0.zip")
    assert (record["outcome"], record["reason"]) == ("aborted", "origin_error")
    assert "TimeoutError" in record["detail"]
    assert wait_until(lambda: f"{APP_ID}/2.2.0.zip" in cdn.state.disconnects, timeout=10)  # the origin was let go


def test_a_body_with_pauses_shorter_than_read_timeout_is_served_whole(
    quick_read_gw: GatewayProcess, quiet_cdn: HttpsOrigin, pki: Pki
) -> None:
    data = _publish(quiet_cdn, "2.2.1", 256 * 1024, "slow:2.5")  # 20 pieces 0.13 s apart: > read_timeout in all
    answer = https_request(
        f"{quick_read_gw.base_url}/bundles/{APP_ID}/2.2.1.zip", pki.client_context(pki.client), timeout=20
    )
    assert answer.status == 200 and answer.body == data
    assert audit_for(quick_read_gw, "/2.2.1.zip")["outcome"] == "ok"


@pytest.mark.parametrize(
    ("mode", "size"),
    [
        ("past_length", 300 * 1024),  # in the same write as the body's last bytes
        ("past_later_close", 300 * 1024),  # 0.2 s after the body, from an origin that announced its close
        ("past_one_write", 2000),  # status line, headers, body and more in one write
    ],
)
def test_bytes_past_content_length_are_size_exceeded_every_time(
    gw: GatewayProcess, cdn: HttpsOrigin, pki: Pki, mode: str, size: int
) -> None:
    data = os.urandom(size)
    version = {"past_length": "2.1.0", "past_later_close": "2.1.1", "past_one_write": "2.1.2"}[mode]
    cdn.publish(APP_ID, version, data)
    cdn.state.modes[f"{APP_ID}/{version}.zip"] = mode
    before = (verifications(gw, "size_exceeded"), refusals(gw, "size_exceeded"))
    before_overruns = overruns(gw)
    for _ in range(5):
        _head, body, _ = raw_get(gw, pki, f"/bundles/{APP_ID}/{version}.zip")
        assert len(body) < len(data), "the bundle must not complete when the origin sent more than it announced"
        record = audit_for(gw, f"/{version}.zip")
        assert (record["outcome"], record["reason"]) == ("aborted", "size_exceeded"), record
        assert "Content-Length" in record["detail"] and record["bytes"] < len(data)
        gw.audit_path.write_text("")
    assert (verifications(gw, "size_exceeded"), refusals(gw, "size_exceeded")) == (before[0] + 5, before[1] + 5)
    assert overruns(gw) >= before_overruns + 5  # each one dropped its connection
    cdn.state.modes[f"{APP_ID}/{version}.zip"] = "ok"  # the twin: exactly Content-Length bytes
    for _ in range(3):
        answer = https_request(f"{gw.base_url}/bundles/{APP_ID}/{version}.zip", pki.client_context(pki.client))
        assert answer.status == 200 and answer.body == data


@pytest.mark.parametrize("location", ["http://[::1", "https://127.0.0.1:99999/x.zip", "https://[zz]/x.zip"])
def test_a_redirect_with_a_malformed_location_is_an_origin_error_and_its_connection_closed(
    gw: GatewayProcess, cdn: HttpsOrigin, pki: Pki, location: str
) -> None:
    """A 302 whose Location is not a URL: the client gets the origin refusal (problem+json `origin_error`, never a
    500), the origin's bytes are not echoed, and (in process) the connection is closed, not left acquired. The twin:
    a 302 to a valid URL on the origin's host is followed and served."""
    data = os.urandom(4000)
    cdn.publish(APP_ID, "2.1.4", data)
    cdn.publish(APP_ID, "2.1.5", data)
    cdn.state.modes[f"{APP_ID}/2.1.4.zip"] = f"location:{location}"
    answer = https_request(f"{gw.base_url}/bundles/{APP_ID}/2.1.4.zip", pki.client_context(pki.client))
    content_type = {k.lower(): v for k, v in answer.headers.items()}.get("content-type", "")
    assert answer.status == 502 and content_type == "application/problem+json", answer
    doc = answer.json()
    assert doc["reason"] == "origin_error" and "malformed Location" in doc["detail"], doc
    assert location not in answer.body.decode(), doc

    async def main() -> tuple[str, int, bytes]:
        origin = _InProcess(cdn)
        try:
            try:
                await origin.bundle(APP_ID, "2.1.4.zip")
                refused = "served"
            except OriginError as exc:
                refused = str(exc)
            connector = origin.upstream._get_session().connector
            acquired = len(connector._acquired)  # type: ignore[union-attr]
            cdn.state.modes[f"{APP_ID}/2.1.4.zip"] = f"redirect:{cdn.url}{APP_ID}/2.1.5.zip"
            return refused, acquired, await origin.bundle(APP_ID, "2.1.4.zip")
        finally:
            await origin.upstream.close()

    refused, acquired, twin = asyncio.run(main())
    assert "malformed Location" in refused and acquired == 0, (refused, acquired)
    assert twin == data


def test_bytes_after_a_served_bundle_on_a_pooled_connection_are_an_overrun(
    gw: GatewayProcess, cdn: HttpsOrigin, pki: Pki
) -> None:
    """Bytes that come 0.2 s after the body, from an origin that keeps its connection alive, arrive once the bundle
    was verified over exactly its Content-Length and released: the client has the signed bundle, and the bytes are
    counted as the origin's overrun on the idle pooled connection, which is dropped (never read as an answer)."""
    data = os.urandom(300 * 1024)
    cdn.publish(APP_ID, "2.1.3", data)
    cdn.state.modes[f"{APP_ID}/2.1.3.zip"] = "past_later"
    before = (overruns(gw), verifications(gw, "size_exceeded"))
    for i in range(3):
        answer = https_request(f"{gw.base_url}/bundles/{APP_ID}/2.1.3.zip", pki.client_context(pki.client))
        assert answer.status == 200 and answer.body == data  # the signed bundle, exactly
        assert audit_for(gw, "/2.1.3.zip")["outcome"] == "ok"
        assert wait_until(lambda i=i: overruns(gw) == before[0] + i + 1, timeout=10)  # counted, once per connection
    assert verifications(gw, "size_exceeded") == before[1]
    said = "bytes after the end of the answer to /com.example.app/2.1.3.zip"
    assert any(said in line for line in gw.stderr_lines), gw.stderr_lines[-5:]
    cdn.state.modes[f"{APP_ID}/2.1.3.zip"] = "ok"  # the twin: nothing after the body, nothing counted
    for _ in range(3):
        answer = https_request(f"{gw.base_url}/bundles/{APP_ID}/2.1.3.zip", pki.client_context(pki.client))
        assert answer.status == 200 and answer.body == data
    time.sleep(0.5)
    assert overruns(gw) == before[0] + 3


def test_an_endless_release_index_is_cut_at_the_cap_while_it_streams(
    gw: GatewayProcess, cdn: HttpsOrigin, pki: Pki
) -> None:
    cdn.state.index_modes["com.example.huge"] = "huge"
    before = origin_errors(gw)
    answer = https_request(f"{gw.base_url}/bundles/com.example.huge/1.0.0.zip", pki.client_context(pki.client))
    assert answer.status == 502 and answer.json()["reason"] == "origin_error"
    assert "larger than 4194304 bytes" in answer.json()["detail"]
    assert origin_errors(gw) == before + 1
    time.sleep(0.5)
    assert cdn.state.index_bytes_sent < 64 * 1024 * 1024  # the rest of the 650 MB was never asked for
    cdn.state.index_modes.pop("com.example.huge")
    cdn.publish("com.example.huge", "1.0.0", b"small index, small bundle")  # the twin: a normal index
    answer = https_request(f"{gw.base_url}/bundles/com.example.huge/1.0.0.zip", pki.client_context(pki.client))
    assert answer.status == 200 and answer.body == b"small index, small bundle"


# ---- slow and stalled clients -------------------------------------------------------------------------------------


def stalled_client(gw: GatewayProcess, pki: Pki, path: str) -> ssl.SSLSocket:
    """A client with a 4 KiB receive buffer that asks for `path` and then never reads."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", gw.port))
    tls = pki.client_context(pki.client).wrap_socket(raw, server_hostname="localhost")
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return tls


def test_a_stalled_client_is_closed_as_client_too_slow(gw: GatewayProcess, cdn: HttpsOrigin, pki: Pki) -> None:
    data = os.urandom(8 * 1024 * 1024)
    cdn.publish(APP_ID, "3.0.0", data)
    before = (refusals(gw, "client_too_slow"), verifications(gw, "client_too_slow"))
    tls = stalled_client(gw, pki, f"/bundles/{APP_ID}/3.0.0.zip")
    try:
        assert wait_until(lambda: any("/3.0.0.zip" in r["path"] for r in gw.audit()), timeout=15)
    finally:
        tls.close()
    record = audit_for(gw, "/3.0.0.zip")
    assert (record["outcome"], record["reason"]) == ("aborted", "client_too_slow")
    assert record["bytes"] < len(data)
    assert refusals(gw, "client_too_slow") == before[0] + 1
    assert verifications(gw, "client_too_slow") == before[1]  # says nothing about the bundle
    answer = https_request(f"{gw.base_url}/bundles/{APP_ID}/3.0.0.zip", pki.client_context(pki.client))
    assert answer.status == 200 and answer.body == data  # the twin: a client that reads


# ---- total deadline on origin calls: headers sent a byte at a time, or garbage ------------------------------------


class RawTlsOrigin:
    """A TLS server that answers every request with `answer`, one byte every `pause` seconds, in its own thread."""

    def __init__(self, cdn: HttpsOrigin, answer: bytes, pause: float) -> None:
        self.cdn, self.answer, self.pause = cdn, answer, pause
        self.port = 0
        self.live = 0  # connections being answered
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=asyncio.run, args=(self.main(),), daemon=True, name="raw-origin")
        self.stop: asyncio.Event | None = None

    async def main(self) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.live += 1
            try:
                await reader.readuntil(b"\r\n\r\n")
                for i in range(len(self.answer)):
                    writer.write(self.answer[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(self.pause)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self.live -= 1
                writer.transport.abort()

        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=self.cdn.server_context())
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        await self.stop.wait()
        server.close()
        for transport in list(getattr(self.loop, "_transports", {}).values()):
            transport.abort()
        await asyncio.sleep(0)

    def __enter__(self) -> RawTlsOrigin:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"type": "https", "url": f"https://127.0.0.1:{self.port}/", "ca": str(self.cdn.ca_pem), **extra}


SLOW_HEADERS = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@pytest.fixture(scope="module")
def slow_gw(cdn: HttpsOrigin, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("slow-gw")
    with (
        RawTlsOrigin(cdn, SLOW_HEADERS, pause=1.0) as slow,
        RawTlsOrigin(cdn, b"\x16\x03garbage, not HTTP\r\n\r\n", pause=0) as garbage,
    ):
        endpoints = {"updates_path": "updates", "stats_path": "stats", "channel_path": "channel_self"}
        apps = default_apps("slow")
        apps.append({**apps[0], "app_id": "com.example.garbage", "origin": "garbage"})
        apps.append({**apps[0], "app_id": "com.example.index", "origin": "slowindex"})
        cfg = write_config(
            base,
            pki,
            origins={
                "slow": slow.config(total_timeout=1.5, **endpoints),
                "garbage": garbage.config(total_timeout=1.5, **endpoints),
                "slowindex": slow.config(total_timeout=1.5),
            },
            apps=apps,
        )
        with run_gateway(cfg) as process:
            yield process


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/updates", device_body()),
        ("POST", "/updates/manifest_size", {**device_body(), "version": "1.0.0", "manifest": []}),
        ("POST", "/stats", {**device_body(APP_ID, "1.1.0"), "action": "set", "old_version_name": "1.0.0"}),
        ("GET", "/channel_self?" + "&".join(f"{k}={str(v).lower()}" for k, v in device_body().items()), None),
    ],
)
def test_an_origin_sending_headers_a_byte_a_second_is_cut_at_total_timeout(
    slow_gw: GatewayProcess, pki: Pki, method: str, path: str, body: dict[str, Any] | None
) -> None:
    before = refusals(slow_gw, "origin_too_slow")
    started = time.monotonic()
    if method == "POST":
        answer = capgo_call(f"{slow_gw.base_url}{path}", pki.client_context(pki.client), body)
    else:
        answer = https_request(f"{slow_gw.base_url}{path}", pki.client_context(pki.client))
    elapsed = time.monotonic() - started
    assert elapsed < 6, elapsed  # total_timeout 1.5 s; the answer alone would take 70 s
    doc = answer.json()
    assert doc["error"] == "origin_too_slow" and doc["kind"] == "failed", doc
    assert "total_timeout" in doc["message"]
    assert refusals(slow_gw, "origin_too_slow") == before + 1
    assert slow_gw.metric("ota_gateway_origin_errors_total", origin="slow") >= 1


@pytest.mark.parametrize(
    ("pause", "limits", "cut_within"),
    [
        (0.3, {"total_timeout": 1.5}, 6.0),  # the head alone would take 25 s: cut at total_timeout
        (1.0, {"total_timeout": 10, "read_timeout": 0.3}, 3.0),  # silent 1 s between bytes: cut at read_timeout
        (0.0, {"total_timeout": 1.5}, None),  # the twin: the same answer at once is served
    ],
)
def test_a_bundle_gets_answer_head_is_held_to_total_timeout_and_read_timeout(
    cdn: HttpsOrigin, pause: float, limits: dict[str, float], cut_within: float | None
) -> None:
    """A bundle GET (in process, no index call around it) whose origin sends the answer's head a byte at a time:
    `origin_too_slow` at total_timeout, or at read_timeout when that is the shorter one and the origin falls silent
    that long, and that connection ends (never kept, never pooled); the same answer sent at once is served."""
    from yarl import URL

    from gateway.config import HttpsOriginConfig
    from gateway.origins import HttpsOrigin as Upstream
    from gateway.origins import OriginTooSlow

    async def main(url: str, config: dict[str, Any]) -> bytes | str:
        upstream = Upstream("slow", HttpsOriginConfig(**config))
        try:
            async with upstream.open_url(URL(url + "com.example.slow/1.0.0.zip")) as body:
                return b"".join([bytes(c) async for c in body.chunks])  # type: ignore[attr-defined]
        except OriginTooSlow as exc:
            for _ in range(60):  # the origin sees the connection end within its next byte's write
                if not slow.live:
                    break
                await asyncio.sleep(0.05)
            return f"{exc} (origin connections left: {slow.live})"
        finally:
            await upstream.close()

    with RawTlsOrigin(cdn, SLOW_HEADERS, pause=pause) as slow:
        config = slow.config(**limits)
        started = time.monotonic()
        got = asyncio.run(main(config["url"], config))
        elapsed = time.monotonic() - started
    if cut_within is None:
        assert got == b"{}"
    else:
        assert isinstance(got, str) and "total_timeout" in got and got.endswith("left: 0)"), got
        assert elapsed < cut_within, elapsed


def test_a_release_index_behind_slow_headers_is_cut_too(slow_gw: GatewayProcess, pki: Pki) -> None:
    started = time.monotonic()
    answer = https_request(f"{slow_gw.base_url}/bundles/com.example.index/1.0.0.zip", pki.client_context(pki.client))
    assert time.monotonic() - started < 6
    assert answer.status == 504 and answer.json()["reason"] == "origin_too_slow"
    ready = https_ready(slow_gw)
    assert ready["status"] == "not ready" and any("slowindex" in r for r in ready["reasons"])


def https_ready(gw: GatewayProcess) -> dict[str, Any]:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{gw.admin_url}/readyz", timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


def test_a_garbage_answer_is_an_origin_error_at_once(slow_gw: GatewayProcess, pki: Pki) -> None:
    started = time.monotonic()
    answer = capgo_call(
        f"{slow_gw.base_url}/updates", pki.client_context(pki.client), device_body("com.example.garbage")
    )
    assert time.monotonic() - started < 6
    doc = answer.json()
    assert doc["error"] == "origin_error" and doc["kind"] == "failed", doc


# ---- update answers: a close mid-body is short_body; another app's bundle is foreign_app ---------------------------


@pytest.fixture(scope="module")
def capgo(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CapgoEnv]:
    apps = default_apps()
    apps.append({**apps[0], "app_id": "com.example.other"})
    base = tmp_path_factory.mktemp("capgo-hostile")
    with capgo_env(base, pki, apps) as env:
        yield env


def test_an_origin_closing_mid_body_is_short_body_and_an_origin_error(capgo: CapgoEnv) -> None:
    data = os.urandom(256 * 1024)
    url = capgo.host(APP_ID, "cut.zip", data, mode="short")  # Content-Length, then a close half way
    capgo.origin.state.update_answers[APP_ID] = {
        "version": "1.1.0",
        "url": url,
        "checksum": hashlib.sha256(data).hexdigest(),
        "session_key": "",
    }
    doc = capgo.new_version(APP_ID)  # the answer gives no size: the origin's Content-Length is the size
    gw = capgo.gw
    before = (verifications(gw, "short_body"), verifications(gw, "checksum_mismatch"), origin_errors(gw, "capgo"))
    path = doc["url"].split(str(gw.port), 1)[1]
    _head, body, _ = raw_get(gw, capgo.pki, path)
    assert len(body) < len(data)
    record = audit_for(gw, "/bundles/t/")
    assert (record["outcome"], record["reason"]) == ("aborted", "short_body"), record
    after = (verifications(gw, "short_body"), verifications(gw, "checksum_mismatch"), origin_errors(gw, "capgo"))
    assert after == (before[0] + 1, before[1], before[2] + 1)
    ready = https_ready(gw)
    assert ready["status"] == "not ready" and any("capgo" in r for r in ready["reasons"])


def test_an_offer_outside_the_apps_bundle_urls_is_foreign_app(pki: Pki, tmp_path: Path) -> None:
    secret = secrets.token_hex(32).encode()
    (tmp_path / "ticket.secret").write_bytes(secret)
    with HttpsOrigin(tmp_path) as origin:
        apps = default_apps()
        apps[0]["verification"] = {"bundle_urls": [f"{origin.url}{{app_id}}/"]}
        cfg = write_config(
            tmp_path / "gw",
            pki,
            origins={"capgo": origin.origin_config(updates_path="updates")},
            apps=apps,
            extra={"tickets": {"keys": [{"id": "k1", "secret_file": str(tmp_path / "ticket.secret")}]}},
        )
        with run_gateway(cfg) as gw:
            env = CapgoEnv(origin, gw, pki, ("k1", secret))
            data = b"the bundle of com.example.other"
            other = env.host("com.example.other", "1.1.0.zip", data)
            checksum = hashlib.sha256(data).hexdigest()
            origin.state.update_answers[APP_ID] = {"version": "1.1.0", "url": other, "checksum": checksum}
            before = refusals(gw, "foreign_app")
            doc = env.check(device_body(APP_ID)).json()
            assert (doc["error"], doc["kind"]) == ("foreign_app", "failed"), doc
            assert refusals(gw, "foreign_app") == before + 1
            own = env.host(APP_ID, "1.1.0.zip", data)  # the twin: the same bytes in the app's own folder
            origin.state.update_answers[APP_ID] = {"version": "1.1.0", "url": own, "checksum": checksum}
            assert env.new_version(APP_ID)["version"] == "1.1.0"


# ---- a directory origin serves only files inside the app's own folder ---------------------------------------------


def test_directory_files_and_ticket_locations_stay_in_the_apps_folder(pki: Pki, tmp_path: Path) -> None:
    root = tmp_path / "origin"
    (root / APP_ID).mkdir(parents=True)
    (root / "com.example.other").mkdir()
    secret_bytes = os.urandom(4096)
    (root / "com.example.other" / "1.0.0.zip").write_bytes(secret_bytes)
    own = os.urandom(4096)
    (root / APP_ID / "1.0.0.zip").write_bytes(own)
    os.symlink("1.0.0.zip", root / APP_ID / "current.zip")  # inside the folder: fine
    os.symlink("../com.example.other/1.0.0.zip", root / APP_ID / "escape.zip")  # leads out
    (root / APP_ID / "assets").mkdir()
    (root / APP_ID / "assets" / "1.0.0.zip").write_bytes(own)  # a real subfolder: fine
    os.symlink("../com.example.other", root / APP_ID / "linked")  # a subfolder that leads out
    sha_own, sha_other = hashlib.sha256(own).hexdigest(), hashlib.sha256(secret_bytes).hexdigest()
    releases = [
        {"version": "1.0.0", "channel": "production", "file": "current.zip", "size": 4096, "sha256": sha_own},
        {"version": "1.0.1", "channel": "production", "file": "escape.zip", "size": 4096, "sha256": sha_other},
    ]
    import yaml

    (root / APP_ID / "releases.yaml").write_text(yaml.safe_dump({"app_id": APP_ID, "releases": releases}))
    key = secrets.token_hex(32).encode()
    (tmp_path / "ticket.secret").write_bytes(key)
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(root)}},
        extra={"tickets": {"keys": [{"id": "k1", "secret_file": str(tmp_path / "ticket.secret")}]}},
    )
    ctx = pki.client_context(pki.client)
    with run_gateway(cfg) as gw:
        answer = https_request(f"{gw.base_url}/bundles/{APP_ID}/1.0.0.zip", ctx)
        assert answer.status == 200 and answer.body == own  # a symlink inside the folder is followed
        answer = https_request(f"{gw.base_url}/bundles/{APP_ID}/1.0.1.zip", ctx)
        assert answer.status == 502 and answer.json()["reason"] == "origin_error"
        assert "outside the app's folder" in answer.json()["detail"] and secret_bytes not in answer.body

        def ticket(location: str, sha: str) -> str:
            sealed = seal(
                Ticket(APP_ID, "1.0.0", sha, "local", location, pki.client.sha256, int(time.time()) + 600, 4096),
                TicketKey("k1", key),
            )
            return f"{gw.base_url}/bundles/t/{sealed}/1.0.0.zip"

        refused = gw.metric("ota_gateway_download_tickets_total", result="refused")
        answer = https_request(ticket("../com.example.other/1.0.0.zip", sha_other), ctx)
        assert answer.status == 403 and answer.json()["reason"] == "ticket_invalid"
        assert gw.metric("ota_gateway_download_tickets_total", result="refused") == refused + 1
        answer = https_request(ticket("escape.zip", sha_other), ctx)  # a plain name, but a symlink that leads out
        assert answer.status == 502 and secret_bytes not in answer.body
        answer = https_request(ticket("1.0.0.zip", sha_own), ctx)  # the twin
        assert answer.status == 200 and answer.body == own
        answer = https_request(ticket("linked/1.0.0.zip", sha_other), ctx)  # a plain file behind a symlinked folder
        assert answer.status == 502 and secret_bytes not in answer.body
        assert "outside the app's folder" in answer.json()["detail"]
        answer = https_request(ticket("assets/1.0.0.zip", sha_own), ctx)  # its twin: a real subfolder
        assert answer.status == 200 and answer.body == own


# ---- memory: slow readers hold a bounded amount each ---------------------------------------------------------------


def test_twenty_stalled_readers_hold_bounded_memory(pki: Pki, tmp_path: Path) -> None:
    root = tmp_path / "origin"
    (root / APP_ID).mkdir(parents=True)
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    with (root / APP_ID / "9.0.0.zip").open("wb") as f:
        for _ in range(64):
            f.write(block)
            digest.update(block)
    import yaml

    release = {"version": "9.0.0", "channel": "production", "file": "9.0.0.zip", "size": 64 * 1024 * 1024}
    release["sha256"] = digest.hexdigest()
    (root / APP_ID / "releases.yaml").write_text(yaml.safe_dump({"app_id": APP_ID, "releases": [release]}))
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(root)}},
        extra={"limits": {"client_min_rate": 1, "rate_window": 600}},
    )
    with run_gateway(cfg) as gw:
        warm = https_request(f"{gw.base_url}/bundles/{APP_ID}/9.0.0.zip", pki.client_context(pki.client), timeout=60)
        assert warm.status == 200 and len(warm.body) == 64 * 1024 * 1024
        del warm
        base = rss_kib(gw)
        clients = [stalled_client(gw, pki, f"/bundles/{APP_ID}/9.0.0.zip") for _ in range(20)]
        try:
            assert wait_until(lambda: gw.metric("ota_gateway_downloads_in_flight") == 20, timeout=20)
            time.sleep(3)  # every buffer on the way fills up
            grown_mib = (rss_kib(gw) - base) / 1024
        finally:
            for tls in clients:
                tls.close()
        print(f"20 stalled readers: RSS +{grown_mib:.1f} MiB")
        assert grown_mib < 20 * 4, grown_mib  # about 2.5 MiB each is measured (bench/README.md); not 64 MiB


def rss_kib(gw: GatewayProcess) -> int:
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


class _InProcess:
    """An `HttpsOrigin` of the gateway in this process, against the test origin: bundle GETs and index calls, the
    pooled connections, and the overruns it counted."""

    def __init__(self, cdn: HttpsOrigin) -> None:
        from gateway.config import HttpsOriginConfig
        from gateway.origins import HttpsOrigin as Upstream

        self.overruns = 0
        self.upstream = Upstream("cdn", HttpsOriginConfig(**cdn.origin_config(index_ttl=0)), self._count)

    def _count(self) -> None:
        self.overruns += 1

    def pooled(self) -> int:
        return sum(len(c) for c in self.upstream._get_session().connector._conns.values())  # type: ignore[union-attr]

    async def bundle(self, app: str, file: str) -> bytes:
        from yarl import URL

        got = b""
        async with self.upstream.open_url(URL(self.upstream.locate(app, file))) as body:
            async for chunk in body.chunks:  # type: ignore[attr-defined]
                got += chunk
        return got


def test_bundle_gets_and_index_calls_share_one_pooled_connection(cdn: HttpsOrigin) -> None:
    data = os.urandom(50_000)
    cdn.publish("com.example.reuse", "1.0.0", data)
    first = len(cdn.state.ports)

    async def main() -> tuple[list[int], int]:
        origin = _InProcess(cdn)
        pooled = []
        try:
            for _ in range(3):
                await origin.upstream.index("com.example.reuse")
                pooled.append(origin.pooled())
            for _ in range(2):
                assert await origin.bundle("com.example.reuse", "1.0.0.zip") == data
                pooled.append(origin.pooled())
            await origin.upstream.index("com.example.reuse")
            pooled.append(origin.pooled())
            return pooled, origin.overruns
        finally:
            await origin.upstream.close()

    pooled, counted = asyncio.run(main())
    assert pooled == [1] * 6 and counted == 0
    assert len(set(cdn.state.ports[first:])) == 1  # one TLS connection to the origin carried all six
    bundle_headers = [h for p, h in cdn.state.headers if p.endswith("/com.example.reuse/1.0.0.zip")][-1]
    assert ("Connection", "close") not in bundle_headers


@pytest.mark.parametrize("mode", ["drop_reused", "drop"])
def test_a_get_that_meets_a_pooled_connection_closed_by_the_origin_is_sent_again_once(
    cdn: HttpsOrigin, mode: str
) -> None:
    """The origin closes a kept-alive connection as the next GET arrives on it (its keep-alive ran out): that GET is
    sent once more, on a new connection, and served. The twin: an origin that closes every connection on the
    request: a GET on a pooled connection is sent once more (twice in all), one on a new connection only once; both
    fail."""
    data = os.urandom(3_000)
    cdn.publish("com.example.drop", "1.0.0", data)
    first = len(cdn.state.ports)

    async def main() -> list[bytes | str]:
        origin = _InProcess(cdn)
        got: list[bytes | str] = []
        try:
            got.append(await origin.bundle("com.example.drop", "1.0.0.zip"))  # a new connection, pooled after it
            cdn.state.modes["com.example.drop/1.0.0.zip"] = mode
            for _ in range(2):
                try:
                    got.append(await origin.bundle("com.example.drop", "1.0.0.zip"))
                except OriginError as exc:
                    got.append(type(exc).__name__)
            return got
        finally:
            await origin.upstream.close()

    got = asyncio.run(main())
    ports = cdn.state.ports[first:]
    if mode == "drop_reused":  # the second and third GETs: on the pooled connection (closed), then on a new one
        assert got == [data, data, data]
        assert len(ports) == 5 and ports[1] == ports[0] and ports[3] == ports[2] and len(set(ports)) == 3
    else:  # the second: on the pooled one, then on a new one (closed too); the third: on a new one, not sent again
        assert got == [data, "OriginError", "OriginError"]
        assert len(ports) == 4 and ports[1] == ports[0] and len(set(ports)) == 3


@pytest.mark.parametrize("mode", ["past_length", "past_later_close", "ok"])
def test_bytes_past_content_length_are_past_length_on_a_get_sent_again_after_a_dropped_pooled_connection(
    cdn: HttpsOrigin, mode: str
) -> None:
    """The origin closes the pooled connection as the bundle GET arrives on it, then answers the GET sent again on
    a new connection with bytes past its Content-Length (with its last bytes, or 0.2 s later after announcing its
    close): still `PastLength`, as on a first attempt (the dead connection's end is not the new one's). The twin
    ("ok"): exactly Content-Length bytes on the new connection are served."""
    from gateway.origins import PastLength

    data = os.urandom(300 * 1024)
    cdn.publish("com.example.dropped", "1.0.0", data)
    cdn.state.modes["com.example.dropped/1.0.0.zip"] = "ok"
    first = len(cdn.state.ports)

    async def main() -> bytes | str:
        origin = _InProcess(cdn)
        try:
            assert await origin.bundle("com.example.dropped", "1.0.0.zip") == data  # pooled after it
            cdn.state.modes["com.example.dropped/1.0.0.zip"] = f"drop_reused+{mode}"
            try:
                return await origin.bundle("com.example.dropped", "1.0.0.zip")
            except PastLength as exc:
                return f"PastLength: {exc}"
        finally:
            await origin.upstream.close()

    got = asyncio.run(main())
    ports = cdn.state.ports[first:]
    assert len(ports) == 3 and ports[1] == ports[0] != ports[2]  # dropped on the pooled one, sent again on a new one
    if mode == "ok":
        assert got == data
    else:
        assert isinstance(got, str) and got.startswith("PastLength") and "past its Content-Length" in got, got[:200]


def test_an_https_origin_closed_and_used_again_in_another_event_loop_serves(cdn: HttpsOrigin) -> None:
    """`close()` forgets what named the closed session and its loop (the per-host request of `_send`), so the same
    origin object serves again from a new event loop."""
    data = os.urandom(5_000)
    cdn.publish("com.example.again", "1.0.0", data)
    origin = _InProcess(cdn)

    async def once() -> bytes:
        try:
            return await origin.bundle("com.example.again", "1.0.0.zip")
        finally:
            await origin.upstream.close()

    assert [asyncio.run(once()) for _ in range(2)] == [data, data]


def test_an_origin_retired_by_a_reload_never_opens_a_pool_again(cdn: HttpsOrigin) -> None:
    """A reload retires a replaced origin `shutdown_grace` seconds later (`Reloader._retire`): a request that still
    holds it after that gets an `OriginError` and no new connection pool, which nothing would ever close. The twin
    above: `close()` alone (not a retirement) lets the same object serve again."""
    from gateway.reload import Reloader

    data = os.urandom(5_000)
    cdn.publish("com.example.retired", "1.0.0", data)

    async def main() -> tuple[bytes, str, bool]:
        origin = _InProcess(cdn)
        assert await origin.bundle("com.example.retired", "1.0.0.zip") == data
        reloader = Reloader.__new__(Reloader)
        reloader._retired = set()
        reloader._retire(origin.upstream, 0.01)  # type: ignore[arg-type]
        await asyncio.gather(*reloader._retired)
        try:
            await origin.bundle("com.example.retired", "1.0.0.zip")
            after = "served"
        except OriginError as exc:
            after = str(exc)
        reopened = origin.upstream._session is not None
        await origin.upstream.close()
        return data, after, reopened

    _, after, reopened = asyncio.run(main())
    assert "retired by a reload" in after, after
    assert not reopened, "a retired origin made a new connection pool"


def test_a_get_while_an_https_origin_closes_is_refused_cleanly_and_it_serves_once_closed(cdn: HttpsOrigin) -> None:
    """A bundle GET that comes while `close()` waits for its pooled connection to close (a reload retiring the
    origin): an `OriginError`, never an AssertionError (a 500); a GET once `close()` is over gets a new pool."""
    data = os.urandom(5_000)
    cdn.publish("com.example.closing", "1.0.0", data)

    async def main() -> tuple[bool, bytes | str, bytes | str]:
        origin = _InProcess(cdn)

        async def get() -> bytes | str:
            try:
                return await origin.bundle("com.example.closing", "1.0.0.zip")
            except OriginError as exc:
                return f"OriginError: {exc}"

        try:
            assert await origin.bundle("com.example.closing", "1.0.0.zip") == data  # a pooled connection
            closing = asyncio.create_task(origin.upstream.close())
            await asyncio.sleep(0)  # close() now waits for that connection's TLS close
            in_window = not closing.done()
            during = await get()
            await closing
            return in_window, during, await get()
        finally:
            await origin.upstream.close()

    in_window, during, after = asyncio.run(main())
    assert in_window
    assert isinstance(during, str) and during.startswith("OriginError") and "retired" in during, during
    assert after == data


@pytest.mark.parametrize("mode", ["chunked_short", "extra"])
def test_a_chunked_body_cut_half_way_is_a_short_body(cdn: HttpsOrigin, mode: str) -> None:
    """A chunked bundle body (framed by the parser) whose origin closes half way while nobody waits for the body's
    next bytes: `ShortBody`, not an origin error named a malformed body. The twin ("extra"): the whole chunked body
    arrives."""
    from yarl import URL

    from gateway.origins import ShortBody

    data = os.urandom(20 * 1024)  # half of it fits in the connection's buffers: the close is seen at once
    cdn.publish("com.example.chunked", "1.0.0", data)
    cdn.state.modes["com.example.chunked/1.0.0.zip"] = mode

    async def main() -> bytes | str:
        origin = _InProcess(cdn)
        try:
            got = b""
            async with origin.upstream.open_url(
                URL(origin.upstream.locate("com.example.chunked", "1.0.0.zip"))
            ) as body:
                async for chunk in body.chunks:  # type: ignore[attr-defined]
                    got += chunk
                    await asyncio.sleep(0.5)  # the origin's close comes meanwhile
            return got
        except OriginError as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            await origin.upstream.close()

    got = asyncio.run(main())
    if mode == "extra":
        assert got == data + b"\x00" * 4096  # chunked, no Content-Length: all the origin sent, verified elsewhere
    else:
        assert isinstance(got, str) and got.startswith(ShortBody.__name__), got


class ThreadedTlsOrigin:
    """A hand-written TLS origin on a thread: each accepted connection is served by `handler(conn)` on a thread of
    its own (`handler` picks it); stops with the `with` block."""

    def __init__(self, cdn: HttpsOrigin, name: str) -> None:
        self.ctx = cdn.server_context()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.accepted = 0
        self.thread = threading.Thread(target=self.serve, daemon=True, name=name)

    def handler(self) -> Callable[[socket.socket], None]:
        raise NotImplementedError

    def serve(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self.handler(), args=(conn,), daemon=True).start()

    @staticmethod
    def request(tls: ssl.SSLSocket) -> bytes:
        """One request's head; raises ConnectionError when the client leaves first."""
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = tls.recv(65536)
            if not chunk:
                raise ConnectionError("the client left")
            got += chunk
        return got

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(5)


class KeepAliveThenMute(ThreadedTlsOrigin):
    """An origin whose first connection answers one GET (`{}`, kept alive), then holds the next GET `hold` seconds
    and closes with no answer; every later connection is accepted but never gets a TLS handshake: silent until the
    client leaves, which `left_after` records (seconds after that close)."""

    def __init__(self, cdn: HttpsOrigin, hold: float) -> None:
        super().__init__(cdn, "keep-alive-then-mute")
        self.hold = hold
        self.dropped_at: float | None = None
        self.left_after: list[float] = []

    def handler(self) -> Callable[[socket.socket], None]:
        return self.first if self.accepted == 1 else self.mute

    def first(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                self.request(tls)
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                self.request(tls)
                time.sleep(self.hold)
                self.dropped_at = time.monotonic()
                tls.settimeout(2)
                with contextlib.suppress(OSError, ValueError):
                    tls.unwrap()  # close_notify: the origin's end of the connection, with no answer
        except OSError:
            conn.close()

    def mute(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with contextlib.suppress(OSError):
            while conn.recv(65536):  # the ClientHello, then nothing until the client leaves
                pass
        if self.dropped_at is not None:
            self.left_after.append(time.monotonic() - self.dropped_at)
        conn.close()


def test_a_get_sent_again_has_only_the_rest_of_total_timeout_to_connect(cdn: HttpsOrigin) -> None:
    """The pooled connection is closed by the origin 3.4 s into a bundle GET whose total_timeout is 4 s, and the new
    connection for the GET sent again never completes its TLS handshake: that connection is given up when the
    total_timeout is over (about 0.6 s later), not after a total_timeout of its own (4 s), as `origin_too_slow`."""
    from yarl import URL

    from gateway.config import HttpsOriginConfig
    from gateway.origins import HttpsOrigin as Upstream
    from gateway.origins import OriginTooSlow

    async def main(port: int) -> tuple[bytes, str]:
        config = {"type": "https", "url": f"https://127.0.0.1:{port}/", "ca": str(cdn.ca_pem)}
        upstream = Upstream("mute", HttpsOriginConfig(**config, total_timeout=4, connect_timeout=10))
        url = URL(f"https://127.0.0.1:{port}/com.example.mute/1.0.0.zip")
        try:
            async with upstream.open_url(url) as body:
                got = b"".join([bytes(c) async for c in body.chunks])  # type: ignore[attr-defined]
            try:
                async with upstream.open_url(url) as body:
                    return got, "served"
            except OriginTooSlow as exc:
                return got, str(exc)
        finally:
            await upstream.close()

    with KeepAliveThenMute(cdn, hold=3.4) as origin:
        got, second = asyncio.run(main(origin.port))
        assert wait_until(lambda: len(origin.left_after) == 1, timeout=10)
    assert got == b"{}" and "total_timeout" in second, second
    assert origin.accepted == 2
    assert origin.left_after[0] < 2.0, origin.left_after  # about 0.6 s; 4 s when the retry had a deadline of its own


def test_an_origins_cookie_is_never_sent_back_and_no_content_coding_is_asked_for(cdn: HttpsOrigin) -> None:
    data = os.urandom(5_000)
    cdn.publish("com.example.cookie", "1.0.0", data)
    cdn.state.modes["com.example.cookie/1.0.0.zip"] = "set_cookie"
    url = cdn.url + "com.example.cookie/1.0.0.zip"

    async def through_the_gateway() -> None:
        origin = _InProcess(cdn)
        try:
            for _ in range(2):
                assert await origin.bundle("com.example.cookie", "1.0.0.zip") == data
        finally:
            await origin.upstream.close()

    async def through_a_client_with_a_jar() -> None:  # the twin: a jar (that takes an IP host's) sends it back
        ctx = ssl.create_default_context(cafile=str(cdn.ca_pem))
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            for _ in range(2):
                async with session.get(url, ssl=ctx) as resp:
                    assert await resp.read() == data

    def sent() -> list[list[tuple[str, str]]]:
        return [h for p, h in cdn.state.headers if p.endswith("/com.example.cookie/1.0.0.zip")]

    asyncio.run(through_the_gateway())
    gateway = sent()
    assert len(gateway) == 2
    for headers in gateway:
        assert not [v for k, v in headers if k.lower() == "cookie"]
        assert [v for k, v in headers if k.lower() == "accept-encoding"] == ["identity"]
    asyncio.run(through_a_client_with_a_jar())
    default = sent()[2:]
    assert [v for k, v in default[1] if k.lower() == "cookie"] == ["origin_session=secret-of-the-first-client"]
    assert [v for k, v in default[0] if k.lower() == "accept-encoding"] != ["identity"]


def _bundle_then_index(
    cdn: HttpsOrigin, app_id: str, mode: str, pause: Callable[[], Awaitable[None]]
) -> tuple[int, int]:
    """One bundle GET through an in-process origin client, `pause`, then an index call that must get the real index:
    (overruns counted, origin TLS connections used)."""
    data = os.urandom(20_000)
    cdn.publish(app_id, "1.0.0", data)
    cdn.state.modes[f"{app_id}/1.0.0.zip"] = mode
    first = len(cdn.state.ports)

    async def main() -> int:
        origin = _InProcess(cdn)
        try:
            assert await origin.bundle(app_id, "1.0.0.zip") == data  # exactly the published bytes
            await pause()
            index = await origin.upstream.index(app_id)
            assert [r.version for r in index.releases] == ["1.0.0"]
            return origin.overruns
        finally:
            await origin.upstream.close()

    counted = asyncio.run(main())
    return counted, len(set(cdn.state.ports[first:]))


@pytest.mark.parametrize("mode", ["ok", "forge_later"])
def test_an_answer_forged_on_an_idle_pooled_connection_is_an_overrun_never_the_next_answer(
    cdn: HttpsOrigin, mode: str
) -> None:
    """0.2 s after a bundle, the origin writes a whole second answer on the kept-alive connection while it waits in
    the pool: counted as an overrun, the connection dropped, and the next index call gets the real index on a new
    connection. The twin ("ok") reuses the connection and counts nothing."""

    async def loop_runs() -> None:
        for _ in range(40):  # the event loop runs, so the forged bytes are read as they come
            await asyncio.sleep(0.05)

    counted, connections = _bundle_then_index(cdn, "com.example.forge", mode, loop_runs)
    assert (counted, connections) == ((1, 2) if mode == "forge_later" else (0, 1))


@pytest.mark.parametrize("mode", ["ok", "forge_later"])
def test_unread_bytes_in_a_pooled_socket_are_never_read_as_the_next_answer(cdn: HttpsOrigin, mode: str) -> None:
    """The event loop is held while the forged answer arrives, so it still waits unread in the socket when the next
    request takes a connection from the pool: that connection is dropped, never read. The twin reuses it."""

    async def loop_held() -> None:
        time.sleep(1.0)  # noqa: ASYNC251 - on purpose: the loop reads nothing meanwhile

    _, connections = _bundle_then_index(cdn, "com.example.unread", mode, loop_held)
    assert connections == (2 if mode == "forge_later" else 1)


# ---- a chunked body the parser cannot frame, from an origin that then keeps its connection open ---------------------


class DeafChunkedOrigin(ThreadedTlsOrigin):
    """Serves `<app>/releases.json` for one release and answers its file with a chunked body whose chunk size is
    not hexadecimal; then it neither reads nor closes (a TLS close from the gateway goes unanswered) until stopped."""

    def __init__(self, cdn: HttpsOrigin, data: bytes) -> None:
        super().__init__(cdn, "deaf-chunked-origin")
        self.data = data
        self.index = {
            "app_id": APP_ID,
            "releases": [
                {
                    "version": "1.0.0",
                    "channel": "production",
                    "file": "1.0.0.zip",
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            ],
        }

    def answer(self, tls: ssl.SSLSocket) -> None:
        while True:
            try:
                request = self.request(tls)
            except ConnectionError:
                return
            if b"releases.json" in request.split(b"\r\n", 1)[0]:
                body = json.dumps(self.index).encode()
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                continue
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            tls.sendall(head + b"%x\r\n" % 4096 + self.data[:4096] + b"\r\nnot-hex\r\n" + self.data[4096:8192])
            self.stop.wait(30)  # deaf: reads nothing more, closes nothing
            return

    def handler(self) -> Callable[[socket.socket], None]:
        return self.handle

    def handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                self.answer(tls)
        except OSError:
            conn.close()


def test_a_chunked_body_that_cannot_be_parsed_is_an_origin_error_at_once(
    cdn: HttpsOrigin, pki: Pki, tmp_path: Path
) -> None:
    """The parser's error ends the download at once as `origin_error`, not after the origin's minimum-rate window
    (counted as too slow) because the origin never answers the TLS close that follows the error."""
    data = os.urandom(100 * 1024)
    window = 6.0
    with DeafChunkedOrigin(cdn, data) as deaf:
        origin = {"type": "https", "url": f"https://127.0.0.1:{deaf.port}/", "ca": str(cdn.ca_pem), "read_timeout": 20}
        cfg = write_config(
            tmp_path / "gw",
            pki,
            origins={"deaf": origin},
            extra={"limits": {"origin_min_rate": 1, "rate_window": window}},
        )
        with run_gateway(cfg) as process:
            started = time.monotonic()
            _head, body, _ = raw_get(process, pki, f"/bundles/{APP_ID}/1.0.0.zip")
            elapsed = time.monotonic() - started
            assert len(body) < len(data)
            record = audit_for(process, "/bundles/")
            assert (record["outcome"], record["reason"]) == ("aborted", "origin_error"), record
            assert "malformed body" in record["detail"] and "not-hex" not in record["detail"], record["detail"]
            assert elapsed < window / 2, elapsed


def test_the_twin_a_chunked_body_with_extensions_and_a_trailer_arrives_whole(
    cdn: HttpsOrigin, pki: Pki, tmp_path: Path
) -> None:
    """Chunk extensions and a trailer field are valid HTTP/1.1: the bundle is served byte for byte."""
    data = os.urandom(100 * 1024)

    class Framed(DeafChunkedOrigin):
        def answer(self, tls: ssl.SSLSocket) -> None:
            request = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    return
                request += chunk
                while b"\r\n\r\n" in request:
                    line, _, request = request.partition(b"\r\n\r\n")
                    if b"releases.json" in line.split(b"\r\n", 1)[0]:
                        body = json.dumps(self.index).encode()
                        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                        continue
                    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                    for at in range(0, len(self.data), 8192):
                        piece = self.data[at : at + 8192]
                        out += b"%x;piece=%d\r\n" % (len(piece), at) + piece + b"\r\n"
                    tls.sendall(out + b"0\r\nX-Sum: whatever\r\n\r\n")

    with Framed(cdn, data) as framed:
        origin = {"type": "https", "url": f"https://127.0.0.1:{framed.port}/", "ca": str(cdn.ca_pem)}
        cfg = write_config(tmp_path / "gw", pki, origins={"framed": origin})
        with run_gateway(cfg) as process:
            answer = https_request(f"{process.base_url}/bundles/{APP_ID}/1.0.0.zip", pki.client_context(pki.client))
            assert answer.status == 200 and answer.body == data


# ---- an origin's malformed answer is named, never echoed -------------------------------------------------------------


class ScriptedAnswer(ThreadedTlsOrigin):
    """Answers every request on every connection with `answer`, in one write, then closes."""

    def __init__(self, cdn: HttpsOrigin, answer: bytes) -> None:
        super().__init__(cdn, "scripted-answer")
        self.answer = answer

    def handler(self) -> Callable[[socket.socket], None]:
        return self.answer_once

    def answer_once(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                self.request(tls)
                tls.sendall(self.answer)
                time.sleep(0.5)
        except OSError:
            conn.close()


LEAK = b"origin-secret"
MALFORMED = {  # what the origin sends -> how aiohttp's parser names it (what the detail keeps)
    "no status line": (LEAK + b" ") * 3000,
    "a CR inside a header": b"HTTP/1.1 200 OK\r\nX-Leak: " + LEAK + b"\rx\r\nContent-Length: 2\r\n\r\n{}",
    "an endless status line": b"HTTP/1.1 200 " + LEAK * 1000 + b"\r\nContent-Length: 2\r\n\r\n{}",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_answer_is_named_without_echoing_the_origins_bytes(
    cdn: HttpsOrigin, pki: Pki, tmp_path: Path, case: str
) -> None:
    """The parser's verdict on a malformed answer head (a release index GET, an update call) reaches the client's
    answer, the audit line and /readyz by name only: none of the origin's bytes. They were echoed, up to 145 KB of a
    bundle in one problem+json answer, one audit line and /readyz. The twin: the verdict is still named."""
    with ScriptedAnswer(cdn, MALFORMED[case]) as origin:
        config = {"type": "https", "url": f"https://127.0.0.1:{origin.port}/", "ca": str(cdn.ca_pem)}
        cfg = write_config(tmp_path, pki, origins={"bad": {**config, "updates_path": "updates"}})
        with run_gateway(cfg) as gw:
            ctx = pki.client_context(pki.client)
            bundle = https_request(f"{gw.base_url}/bundles/{APP_ID}/1.0.0.zip", ctx)
            update = capgo_call(f"{gw.base_url}/updates", ctx, device_body())
            ready = https_ready(gw)
            assert wait_until(lambda: len(gw.audit()) == 2)
            lines = gw.audit_path.read_text().splitlines()
    assert bundle.status == 502 and bundle.json()["reason"] == "origin_error"
    assert update.json()["error"] == "origin_error"
    details = [bundle.json()["detail"], update.json()["message"], *ready["reasons"], *lines]
    for text in details:
        assert LEAK.decode() not in text and len(text) < 1000, text[:300]
    for text in details[:3]:
        assert "HTTP response" in text, text  # the verdict, named
