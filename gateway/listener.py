"""The mTLS listener: accepts TCP, runs the TLS handshake itself, then hands the connection to aiohttp.

Owns the handshake of every public connection. Starting TLS per connection (`loop.start_tls`) instead of
passing an SSLContext to `create_server` gives the gateway every handshake outcome (counted by cause, even those
OpenSSL rejects before any HTTP request), a handshake timeout of its own, and the current SSLContext for each new
connection, so certificate material can be swapped without a restart. After the handshake the leaf certificate
must carry the clientAuth EKU (OpenSSL accepts certificates without any EKU; the gateway does not).

Bytes that arrive between the end of the handshake and the switch to the HTTP protocol are buffered and passed on.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, cast

from gateway.core.handshake import classify
from gateway.core.identity import identity_from_der
from gateway.metrics import Metrics
from gateway.tls import ListenerMaterial

log = logging.getLogger("ota_gateway.tls")


class _Acceptor(asyncio.Protocol):
    """Protocol of a fresh TCP connection until its TLS handshake is done."""

    def __init__(self, listener: TlsListenerServer) -> None:
        self._listener = listener
        self._pending = bytearray()
        self._lost = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is not a subclass
        self._listener.spawn(self._handshake(transport))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self._pending += data  # application data decrypted before the HTTP protocol took over

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True

    async def _handshake(self, raw: asyncio.Transport) -> None:
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
            return
        except ssl.SSLError as exc:
            listener.failed(classify(exc.reason, None), exc)
            raw.abort()
            return
        except TimeoutError as exc:
            listener.failed("timeout", exc)
            raw.abort()
            return
        except (ConnectionError, OSError) as exc:
            # asyncio's and uvloop's SSLProtocol report their own handshake timeout as ConnectionAbortedError
            timed_out = isinstance(exc, ConnectionAbortedError) and loop.time() - started >= listener.handshake_timeout
            listener.failed("timeout" if timed_out else "aborted", exc)
            raw.abort()
            return
        if tls is None or self._lost:
            listener.failed("aborted", None)
            raw.abort()
            return
        ssl_object = tls.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None:
            listener.failed("no_cert", None)
            tls.abort()
            return
        identity = identity_from_der(der)
        if not identity.client_auth_eku:
            listener.failed("purpose", None)
            tls.abort()
            return
        if material.pinned_out(identity.spki_sha256, identity.sha256):
            listener.failed("pin", identity.sha256)
            tls.abort()
            return
        revoked = material.revocation.check(identity, dt.datetime.now(dt.UTC))
        if revoked:
            listener.failed("revoked", revoked)
            tls.abort()
            return
        listener.metrics.handshakes.labels(listener.name).inc()
        protocol = listener.protocol_factory()
        tls.set_protocol(protocol)
        protocol.connection_made(tls)
        if self._pending:
            protocol.data_received(bytes(self._pending))
            self._pending.clear()


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
    ) -> None:
        self.name = name
        self.material = material
        self.protocol_factory = protocol_factory
        self.metrics = metrics
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        metrics.listener(name)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"tls-handshake-{self.name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def failed(self, cause: str, exc: BaseException | str | None) -> None:
        self.metrics.handshake_failures.labels(self.name, cause).inc()
        log.info("tls handshake failed on %s: %s (%s)", self.name, cause, exc)

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
