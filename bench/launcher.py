"""Bench-only launcher: `ota-gateway` with optional monkeypatches and an optional profiler, for A/B runs.

Nothing here changes gateway/ on disk: each patch replaces one function or default in the running process, so an
idea can be measured before anyone edits the real code. Without patches it is exactly `ota-gateway`.

    python bench/launcher.py [--patch NAME[=VALUE]]... [--cprofile FILE] -- serve --config gateway.yaml [...]

`--cprofile` profiles the whole process and writes pstats to FILE when the gateway stops (SIGTERM). Patches:
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import sys
from collections.abc import Callable
from typing import Any

PATCHES: dict[str, tuple[str, Callable[[str | None], None]]] = {}


def patch(name: str, doc: str) -> Callable[[Callable[[str | None], None]], Callable[[str | None], None]]:
    def register(fn: Callable[[str | None], None]) -> Callable[[str | None], None]:
        PATCHES[name] = (doc, fn)
        return fn

    return register


def _size(value: str | None, default: int) -> int:
    if not value:
        return default
    units = {"k": 1024, "m": 1024 * 1024}
    v = value.lower().rstrip("ib")
    return int(float(v[:-1]) * units[v[-1]]) if v[-1] in units else int(v)


@patch("pause-accept", "pause reading on a fresh TCP connection until start_tls takes it (ClientHello race)")
def _pause_accept(value: str | None) -> None:
    from gateway import listener

    original = listener._Acceptor.connection_made

    def connection_made(self: Any, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]  # start_tls resumes it
        original(self, transport)

    listener._Acceptor.connection_made = connection_made  # type: ignore[method-assign]


# One replacement for handlers/bundles.py `_pump`, configured by the patches below. With the defaults it does what
# the original does (feed each origin chunk to the verifier, send what it releases under a write timeout).
PUMP: dict[str, Any] = {"thread_min": None, "timeout": True, "write_high": None, "coalesce": 0, "stats": False}
CHUNK_SIZES: list[int] = []


class _Prehashed:
    """A verifier digest whose bytes were already hashed elsewhere (in the origin's reader thread)."""

    def __init__(self, digest: Any) -> None:
        self._digest = digest

    def update(self, data: bytes, /) -> None:
        pass

    def hexdigest(self) -> str:
        return str(self._digest.hexdigest())


def _install_pump() -> None:
    from aiohttp import web

    from gateway.core.reasons import Reason
    from gateway.core.verify import Verifier
    from gateway.handlers import bundles
    from gateway.origins import Body, OriginError

    if getattr(bundles._pump, "bench_patched", False):
        return

    async def _pump(resp: web.StreamResponse, verifier: Verifier, body: Body) -> None:
        prehashed = getattr(body, "bench_digest", None)
        if prehashed is not None:  # the origin hashes in its reader thread (dir-read-hash): don't hash twice
            verifier._digest = _Prehashed(prehashed)
        if PUMP["write_high"]:
            req = getattr(resp, "_req", None)
            if req is not None and req.transport is not None:
                req.transport.set_write_buffer_limits(high=PUMP["write_high"])
        thread_min = PUMP["thread_min"]
        use_timeout = PUMP["timeout"]

        async def send(data: bytes | None) -> None:
            """Write `data`, or finish the response when it is None (as the gateway's own _pump does)."""
            try:
                if use_timeout:
                    async with asyncio.timeout(bundles.CLIENT_WRITE_TIMEOUT):
                        await (resp.write_eof() if data is None else resp.write(data))
                else:
                    await (resp.write_eof() if data is None else resp.write(data))
            except TimeoutError:
                raise verifier.error(Reason.TOO_SLOW, "client did not accept data in time") from None
            except (ConnectionError, RuntimeError) as exc:
                raise verifier.error(Reason.CLIENT_GONE, f"client went away: {exc}") from None

        async def feed(chunk: bytes) -> bytes:
            if thread_min is not None and len(chunk) >= thread_min:
                return await asyncio.to_thread(verifier.feed, chunk)  # hashlib releases the GIL
            return verifier.feed(chunk)

        coalesce = PUMP["coalesce"]
        pending: list[bytes] = []
        pending_size = 0
        try:
            async for chunk in body.chunks:
                if PUMP["stats"]:
                    CHUNK_SIZES.append(len(chunk))
                if coalesce:
                    pending.append(chunk)
                    pending_size += len(chunk)
                    if pending_size < coalesce:
                        continue
                    chunk = b"".join(pending) if len(pending) > 1 else pending[0]
                    pending.clear()
                    pending_size = 0
                out = await feed(chunk)
                if out:
                    await send(out)
            if pending:
                out = await feed(b"".join(pending))
                if out:
                    await send(out)
        except OriginError as exc:
            raise verifier.error(Reason.ORIGIN_ERROR, str(exc)) from None
        tail = verifier.finish()
        await send(tail)
        await send(None)

    _pump.bench_patched = True  # type: ignore[attr-defined]
    bundles._pump = _pump


@patch("thread-hash", "hash chunks of at least VALUE bytes (default 65536) in a worker thread (asyncio.to_thread)")
def _thread_hash(value: str | None) -> None:
    _install_pump()
    PUMP["thread_min"] = _size(value, 65536)


@patch("no-write-timeout", "write without the per-chunk asyncio.timeout() (measures what the timeout costs)")
def _no_write_timeout(value: str | None) -> None:
    _install_pump()
    PUMP["timeout"] = False


@patch("write-high", "raise the client transport's write-buffer high-water mark to VALUE bytes (default 1 MiB)")
def _write_high(value: str | None) -> None:
    _install_pump()
    PUMP["write_high"] = _size(value, 1024 * 1024)


@patch("coalesce", "join origin chunks until at least VALUE bytes (default 256 KiB) before verifying and sending")
def _coalesce(value: str | None) -> None:
    _install_pump()
    PUMP["coalesce"] = _size(value, 256 * 1024)


@patch("same-pump", "the replacement pump with every option off (checks that the replacement itself costs nothing)")
def _same_pump(value: str | None) -> None:
    _install_pump()


@patch("chunk-stats", "print a histogram of origin chunk sizes on stderr at exit")
def _chunk_stats(value: str | None) -> None:
    import atexit
    import collections

    _install_pump()
    PUMP["stats"] = True

    def report() -> None:
        if not CHUNK_SIZES:
            return
        buckets = collections.Counter(1 << max(0, (n - 1).bit_length()) for n in CHUNK_SIZES)
        total = sum(CHUNK_SIZES)
        print(f"bench: {len(CHUNK_SIZES)} origin chunks, mean {total / len(CHUNK_SIZES):.0f} bytes", file=sys.stderr)
        for size, count in sorted(buckets.items()):
            print(f"bench:   <= {size:>8} bytes: {count}", file=sys.stderr)

    atexit.register(report)


@patch("read-bufsize", "aiohttp ClientSession read_bufsize VALUE (default 1 MiB; aiohttp's default is 64 KiB)")
def _read_bufsize(value: str | None) -> None:
    import aiohttp

    size = _size(value, 1024 * 1024)
    original = aiohttp.ClientSession.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("read_bufsize", size)
        original(self, *args, **kwargs)

    aiohttp.ClientSession.__init__ = init  # type: ignore[method-assign]


def _install_directory_open(*, read_hash: bool) -> None:
    """DirectoryOrigin.open with one thread hop to open+stat (+read a file that fits one chunk), and optionally each
    chunk read and hashed in the same hop, one chunk read ahead."""
    import hashlib
    import os
    from contextlib import asynccontextmanager
    from pathlib import Path

    from gateway import origins
    from gateway.origins import Body, OriginError

    _install_pump()

    @asynccontextmanager
    async def open_(self: Any, app_id: str, release: Any, chunk_size: int, *args: Any, **kwargs: Any) -> Any:
        path = Path(self.root) / app_id / release.file
        digest = hashlib.sha256() if read_hash else None

        def open_stat() -> tuple[Any, int, bytes | None]:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
            try:
                size = os.fstat(handle.fileno()).st_size
                first = None
                if size <= chunk_size:
                    first = handle.read()
                    if digest is not None:
                        digest.update(first)
                return handle, size, first
            except BaseException:
                handle.close()
                raise

        try:
            handle, size, first = await asyncio.to_thread(open_stat)
        except FileNotFoundError:
            raise OriginError(f"origin {self.name}: {path} is listed in the index but missing") from None
        except OSError as exc:
            raise OriginError(f"origin {self.name}: cannot open {path}: {exc.strerror}") from None

        def read() -> bytes:
            data = handle.read(chunk_size)
            if digest is not None and data:
                digest.update(data)  # hashlib releases the GIL: this overlaps with the event loop
            return bytes(data)

        pending: list[asyncio.Future[bytes]] = []

        async def chunks() -> Any:
            if first is not None:
                if first:
                    yield first
                return
            loop = asyncio.get_running_loop()
            try:
                fut = loop.run_in_executor(None, read)
                while True:
                    pending[:] = [fut]
                    data = await fut
                    if not data:
                        return
                    if read_hash:  # read (and hash) the next chunk while this one is encrypted and sent
                        fut = loop.run_in_executor(None, read)
                        pending[:] = [fut]
                    yield data
                    if not read_hash:
                        fut = loop.run_in_executor(None, read)
            except OSError as exc:
                raise OriginError(f"origin {self.name}: read error on {path}: {exc.strerror}") from None

        try:
            body = Body(size, chunks())
            if digest is not None:
                body.bench_digest = digest  # type: ignore[attr-defined]
            yield body
        finally:
            for fut in pending:
                if not fut.done():
                    await asyncio.wait([fut])
            handle.close()

    origins.DirectoryOrigin.open = open_  # type: ignore[method-assign,assignment]


@patch("dir-fast", "directory origin: open+stat (+ the whole file if it fits one chunk) in one thread hop")
def _dir_fast(value: str | None) -> None:
    _install_directory_open(read_hash=False)


@patch("dir-read-hash", "dir-fast, and each chunk read AND hashed in the same worker call, one chunk read ahead")
def _dir_read_hash(value: str | None) -> None:
    _install_directory_open(read_hash=True)


@patch("audit-fast", "audit line from vars(record) instead of dataclasses.asdict (which deep-copies)")
def _audit_fast(value: str | None) -> None:
    import json
    import time

    from gateway import audit

    def write(self: Any, record: Any) -> None:
        record.time = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
        line = json.dumps({k: v for k, v in vars(record).items() if v is not None}, separators=(",", ":"))
        try:
            self._out.write(line + "\n")
            self._out.flush()
        except (OSError, ValueError):
            pass

    audit.AuditLog.write = write  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    epilog = "\n".join(f"  {name}: {doc}" for name, (doc, _) in sorted(PATCHES.items()))
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patch", action="append", default=[], help="NAME or NAME=VALUE (repeatable)")
    parser.add_argument("--cprofile", help="write cProfile stats to this file at exit")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the ota-gateway arguments")
    args = parser.parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    for spec in args.patch:
        name, _, value = spec.partition("=")
        if name not in PATCHES:
            parser.error(f"unknown patch {name!r}; known: {', '.join(sorted(PATCHES))}")
        PATCHES[name][1](value or None)
    from gateway.cli import main as gateway_main

    if not args.cprofile:
        return gateway_main(rest)
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return gateway_main(rest)
    finally:
        profiler.disable()
        profiler.dump_stats(args.cprofile)


if __name__ == "__main__":
    sys.exit(main())
