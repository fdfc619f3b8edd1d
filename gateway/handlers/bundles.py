"""GET /bundles/{app_id}/{version}.zip: look the release up and stream it through the verifier.

A thin shell: `core/plans.py` decides (the release on an allowed channel, the size cap, then the answer's shape
once the origin declared its size, and the Range: `bytes=N-` is a 206 of the bytes from N on, the whole body still
verified, as for a ticket download), `core/verify.py` judges the bytes. The expected size and digest come from the
origin's release index before the first byte; the answer carries that Content-Length; the verifier holds back the
newest chunk until the digest matches. On any failure after the headers went out the connection is aborted, so the
client's transfer ends short and can never look complete. Before the headers, failures are problem-details answers.
Outcomes are raised, never recorded here: a `Refusal`, or `recorder.Answered` for the 416 and for an aborted stream.
A small body (`core/plans.read_whole`: up to 64 KiB, sized, below one window's worth of the origin's minimum rate)
is read whole through the same verifier before the answer starts, and goes out with its headers in one write: no
stream, no rate meter on the origin (one deadline is the same rule there); a failure is cut like a failed stream
(the same outcome and audit line), before a byte went out.

Memory per download is bounded by configuration, not by the client's speed: the origin is read only when the
previous chunk has been handed to the client's transport, whose write buffer is capped (`limits.client_buffer`;
a write waits while it is above that mark), and chunks go out in slices of `WRITE_SLICE` (of `origins.WIDE_SLICE`
while the client keeps up, past the first `origins.WIDE_AFTER` bytes). So a download holds the verifier's held-back
slice, the chunk being sent and the transport buffers, whatever the bundle size. Both sides must keep
`limits.origin_min_rate` / `limits.client_min_rate` over `limits.rate_window` seconds of waiting on them
(`core/rates.py`), or the download is aborted (`origin_too_slow`, `client_too_slow`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager

from aiohttp import web
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict

from gateway.answers import problem_response
from gateway.config import Limits
from gateway.core.names import is_app_id, is_version
from gateway.core.plans import DownloadPlan, Unsatisfiable, plan_release, plan_response, read_whole
from gateway.core.policy import admit
from gateway.core.rates import MinRate, RateMeter
from gateway.core.reasons import Reason, Refusal
from gateway.core.verify import Verifier
from gateway.origins import Body, FileBody, OriginError, ReleaseNotFound
from gateway.recorder import Answered
from gateway.state_keys import RUNTIME, Runtime, request_audit, request_peer, request_snapshot

WRITE_SLICE = 64 * 1024  # chunks are verified and sent in slices of this size; the verifier holds back one
_HEADERS = CIMultiDict({"Content-Type": "application/zip", "Cache-Control": "no-store"})  # copied per answer
# aborts that say nothing about the bundle (not counted as verification results)
_NOT_VERIFIED = frozenset({Reason.CLIENT_GONE, Reason.SHUTDOWN, Reason.CLIENT_TOO_SLOW})
# aborts that are the origin's failure (origin_errors, /readyz)
_ORIGIN_FAILED = frozenset({Reason.ORIGIN_ERROR, Reason.SHORT_BODY, Reason.ORIGIN_TOO_SLOW})


async def get_bundle(request: web.Request) -> web.StreamResponse:
    rt, snap = request.app[RUNTIME], request_snapshot(request)
    record = request_audit(request)
    app_id = request.match_info["app_id"]
    version = request.match_info["version"]
    if not is_app_id(app_id) or not is_version(version):
        raise Refusal(Reason.BAD_REQUEST, "app id or version is malformed")
    record.app, record.version = app_id, version
    peer = request_peer(request)
    app = admit(snap.policies, peer, app_id)
    origin = snap.origins[app.origin]
    record.origin = origin.name
    started = time.monotonic()
    try:
        index = await origin.index(app_id)
    except ReleaseNotFound as exc:
        raise Refusal(Reason.RELEASE_UNKNOWN, f"no release index for {app_id}") from exc
    except OriginError as exc:
        rt.origin_failed(origin.name, str(exc))
        raise Refusal(exc.reason, str(exc)) from exc
    plan = plan_release(
        app,
        index,
        version,
        origin=origin.name,
        max_bundle_bytes=snap.config.limits.max_bundle_bytes,
        range_header=request.headers.get("Range"),
    )
    if isinstance(plan, Refusal):
        raise plan
    location = origin.locate(app_id, plan.location)
    body_cm = origin.open(app_id, location, snap.config.limits.chunk_size, peer, size_hint=plan.expect.size)
    return await stream_verified(request, rt, body_cm, plan, started)


async def stream_verified(
    request: web.Request,
    rt: Runtime,
    body_cm: AbstractAsyncContextManager[Body],
    plan: DownloadPlan,
    started: float,
) -> web.StreamResponse:
    """Carry out `plan`: stream an origin body to the client through a `Verifier`; abort the connection on any
    failure after the headers went out."""
    try:
        async with body_cm as body:
            metrics = rt.metrics
            seconds = metrics.origin_seconds.get(plan.origin) or metrics.origin_latency.labels(plan.origin)
            seconds.observe(time.monotonic() - started)
            rt.origin_ok(plan.origin)
            return await _respond(request, rt, body, plan)
    except OriginError as exc:  # raised while opening: nothing has been sent yet
        rt.origin_failed(plan.origin, str(exc))
        raise Refusal(exc.reason, str(exc)) from exc


def _unsatisfiable(refusal: Unsatisfiable) -> Answered:
    """416 to a range the gateway cannot answer exactly (never a 200 with the whole file: the plugin appends it)."""
    resp = problem_response(refusal.reason, refusal.detail)
    if refusal.size is not None:
        resp.headers["Content-Range"] = f"bytes */{refusal.size}"
    return Answered(refusal, resp)


async def _respond(request: web.Request, rt: Runtime, body: Body, plan: DownloadPlan) -> web.StreamResponse:
    record = request_audit(request)
    shape = plan_response(plan, body.declared_size)
    if isinstance(shape, Unsatisfiable):
        raise _unsatisfiable(shape)
    if isinstance(shape, Refusal):  # the origin declares another size than expected
        _verified(rt, shape.reason.label)
        raise shape
    expect = shape.expect
    headers = CIMultiDict(_HEADERS)  # a ready CIMultiDict: aiohttp copies it as is (a dict costs twice as much)
    headers["Content-Type"], headers["ETag"] = plan.content_type, f'"{expect.sha256}"'
    if shape.content_range is not None:
        headers["Content-Range"] = shape.content_range
    if shape.content_length is not None:
        headers["Content-Length"] = str(shape.content_length)
    resp = _BundleResponse(status=shape.status, headers=headers)
    if shape.content_length is None:
        resp.enable_chunked_encoding()
    verifier = Verifier(expect, send_from=shape.send_from, digest_factory=plan.digest_factory())
    limits = request_snapshot(request).config.limits
    if request.transport is not None:  # a write waits while more than this is buffered for the client
        request.transport.set_write_buffer_limits(high=limits.client_buffer, low=limits.client_buffer // 4)
    origin_rule = MinRate(limits.origin_min_rate, limits.rate_window)
    whole = read_whole(shape, origin_rule)
    rt.metrics.in_flight.inc()
    failed: Refusal | None = None
    sent = 0  # of a body read whole: what was handed to the client (the verifier released it all before)
    try:
        if whole is None:
            await resp.prepare(request)
            record.status = resp.status  # what went out, whatever becomes of the body
            await _pump(resp, verifier, body, limits, origin_rule)
        else:
            if isinstance(body, FileBody) and body.small:  # a small local file: read at once, no stream at all
                data = _read_at_once(verifier, body)
            else:
                data = await _read_whole(verifier, body, whole, origin_rule)
            await resp.prepare(request)
            record.status = resp.status
            client = _Client(resp, verifier, limits)
            sent = len(data)
            await client.send(data)
            await client.end()
    except Refusal as refusal:
        if not resp.prepared:  # read whole and refused: nothing went out; cut like a stream that failed
            await resp.prepare(request)
            record.status = resp.status
        _abort(request, resp)
        if refusal.reason not in _NOT_VERIFIED:
            _verified(rt, refusal.reason.label)
        if refusal.reason in _ORIGIN_FAILED:
            rt.origin_failed(plan.origin, refusal.detail)
        failed = Refusal(refusal.reason, refusal.detail)  # without the traceback (and the frames it holds)
    except asyncio.CancelledError:  # the recorder records it (client_gone or shutdown)
        verifier.error(Reason.SHUTDOWN if rt.live.shutting_down else Reason.CLIENT_GONE, "download cancelled")
        _abort(request, resp)
        raise
    else:
        _verified(rt, "passed")
    finally:
        record.bytes = verifier.released if whole is None else sent
        rt.metrics.bytes_streamed.inc(record.bytes)
        rt.metrics.in_flight.dec()
    if failed is not None:  # raised outside the except block: the outcome carries no traceback of the pump
        raise Answered(failed, resp, aborted=True)
    return resp


def _verified(rt: Runtime, result: str) -> None:
    """Count a finished verification by result (`ota_gateway_bundle_verifications_total`)."""
    (rt.metrics.verification_count.get(result) or rt.metrics.verifications.labels(result)).inc()


def _at(deadline: float) -> float | None:
    return None if math.isinf(deadline) else deadline


def _too_slow(verifier: Verifier, reason: Reason, rate: float, rule: MinRate, key: str) -> Refusal:
    return verifier.error(
        reason,
        f"{rate:.0f} bytes/s over the last {rule.window:g} s of waiting, "
        f"below limits.{key} ({rule.bytes_per_second} bytes/s)",
    )


async def _read_whole(verifier: Verifier, body: Body, seconds: float, rule: MinRate) -> bytes | memoryview:
    """A small body read whole through the verifier, the origin given `seconds` for it (`core/plans.read_whole`;
    no timer for a body that never waits): its verified bytes, or a `Refusal` before any of them is sent."""
    chunks = body.through(verifier, WRITE_SLICE)
    try:
        if math.isinf(seconds) or not body.waits:
            pieces = await _collect(chunks)
        else:
            async with asyncio.timeout(seconds):
                pieces = await _collect(chunks)
    except TimeoutError:
        rate = verifier.received / rule.window
        raise _too_slow(verifier, Reason.ORIGIN_TOO_SLOW, rate, rule, "origin_min_rate") from None
    except OriginError as exc:
        raise verifier.error(exc.reason, str(exc)) from None
    finally:
        await chunks.aclose()
    return _finished(verifier, pieces)


def _read_at_once(verifier: Verifier, body: FileBody) -> bytes | memoryview:
    """A small local file (`FileBody.small`: read on the event loop, it never waits) read to its end and fed to the
    verifier as it comes, without the stream's slicing, generator or timer: its verified bytes, or a `Refusal`
    before any of them is sent. Reads on to the file's real end (a file that grew past its size fails the
    verifier's size check at once), as the stream does."""
    pieces: list[bytes | memoryview] = []
    try:
        while data := body.read_file():
            if released := verifier.feed(data):
                pieces.append(released)
    except OriginError as exc:
        raise verifier.error(exc.reason, str(exc)) from None
    return _finished(verifier, pieces)


def _finished(verifier: Verifier, pieces: list[bytes | memoryview]) -> bytes | memoryview:
    """A body read whole: the pieces the verifier released, then its tail (or a `Refusal` if the body fails)."""
    tail = verifier.finish()
    if not pieces:
        return tail
    pieces.append(tail)
    return b"".join(pieces)


async def _collect(chunks: AsyncIterator[list[bytes | memoryview]]) -> list[bytes | memoryview]:
    """Every piece the verifier released, kept until the end: a copy of any view into a body's reused buffers."""
    pieces: list[bytes | memoryview] = []
    async for released in chunks:
        pieces += [bytes(p) if isinstance(p, memoryview) else p for p in released]
    return pieces


class _Client:
    """The client's side of one answer: pieces handed to its transport without waiting, and a wait on it only when
    its buffer is above the mark (or at the end), each wait under `limits.client_min_rate`."""

    def __init__(self, resp: _BundleResponse, verifier: Verifier, limits: Limits) -> None:
        self.resp, self.verifier, self.limits = resp, verifier, limits
        self.meter: RateMeter | None = None  # made at the first wait (most small answers never wait)
        self.unwaited = 0  # bytes handed to the client's transport since the last wait on it, not yet counted
        self.waits = 0  # waits on the client so far

    async def wait(self, step: Awaitable[None], moved: int) -> None:
        """Wait on the client (`step`: a drain or the end of the response) under its minimum rate; `moved` bytes
        count once it is done. A slow or vanished client is a refusal."""
        loop = asyncio.get_running_loop()
        if self.meter is None:
            self.meter = RateMeter(MinRate(self.limits.client_min_rate, self.limits.rate_window))
        meter = self.meter
        self.waits += 1
        if self.unwaited:  # written without waiting: they count now, as if each had been counted when written
            meter.moved(self.unwaited, loop.time())
            self.unwaited = 0
        meter.wait(loop.time())
        try:
            async with asyncio.timeout_at(_at(meter.deadline(loop.time()))):
                await step
        except TimeoutError:
            rate = meter.rate(loop.time())
            raise _too_slow(self.verifier, Reason.CLIENT_TOO_SLOW, rate, meter.rule, "client_min_rate") from None
        except (ConnectionError, RuntimeError) as exc:
            raise self.verifier.error(Reason.CLIENT_GONE, f"client went away: {exc}") from None
        meter.moved(moved, loop.time())

    async def send(self, piece: bytes | memoryview) -> None:
        """Hand one piece to the client's transport; if that put its buffer above the mark, wait until it is below
        again. Most writes of a fast client never wait, and cost no timer."""
        try:
            full = await self.resp.write_piece(piece)
        except (ConnectionError, RuntimeError) as exc:
            raise self.verifier.error(Reason.CLIENT_GONE, f"client went away: {exc}") from None
        if full:
            await self.wait(self.resp.drained(), len(piece))
        else:
            self.unwaited += len(piece)

    async def end(self) -> None:
        """End the answer, waiting on the client (under its minimum rate) if ending may wait for it."""
        if not self.resp.ends_at_once():
            await self.wait(self.resp.write_eof(), 0)
            return
        try:  # nothing to wait for: no timer
            await self.resp.write_eof()
        except (ConnectionError, RuntimeError) as exc:
            raise self.verifier.error(Reason.CLIENT_GONE, f"client went away: {exc}") from None


async def _pump(resp: _BundleResponse, verifier: Verifier, body: Body, limits: Limits, rule: MinRate) -> None:
    """Origin -> verifier -> client, one chunk at a time, each side held to its minimum rate."""
    loop = asyncio.get_running_loop()
    origin = RateMeter(rule)
    client = _Client(resp, verifier, limits)
    keeping_up = False  # the client took the last chunk without a wait (the body may read larger pieces)

    def origin_too_slow() -> Refusal:
        rate = origin.rate(loop.time())
        return _too_slow(verifier, Reason.ORIGIN_TOO_SLOW, rate, origin.rule, "origin_min_rate")

    chunks = body.through(verifier, WRITE_SLICE, lambda: keeping_up)
    try:
        while True:
            before = verifier.received
            origin.wait(loop.time())
            try:
                async with asyncio.timeout_at(_at(origin.deadline(loop.time()))):
                    pieces = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise origin_too_slow() from None
            except OriginError as exc:
                raise verifier.error(exc.reason, str(exc)) from None
            origin.moved(verifier.received - before, loop.time())
            if origin.too_slow(loop.time()):
                raise origin_too_slow()
            waited = client.waits
            while pieces:
                await client.send(pieces.pop(0))  # each piece let go of once written
            del pieces
            keeping_up = client.waits == waited
    finally:
        await chunks.aclose()
    tail = verifier.finish()
    if tail:
        await client.send(tail)
    await client.end()


class _BundleResponse(web.StreamResponse):
    """Headers leave with the first released bytes (one TLS record and one send for a small bundle, as aiohttp's
    own `Response` does), not alone at `prepare()`. Body pieces are handed to the transport without waiting
    (`write_piece`); the caller waits (`drained`) only when the client's buffer is above its mark."""

    _send_headers_immediately = False

    async def write_piece(self, data: bytes | memoryview) -> bool:
        """Write `data` without waiting for the client; True when the transport's buffer is now above its mark."""
        writer = self._payload_writer
        if not isinstance(writer, StreamWriter):  # not aiohttp's own writer: its write() waits by itself
            await self.write(data)
            return False
        if self._eof_sent:
            raise RuntimeError("Cannot call write() after write_eof()")
        await writer.write(data, drain=False)
        return writer.protocol.writing_paused

    def ends_at_once(self) -> bool:
        """Whether `write_eof()` now cannot wait for the client: a declared length (nothing more to write once the
        body is out) and the client's transport buffer below its mark."""
        writer = self._payload_writer
        return isinstance(writer, StreamWriter) and not writer.chunked and not writer.protocol.writing_paused

    async def drained(self) -> None:
        """Return once the client's transport buffer is below its low mark again."""
        if self._payload_writer is not None:
            await self._payload_writer.drain()


def _abort(request: web.Request, resp: web.StreamResponse) -> None:
    """Cut the connection without finishing the body: the client sees a short transfer, never a complete one."""
    resp.force_close()
    transport = request.transport
    if transport is not None:
        transport.abort()
