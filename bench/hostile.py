"""Hostile section of `make bench`: resident memory after connection churn, and connections held by a flood.

For ota-gateway and nginx (mTLS, serving the same file from disk, with the same timeouts where nginx has them):

1. **churn**: warm the server (100 complete downloads), read VmRSS; then `--churn` connections that go wrong, in
   equal parts: downloads aborted with a TCP RST after the first 64 KiB, TCP connections that never send a ClientHello
   (cut by the handshake timeout, 1 s here), and handshakes reset halfway (ClientHello sent, then RST); read VmRSS
   again after a 7 s pause (the gateway trims its heap every 5 s after churn). The growth is the number that
   matters (issue 8: within 32 MiB after 10,000).
2. **flood**: 1,000 TCP connections from one address that never start TLS: how many the server keeps open, and
   its RSS while it does.

    .venv/bin/python bench/hostile.py              # part of `make bench`
    .venv/bin/python bench/hostile.py --churn 1500 # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import ssl
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from run import (  # bench/run.py: the shared harness
    APP_DIR,
    BIG_VERSION,
    GATEWAY_ENV,
    BenchError,
    Server,
    Workspace,
    check_prerequisites,
    free_port,
    gateway_config,
    make_workspace,
    process_tree,
    run_gateway,
    run_nginx,
    write_nginx,
)

PROXY_CORE, CLIENT_CORE = 0, 1
MIB = 1024 * 1024
HANDSHAKE_TIMEOUT = 1
SETTLE = 7.0  # seconds after the churn before RSS is read: the gateway trims its heap every 5 s after churn
CONCURRENCY = 100  # connections in flight

NGINX_FILES = """\
    access_log {dir}/access.log;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certs}/server.pem;
        ssl_certificate_key {certs}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
        ssl_session_cache off;
        ssl_client_certificate {certs}/ca.pem;
        ssl_verify_client on;
        client_header_timeout {handshake}s;   # nginx times the TLS handshake with client_header_timeout
        location /files/ {{
            alias {origin}/;
            sendfile off;
            output_buffers 2 256k;
        }}
    }}
"""


def vmrss_kib(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def open_fds(pid: int) -> int:
    return sum(len(list(Path(f"/proc/{p}/fd").iterdir())) for p in process_tree(pid))


_next_source = 0


def source() -> tuple[str, int]:
    """Client addresses spread over 127.0.1.1-250, as many clients would be (the per-address cap stays out of it)."""
    global _next_source
    _next_source += 1
    return (f"127.0.1.{1 + _next_source % 250}", 0)


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def download(port: int, path: str, ctx: ssl.SSLContext, *, abort_after: int | None) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost", local_addr=source()
    )
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    if abort_after is not None:
        await reader.readexactly(abort_after)
        _rst(writer)
        return
    while await reader.read(MIB):
        pass
    writer.close()


async def silent(port: int) -> None:
    """A TCP connection that never starts TLS: the server's handshake timeout closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=source())
    await reader.read(1)  # until the server closes
    writer.close()


def client_hello(ctx: ssl.SSLContext) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def half_handshake(port: int, hello: bytes) -> None:
    """ClientHello sent, the server's answer read, then a TCP RST."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=source())
    writer.write(hello)
    await reader.read(1024)
    _rst(writer)


async def run_all(jobs: list[Callable[[], Awaitable[None]]], concurrency: int = CONCURRENCY) -> int:
    sem = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        nonlocal failures
        async with sem:
            try:
                await asyncio.wait_for(job(), 30)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
                failures += 1

    await asyncio.gather(*(one(j) for j in jobs))
    return failures


@dataclass
class ChurnResult:
    name: str
    warm_kib: int  # after 100 complete downloads
    end_kib: int  # right at the end of the churn
    after_kib: int  # after SETTLE seconds
    fds_before: int
    fds_after: int
    seconds: float
    failures: int  # jobs that did not go as scripted (e.g. a download refused before its first 64 KiB)

    @property
    def growth_mib(self) -> float:
        return (self.after_kib - self.warm_kib) / 1024


def churn(server: Server, ws: Workspace, path: str, n: int) -> ChurnResult:
    ctx = ws.client_context()
    hello = client_hello(ctx)
    warm = [lambda: download(server.port, path, ctx, abort_after=None) for _ in range(100)]
    asyncio.run(run_all(warm, 10))
    time.sleep(1.5)
    warm_kib, fds_before = vmrss_kib(server.pid), open_fds(server.pid)
    started = time.monotonic()
    failures = asyncio.run(run_all(_churn_jobs(server.port, path, ctx, hello, n // 3)))
    seconds = time.monotonic() - started
    peak_kib = vmrss_kib(server.pid)
    time.sleep(SETTLE)
    after = vmrss_kib(server.pid)
    return ChurnResult(server.name, warm_kib, peak_kib, after, fds_before, open_fds(server.pid), seconds, failures)


Job = Callable[[], Awaitable[None]]


def _churn_jobs(port: int, path: str, ctx: ssl.SSLContext, hello: bytes, each: int) -> list[Job]:
    jobs: list[Job] = []
    for _ in range(each):
        jobs.append(lambda: download(port, path, ctx, abort_after=64 * 1024))
        jobs.append(lambda: silent(port))
        jobs.append(lambda: half_handshake(port, hello))
    return jobs


@dataclass
class FloodResult:
    name: str
    sent: int
    held: int
    rss_before_kib: int
    rss_during_kib: int


def flood(server: Server, count: int) -> FloodResult:
    before = vmrss_kib(server.pid)
    fds0 = open_fds(server.pid)
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", server.port))
        socks.append(s)
    time.sleep(0.5)
    held = open_fds(server.pid) - fds0
    during = vmrss_kib(server.pid)
    for s in socks:
        s.close()
    time.sleep(HANDSHAKE_TIMEOUT + 0.5)
    return FloodResult(server.name, count, held, before, during)


def gateway_hostile_config(ws: Workspace, directory: Path) -> Path:
    path = gateway_config(ws, directory, free_port())
    cfg = yaml.safe_load(path.read_text())
    cfg["listeners"][0]["handshake_timeout"] = HANDSHAKE_TIMEOUT
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def render(churns: list[ChurnResult], floods: list[FloodResult], n: int) -> str:
    out = [
        f"### Hostile: RSS after {n:,} bad connections (1/3 aborted downloads, 1/3 handshake timeouts, "
        "1/3 half handshakes reset)",
        "",
        "| server | RSS warm (MiB) | at the end of the churn | 7 s later | growth (MiB) | fds before / after "
        "| churn time (s) | jobs not as scripted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in churns:
        out.append(
            f"| {c.name} | {c.warm_kib / 1024:.1f} | {c.end_kib / 1024:.1f} | {c.after_kib / 1024:.1f} | "
            f"{c.growth_mib:+.1f} | {c.fds_before} / {c.fds_after} | {c.seconds:.1f} | {c.failures} |"
        )
    out += [
        "",
        "### Hostile: 1,000 TCP connections from one address that never start TLS",
        "",
        "| server | connections held | RSS before (MiB) | RSS while held (MiB) |",
        "|---|---|---|---|",
    ]
    for f in floods:
        out.append(f"| {f.name} | {f.held} | {f.rss_before_kib / 1024:.1f} | {f.rss_during_kib / 1024:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--churn", type=int, default=10_000, help="bad connections per server (default 10,000)")
    parser.add_argument("--flood", type=int, default=1_000)
    parser.add_argument("--only", choices=["gateway", "nginx"], help="measure one server")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the gateway (experiments)")
    args = parser.parse_args(argv)
    for item in args.env:
        key, _, value = item.partition("=")
        GATEWAY_ENV[key] = value
    check_prerequisites()
    os.sched_setaffinity(0, {CLIENT_CORE})  # the servers run on PROXY_CORE
    churns: list[ChurnResult] = []
    floods: list[FloodResult] = []
    with tempfile.TemporaryDirectory(prefix="ota-hostile-") as tmp:
        ws = make_workspace(Path(tmp), 4 * MIB, 1024)
        path = f"/bundles/{APP_DIR}/{BIG_VERSION}.zip"
        if args.only in (None, "gateway"):
            config = gateway_hostile_config(ws, Path(tmp) / "gw")
            with run_gateway("ota-gateway", config, PROXY_CORE) as gw:
                churns.append(churn(gw, ws, path, args.churn))
                floods.append(flood(gw, args.flood))
        if args.only in (None, "nginx"):
            port = free_port()
            body = NGINX_FILES.format(
                dir=Path(tmp) / "nginx", port=port, certs=ws.certs, origin=ws.origin, handshake=HANDSHAKE_TIMEOUT
            )
            conf = write_nginx(Path(tmp) / "nginx", body)
            with run_nginx("nginx", conf, port, PROXY_CORE) as ngx:
                churns.append(churn(ngx, ws, f"/files/{APP_DIR}/{BIG_VERSION}.zip", args.churn))
                floods.append(flood(ngx, args.flood))
    report = render(churns, floods, args.churn)
    print(report)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "hostile.md").write_text(report)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(1)
