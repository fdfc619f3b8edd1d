"""Origins: where bundles and release indexes come from. The client never chooses the upstream host.

Owns `DirectoryOrigin` (a local folder: `<root>/<app_id>/releases.yaml` and the files it names) and `HttpsOrigin`
(one pool of aiohttp connections per origin, its own CA bundle, optional SPKI pins checked on every new
connection, connect/read timeouts, redirects followed only to https on configured hosts). Its GETs (bundles,
release indexes) are driven with aiohttp's connector, writer and parser directly (`HttpsOrigin._send`); its API
calls (`exchange`) go through an aiohttp `ClientSession` on the same pool. Both hand out a body
as an async iterator of chunks together with the size the origin declared. Nothing here decides whether bytes are
good; `core/verify.py` does.

Bounds: every call to an HTTPS origin has a total deadline (`total_timeout`: a whole API or index call, a bundle
GET up to its headers; past it, `OriginTooSlow`); release indexes and API answers are capped while they stream,
never read whole first. A bundle body that ends before its Content-Length is `ShortBody`. Every origin connection
(`_GuardedHandler`) feeds aiohttp's parser exactly the head and the declared body of each answer and never parses
a byte after them: bytes past a bundle's Content-Length that reached the gateway by the body's end are
`PastLength` before its last chunk is handed out; bytes that come later, on the idle pooled connection, are an
overrun (counted, logged, the connection aborted, never read as the next answer). At a body's end
`core/keepalive.py` decides whether the connection goes back to the pool; a bundle whose origin announced its
close, or whose socket holds unread bytes, ends only at the origin's end of stream, more bytes or `close_grace`.
A bundle's 200 body bypasses the parser: the TLS layer decrypts it straight into reused buffers (`_BodyReader`,
through `_BufferedReads`), handed out as memoryviews, with `read_timeout` applied to every wait for its bytes.
A directory origin opens only files inside the app's own folder (`core/confine.py`), symlinks followed. Each
`OriginError` carries the refusal reason it stands for. Its text may reach the client (problem details), so a
directory origin names files relative to its root there (`com.example.app/1.0.0.zip`) and logs the absolute path
on the server.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import errno
import functools
import logging
import os
import re
import select
import ssl
import stat
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

import aiohttp
import yaml
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection
from aiohttp.helpers import _EXC_SENTINEL
from aiohttp.http import HttpProcessingError, RawResponseMessage, StreamWriter
from yarl import URL

from gateway.config import DirectoryOriginConfig, HttpsOriginConfig, OriginConfig
from gateway.core.confine import direct_entry, within
from gateway.core.forwarded import CLIENT_CERT, XFCC, client_cert_value, xfcc_value
from gateway.core.identity import spki_pin
from gateway.core.jsonsafe import loads_bounded
from gateway.core.keepalive import AfterBody, after_body
from gateway.core.locations import location_problem
from gateway.core.policy import Peer
from gateway.core.reasons import Reason
from gateway.core.releases import ReleaseIndex, ReleaseIndexError, parse_index
from gateway.core.verify import Verifier
from gateway.tls import upstream_context

INLINE_READ_BYTES = 64 * 1024  # directory-origin files up to this size are read on the event loop
MAX_INDEX_BYTES = 4 * 1024 * 1024  # a release index larger than this is refused while it streams
ORIGIN_READ_BUFFER = 64 * 1024  # TLS read-ahead per origin connection (asyncio's default is 256 KiB)
# a bundle body is decrypted into buffers of this size, and at most this much waits unread: the small size while
# the client is slow (memory per slow reader), the wide one while it keeps up (fewer, larger chunks per CPU), the
# widest while it keeps up past the first WIDE_AFTER bytes (one pump round per buffer: +4 to +10 % MB per
# CPU-second over 512 KiB; not before, or a slow reader that looked fast at first holds 1 MiB more;
# bench/README.md, "The verified stream, session 4")
BODY_BUFFER = 128 * 1024
BODY_BUFFER_WIDE = 512 * 1024
BODY_BUFFER_FAR = 1024 * 1024
# while the client keeps up, past the first WIDE_AFTER bytes, chunks are sent in slices of WIDE_SLICE (`_feeder`):
# more than the kernel's largest socket send buffer (tcp_wmem 4 MiB) plus a reader's first window
WIDE_SLICE = 256 * 1024
WIDE_AFTER = 8 * 1024 * 1024
_T = TypeVar("_T")

log = logging.getLogger("ota_gateway.origins")


class OriginError(Exception):
    """The origin could not be used: unreachable, refused, wrong status, bad index, pin mismatch, timeout."""

    reason = Reason.ORIGIN_ERROR


class OriginTooSlow(OriginError):
    """The origin did not answer within `total_timeout`."""

    reason = Reason.ORIGIN_TOO_SLOW


class ShortBody(OriginError):
    """The origin closed the connection before the end of the body it announced."""

    reason = Reason.SHORT_BODY


class PastLength(OriginError):
    """The origin sent bytes past the Content-Length it announced."""

    reason = Reason.SIZE_EXCEEDED


class OriginBusy(OriginError):
    """The origin answered 429: it is healthy but asks clients to come back after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None, now: float, default: float = 60.0) -> float:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), between 1 s and the plugin's cap of 24 h."""
    seconds = default
    if value:
        value = value.strip()
        if value.isdigit():
            seconds = float(value)
        else:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
            except (TypeError, ValueError, IndexError, OverflowError):
                seconds = default
    return min(max(seconds, 1.0), 86400.0)


class ReleaseNotFound(OriginError):
    """The origin answered, but has no such app or file."""


def _feeder(verifier: Verifier, piece: int) -> Callable[[bytes | memoryview, bool], list[bytes | memoryview]]:
    """Feed a chunk to the verifier in slices of at most `piece` bytes; what it releases. The verifier keeps a copy
    of the slice it holds back (at most `piece` bytes), so no chunk outlives the sending of its own bytes.

    `wide` (the client took the last chunk without a wait), once `WIDE_AFTER` bytes are out: the chunk goes in
    slices of `WIDE_SLICE` but its last `piece` bytes, then those; fewer hash updates, TLS writes and sends per
    chunk (bench/README.md, "The verified stream, session 3"). Not before: the kernel's socket buffers take the
    first MiBs even of a client that reads 1,000 bytes/s, and a wide slice in its TLS buffers stays there."""

    def feed(data: bytes | memoryview, wide: bool) -> list[bytes | memoryview]:
        view = memoryview(data)
        cut = len(view) - piece
        if wide and cut > 0 and verifier.released >= WIDE_AFTER:
            parts: Iterable[memoryview] = (
                *(view[i : min(i + WIDE_SLICE, cut)] for i in range(0, cut, WIDE_SLICE)),
                view[cut:],
            )
        else:
            parts = (view[i : i + piece] for i in range(0, len(view), piece))
        out = [released for part in parts if (released := verifier.feed(part))]
        verifier.detach()
        return out

    return feed


def _keep_width(wide: bool) -> None:
    """For a body that reads the same way whatever the client's pace."""


class Body(Protocol):
    """An open origin body: the size the origin declared (Content-Length or the file's size), and its chunks fed
    through the verifier."""

    @property
    def declared_size(self) -> int | None: ...

    @property
    def waits(self) -> bool:
        """Whether reading it may wait on the origin (False: a small local file, read at once on the event loop)."""
        ...

    def through(
        self, verifier: Verifier, piece: int, keeping_up: Callable[[], bool] = lambda: False
    ) -> AsyncGenerator[list[bytes | memoryview], None]:
        """Each chunk fed to the verifier in slices of at most `piece` bytes (wider while `keeping_up()`: see
        `_feeder`), yielding what it releases; none is kept here while the next one is read. `keeping_up()`: whether
        the client took the last chunk without a wait (a body may then also read in larger pieces)."""
        ...


@dataclass(frozen=True, slots=True)
class StreamBody:
    """A network body: chunks as they arrive."""

    declared_size: int | None
    chunks: AsyncIterator[bytes | memoryview]
    widen: Callable[[bool], None] = _keep_width  # told before each chunk whether the client keeps up
    waits = True

    async def through(
        self, verifier: Verifier, piece: int, keeping_up: Callable[[], bool] = lambda: False
    ) -> AsyncGenerator[list[bytes | memoryview], None]:
        feed, widen = _feeder(verifier, piece), self.widen
        while True:
            wide = keeping_up()
            widen(wide)
            try:
                chunk = await anext(self.chunks)
            except StopAsyncIteration:
                return
            yield feed(chunk, wide)
            del chunk


@dataclass(frozen=True, slots=True)
class FileBody:
    """A local file: `read_file` is a blocking read of the next chunk (b"" at its end). Reading and feeding
    (hashing, decrypting) run together in one worker-thread call per chunk, off the event loop, unless the file is
    `small` enough to read on it."""

    declared_size: int | None
    read_file: Callable[[], bytes]
    small: bool = False

    @property
    def waits(self) -> bool:
        return not self.small

    async def through(
        self, verifier: Verifier, piece: int, keeping_up: Callable[[], bool] = lambda: False
    ) -> AsyncGenerator[list[bytes | memoryview], None]:
        feed, read = _feeder(verifier, piece), self.read_file
        wide = False

        def step() -> list[bytes | memoryview] | None:
            data = read()
            return feed(data, wide) if data else None

        while True:
            wide = keeping_up()
            out = step() if self.small else await _finish_in_thread(step)
            if out is None:
                return
            yield out
            del out


async def _finish_in_thread(step: Callable[[], _T | None]) -> _T | None:
    """Run `step` in a worker thread. If the caller is cancelled meanwhile, wait until the step has finished before
    the cancellation goes on, so that nobody touches the verifier while the thread still feeds it."""
    future = asyncio.ensure_future(asyncio.to_thread(step))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: a refusal raised by the abandoned step is of no further interest
        raise


class Endpoint(NamedTuple):
    """A Capgo API endpoint of an update server: the origin that serves it and its path there."""

    origin: HttpsOrigin
    path: str


EndpointName = Literal["updates", "stats", "channel"]


class Origin(Protocol):
    """What handlers use of an origin, whatever its kind: they never ask which kind it is."""

    name: str

    @property
    def hosts(self) -> frozenset[str] | None:
        """The hosts its urls may name; None for a directory origin, whose locations are files."""
        ...

    async def index(self, app_id: str) -> ReleaseIndex: ...

    async def published(self, app_id: str) -> frozenset[str]:
        """The versions of the app's release index that this origin knows without a network call (a device event
        never waits for the origin): a directory origin's index, nothing for an HTTPS origin, nothing when the
        index cannot be read."""
        ...

    def endpoint(self, name: EndpointName) -> Endpoint | None:
        """The update server's `<name>_path` (`updates_path`, ...), if this origin has one."""
        ...

    def locate(self, app_id: str, file: str) -> str:
        """The location of a release index's `file` (what `open` and download tickets take)."""
        ...

    def open(
        self, app_id: str, location: str, chunk_size: int, peer: Peer | None = None, *, size_hint: int | None = None
    ) -> AbstractAsyncContextManager[Body]:
        """The body at `location` (a file below the app's folder, or an https url on `hosts`)."""
        ...

    async def close(self) -> None: ...

    async def retire(self) -> None:
        """Close for good (a reload replaced this origin): a request still holding it gets an `OriginError`."""
        ...


class DirectoryOrigin:
    """A local folder laid out as `<root>/<app_id>/releases.yaml` plus the files it lists."""

    def __init__(self, name: str, config: DirectoryOriginConfig) -> None:
        self.name = name
        self.root = config.path
        self._root = os.fspath(config.path)  # paths are joined as strings: pathlib costs more than the stat
        self._cache: dict[str, tuple[tuple[int, int], ReleaseIndex]] = {}

    def _index_path(self, app_id: str) -> str:
        return f"{self._root}/{app_id}/releases.yaml"

    def _failed(self, message: str, path: str | Path, cause: BaseException) -> OriginError:
        """An error for the client that names no server path; the path and the cause go to the server log."""
        log.warning("%s (file %s: %s)", message, path, cause)
        return OriginError(message)

    async def index(self, app_id: str) -> ReleaseIndex:
        path = self._index_path(app_id)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ReleaseNotFound(f"origin {self.name} has no index for {app_id}") from None
        except OSError as exc:
            raise self._failed(
                f"origin {self.name}: cannot read {app_id}/releases.yaml: {exc.strerror}", path, exc
            ) from None
        stamp = (st.st_mtime_ns, st.st_ino)
        cached = self._cache.get(app_id)
        if cached and cached[0] == stamp:
            return cached[1]
        try:
            text = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
            index = parse_index(app_id, yaml.safe_load(text))
        except OSError as exc:
            raise self._failed(
                f"origin {self.name}: cannot read {app_id}/releases.yaml: {exc.strerror}", path, exc
            ) from None
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise self._failed(f"origin {self.name}: {app_id}/releases.yaml is not valid YAML", path, exc) from None
        except ReleaseIndexError as exc:
            raise self._failed(f"origin {self.name}: {app_id}/releases.yaml: {exc}", path, exc) from None
        self._cache[app_id] = (stamp, index)
        return index

    @property
    def hosts(self) -> None:
        return None

    async def published(self, app_id: str) -> frozenset[str]:
        try:
            return frozenset(r.version for r in (await self.index(app_id)).releases)
        except OriginError:
            return frozenset()

    def endpoint(self, name: EndpointName) -> None:
        return None  # a folder has no update server

    def locate(self, app_id: str, file: str) -> str:
        return file

    def open(
        self, app_id: str, location: str, chunk_size: int, peer: Peer | None = None, *, size_hint: int | None = None
    ) -> AbstractAsyncContextManager[Body]:
        """The file `location` below the app's folder; `size_hint` (the expected size) picks how it is read."""
        return _OpenFile(self, app_id, location, chunk_size, size_hint)

    async def close(self) -> None:
        return None

    async def retire(self) -> None:
        return None  # holds nothing between requests


class _OpenFile:
    """`DirectoryOrigin.open`: the file opened (and confined to the app's folder) on entry, closed on exit."""

    def __init__(
        self, origin: DirectoryOrigin, app_id: str, location: str, chunk_size: int, size_hint: int | None
    ) -> None:
        self.origin, self.app_id, self.location, self.chunk_size = origin, app_id, location, chunk_size
        self.small = size_hint is not None and size_hint <= INLINE_READ_BYTES
        self.fd = -1

    async def __aenter__(self) -> Body:
        origin, app_id, location, chunk_size = self.origin, self.app_id, self.location, self.chunk_size
        problem = location_problem(location, None)
        if problem is not None:
            raise OriginError(f"origin {origin.name}: {problem[1]}")
        folder = f"{origin._root}/{app_id}"
        path = f"{folder}/{location}"
        shown = f"{app_id}/{location}"
        try:
            if self.small:
                # a small file costs less to read at once than a trip to a worker thread (~100 us of CPU)
                fd, size, first = _open_first(path, location, chunk_size, folder)
            else:
                # one trip to a worker thread opens, sizes and reads the first chunk
                opening = asyncio.ensure_future(asyncio.to_thread(_open_first, path, location, chunk_size, folder))
                try:
                    fd, size, first = await asyncio.shield(opening)
                except asyncio.CancelledError:  # the thread goes on: its descriptor is closed once it is done
                    opening.add_done_callback(_close_opened)
                    raise
        except FileNotFoundError as exc:
            raise origin._failed(
                f"origin {origin.name}: {shown} is listed in the index but missing", path, exc
            ) from None
        except _Outside as exc:
            raise origin._failed(f"origin {origin.name}: {shown} leads outside the app's folder", path, exc) from None
        except OSError as exc:
            raise origin._failed(f"origin {origin.name}: cannot open {shown}: {exc.strerror}", path, exc) from None
        self.fd = fd
        pending = [first] if first else []

        def read_next() -> bytes:
            if pending:
                return pending.pop()
            try:
                return os.read(fd, chunk_size)  # reads on to the real end of the file, so growth is seen
            except OSError as exc:
                raise origin._failed(
                    f"origin {origin.name}: read error on {shown}: {exc.strerror}", path, exc
                ) from None

        return FileBody(size, read_next, self.small)

    async def __aexit__(self, *exc_info: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Outside(Exception):
    """The opened file is not inside the app's folder (a symlink, or a path that leads out)."""


def _open_first(path: str, location: str, chunk_size: int, folder: str) -> tuple[int, int, bytes]:
    """Open `path` (`folder`/`location`) inside the app's folder: its descriptor, size and first chunk.

    A plain name in the folder itself is opened without following a symlink in its last part (`O_NOFOLLOW`; the
    folder's own symlinks are followed): the file is then an entry of the app's folder, inside it by construction
    (`core/confine.direct_entry`). A deeper location, or a name that is a symlink, is opened following every
    symlink and its real path (from /proc: no race with a symlink swapped after the open) compared with the
    folder's (`core/confine.within`).

    `O_NONBLOCK`: opening a FIFO (or a device) never waits for a writer, so a small file opened on the event loop
    cannot stall it; anything but a regular file is then refused."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    fd = -1
    if direct_entry(location):
        try:
            fd = os.open(path, flags | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # ELOOP: the name is a symlink; followed and checked below
                raise
    try:
        if fd < 0:
            fd = os.open(path, flags)
            if not within(os.path.realpath(folder), _real_path(fd, path)):
                raise _Outside()
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        return fd, st.st_size, os.read(fd, chunk_size)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def _close_opened(done: asyncio.Future[tuple[int, int, bytes]]) -> None:
    if not done.cancelled() and done.exception() is None:
        os.close(done.result()[0])


def _real_path(fd: int, path: str) -> str:
    """The real path of the file open as `fd`: from /proc (no race with a symlink swapped after the open)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


class _EndWatch:
    """What one bundle GET learns of its connection at the end of the declared body: bytes past it (`past`), and
    `ended`, done once that is known: at once when nothing more had arrived (the connection goes back to the pool),
    or, when the origin announced its close or unread bytes waited in the socket, once the origin closed, sent more,
    or stayed silent for `grace` seconds."""

    def __init__(self, grace: float, read_timeout: float | None) -> None:
        self.grace = grace
        self.read_timeout = read_timeout  # of each wait for the body's bytes
        self.past = 0
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.body: _BodyReader | None = None  # the declared body of a 200 answer, once its head has arrived


class _BodyReader:
    """The declared body of a bundle GET, decrypted by the TLS layer straight into buffers (`space`, `filled`) and
    handed out as memoryviews of them (`take`): aiohttp's parser and stream reader would copy every byte two or
    three times. At most one buffer's size waits unread (`BODY_BUFFER`, or `BODY_BUFFER_WIDE` / `_FAR` while the
    client keeps up: `widen`); past that the connection stops reading until the bytes are taken. A buffer is written
    again only once no view of it is alive anywhere (the verifier, the client's transport): its reference count says so;
    otherwise a new one is used."""

    def __init__(self, length: int, transport: asyncio.Transport | None, read_timeout: float | None) -> None:
        self.length = length
        self.received = 0
        self._transport = transport
        self._read_timeout = read_timeout
        self._size = BODY_BUFFER
        self._pool: list[bytearray] = []
        self._buf: bytearray | None = None
        self._start = 0  # taken up to here
        self._filled = 0  # written up to here
        self._ready: collections.deque[bytes | memoryview] = collections.deque()  # untaken, from earlier buffers
        self._unread = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: Exception | None = None

    def widen(self, wide: bool) -> None:
        """Whether the client keeps up: larger buffers then (the largest past `WIDE_AFTER` bytes, as the slices of
        `_feeder`); a slow one gets small ones again."""
        if not wide:
            self._size = BODY_BUFFER
        else:
            self._size = BODY_BUFFER_FAR if self.received >= WIDE_AFTER else BODY_BUFFER_WIDE

    def _fresh(self) -> bytearray:
        size = self._size
        self._pool = [buf for buf in self._pool if len(buf) == size]  # others are freed once no view is left
        for buf in self._pool:
            if sys.getrefcount(buf) <= 3:  # the pool, `buf` and the call's argument: no view of it is alive
                return buf
        buf = bytearray(size)
        if len(self._pool) < 3:
            self._pool.append(buf)
        return buf

    def space(self, limit: int) -> memoryview:
        """Where the next decrypted bytes go: at most `limit` bytes, never none; room for exactly `limit - 1` (the
        rest of the body, when `limit` asks for one byte past it) is never offered, so that a byte past the body
        that the TLS layer already holds lands here and is seen with the body's end."""
        buf = self._buf
        if buf is None or len(buf) - self._filled in (0, limit - 1):
            if buf is not None and self._start < self._filled:
                self._ready.append(memoryview(buf)[self._start : self._filled])
            self._buf = None
            buf = self._fresh()
            if len(buf) == limit - 1:  # rare: a buffer exactly the rest of the body
                buf = bytearray(limit)
            self._buf = buf
            self._start = self._filled = 0
        return memoryview(buf)[self._filled : min(len(buf), self._filled + limit)]

    def filled(self, n: int) -> None:
        """`n` bytes were written where `space` said."""
        self._filled += n
        self._more(n)

    def spill(self, n: int) -> bytes:
        """A copy of the `n` bytes written after those `filled` counted (past the body): never handed out."""
        assert self._buf is not None
        return bytes(memoryview(self._buf)[self._filled : self._filled + n])

    def put(self, data: bytes) -> None:
        """Body bytes that came in the same read as the head."""
        if data:
            self._ready.append(data)
            self._more(len(data))

    def _more(self, n: int) -> None:
        self.received += n
        self._unread += n
        if self._unread >= self._size and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def finish(self) -> None:
        """The declared body is complete: the connection reads on for whatever comes next (it may be pooled)."""
        self._done = True
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        self._wake()

    def fail(self, exc: Exception) -> None:
        """The connection ended before the declared body did."""
        if not self._done and self._error is None:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> bytes | memoryview | None:
        """The bytes received and not yet taken (waiting for some, at most `read_timeout` s); None at the end."""
        while True:
            if self._ready:
                data: bytes | memoryview = self._ready.popleft()
            elif self._buf is not None and self._start < self._filled:
                data = memoryview(self._buf)[self._start : self._filled]
                self._start = self._filled
            elif self._error is not None:
                raise self._error
            elif self._done:
                return None
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    async with asyncio.timeout(self._read_timeout):
                        await self._waiter
                finally:
                    self._waiter = None
                continue
            self._unread -= len(data)
            if self._paused and self._unread < self._size and self._transport is not None:
                self._paused = False
                self._transport.resume_reading()
            return data


class _BufferedReads(asyncio.BufferedProtocol):
    """Stands in for a bundle GET's `_GuardedHandler` as the TLS transport's protocol, so that the transport
    decrypts into the handler's buffers (uvloop does that only for a protocol that is not an `asyncio.Protocol`,
    which aiohttp's handler is); everything else is passed on."""

    def __init__(self, handler: _GuardedHandler) -> None:
        self._handler = handler

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._handler.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self._handler.buffer_updated(nbytes)

    def eof_received(self) -> None:
        self._handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()


_HEAD_END = re.compile(rb"\r?\n\r?\n")  # the parser is lenient about the CR before LF in responses


def _verdict(exc: BaseException) -> str | None:
    """The HTTP parser's verdict on a malformed answer, by name only: the first line of its message up to the first
    colon, where aiohttp starts quoting the origin's bytes (the line, or the whole buffer: up to a bundle's 145 KB).
    None: not the parser's error."""
    parser = isinstance(exc, HttpProcessingError)  # a ClientSession's call says it as a ClientResponseError 400
    if not (parser or (isinstance(exc, aiohttp.ClientResponseError) and exc.status == 400)):
        return None
    first = str(getattr(exc, "message", "") or "").strip().partition("\n")[0].partition(":")[0].strip()
    return first or type(exc).__name__


def _described(exc: BaseException) -> str:
    """What went wrong on the way to an origin's answer, for a detail, the audit line and /readyz: a malformed answer
    by the parser's verdict (never the origin's bytes), anything else by its type and message."""
    verdict = _verdict(exc)
    return f"malformed HTTP response ({verdict})" if verdict is not None else f"{type(exc).__name__}: {exc}"


class _MalformedBody(aiohttp.ClientError):
    """A body the parser could not frame, named by the parser's verdict only (never the origin's bytes)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"malformed body: {_verdict(exc) or type(exc).__name__}")

    def __repr__(self) -> str:
        return str(self)


class _GuardedHandler(ResponseHandler):
    """aiohttp's response protocol, which frames every Content-Length answer itself: it feeds the parser exactly the
    head and the declared body, and never parses a byte after them. Bytes that come after a complete answer and
    before the next request (in the same read as the body's end, in the same read as the head, later, or while the
    connection waits in the pool) are an overrun: counted (`on_overrun`), never parsed, the connection aborted.
    At the end of a body `core/keepalive.py` decides whether the connection goes back to the pool; for a bundle
    (a watched request) that waits for the origin's end of stream, the close is held until the watch ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_overrun: Callable[[int, str], None]) -> None:
        super().__init__(loop)
        self._on_overrun = on_overrun
        self._watch: _EndWatch | None = None
        self._path = ""  # the path of the request in flight, or of the last one (for the overrun's log line)
        # idle (no request in flight) -> head -> body -> idle; "parser" while the parser frames the body (chunked,
        # until close); "held" after a bundle's body whose end is awaited
        self._phase = "idle"
        self._remaining = 0
        self._carry = b""
        self._message: Any = None
        self._body: Any = None  # the payload stream of the answer in flight
        self._keep = True  # False: never back to the pool
        self._overran = False
        self._close_wanted = False
        self._grace_timer: asyncio.TimerHandle | None = None
        self._served = 0
        self._poller: select.poll | None = None  # this connection's socket, for `pending`
        self._reader: _BodyReader | None = None  # a bundle's 200 body goes here instead of to the parser
        self._scratch: bytearray | None = None  # buffered reads outside such a body land here

    def get_buffer(self, sizehint: int) -> memoryview:
        """Where the TLS layer decrypts the next bytes (with `_BufferedReads`): a bundle body's own buffers, with
        room for one byte past the body (so that it is seen with the body's end, as in one read)."""
        if self._reader is not None and self._phase == "body":
            return self._reader.space(self._remaining + 1)
        if self._scratch is None:
            self._scratch = bytearray(ORIGIN_READ_BUFFER)
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        reader = self._reader
        if reader is not None and self._phase == "body":
            take = min(nbytes, self._remaining)
            self._remaining -= take
            reader.filled(take)
            if self._remaining == 0:
                past = reader.spill(nbytes - take)
                self._body_end(len(past))  # first, as with the parser: the answer's end may pool the connection
                self._read_to_end()
                if past:
                    self.data_received(past)  # after the body: an overrun, the bundle's size_exceeded
            return
        assert self._scratch is not None
        self.data_received(bytes(memoryview(self._scratch)[:nbytes]))

    def _read_to_end(self) -> None:
        """The reader has the whole body: the answer is complete for aiohttp too (which may pool the connection;
        its parser, which never saw the body, is replaced for the next request)."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.finish()
        if self._body is not None:
            self._body.feed_eof()

    def begin(self, watch: _EndWatch | None, path: str) -> None:
        """A request is about to go out on this connection (`watch`: a bundle GET's)."""
        self._watch, self._path = watch, path

    def head_late(self) -> None:
        """The head of the answer did not come by its deadline: the request waiting for it fails (`TimeoutError`)."""
        self.set_exception(TimeoutError("no answer head by the deadline"))

    @property
    def reused(self) -> bool:
        return self._served > 0

    def pending(self) -> bool:
        """Unread bytes (or the end of stream, or an error) wait in the socket."""
        if self._poller is None:  # once per connection: asked at every body's end and every reuse
            sock = self.transport.get_extra_info("socket") if self.transport is not None else None
            if sock is None:
                return True
            self._poller = select.poll()
            self._poller.register(sock.fileno(), select.POLLIN)
        return bool(self._poller.poll(0))

    @property
    def should_close(self) -> bool:
        return not self._keep or super().should_close

    def set_response_params(self, **kwargs: Any) -> None:
        self._phase, self._carry, self._message, self._reader = "head", b"", None, None
        self._served += 1
        super().set_response_params(**kwargs)

    def feed_data(self, data: Any, size: int = 0) -> None:
        self._message, self._body = data  # (message, payload): the head the parser just completed
        super().feed_data(data, size)

    def _to_parser(self) -> None:
        """The parser frames the rest (chunked, until close, or what it could not parse); the verifier counts."""
        self._phase = "parser"
        self._end()
        if self._message is not None and self._body is not None:
            self._body.on_eof(self._parsed)  # its end: idle again

    def _parsed(self) -> None:
        if self._phase == "parser":
            self._phase = "idle"

    def data_received(self, data: bytes) -> None:
        if not data:  # aiohttp resuming a paused parser: the bytes it holds were framed when they came
            super().data_received(data)
            return
        while data:
            phase = self._phase
            if phase == "parser":
                super().data_received(data)
                return
            if phase in ("idle", "held"):
                self._overrun(len(data))
                return
            if phase == "head":
                buf = self._carry + data
                found = _HEAD_END.search(buf)
                if found is None:
                    self._carry = buf[-3:]
                    super().data_received(data)
                    return
                cut = found.end() - len(self._carry)
                self._message = self._body = None
                super().data_received(data[:cut])
                data, self._carry = data[cut:], b""
                message = self._message
                if message is None:  # the parser saw it otherwise (an error): leave the rest to it
                    self._to_parser()
                    continue
                if 100 <= message.code < 200:
                    continue  # an interim answer; the real head follows
                length = message.headers.get("Content-Length", "")
                if message.code in (204, 304) or self._skip_payload:
                    length = "0"
                if not length.isdigit():
                    self._to_parser()
                    continue
                self._phase, self._remaining = "body", int(length)
                if self._remaining == 0:
                    self._body_end(len(data))
                elif self._watch is not None and message.code == 200:  # a bundle: never through the parser
                    watch = self._watch
                    self._reader = watch.body = _BodyReader(self._remaining, self.transport, watch.read_timeout)
                    self._drop_timeout()  # aiohttp's sock_read: the reader applies read_timeout itself
                continue
            take, data = data[: self._remaining], data[self._remaining :]
            self._remaining -= len(take)
            if self._remaining == 0:
                self._body_end(len(data))  # first: the parser's end of body hands the connection back to the pool
            if self._reader is not None:
                self._reader.put(take)
                if self._remaining == 0:
                    self._read_to_end()
            else:
                super().data_received(take)

    def _body_end(self, extra: int) -> None:
        close_announced = bool(self._message.should_close)
        watched = self._watch is not None
        pending = not extra and not close_announced and self.pending()
        decision = after_body(extra=extra, close_announced=close_announced, pending=pending, watched=watched)
        self._phase = "held" if decision is AfterBody.WAIT else "idle"
        if decision is AfterBody.POOL:
            self._end()
            return
        self._keep = False
        if decision is AfterBody.WAIT:
            assert self._watch is not None
            self._grace_timer = self._loop.call_later(self._watch.grace, self._end)
        elif decision is AfterBody.DROP:
            self._end()
        # OVERRUN: counted by the caller's next round, with the bytes that follow

    def _overrun(self, nbytes: int) -> None:
        """Bytes after a complete answer, before the next request: never parsed; the connection is aborted."""
        watch = self._watch
        if watch is not None and not watch.ended.done():
            watch.past += nbytes  # a bundle whose end was not yet settled: size_exceeded
        self._keep = False
        if not self._overran:
            self._overran = True
            self._on_overrun(nbytes, self._path)
        self._end()
        if self._body is None or self._body.is_eof():
            self.abort()
        # else the parser still holds some of the body: aiohttp's release at its end closes (aborts) the connection

    def _end(self) -> None:
        """The watch is over: tell the waiter, and close the connection if aiohttp asked meanwhile."""
        watch, self._watch = self._watch, None
        if self._phase == "held":
            self._phase = "idle"
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        if watch is not None and not watch.ended.done():
            watch.ended.set_result(None)
        if self._close_wanted:
            self._close_wanted = False
            self.close()

    def close(self) -> None:
        if self._phase == "held" and self._watch is not None:
            self._close_wanted = True  # held until the origin's end of stream, more bytes, or the grace
            return
        if self._overran:
            super().abort()  # a TLS close would go on reading what the origin still sends
            return
        super().close()

    def abort(self) -> None:
        self._close_wanted = False
        self._end()
        super().abort()

    def set_exception(self, exc: BaseException, exc_cause: BaseException = _EXC_SENTINEL) -> None:
        """A body the parser frames (chunked) that it cannot parse (a bad chunk size, a forbidden trailer) fails at
        once, as an origin error. aiohttp fails it only when the connection is lost, which its TLS close puts off
        until the origin answers the close: an origin that does not would hold the download until its minimum
        rate cut it, counted as too slow. Only the parser's own errors (aiohttp wraps each in `HttpProcessingError`):
        a connection lost mid-body stays a short body, a read timeout a timeout."""
        body = self._body
        if isinstance(exc, HttpProcessingError) and self._phase == "parser" and body is not None and not body.is_eof():
            body.set_exception(_MalformedBody(exc))
            self._keep = False
        super().set_exception(exc, exc_cause)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._close_wanted = False
        if self._reader is not None and self._phase == "body":
            got, length = self._reader.received, self._reader.length
            self._reader.fail(aiohttp.ClientPayloadError(f"connection lost after {got} of {length} bytes"))
        self._end()
        super().connection_lost(exc)


# what every GET to an origin sends besides Host: bodies are verified and relayed as the origin's bytes
# (`auto_decompress=False`), so no content coding is asked for (aiohttp would add `Accept-Encoding: gzip, deflate`)
_REQUEST_HEADERS = {"User-Agent": "ota-gateway", "Accept": "*/*", "Accept-Encoding": "identity"}


class _Answer:
    """The head of an origin's answer to a GET and its body (aiohttp's payload stream) on `connection`, which goes
    back to the pool when the body is complete (`release`) or is dropped (`close`)."""

    __slots__ = ("connection", "content", "content_length", "headers", "status")

    def __init__(self, message: RawResponseMessage, payload: aiohttp.StreamReader, connection: Connection) -> None:
        self.status: int = message.code
        self.headers = message.headers
        self.content = payload
        length = message.headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self.connection = connection

    def release(self) -> None:
        self.connection.release()

    def close(self) -> None:
        self.connection.close()


class _PinningConnector(aiohttp.TCPConnector):
    """A connector that refuses a TLS connection whose leaf SPKI is not one of the pins (in addition to the CA), and
    never hands out a pooled connection whose socket holds unread bytes (they are never read as the next answer)."""

    def __init__(self, pins: frozenset[str], on_overrun: Callable[[int, str], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pins = pins
        self._factory = functools.partial(  # type: ignore[assignment]
            _GuardedHandler, loop=self._loop, on_overrun=on_overrun
        )

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:  # noqa: ASYNC109 - aiohttp's signature
        for _ in range(self.limit + 1):  # each round takes a pooled connection (and drops it) or opens a new one
            conn = await super().connect(req, traces, timeout)
            protocol = conn.protocol
            if not isinstance(protocol, _GuardedHandler):
                return conn
            if protocol.reused and protocol.pending():
                protocol.abort()  # the origin's close, or bytes nobody asked for: not the next answer
                conn.close()
                continue
            protocol.begin(None, req.url.path)  # a GET of `HttpsOrigin._send` sets its own (and its watch) over this
            return conn
        raise aiohttp.ClientConnectionError("no pooled origin connection without unread bytes")

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super()._wrap_create_connection(*args, **kwargs)
        # decrypted-but-unread bytes of one origin connection stay below this, whatever the client's speed
        set_limits = getattr(transport, "set_read_buffer_limits", None)  # TLS transports (asyncio's and uvloop's)
        if set_limits is not None:
            set_limits(high=ORIGIN_READ_BUFFER)
        set_protocol = getattr(transport, "set_protocol", None)
        if set_protocol is not None and isinstance(protocol, _GuardedHandler):
            set_protocol(_BufferedReads(protocol))  # the TLS layer decrypts into the handler's buffers
        if self._pins:
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            from cryptography import x509

            pin = spki_pin(x509.load_der_x509_certificate(der)) if der else None
            if pin not in self._pins:
                transport.abort()
                raise OriginError(f"origin certificate SPKI {pin} matches no configured pin")
        return transport, protocol


class HttpsOrigin:
    """A remote HTTPS origin: `<url>/<app_id>/releases.json` and the files it names."""

    def __init__(self, name: str, config: HttpsOriginConfig, on_overrun: Callable[[], None] | None = None) -> None:
        self.name = name
        self.config = config
        self._on_overrun = on_overrun  # counts an overrun (ota_gateway_origin_overruns)
        self.base = URL(config.url)
        self._ssl: ssl.SSLContext = upstream_context(config)
        self._session: aiohttp.ClientSession | None = None
        self._retired = False  # a reload replaced it: no new pool is ever made (nothing would close it)
        self._connector: _PinningConnector | None = None
        self._timeout = aiohttp.ClientTimeout(  # `connect`: a new connection, or a wait for one, within total_timeout
            total=None,
            connect=config.total_timeout,
            sock_connect=min(config.connect_timeout, config.total_timeout),
            sock_read=config.read_timeout,
        )
        self._targets: dict[tuple[str, int | None], aiohttp.ClientRequest] = {}  # `_target`
        self._locations: dict[tuple[str, str], str] = {}  # `locate`
        self._hosts = frozenset(h.lower() for h in (self.base.host, *config.redirect_hosts) if h)  # yarl lowercases
        self._cache: dict[str, tuple[float, ReleaseIndex]] = {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            if self._retired:  # a request that outlived `limits.shutdown_grace` after the reload that retired it
                raise OriginError(f"origin {self.name}: retired by a reload; its connections are closed")
            connector = _PinningConnector(
                frozenset(self.config.spki_pins), self._overrun, ssl=self._ssl, limit=256, ttl_dns_cache=60
            )
            self._connector = connector
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                # no jar: an origin's Set-Cookie is never sent back, on this client's request or another's
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
                headers=_REQUEST_HEADERS,
            )
        return self._session

    def _overrun(self, nbytes: int, path: str) -> None:
        """The origin sent bytes after a complete answer to `path` (past its Content-Length, or on an idle pooled
        connection): its connection was aborted and the bytes never parsed."""
        log.warning(
            "origin %s: %d bytes after the end of the answer to %s (past its Content-Length, or while the connection "
            "was idle): connection dropped",
            self.name,
            nbytes,
            path,
        )
        if self._on_overrun is not None:
            self._on_overrun()

    @asynccontextmanager
    async def _deadline(self, what: str) -> AsyncIterator[None]:
        """`total_timeout` over the block: past it, `OriginTooSlow` (a trickle of header bytes cannot hold a call)."""
        try:
            async with asyncio.timeout(self.config.total_timeout):
                yield
        except TimeoutError:
            raise self._too_slow(what) from None

    def _too_slow(self, what: str) -> OriginTooSlow:
        return OriginTooSlow(
            f"origin {self.name}: {what} took longer than total_timeout ({self.config.total_timeout:g} s)"
        )

    async def _read_capped(self, resp: aiohttp.ClientResponse | _Answer, limit: int, what: str) -> bytes:
        """The whole body, refused as soon as it passes `limit` bytes (announced or streamed)."""
        too_large = f"origin {self.name}: {what} is larger than {limit} bytes"
        if resp.content_length is not None and resp.content_length > limit:
            raise OriginError(too_large)
        data = bytearray()
        async for chunk in resp.content.iter_any():
            data += chunk
            if len(data) > limit:
                # abort, not close: a TLS close waits for the origin's close_notify while reading (and discarding)
                # whatever it still sends, so an endless body would go on being read after the refusal
                transport = resp.connection.transport if resp.connection is not None else None
                if transport is not None:
                    transport.abort()
                raise OriginError(too_large)
        return bytes(data)

    def _target(self, url: URL) -> aiohttp.ClientRequest:
        """What aiohttp's connector is asked for a connection to `url`'s host and port with (it names the pool, and
        a new connection is made from it), built once per host and port; its headers are the ones every GET to that
        host sends (Host and `_REQUEST_HEADERS`)."""
        key = (url.raw_host or "", url.port)
        target = self._targets.get(key)
        if target is None:
            session = self._get_session()
            target = aiohttp.ClientRequest(
                "GET", url.with_path("/"), headers=_REQUEST_HEADERS, loop=asyncio.get_running_loop(), session=session
            )
            if len(self._targets) < 16:  # a redirect may name any port of a configured host
                self._targets[key] = target
        return target

    async def _send(
        self, url: URL, headers: dict[str, str] | None, grace: float | None, deadline: float
    ) -> tuple[_Answer, _EndWatch | None]:
        """One GET of `url` on a pooled connection (or a new one) up to the head of its answer, with aiohttp's
        connector, writer and parser (framed by `_GuardedHandler`) but without the rest of `ClientSession`'s request
        machinery (cookies, auth, proxies, tracing, middlewares: nothing an origin GET uses). As aiohttp does, a
        GET that fails on a reused connection before its answer's head (the origin closed it meanwhile) is sent
        once more, on another connection. Past `deadline` (loop time) without the answer's head: `TimeoutError`, by
        one timer on the connection instead of a cancellation of the task (`asyncio.timeout` costs 4 times as much).
        `grace` given (a bundle GET): the answer comes with the watch of the connection it came on, a fresh one for
        each attempt (the connection that died before its answer ended the watch it was given)."""
        self._get_session()  # a new pool once `close()` is over (an origin may serve again, from another loop)
        connector = self._connector
        if connector is None or connector.closed:  # `close()` under way (a reload retired this origin)
            raise OriginError(f"origin {self.name}: its connections are being closed (the origin was retired)")
        target = self._target(url)
        config, loop = self.config, asyncio.get_running_loop()
        # the head's own timer (`deadline`) covers aiohttp's read timeout too, unless that is the shorter one
        head_read = config.read_timeout if config.read_timeout < config.total_timeout else None
        timeout = self._timeout
        for attempt in range(2):
            # a new connection (or a wait for a free one) ends by `total_timeout` (`timeout.connect`), or by
            # `deadline` when the GET is sent again
            conn = await connector.connect(target, [], timeout)
            protocol = conn.protocol
            if not isinstance(protocol, _GuardedHandler):  # never: `_PinningConnector` makes only those
                conn.close()
                raise OriginError(f"origin {self.name}: unexpected connection protocol {type(protocol).__name__}")
            reused = protocol.reused
            watch = None if grace is None else _EndWatch(grace, config.read_timeout)
            protocol.begin(watch, url.path)  # before the request is written, so before any byte of the answer
            late = None
            try:
                protocol.set_response_params(read_until_eof=True, auto_decompress=False, read_timeout=head_read)
                sent = target.headers.copy()
                if headers:
                    sent.update(headers)
                writer = StreamWriter(protocol, loop)
                await writer.write_headers(f"GET {url.raw_path_qs} HTTP/1.1", sent)
                if head_read is not None:
                    protocol.start_timeout()
                late = loop.call_at(deadline, protocol.head_late)
                await writer.write_eof()
                while True:
                    message, payload = await protocol.read()
                    if not 100 <= message.code < 200 or message.code == 101:
                        break
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError, ConnectionResetError):
                conn.close()
                if reused and not attempt:
                    left = deadline - loop.time()  # the GET sent again has only what is left of total_timeout
                    if left <= 0:  # (aiohttp reads a timeout of 0 or less as none at all)
                        raise TimeoutError("no time left to send the GET again") from None
                    timeout = aiohttp.ClientTimeout(
                        total=None,
                        connect=left,
                        sock_connect=min(config.connect_timeout, left),
                        sock_read=config.read_timeout,
                    )
                    continue
                raise
            except BaseException:
                # abort, not close: a TLS close would wait for the origin's close_notify, reading what it still sends
                protocol.abort()
                conn.close()
                raise
            finally:
                if late is not None:
                    late.cancel()
            protocol.read_timeout = config.read_timeout  # each wait for the body's bytes (in the parser's stream)
            if not payload.is_eof() and (watch is None or watch.body is None):
                protocol.start_timeout()
            payload.on_eof(conn.release)  # the whole body read: back to the pool (or closed, if it must be)
            return _Answer(message, payload, conn), watch
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def _get(
        self, url: URL, headers: dict[str, str] | None = None, grace: float | None = None
    ) -> AsyncIterator[tuple[_Answer, _EndWatch | None]]:
        """GET `url`, following redirects only to https on this origin's hosts, each hop up to its head within
        `total_timeout`; the answer, and (`grace` given: a bundle GET) the watch of the connection it came on."""
        loop = asyncio.get_running_loop()
        for _ in range(self.config.max_redirects + 1):
            try:
                resp, watch = await self._send(url, headers, grace, loop.time() + self.config.total_timeout)
            except OriginError:
                raise
            except TimeoutError:
                raise self._too_slow(f"GET {url.path} (until its headers)") from None
            except (aiohttp.ClientError, HttpProcessingError, ssl.SSLError, OSError) as exc:
                raise OriginError(f"origin {self.name}: {_described(exc)}") from None
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                try:
                    target = url.join(URL(resp.headers["Location"]))
                except ValueError:  # the origin's bytes are not echoed: they may be anything
                    resp.close()
                    raise OriginError(
                        f"origin {self.name}: {url.path} answered HTTP {resp.status} with a malformed Location"
                    ) from None
                resp.release()
                if target.scheme != "https" or target.host not in self._hosts:
                    raise OriginError(f"origin {self.name}: redirect to a host that is not configured: {target.host}")
                url = target
                continue
            try:
                yield resp, watch
            finally:
                if resp.content.is_eof():
                    resp.release()
                else:
                    resp.close()  # an unfinished body: never hand this connection to another request
            return
        raise OriginError(f"origin {self.name}: more than {self.config.max_redirects} redirects")

    async def index(self, app_id: str) -> ReleaseIndex:
        cached = self._cache.get(app_id)
        now = time.monotonic()
        if cached and now - cached[0] < self.config.index_ttl:
            return cached[1]
        async with (
            self._deadline(f"the index of {app_id}"),
            self._get(self.base / app_id / "releases.json") as (resp, _),
        ):
            if resp.status == 404:
                raise ReleaseNotFound(f"origin {self.name} has no index for {app_id}")
            if resp.status != 200:
                raise OriginError(f"origin {self.name}: index for {app_id} answered HTTP {resp.status}")
            try:
                raw = await self._read_capped(resp, MAX_INDEX_BYTES, f"the index of {app_id}")
                index = parse_index(app_id, loads_bounded(raw))
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise OriginError(f"origin {self.name}: reading index: {exc}") from None
            except (ValueError, UnicodeDecodeError) as exc:
                raise OriginError(f"origin {self.name}: bad index for {app_id}: {exc}") from None
        self._cache[app_id] = (now, index)
        return index

    def identity_headers(self, peer: Peer | None) -> dict[str, str]:
        """What the origin learns about the client: set by the gateway alone, never copied from the request."""
        if peer is None or self.config.forward_identity == "none":
            return {}
        if self.config.forward_identity == "xfcc":
            return {XFCC: xfcc_value(peer.identity, by=None)}
        return {CLIENT_CERT: client_cert_value(peer.identity.der)}

    async def published(self, app_id: str) -> frozenset[str]:
        return frozenset()

    def locate(self, app_id: str, file: str) -> str:
        key = (app_id, file)
        location = self._locations.get(key)
        if location is None:  # yarl's joins cost about 15 us a call, a dict lookup well under one
            location = str(self.base / app_id / file)
            if len(self._locations) >= 4096:  # bounded: files are named by release indexes, which change
                self._locations.clear()
            self._locations[key] = location
        return location

    def endpoint(self, name: EndpointName) -> Endpoint | None:
        config = self.config
        path = {"updates": config.updates_path, "stats": config.stats_path, "channel": config.channel_path}[name]
        return None if path is None else Endpoint(self, path)

    def open(
        self, app_id: str, location: str, chunk_size: int, peer: Peer | None = None, *, size_hint: int | None = None
    ) -> AbstractAsyncContextManager[Body]:
        """GET `location`, an https url on this origin's hosts."""
        return self.open_url(URL(location), peer)

    @property
    def hosts(self) -> frozenset[str]:
        """The hosts this origin's urls may name (its own and `redirect_hosts`), lowercase."""
        return self._hosts

    def url(self, path: str) -> URL:
        """A path relative to the origin's url (`updates_path` and the like)."""
        return self.base.join(URL(path))

    @asynccontextmanager
    async def open_url(self, url: URL, peer: Peer | None = None) -> AsyncIterator[Body]:
        """GET a file by its URL, which must be https on this origin's hosts (download tickets name such URLs).

        The connection comes from the pool and goes back to it: a byte past Content-Length that reached the gateway
        by the body's end (in the same read, or waiting unread in the socket) is `PastLength` before the last chunk
        is handed out; if the origin announced its close, or bytes were waiting, the body ends only at the origin's
        end of stream, more bytes, or `close_grace` seconds of silence. Bytes that come later, on the idle pooled
        connection, are an overrun of the origin (`_GuardedHandler`): counted, never read as another answer."""
        if url.scheme != "https" or (url.host or "").lower() not in self.hosts:
            raise OriginError(f"origin {self.name}: {url.host} is not one of its hosts")
        async with self._get(url, self.identity_headers(peer), self.config.close_grace) as (resp, watch):
            if resp.status != 200:
                raise OriginError(f"origin {self.name}: {url.path} answered HTTP {resp.status}")
            assert watch is not None

            async def chunks() -> AsyncIterator[bytes | memoryview]:
                try:
                    if watch.body is not None:  # a 200 with a Content-Length
                        while (data := await watch.body.take()) is not None:
                            yield data
                    else:
                        async for data in resp.content.iter_any():
                            yield data
                except aiohttp.ClientPayloadError as exc:
                    raise ShortBody(f"origin {self.name}: {url.path} ended before its end: {exc}") from None
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise OriginError(f"origin {self.name}: body of {url.path}: {exc!r}") from None
                if not watch.ended.done():
                    await asyncio.shield(watch.ended)  # the origin's end of stream, more bytes, or close_grace
                if watch.past:
                    raise PastLength(f"origin {self.name}: {url.path} sent {watch.past} bytes past its Content-Length")

            widen = watch.body.widen if watch.body is not None else _keep_width
            yield StreamBody(resp.content_length, chunks(), widen)

    async def exchange(
        self,
        method: str,
        url: URL,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        peer: Peer | None = None,
        limit: int = 1024 * 1024,
    ) -> tuple[int, bytes]:
        """One API call (Capgo update, stats, channel endpoints): no redirects followed, at most `limit` bytes read."""
        session = self._get_session()
        sent = {**(headers or {}), **self.identity_headers(peer)}
        try:
            async with (
                self._deadline(f"{method} {url.path}"),
                session.request(method, url, data=body, headers=sent, allow_redirects=False) as resp,
            ):
                if resp.status == 429:
                    wait = retry_after_seconds(resp.headers.get("Retry-After"), time.time())
                    raise OriginBusy(f"origin {self.name}: {url.path} answered 429 (retry after {wait:.0f} s)", wait)
                return resp.status, await self._read_capped(resp, limit, f"the answer of {url.path}")
        except OriginError:
            raise
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise OriginError(f"origin {self.name}: {_described(exc)}") from None

    async def close(self) -> None:
        self._targets.clear()  # they name the closed session
        if self._session is not None:
            await self._session.close()
            self._targets.clear()  # and any made meanwhile
            self._session = None
            self._connector = None

    async def retire(self) -> None:
        """`close()` for good: a reload replaced this origin and closes it `limits.shutdown_grace` seconds later. A
        request that still holds it after that gets an `OriginError` instead of a new pool that nothing would ever
        close (`close()` alone lets the same object serve again, from another event loop)."""
        self._retired = True
        await self.close()


def make_origin(
    name: str, config: OriginConfig, on_overrun: Callable[[], None] | None = None
) -> DirectoryOrigin | HttpsOrigin:
    """The origin `config` describes; `on_overrun` counts an HTTPS origin's overruns (bytes after an answer)."""
    if isinstance(config, DirectoryOriginConfig):
        return DirectoryOrigin(name, config)
    return HttpsOrigin(name, config, on_overrun)
