"""A real HTTPS origin for tests (aiohttp, its own CA), which a test can tell to misbehave.

Serves `/<app_id>/releases.json` and the files it lists. `mode` per file: "ok", "flip:<offset>" (one flipped byte),
"extra" (chunked, more bytes than declared in the index), "short" (closes before the end), "chunked_short"
(chunked, closes half way), "error" (HTTP 500),
"stall" (sends half, then waits), "wrong_length" (Content-Length larger than the file), "stall_watch" (sends half,
then waits until the peer disconnects and records that in `disconnects`), "redirect:<url>" (302 to that URL),
"location:<value>" (302 with that Location header as it is, valid or not).
"slow:<seconds>" (the whole body, spread over that many seconds), "trickle:<seconds>" (one byte every that many
seconds, until the peer leaves), "past_length" (the body, then bytes past its Content-Length, sent together with its
last bytes), "past_later" (the body, then 0.2 s later bytes past it), "past_later_close" (the same, with
`Connection: close` in the answer), "past_one_write" (status line, headers, body and bytes past it in one write),
"forge_later" (the whole answer, then 0.2 s later a forged second answer on the same kept-alive connection, which
stays open), "drop_reused" (a connection that served a request before is closed on this one, with no answer: an
origin whose keep-alive ran out as the request came), "drop_reused+<mode>" (the same, then a new connection is
served in <mode>), "drop" (every connection closed on the request, no answer).
Records every request (`requests`), its headers (`headers`) and the client port it came from (`ports`:
one port per connection).
`index_modes[app] = "huge"` streams an endless release index (what it managed to send is in `index_bytes_sent`).

Also a Capgo-style update server: POST /updates answers `update_answers[app_id]` (a dict, or a function of the
request body returning one; default: no new version), POST /stats records the events and answers like the
backend, /channel_self records the call and answers `channel_answer`. Bodies and User-Agents are recorded in
`capgo_calls` as (path, method, body, user agent), their headers in `headers` too. With `updates_gate` set,
POST /updates is recorded and then held until the test sets the event (at most 20 s), to keep an update check in
flight.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web

from gateway.tls import libssl


@dataclass
class OriginState:
    files: dict[str, bytes] = field(default_factory=dict)  # "<app>/<file>" -> bytes
    indexes: dict[str, Any] = field(default_factory=dict)  # app -> index document
    modes: dict[str, str] = field(default_factory=dict)  # "<app>/<file>" -> mode
    requests: list[str] = field(default_factory=list)
    # (path, every request header as (name, value) pairs, repeats kept), in the order the requests came
    headers: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)  # "<app>/<file>" of "stall_watch" bodies the peer left
    ports: list[int] = field(default_factory=list)  # the client port of each request, in order
    ciphers: list[tuple[str, str]] = field(default_factory=list)  # (TLS suite, version) of each request, in order
    chunk: int = 16 * 1024
    update_answers: dict[str, Any] = field(default_factory=dict)  # app -> answer dict or fn(body) -> answer
    channel_answer: Any = None
    capgo_calls: list[tuple[str, str, Any, str]] = field(default_factory=list)
    busy_retry_after: str | None = None  # when set, every Capgo endpoint answers 429 with this Retry-After
    index_modes: dict[str, str] = field(default_factory=dict)  # app -> "huge"
    index_bytes_sent: int = 0
    updates_gate: threading.Event | None = None  # when set, POST /updates waits for it (at most 20 s)


def build_origin_app(state: OriginState) -> web.Application:
    def record(request: web.Request) -> None:
        state.requests.append(request.path)
        state.headers.append((request.path, list(request.headers.items())))
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        state.ports.append(peer[1] if peer else 0)
        tls = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
        if tls is not None:
            state.ciphers.append((tls.cipher()[0], tls.version()))

    async def index(request: web.Request) -> web.StreamResponse:
        record(request)
        if state.index_modes.get(request.match_info["app"]) == "huge":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(b'{"app_id": "x", "releases": [')
            filler = b'{"version": "1.0.0", "padding": "' + b"x" * 65000 + b'"},'
            for _ in range(10_000):  # 650 MB if nobody stops reading
                await resp.write(filler)
                state.index_bytes_sent += len(filler)
                # yield, so that a reset by the gateway is seen (the next write raises): asyncio drops writes to a
                # dead socket silently until connection_lost has run, which a loop that never waits never lets run.
                # A TLS close_notify from the gateway does not stop this origin: it is endless on purpose.
                await asyncio.sleep(0)
            return resp
        doc = state.indexes.get(request.match_info["app"])
        if doc is None:
            raise web.HTTPNotFound()
        return web.json_response(doc)

    async def bundle(request: web.Request) -> web.StreamResponse:
        record(request)
        key = f"{request.match_info['app']}/{request.match_info['file']}"
        data = state.files.get(key)
        if data is None:
            raise web.HTTPNotFound()
        mode = state.modes.get(key, "ok")
        if mode.startswith("redirect:"):
            raise web.HTTPFound(mode.split(":", 1)[1])
        if mode.startswith("location:"):  # not through HTTPFound, which parses (and refuses) a malformed URL
            return web.Response(status=302, headers={"Location": mode.split(":", 1)[1]})
        reused = state.ports[-1] in state.ports[:-1]
        if mode == "drop" or (mode.split("+")[0] == "drop_reused" and reused):
            assert request.transport is not None
            request.transport.close()  # no answer: the connection ends on the request
            return web.Response()  # never sent: the transport is closed
        if mode.startswith("drop_reused+"):
            mode = mode.split("+", 1)[1]
        if mode == "error":
            raise web.HTTPInternalServerError()
        if mode.startswith("flip:"):
            at = int(mode.split(":")[1]) % len(data)
            data = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
        if mode == "past_one_write":
            assert request.transport is not None
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\nContent-Length: {len(data)}\r\n\r\n"
            request.transport.write(head.encode() + data + b"EXTRA" * 40)
            await asyncio.sleep(0.5)
            request.transport.close()
            return web.Response()  # never sent: the transport is closed
        resp = web.StreamResponse(headers={"Content-Type": "application/zip"})
        if mode == "extra":
            resp.enable_chunked_encoding()
            data = data + b"\x00" * 4096
        elif mode == "chunked_short":
            resp.enable_chunked_encoding()
        elif mode == "wrong_length":
            resp.content_length = len(data) + 10
        else:
            resp.content_length = len(data)
        if mode == "past_later_close":
            resp.force_close()  # the answer says `Connection: close`
        if mode == "set_cookie":
            resp.set_cookie("origin_session", "secret-of-the-first-client")
        await resp.prepare(request)
        if mode.startswith("trickle:"):
            pause = float(mode.split(":", 1)[1])
            for i in range(len(data)):
                if request.transport is None or request.transport.is_closing():
                    state.disconnects.append(key)
                    return resp
                await resp.write(data[i : i + 1])
                await asyncio.sleep(pause)
            return resp
        if mode == "past_length":
            assert request.transport is not None
            await resp.write(data[:-100])
            request.transport.write(data[-100:] + b"EXTRA" * 40)  # one TLS record: the end and what follows
            await asyncio.sleep(0.5)
            request.transport.close()
            return resp
        if mode == "forge_later":
            transport = request.transport
            assert transport is not None
            await resp.write(data)
            await resp.write_eof()
            forged = b'{"forged": true}'
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(forged)}\r\n\r\n"

            def forge() -> None:
                if not transport.is_closing():
                    transport.write(head.encode() + forged)

            asyncio.get_running_loop().call_later(0.2, forge)
            return resp
        if mode in ("past_later", "past_later_close"):
            assert request.transport is not None
            await resp.write(data)
            await asyncio.sleep(0.2)
            request.transport.write(b"EXTRA" * 40)  # after the body, in a read of its own
            await asyncio.sleep(0.5)
            request.transport.close()
            return resp
        if mode.startswith("slow:"):
            # the whole body, spread evenly over that many seconds: first piece at once, last one at the end
            seconds, pieces = float(mode.split(":", 1)[1]), 20
            step = max(1, -(-len(data) // pieces))
            for i in range(0, len(data), step):
                if i:
                    await asyncio.sleep(seconds / (pieces - 1))
                await resp.write(data[i : i + step])
            await resp.write_eof()
            return resp
        limit = len(data) // 2 if mode in ("short", "chunked_short", "stall", "stall_watch") else len(data)
        for i in range(0, limit, state.chunk):
            await resp.write(data[i : min(i + state.chunk, limit)])
        if mode == "stall":
            await asyncio.sleep(3600)
        if mode == "stall_watch":
            for _ in range(1200):  # at most a minute
                if request.transport is None or request.transport.is_closing():
                    state.disconnects.append(key)
                    break
                await asyncio.sleep(0.05)
            return resp
        if mode in ("short", "chunked_short", "wrong_length"):
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    async def capgo(request: web.Request) -> web.StreamResponse:
        body: Any = dict(request.query) if request.method == "GET" else await request.json()
        state.capgo_calls.append((request.path, request.method, body, request.headers.get("User-Agent", "")))
        state.headers.append((request.path, list(request.headers.items())))
        if state.busy_retry_after is not None:
            return web.json_response(
                {"error": "too_many_requests"}, status=429, headers={"Retry-After": state.busy_retry_after}
            )
        if request.path == "/updates":
            gate = state.updates_gate
            for _ in range(1000):
                if gate is None or gate.is_set():
                    break
                await asyncio.sleep(0.02)
            answer = state.update_answers.get(body.get("app_id"))
            if callable(answer):
                answer = answer(body)
            if answer is None:
                answer = {"error": "no_new_version_available", "message": "No new version available"}
            return web.json_response(answer)
        if request.path == "/updates/manifest_size":
            sizes = {e.get("file_name"): 1000 + i for i, e in enumerate(body.get("manifest", []))}
            return web.json_response({"version": body.get("version"), "sizes": sizes})
        if request.path == "/stats":
            if isinstance(body, list):
                return web.json_response(
                    {"status": "ok", "results": [{"status": "ok", "index": i} for i in range(len(body))]}
                )
            return web.json_response({"status": "ok"})
        return web.json_response(state.channel_answer if state.channel_answer is not None else {"status": "ok"})

    app = web.Application()
    app.router.add_post("/updates", capgo)
    app.router.add_post("/stats", capgo)
    app.router.add_post("/updates/manifest_size", capgo)
    app.router.add_route("*", "/channel_self", capgo)
    app.router.add_get("/{app}/releases.json", index)
    app.router.add_get("/{app}/{file}", bundle)
    return app


class HttpsOrigin:
    """Runs `build_origin_app` on 127.0.0.1 with a certificate from its own CA, in a thread with its own loop,
    so that tests can use blocking clients (curl, openssl, http.client) against a gateway in front of it."""

    def __init__(self, directory: Path, *, tls13_suites: str | None = None) -> None:
        """`tls13_suites`: the only TLS 1.3 suites this origin accepts (unset: OpenSSL's default three)."""
        self.tls13_suites = tls13_suites
        self.state = OriginState()
        self.ca = trustme.CA()
        self.ca_pem = directory / "origin-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))
        self.cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.options &= (
            ~ssl.OP_CIPHER_SERVER_PREFERENCE
        )  # the client's order decides, as in OpenSSL's and nginx's default
        self.cert.configure_cert(ctx)
        if self.tls13_suites is not None:
            libssl().set_ciphersuites(ctx, self.tls13_suites)
        return ctx

    def start(self) -> None:
        ready = threading.Event()

        async def main() -> None:
            runner = web.AppRunner(build_origin_app(self.state), access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.server_context())
            await site.start()
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            ready.set()
            await self._stop.wait()
            await runner.cleanup()
            # A connection whose peer hung up mid-body can still be in its TLS shutdown here; left to the garbage
            # collector it would warn about an unclosed transport (an error under filterwarnings=error).
            loop = asyncio.get_running_loop()
            for transport in list(getattr(loop, "_transports", {}).values()):
                transport.abort()
            for _ in range(3):
                await asyncio.sleep(0)

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True, name="test-origin")
        self._thread.start()
        if not ready.wait(10):
            raise AssertionError("test origin did not start")

    def stop(self) -> None:
        """Stop serving (idempotent: a test may stop the origin before the fixture does)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._loop = None
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> HttpsOrigin:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    def origin_config(self, **extra: Any) -> dict[str, Any]:
        return {"type": "https", "url": self.url, "ca": str(self.ca_pem), **extra}

    def publish(
        self, app: str, version: str, data: bytes, *, channel: str = "production", file: str | None = None
    ) -> None:
        import hashlib

        name = file or f"{version}.zip"
        self.state.files[f"{app}/{name}"] = data
        doc = self.state.indexes.setdefault(app, {"app_id": app, "releases": []})
        doc["releases"] = [r for r in doc["releases"] if r["version"] != version]
        doc["releases"].append(
            {
                "version": version,
                "channel": channel,
                "file": name,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )


def dump_index(doc: dict[str, Any]) -> str:
    return json.dumps(doc)
