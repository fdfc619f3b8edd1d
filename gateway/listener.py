"""Listeners: accepting connections, the TLS handshake, connection caps and the timeouts of every connection.

Owns the handshake of every public connection, and for every listener (mTLS, plain HTTP, admin) the life of a
connection around aiohttp's HTTP protocol: the caps checked at accept (`ConnectionBudget`, decided by
core/connguard.py: over a cap a new connection is closed at once and counted), the header, body and keep-alive
idle timeouts (`GuardedRequestHandler`: 408 problem details while HTTP can still answer, else a quiet close;
counted by cause), and the answers aiohttp's parser gives before any application sees the request (malformed
request line, oversized headers, bad chunked encoding): problem details without an echo of the client's bytes,
one log line, and handed to the recorder (`gateway/recorder.py`, `Recorder.low_level`) for the audit line and the
counters.

Starting TLS per connection (`loop.start_tls`) instead of passing an SSLContext to `create_server` gives the
gateway every handshake outcome (counted by cause, even those OpenSSL rejects before any HTTP request), a
handshake timeout of its own, and the current SSLContext for each new connection, so certificate material can be
swapped without a restart. After the handshake the leaf certificate must carry the clientAuth EKU (OpenSSL
accepts certificates without any EKU; the gateway does not).

Bytes that arrive between the end of the handshake and the switch to the HTTP protocol are buffered and passed on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.core.connguard import (
    Caps,
    Counts,
    Phase,
    Timeouts,
    admit,
    deadline,
    due,
    fired_early,
    makes_room,
    timer_needed,
    waiting,
)
from gateway.core.handshake import classify
from gateway.core.identity import identity_from_der
from gateway.core.reasons import Reason, Refusal
from gateway.core.revocation import RevocationSet
from gateway.metrics import Metrics
from gateway.tls import HANDSHAKE_ALERTS, ListenerMaterial

log = logging.getLogger("ota_gateway.tls")
http_log = logging.getLogger("ota_gateway.http")


class _Acceptor(asyncio.Protocol):
    """Protocol of a fresh TCP connection until its TLS handshake is done."""

    def __init__(self, listener: TlsListenerServer) -> None:
        self._listener = listener
        self._pending = bytearray()
        self._lost = False
        self._transport: asyncio.Transport | None = None
        self._slot: Slot | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass
        HANDSHAKE_ALERTS.set(self._send_alert)  # a failed handshake's alert goes out here (tls.AlertingSSLObject)
        budget = self._listener.budget
        if budget is not None:
            self._slot = budget.open_slot(
                self._listener.name, _peer_ip(transport), tls=True, abort=self._close_for_room
            )
            if self._slot is None:
                self._lost = True
                cast(asyncio.Transport, transport).abort()  # over a cap: closed before any TLS work
                return
        self._listener.spawn(self._handshake(transport))  # type: ignore[arg-type]

    def _close_for_room(self) -> None:
        """Closed to make room at a cap: its handshake ends as `aborted` (uvloop's start_tls returns the aborted
        connection as if its handshake had ended, which read as a client without a certificate)."""
        self._lost = True
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self._lost:
            self._pending += data  # application data decrypted before the HTTP protocol took over

    def _send_alert(self, alert: bytes) -> None:
        """The alert OpenSSL made for a failed handshake, written to the raw connection before it is dropped."""
        transport = self._transport
        if transport is not None and not self._lost and not transport.is_closing():
            transport.write(alert)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True

    async def _handshake(self, raw: asyncio.Transport) -> None:
        slot = self._slot
        handed_over = False
        try:
            handed_over = await self._handshake_and_hand_over(raw)
        except Exception:
            raw.abort()  # never left open with this protocol, which has no deadline and buffers what it reads
            raise
        finally:
            self._transport = None  # the alert sink (kept by the transport's context) holds no transport after
            if slot is not None:
                if handed_over:
                    slot.handshake_done()
                else:
                    slot.release()  # ends its handshake too

    async def _handshake_and_hand_over(self, raw: asyncio.Transport) -> bool:
        """True when the connection went to the HTTP protocol (which then owns the slot)."""
        listener = self._listener
        loop = asyncio.get_running_loop()
        early = bytes(self._pending)
        self._pending.clear()
        if early:
            # uvloop starts reading right after connection_made, so the ClientHello can reach this protocol before
            # start_tls takes the transport over. start_tls swaps the protocol synchronously and schedules the
            # handshake with call_soon, so this callback (scheduled first) runs in between and hands the bytes over.
            loop.call_soon(_feed_early, raw, self, early)
        material = listener.material()
        started = loop.time()
        try:
            tls = await loop.start_tls(
                raw,
                self,
                material.context,
                server_side=True,
                ssl_handshake_timeout=listener.handshake_timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            listener.failed(classify(exc.reason, exc.verify_code), exc)
            raw.abort()
            return False
        except ssl.SSLError as exc:
            listener.failed(classify(exc.reason, None), exc)
            raw.abort()
            return False
        except TimeoutError as exc:
            listener.failed("timeout", exc)
            raw.abort()
            return False
        except (ConnectionError, OSError) as exc:
            # asyncio's and uvloop's SSLProtocol report their own handshake timeout as ConnectionAbortedError
            timed_out = isinstance(exc, ConnectionAbortedError) and loop.time() - started >= listener.handshake_timeout
            listener.failed("timeout" if timed_out else "aborted", exc)
            raw.abort()
            return False
        except ValueError as exc:
            # UnicodeDecodeError: at the end of the handshake the event loop's getpeercert() decodes every name of
            # the client's certificate, and fails on one that is not text (a DNS name of raw bytes a CA signed)
            listener.failed("other", f"client certificate names cannot be decoded: {exc!r}")
            raw.abort()
            return False
        if tls is None or self._lost:
            listener.failed("aborted", None)
            raw.abort()
            return False
        ssl_object = tls.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None:
            listener.failed("no_cert", None)
            tls.abort()
            return False
        try:
            identity = identity_from_der(der)
        except ValueError as exc:  # OpenSSL accepted what cryptography cannot parse (a PrintableString with '_')
            listener.failed("other", f"client certificate cannot be parsed: {exc}")
            tls.abort()
            return False
        if not identity.client_auth_eku:
            listener.failed("purpose", None)
            tls.abort()
            return False
        if material.pinned_out(identity.spki_sha256, identity.sha256):
            listener.failed("pin", identity.sha256)
            tls.abort()
            return False
        revoked = material.revocation.check(identity, dt.datetime.now(dt.UTC))
        if revoked:
            listener.failed("revoked", revoked)
            tls.abort()
            return False
        listener.handshakes_ok.inc()
        protocol = listener.protocol_factory()
        if isinstance(protocol, GuardedRequestHandler):
            protocol.attach(self._slot)
            memo = protocol.memo
            memo["der"] = der  # the request's identity reads it from there, not again from OpenSSL
            memo["listener"] = listener.name  # whose headers (HSTS) its answers carry, without a sockname lookup
            if self._slot is not None:
                memo["ip"] = self._slot.address  # the audit line's peer address, read at accept
        tls.set_protocol(protocol)
        protocol.connection_made(tls)
        if self._pending:
            protocol.data_received(bytes(self._pending))
            self._pending.clear()
        return True


def quiet_handshake_reports(loop: asyncio.AbstractEventLoop) -> None:
    """Send the event loop's own report of a failed handshake to debug.

    asyncio and uvloop report a handshake that failed with anything but an OSError (a certificate name their
    getpeercert() cannot decode) as an error with a traceback; the listener counts and logs that handshake itself
    (`TlsListenerServer.failed`). Every other report of the loop keeps its default handling."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("SSL handshake failed"):
            log.debug("%s: %r", context["message"], context.get("exception"))
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def _feed_early(raw: asyncio.Transport, acceptor: _Acceptor, data: bytes) -> None:
    """Give bytes read before start_tls to the TLS protocol, which buffers them until its handshake starts."""
    # both asyncio's and uvloop's SSLProtocol take data through get_buffer/buffer_updated
    current = raw.get_protocol()
    if current is acceptor or raw.is_closing() or not hasattr(current, "get_buffer"):
        return  # start_tls failed before taking the transport over; it reports that itself
    proto = cast(asyncio.BufferedProtocol, current)
    view = memoryview(data)
    while view:
        buf = memoryview(proto.get_buffer(len(view)))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        proto.buffer_updated(n)
        view = view[n:]


class TlsListenerServer:
    """One listening socket: connections get TLS from `material()` (looked up per connection, so a reload that
    swaps it takes effect for the next handshake) and HTTP from `protocol_factory`."""

    def __init__(
        self,
        name: str,
        material: Callable[[], ListenerMaterial],
        protocol_factory: Callable[[], asyncio.Protocol],
        metrics: Metrics,
        handshake_timeout: float,
        budget: ConnectionBudget | None = None,
    ) -> None:
        self.name = name
        self.material = material
        self.protocol_factory = protocol_factory
        self.metrics = metrics
        self.handshake_timeout = handshake_timeout
        self.budget = budget
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._task_name = f"tls-handshake-{name}"
        metrics.listener(name)
        self.handshakes_ok = metrics.handshakes.labels(name)  # looked up once, incremented per handshake

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=self._task_name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def failed(self, cause: str, exc: BaseException | str | None) -> None:
        self.metrics.handshake_failures.labels(self.name, cause).inc()
        log.debug("tls handshake failed on %s: %s (%s)", self.name, cause, exc)

    async def start(self, host: str, port: int, *, reuse_port: bool = False, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(lambda: _Acceptor(self), sock=sock, backlog=1024)
        else:
            self._server = await loop.create_server(
                lambda: _Acceptor(self), host, port, reuse_port=reuse_port, backlog=1024
            )

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._server.sockets) if self._server else ()

    def close(self) -> None:
        """Stop accepting; connections already handed to HTTP go on."""
        if self._server is not None:
            self._server.close()

    async def wait_closed(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _peer_ip(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


class Slot:
    """One admitted connection's place in the budget; `release()` gives it back (once)."""

    __slots__ = ("_budget", "_handshaking", "_released", "abort", "address", "listener", "waiting")

    def __init__(
        self,
        budget: ConnectionBudget,
        listener: str,
        address: str | None,
        handshaking: bool,
        abort: Callable[[], None] | None = None,
        waiting: Callable[[], bool] | None = None,
    ) -> None:
        self._budget, self.listener, self.address = budget, listener, address
        self._handshaking, self._released = handshaking, False
        self.abort = abort  # closes the connection (a handshake closed to make room: core/connguard.makes_room)
        self.waiting = waiting  # True while it has no request being answered (may make room at its listener's cap)

    def handshake_done(self) -> None:
        if self._handshaking:
            self._handshaking = False
            self._budget._handshake_done(self)

    def release(self) -> None:
        if not self._released:
            self._released = True
            if self._handshaking:
                self.handshake_done()
            self._budget._closed(self)


class ConnectionBudget:
    """The connections of one worker, over all its listeners: admission by core/connguard.py `admit`."""

    LOG_EVERY = 10.0  # seconds between two log lines about refused connections, per listener

    def __init__(
        self,
        caps: Caps,
        metrics: Metrics,
        listener_caps: dict[str, int] | None = None,
        own_cap_only: frozenset[str] = frozenset(),
    ) -> None:
        self.caps = caps
        self.metrics = metrics
        self.listener_caps = listener_caps or {}
        self.own_cap_only = own_cap_only  # listeners outside the overall cap (admin)
        self.open = 0
        self.closed_total = 0  # connections closed since start (gateway/memory.py trims the heap after churn)
        self.per_listener: dict[str, int] = {}
        self.handshakes = 0
        self.by_address: dict[str | None, int] = {}
        self._handshaking: dict[Slot, None] = {}  # handshakes in progress, oldest first
        self._capped: dict[str, dict[Slot, None]] = {name: {} for name in self.listener_caps}  # oldest first
        self._logged: dict[str, float] = {}
        self._open_gauges: dict[str, Any] = {}  # listener -> its child of `connections_open`, looked up once

    def _open_gauge(self, listener: str) -> Any:
        gauge = self._open_gauges.get(listener)
        if gauge is None:
            gauge = self._open_gauges[listener] = self.metrics.connections_open.labels(listener)
        return gauge

    def open_slot(
        self,
        listener: str,
        address: str | None,
        *,
        tls: bool,
        abort: Callable[[], None] | None = None,
        waiting: Callable[[], bool] | None = None,
    ) -> Slot | None:
        """A place for a new connection (`abort` closes it, should it be closed to make room; `waiting` says whether
        it may be, at its listener's own cap), or None: refused."""
        cause = self._admit(listener, address, tls)
        if cause is not None and makes_room(cause) and self._make_room(cause, address, listener):
            cause = self._admit(listener, address, tls)
        if cause is not None:
            self.closed_total += 1
            self.metrics.connections_refused.labels(listener, cause).inc()
            now = asyncio.get_running_loop().time()
            if now - self._logged.get(listener, -self.LOG_EVERY) >= self.LOG_EVERY:
                self._logged[listener] = now
                http_log.warning(
                    "connection cap reached on %s (%s): new connections are closed at once", listener, cause
                )
            return None
        if listener not in self.own_cap_only:
            self.open += 1
        self.per_listener[listener] = self.per_listener.get(listener, 0) + 1
        self._open_gauge(listener).inc()
        slot = Slot(self, listener, address, tls, abort, waiting)
        capped = self._capped.get(listener)
        if capped is not None:
            capped[slot] = None
        if tls:
            self.handshakes += 1
            self.by_address[address] = self.by_address.get(address, 0) + 1
            self._handshaking[slot] = None
        return slot

    def _admit(self, listener: str, address: str | None, tls: bool) -> str | None:
        counts = Counts(self.open, self.per_listener.get(listener, 0), self.handshakes, self.by_address.get(address, 0))
        return admit(
            self.caps,
            counts,
            tls=tls,
            listener_cap=self.listener_caps.get(listener),
            overall=listener not in self.own_cap_only,
        )

    def _make_room(self, cause: str, address: str | None, listener: str) -> bool:
        """Close the oldest handshake in progress (from `address`, for the per-address cap), or at `listener`'s own
        cap its oldest connection waiting for a request; False if there is none. Counted as a connection closed for
        `cause`; a handshake closed so ends as `aborted`."""
        if cause == "listener_max_connections":
            for victim in self._capped.get(listener, {}):
                if victim.abort is None:
                    continue
                if victim._handshaking or (victim.waiting is not None and victim.waiting()):
                    self.metrics.connections_refused.labels(listener, cause).inc()
                    victim.release()  # its place is free now (released once more, as a no-op, when it is lost)
                    victim.abort()
                    return True
            return False
        same_address = cause == "max_handshakes_per_address"
        for victim in self._handshaking:
            if victim.abort is not None and (not same_address or victim.address == address):
                self.metrics.connections_refused.labels(victim.listener, cause).inc()
                victim.handshake_done()  # its place is free now; the connection itself is released once closed
                victim.abort()
                return True
        return False

    def _handshake_done(self, slot: Slot) -> None:
        self._handshaking.pop(slot, None)
        address = slot.address
        self.handshakes -= 1
        left = self.by_address.get(address, 1) - 1
        if left > 0:
            self.by_address[address] = left
        else:
            self.by_address.pop(address, None)  # the table holds only addresses with handshakes in progress

    def _closed(self, slot: Slot) -> None:
        listener = slot.listener
        capped = self._capped.get(listener)
        if capped is not None:
            capped.pop(slot, None)
        self.closed_total += 1
        if listener not in self.own_cap_only:
            self.open -= 1
        self.per_listener[listener] -= 1
        self._open_gauge(listener).dec()


# audits and counts an answer given below the application (parser errors, header timeouts):
# (listener, peer address, status, reason, detail)
LowLevelRecorder = Callable[[str, str | None, int, Reason, str], None]


@dataclass(frozen=True)
class HttpGuard:
    """What every connection of one HTTP server is held to, and where its low-level answers are reported."""

    listener: str  # label for connections not admitted by a TLS listener (those carry their listener's name)
    timeouts: Timeouts
    budget: ConnectionBudget
    record: LowLevelRecorder
    headers: Callable[[], dict[str, str]]  # Server, and HSTS on TLS listeners


class RequestTimedOut(Refusal):
    """Raised into a handler that waits for a request body the client did not finish in time."""

    def __init__(self, seconds: float) -> None:
        super().__init__(Reason.REQUEST_TIMEOUT, f"the request body was not complete within {seconds:g} s")


class GuardedRequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with the gateway's timeouts, admission and low-level answers."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager.guard
        self._slot: Slot | None = None
        self._refused = False
        self._phase = Phase.FIRST
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._inner_factory = self._request_factory
        self._request_factory = self._dispatch
        self.memo: dict[str, Any] = {}  # what the application derives from this connection once (peer.py)
        self._peer_done = False  # a plain-HTTP client ended its side after complete requests (`eof_received`)

    def attach(self, slot: Slot | None) -> None:
        """Take over the slot a TLS listener admitted this connection with."""
        self._slot = slot
        if slot is not None:
            slot.waiting = self._waiting  # at its listener's cap (admin with TLS) it may make room while it waits

    @property
    def listener(self) -> str:
        return self._slot.listener if self._slot is not None else self._guard.listener

    # -- connection life ------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._slot is None:  # a plain listener: admission happens here
            self._slot = self._guard.budget.open_slot(
                self._guard.listener,
                _peer_ip(transport),
                tls=False,
                abort=cast(asyncio.Transport, transport).abort,
                waiting=self._waiting,
            )
            if self._slot is None:
                self._refused = True
                cast(asyncio.Transport, transport).abort()
                return
        super().connection_made(transport)
        self._enter(Phase.FIRST)

    def _waiting(self) -> bool:
        return waiting(self._phase)

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio's Protocol returns bool; aiohttp says None
        """A plain-HTTP client that ends its side once its requests are out (shutdown(SHUT_WR), `nc -N`) still gets
        their answers, then the connection closes (aiohttp closed it at the end of stream, unanswered). With no
        complete request received, or one whose body can no longer come, it closes now. TLS connections end with
        close_notify, which asyncio's TLS layer handles itself."""
        transport = self.transport
        if transport is None or transport.get_extra_info("ssl_object") is not None:
            return False
        if self._messages or self._phase is Phase.BUSY:
            self._peer_done = True  # answered, then closed (`log_access`)
            return True
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._body = None
        if self._slot is not None:
            self._slot.release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._phase is Phase.IDLE:
            self._enter(Phase.HEADERS)  # keep-alive: the header timeout runs from the next request's first byte
        super().data_received(data)

    def _dispatch(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        """aiohttp's request factory, called when a request starts: the body timeout starts with it.

        An `Expect` other than 100-continue is dropped here: aiohttp would answer it before any middleware with a
        text/plain 417 echoing the header, unaudited. RFC 9110 10.1.1 lets a server ignore an expectation it does
        not know; the request is then answered as it would be without one."""
        expect = message.headers.get("Expect")
        if expect is not None and expect.strip().lower() != "100-continue":
            message = _without_expect(message)
        if payload.is_eof():
            self._enter(Phase.BUSY)
        else:
            self._body = payload
            self._enter(Phase.BODY)
            payload.on_eof(self._body_complete)
        assert self._inner_factory is not None
        return self._inner_factory(message, payload, protocol, writer, task)

    def _body_complete(self) -> None:
        if self._phase is Phase.BODY:
            self._body = None
            self._enter(Phase.BUSY)

    def log_access(self, request: web.BaseRequest, response: web.StreamResponse, time: float | None) -> None:
        super().log_access(request, response, time)  # called once the response is complete
        self._body = None
        self._enter(Phase.IDLE)
        if self._peer_done and not self._messages:
            self.close()  # the client ended its side: the last of its requests is answered

    # -- timeouts -------------------------------------------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        self._phase = phase
        self._since = since = self._loop.time()
        at = due(phase, since, self._guard.timeouts)
        timer = self._timer
        if timer_needed(None if timer is None else timer.when(), at):
            assert at is not None
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(at, self._expired)

    def _expired(self) -> None:
        self._timer = None
        expiry = deadline(self._phase, self._since, self._guard.timeouts)
        transport = self.transport
        if expiry is None or transport is None or self._force_close:
            return
        if fired_early(expiry, self._loop.time()):  # armed for an earlier phase: wait for this one's deadline
            self._timer = self._loop.call_at(expiry.at, self._expired)
            return
        if self._phase in (Phase.FIRST, Phase.HEADERS) and self._messages:
            return  # the headers are complete; the request is about to start
        self._guard.budget.metrics.timeouts.labels(self.listener, expiry.cause).inc()
        peer = _peer_ip(transport)
        timeouts = self._guard.timeouts
        if expiry.cause == "body":
            http_log.debug("request body timeout on %s from %s", self.listener, peer)
            body, self._body = self._body, None
            self.close()  # read nothing more; the connection closes after the 408 the handler answers
            if body is not None:
                body.set_exception(RequestTimedOut(timeouts.body))
                body.feed_eof()  # nothing left to linger on
            return
        if expiry.cause == "header":
            detail = f"the request headers were not complete within {timeouts.header:g} s"
            http_log.debug("request header timeout on %s from %s", self.listener, peer)
            self._guard.record(self.listener, peer, 408, Reason.REQUEST_TIMEOUT, detail)
            transport.write(_raw_problem(Reason.REQUEST_TIMEOUT, detail, 408, self._guard.headers()))
        self.force_close()  # close() after the write: the 408 is flushed first

    # -- answers aiohttp gives before the application ------------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Problem details instead of aiohttp's text (which echoes the client's bytes); audited and counted."""
        from gateway.answers import problem_response

        peer = _peer_ip(self.transport) if self.transport is not None else None
        if status < 500:
            reason = Reason.BAD_REQUEST
            kind = type(exc).__name__ if exc is not None else "malformed"
            detail = f"malformed HTTP request ({kind})"  # the exception's class, never the client's bytes
            http_log.debug("malformed HTTP request on %s from %s: %s", self.listener, peer, kind)
        else:
            reason = Reason.INTERNAL_ERROR
            detail = "internal error"
            http_log.error("unhandled error on %s from %s", self.listener, peer, exc_info=exc)
        self._guard.record(self.listener, peer, status, reason, detail)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is closed instead")
        resp = problem_response(reason, detail, status)
        resp.headers.update(self._guard.headers())
        resp.force_close()
        return resp


def _without_expect(message: RawRequestMessage) -> RawRequestMessage:
    """The request without its Expect header(s)."""
    headers = CIMultiDict((k, v) for k, v in message.headers.items() if k.lower() != "expect")
    raw = tuple((k, v) for k, v in message.raw_headers if k.lower() != b"expect")
    return message._replace(headers=CIMultiDictProxy(headers), raw_headers=raw)


def _raw_problem(reason: Reason, detail: str, status: int, headers: dict[str, str]) -> bytes:
    from gateway.answers import problem_body

    body = problem_body(reason, detail, status)
    lines = [
        f"HTTP/1.1 {status} {'Request Timeout' if status == 408 else 'Error'}",
        "Content-Type: application/problem+json",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class GuardedServer(web.Server):
    """aiohttp's low-level server whose connections are `GuardedRequestHandler`s held to `guard`."""

    def __init__(self, handler: Any, *, guard: HttpGuard, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.guard = guard

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """An AppRunner whose server is a `GuardedServer` (start the app, then wrap its handler)."""

    def __init__(self, app: web.Application, guard: HttpGuard, **kwargs: Any) -> None:
        # aiohttp's own keep-alive close is a backstop behind the guard's timers
        kwargs.setdefault("keepalive_timeout", guard.timeouts.idle + guard.timeouts.header + 1)
        kwargs.setdefault("lingering_time", 2.0)
        super().__init__(app, **kwargs)
        self._guard = guard

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            guard=self._guard,
            **{k: v for k, v in self._kwargs.items() if k != "handler_cancellation"},
        )


class PlainListener:
    """A listening socket for the plain-HTTP or admin app: connections are `GuardedRequestHandler`s, admitted at
    accept. With `ssl_context` (`admin.tls`) the handshake is the TLS listeners' own (`TlsListenerServer`): the
    connection is admitted, and held to the listener's cap, from accept, not only once the event loop's handshake
    is done (silent connections were held to no cap, and took every descriptor), and handshakes are counted."""

    def __init__(self, runner: GuardedAppRunner) -> None:
        self._runner = runner
        self._server: asyncio.Server | None = None
        self._tls: TlsListenerServer | None = None

    async def start(
        self, host: str, port: int, *, reuse_port: bool = False, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        assert self._runner.server is not None
        guard = self._runner._guard
        if ssl_context is not None:
            material = ListenerMaterial(ssl_context, RevocationSet(), {})
            self._tls = TlsListenerServer(
                guard.listener,
                lambda: material,
                self._runner.server,
                guard.budget.metrics,
                guard.timeouts.header,
                guard.budget,
            )
            await self._tls.start(host, port, reuse_port=reuse_port)
            return
        self._server = await asyncio.get_running_loop().create_server(
            self._runner.server, host, port, reuse_port=reuse_port or None, backlog=1024
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._tls is not None:
            self._tls.close()

    async def cleanup(self) -> None:
        self.close()
        if self._tls is not None:
            await self._tls.wait_closed()
        await self._runner.cleanup()
