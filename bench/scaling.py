"""Scaling across cores: `serve --workers 2` against `--workers 1`, and nginx with 2 worker processes against 1.

Measures requests per second, with the client load coming from separate processes (`--clients` processes, each
with `--connections` keep-alive mTLS connections, one request in flight per connection; `--client` picks the load
generator, by default non-blocking `ssl` sockets on one selector sending prebuilt requests), and
the server's CPU per request (utime+stime of its process tree, as `bench/run.py` reads it):

- **update checks**: `POST /updates` of the directory origin's app (the full path: body checks, policy, rate limit
  and channel high-water mark in the shared SQLite state store, review, ticket, audit line, metrics); nginx has no
  peer for these;
- **1 KiB downloads**: `GET /bundles/<app>/1.0.0.zip` through the gateway's HTTPS origin (the nginx origin of
  `bench/run.py`) and its directory origin, and through nginx as an mTLS proxy to the same HTTPS origin
  (`bench/run.py`'s proxy config, `worker_processes` 1 and 2).

Nothing is pinned: servers, origin and clients share both cores, as in production. Each connection has its own
client certificate (devices do; the per-certificate rate limit is then not what is measured). Every row runs
`--seconds` per round, rounds go round-robin over all rows (all servers are started first), medians are reported.
The split column says how the server CPU of a 2-process row was shared between its workers (SO_REUSEPORT hashes
each connection to one of them). The client processes' own CPU per request is shown: on a 2-core machine they
take their part of the cores the servers would need, so the ceiling for "2 workers / 1 worker" is below 2.

    .venv/bin/python bench/scaling.py                # part of `make bench` (about 2 minutes)
    .venv/bin/python bench/scaling.py --quick        # 1 round of 2 s: checks the harness
    .venv/bin/python bench/scaling.py --gateway-src DIR   # the same on another source copy
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # bench/run.py: workspace, servers, CPU accounting

ALL_CORES = f"0-{(os.cpu_count() or 1) - 1}"  # nginx unpinned: taskset over every core, as the gateways run
CHECK = "check"
GET = "get"


# --------------------------------------------------------------------------------------------------------------
# the client (a separate process: `scaling.py --client SPEC`)


def _request(kind: str, path: str, app: str, device: str) -> bytes:
    if kind == GET:
        return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    body = json.dumps(
        {
            "platform": "android",
            "device_id": device,
            "app_id": app,
            "version_build": "0.1.0",
            "version_name": "0.9.0",
            "plugin_version": "8.51.14",
            "is_emulator": False,
            "is_prod": True,
        }
    ).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _contexts(spec: dict[str, Any]) -> list[ssl.SSLContext]:
    ctxs = []
    for cert in spec["certs"]:
        ctx = ssl.create_default_context(cafile=spec["ca"])
        ctx.load_cert_chain(cert, cert.replace(".pem", ".key"))
        ctxs.append(ctx)
    return ctxs


def _requests(spec: dict[str, Any]) -> list[bytes]:
    """Prebuilt request bytes for one connection: 64 update checks of one device each, or the same GET."""
    return [_request(spec["kind"], spec["path"], spec["app"], str(uuid.uuid4())) for _ in range(64)]


def _answer_size(buf: bytes | bytearray, end: int) -> int:
    """Head plus body of the answer whose head ends at `buf[end:end + 4]` (`Content-Length`, as both servers spell
    it; any other spelling is looked up case-blind)."""
    at = buf.find(b"\r\nContent-Length:", 0, end)
    if at < 0:
        at = bytes(buf[:end]).lower().find(b"\r\ncontent-length:")
        if at < 0:
            raise RuntimeError(f"answer without Content-Length: {bytes(buf[:end])!r}")
    at += 17
    return end + 4 + int(buf[at : buf.find(b"\r\n", at)])


def _report(done: list[int], wall: float, cpu: float, errors: list[str]) -> None:
    print(json.dumps({"ok": done[0], "bad": done[1], "wall": wall, "cpu": cpu, "errors": errors[:3]}), flush=True)


# the kind `raw`: an asyncio Protocol on uvloop per connection that sends prebuilt request bytes and
# reads only the status code and Content-Length (bench/README.md, "Scaling, session 5")


class _RawConnection(asyncio.Protocol):
    def __init__(self, requests: list[bytes], counts: list[int], stop: asyncio.Event, closed: asyncio.Future[None]):
        self.requests, self.counts, self.stop, self.closed = requests, counts, stop, closed
        self.buf = bytearray()
        self.need = -1  # bytes of the answer being read (head and body), -1 until its head is in
        self.sent = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self) -> None:
        assert self.transport is not None
        self.transport.write(self.requests[self.sent & 63])
        self.sent += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.need = _answer_size(buf, end)
        if len(buf) < self.need:
            return
        if len(buf) > self.need:
            raise RuntimeError(f"{len(buf) - self.need} bytes after the answer, one request in flight")
        self.counts[0 if buf[9:12] == b"200" else 1] += 1
        buf.clear()
        self.need = -1
        if self.stop.is_set():
            assert self.transport is not None
            self.transport.close()
        else:
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            if exc is None and not self.stop.is_set():
                exc = ConnectionError("the server closed the connection")
            self.closed.set_exception(exc) if exc else self.closed.set_result(None)


async def _raw_main(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    ctxs = _contexts(spec)
    stop = asyncio.Event()
    counts = [0, 0]
    conns: list[_RawConnection] = []
    for i in range(spec["connections"]):
        closed: asyncio.Future[None] = loop.create_future()
        reqs = _requests(spec)
        _, proto = await loop.create_connection(
            lambda reqs=reqs, closed=closed: _RawConnection(reqs, counts, stop, closed),  # type: ignore[misc]
            "127.0.0.1",
            spec["port"],
            ssl=ctxs[i % len(ctxs)],
            server_hostname="localhost",
        )
        conns.append(proto)
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    c0, t0 = time.process_time(), time.perf_counter()
    for conn in conns:
        conn.send()
    await asyncio.sleep(spec["seconds"])
    done = list(counts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    await asyncio.wait([c.closed for c in conns], timeout=10)
    errors = [str(c.closed.exception()) for c in conns if c.closed.done() and c.closed.exception()]
    _report(done, wall, cpu, errors)


# the kind `streams` (the client of sessions 2-4, kept to compare): asyncio streams, readuntil and readexactly


async def _connection(
    spec: dict[str, Any], ctx: ssl.SSLContext, go: asyncio.Event, stop: asyncio.Event, counts: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", spec["port"], ssl=ctx, server_hostname="localhost")
    requests = _requests(spec)
    await go.wait()
    i = 0
    try:
        while not stop.is_set():
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"content-length:")
            if at < 0:
                raise RuntimeError(f"answer without Content-Length: {head!r}")
            length = int(lower[at + 15 : lower.find(b"\r\n", at)])
            await reader.readexactly(length)
            counts[0 if status == 200 else 1] += 1
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _streams_main(spec: dict[str, Any]) -> None:
    ctxs = _contexts(spec)
    go, stop = asyncio.Event(), asyncio.Event()
    counts = [0, 0]
    tasks = [
        asyncio.ensure_future(_connection(spec, ctxs[i % len(ctxs)], go, stop, counts))
        for i in range(spec["connections"])
    ]
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0.5)  # handshakes
    for t in tasks:
        if t.done() and t.exception():
            raise t.exception()  # type: ignore[misc]
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    c0, t0 = time.process_time(), time.perf_counter()
    go.set()
    await asyncio.sleep(spec["seconds"])
    done = list(counts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    await asyncio.wait(tasks, timeout=10)
    errors = [str(t.exception()) for t in tasks if t.done() and not t.cancelled() and t.exception()]
    _report(done, wall, cpu, errors)


# the kind `selector` (the default): non-blocking `ssl.SSLSocket`s on one epoll selector, no event loop, prebuilt
# request bytes, only the status code and Content-Length read: the least CPU per request of the three kinds
# (bench/README.md, "Scaling, session 5")


def _selector_main(spec: dict[str, Any]) -> None:
    ctxs = _contexts(spec)
    socks = []
    for i in range(spec["connections"]):
        raw = socket.create_connection(("127.0.0.1", spec["port"]))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = ctxs[i % len(ctxs)].wrap_socket(raw, server_hostname="localhost")
        sock.setblocking(False)
        socks.append(sock)
    sel = selectors.DefaultSelector()
    # per connection: [socket, buffer, bytes of the answer being read or -1, requests, requests sent]
    states = [[s, bytearray(), -1, _requests(spec), 0] for s in socks]
    for st in states:
        sel.register(st[0], selectors.EVENT_READ, st)
    print("ready", flush=True)
    sys.stdin.readline()
    counts = [0, 0]
    c0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + spec["seconds"]
    for st in states:
        st[0].send(st[3][0])
        st[4] = 1
    select, perf = sel.select, time.perf_counter
    while perf() < deadline:
        for key, _ in select(0.5):
            st = key.data
            sock, buf = st[0], st[1]
            try:
                data = sock.recv(65536)
            except ssl.SSLWantReadError:
                continue
            if not data:
                raise RuntimeError("the server closed the connection")
            buf += data
            while sock.pending():
                buf += sock.recv(65536)
            if st[2] < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                st[2] = _answer_size(buf, end)
            if len(buf) < st[2]:
                continue
            counts[0 if buf[9:12] == b"200" else 1] += 1
            buf.clear()
            st[2] = -1
            sock.send(st[3][st[4] & 63])
            st[4] += 1
    done = list(counts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    for s in socks:
        s.close()
    _report(done, wall, cpu, [])


CLIENTS = {"raw": _raw_main, "streams": _streams_main, "selector": _selector_main}


def client_process(spec: dict[str, Any]) -> int:
    main = CLIENTS[spec["client"]]
    if not asyncio.iscoroutinefunction(main):
        main(spec)
        return 0
    try:
        import uvloop

        uvloop.run(main(spec))
    except ImportError:
        asyncio.run(main(spec))
    return 0


# --------------------------------------------------------------------------------------------------------------
# the harness


@dataclass
class Row:
    label: str
    kind: str  # CHECK or GET
    server: harness.Server
    path: str
    app: str
    client: str = "selector"  # which client drives it (CLIENTS)
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    client_us: list[float] = field(default_factory=list)
    split: list[float] = field(default_factory=list)  # the busiest process's share of the server CPU
    idle: list[float] = field(default_factory=list)  # the machine's idle share of all cores during the row
    other: list[float] = field(default_factory=list)  # cores busy with anything but this server and its clients


def _worker_pids(server: harness.Server) -> list[int]:
    """The processes that serve: the children of a supervisor or nginx master, or the process itself."""
    tree = harness.process_tree(server.proc.pid)
    return tree[1:] or tree


def _cpu(pid: int) -> float:
    with contextlib.suppress(OSError):
        f = harness._stat_fields(pid)
        return (int(f[11]) + int(f[12])) / harness.CLK_TCK
    return 0.0


def machine_times() -> tuple[float, float]:
    """(idle, busy) CPU seconds of the whole machine since boot, all cores (/proc/stat; iowait counts as idle)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    return idle / harness.CLK_TCK, (sum(f[:8]) - idle) / harness.CLK_TCK


def drive(row: Row, certs: list[Path], ca: Path, clients: int, connections: int, seconds: float) -> None:
    """`clients` client processes with `connections` connections each against `row` for `seconds`."""
    procs = []
    per = [certs[i::clients] for i in range(clients)]
    try:
        for i in range(clients):
            spec = {
                "port": row.server.port,
                "kind": row.kind,
                "path": row.path,
                "app": row.app,
                "ca": str(ca),
                "certs": [str(c) for c in per[i]],
                "connections": connections,
                "seconds": seconds,
                "client": row.client,
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--run-client", json.dumps(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise harness.BenchError(f"{row.label}: a client did not connect (exit {p.wait()})")
        pids = _worker_pids(row.server)
        total0, each0 = harness.cpu_seconds(row.server.proc.pid), [_cpu(p) for p in pids]
        idle0, busy0 = machine_times()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            assert p.stdout is not None
            results.append(json.loads(p.stdout.readline()))
        total1, each1 = harness.cpu_seconds(row.server.proc.pid), [_cpu(p) for p in pids]
        idle1, busy1 = machine_times()
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.stdin.close()  # type: ignore[union-attr]
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    ok, bad = sum(r["ok"] for r in results), sum(r["bad"] for r in results)
    errors = [e for r in results for e in r["errors"]]
    if bad or errors or not ok:
        raise harness.BenchError(f"{row.label}: {ok} answers 200, {bad} other answers, errors: {errors[:3]}")
    wall = max(r["wall"] for r in results)
    row.rates.append(ok / wall)
    row.cpu_us.append((total1 - total0) / ok * 1e6)
    row.client_us.append(sum(r["cpu"] for r in results) / ok * 1e6)
    row.idle.append((idle1 - idle0) / ((idle1 - idle0) + (busy1 - busy0)))
    # what else ran (the origin of an HTTPS row, this harness, other users of the machine), in cores
    row.other.append(max(0.0, (busy1 - busy0) - (total1 - total0) - sum(r["cpu"] for r in results)) / wall)
    used = [b - a for a, b in zip(each0, each1, strict=True)]
    if len(used) > 1 and sum(used) > 0:
        row.split.append(max(used) / sum(used))


def memory_kib(pid: int) -> dict[str, int]:
    """RSS, PSS (shared pages divided among the processes that map them) and USS (pages of this process alone)."""
    out = {"rss": 0, "pss": 0, "uss": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            value = int(rest.split()[0]) if rest.strip() and rest.split()[0].isdigit() else 0
            if key == "Rss":
                out["rss"] = value
            elif key == "Pss":
                out["pss"] = value
            elif key in ("Private_Clean", "Private_Dirty"):
                out["uss"] += value
    return out


def memory_rows(servers: list[harness.Server]) -> list[str]:
    """One line per server: its processes' memory after the run (every worker has served requests by then)."""
    lines = [
        "| server | processes | RSS MiB, sum | PSS MiB, sum | USS MiB, sum | each worker: RSS / PSS / USS MiB |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for server in servers:
        tree = harness.process_tree(server.proc.pid)
        mem = {pid: memory_kib(pid) for pid in tree}
        total = {k: sum(m[k] for m in mem.values()) / 1024 for k in ("rss", "pss", "uss")}
        each = " ; ".join(
            f"{mem[pid]['rss'] / 1024:.1f} / {mem[pid]['pss'] / 1024:.1f} / {mem[pid]['uss'] / 1024:.1f}"
            for pid in _worker_pids(server)
        )
        lines.append(
            f"| {server.name} | {len(tree)} | {total['rss']:.1f} | {total['pss']:.1f} | {total['uss']:.1f} | {each} |"
        )
    return lines


def write_policy(ws: harness.Workspace, config: Path) -> None:
    """Both apps, admitted for every certificate of the client CA, rate limits far above what is measured."""
    apps = []
    for app, origin in ((harness.APP_DIR, "local"), (harness.APP_CDN, "cdn")):
        apps.append(
            {
                "app_id": app,
                "origin": origin,
                "channels": {"default": "production", "allowed": ["production"]},
                "clients": [{"name": "bench", "issuer": [ws.ca.stem]}],
                "rate_limits": {"updates_per_minute": 100000},
            }
        )
    (config.parent / "policies" / "bench.yaml").write_text(yaml.safe_dump({"apps": apps}, sort_keys=False))


def issue_certs(ws: harness.Workspace, n: int) -> list[Path]:
    """`n` client certificates from the workspace's CA (as `ota-gateway certs issue-client` makes them)."""
    from gateway.certs import issue_client

    return [issue_client(ws.certs, f"scaling-{i}").cert_path for i in range(n)]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(
    rows: list[Row], memory: list[str], args: argparse.Namespace, load: tuple[float, float, float], took: float
) -> str:
    by = {r.label: r for r in rows}
    info = harness.machine_info()
    lines = [
        "# Scaling across cores (bench/scaling.py)",
        "",
        f"{dt_now()}; {info.get('cpu', '?')}; gateway {harness.gateway_revision()}; load average before the run "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        f"{args.clients} client processes x {args.connections} keep-alive mTLS connections (one request in flight "
        f"each, one client certificate each), {args.seconds:g} s per row and round, medians of {args.rounds} "
        "round(s); nothing pinned.",
        "",
        "| server | requests | requests/s | server CPU us / request | client CPU us / request | busiest worker's "
        "share of the CPU | machine idle | other processes, cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        split = f"{_median(r.split) * 100:.0f} %" if r.split else ""
        what = "update check" if r.kind == CHECK else "1 KiB GET"
        lines.append(
            f"| {r.label} | {what} | {_median(r.rates):.0f} | {_median(r.cpu_us):.0f} | "
            f"{_median(r.client_us):.0f} | {split} | {_median(r.idle) * 100:.0f} % | {_median(r.other):.2f} |"
        )
    cores = len(os.sched_getaffinity(0))
    lines += [
        "",
        f"| ratio (requests/s) | | | ceiling: what {cores} cores allow (1) | ceiling with the other processes (2) |",
        "|---|---|---:|---:|---:|",
    ]
    pairs = [
        ("gateway --workers 2, update checks", "gateway --workers 1, update checks", "target >= 1.7x"),
        ("gateway --workers 2, directory origin", "gateway --workers 1, directory origin", ""),
        ("gateway --workers 2, HTTPS origin", "gateway --workers 1, HTTPS origin", ""),
        ("nginx worker_processes 2", "nginx worker_processes 1", "what this machine and client allow"),
        ("gateway --workers 2, HTTPS origin", "nginx worker_processes 2", "same origin, same client"),
    ]
    for a, b, note in pairs:
        if a in by and b in by:
            ratio = _median(by[a].rates) / _median(by[b].rates)
            ceiling = shared = ""
            if by[a].kind == by[b].kind and a.split(" ")[0] == b.split(" ")[0]:  # the same server, more workers
                per = _median(by[a].cpu_us) + _median(by[a].client_us)
                ceiling = f"{cores * 1e6 / per / _median(by[b].rates):.2f}x"
                shared = f"{(cores - _median(by[a].other)) * 1e6 / per / _median(by[b].rates):.2f}x"
            lines.append(f"| {a} / {b} | {note} | {ratio:.2f}x | {ceiling} | {shared} |")
    lines += [
        "",
        "(1) The clients run on the same cores: at most cores / (server + client CPU per request) requests/s, over "
        "the one-worker row's rate. A ratio near its ceiling is bounded by the machine, not by the server.",
        "",
        "(2) The same with the cores that other processes used during the 2-process row taken out (the HTTPS "
        "origin, this harness, anything else on the machine; /proc/stat). With the machine idle near 0 % the ratio "
        "is what was left, not what the server allows.",
    ]
    lines += ["", "Memory after the run (smaps_rollup; a supervisor or nginx master is counted in the sums):", ""]
    lines += memory
    command = " ".join(["bench/scaling.py", *sys.argv[1:]])
    lines += ["", f"Total harness time: {took:.0f} s. Command: `{command}`."]
    return "\n".join(lines) + "\n"


def dt_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--run-client", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=3.0, help="per row and round (default 3)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--connections", type=int, default=8, help="connections per client process (default 8)")
    p.add_argument(
        "--client",
        choices=sorted(CLIENTS),
        default="selector",
        help="the load generator of every row (default %(default)s)",
    )
    p.add_argument(
        "--compare-clients",
        default="raw,streams",
        help="comma-separated client kinds that also drive the one-process rows (the gateway's update checks, nginx), "
        "to show each client's own CPU per request (default raw,streams; '' for none)",
    )
    p.add_argument("--only", default="", help="comma-separated: checks, get (default both)")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s")
    p.add_argument("--out", type=Path, default=harness.BENCH / "results" / "scaling.md")
    p.add_argument("--gateway-src", type=Path, help="run `python -m gateway` from this source folder instead")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 2.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_client:
        return client_process(json.loads(args.run_client))
    harness.use_gateway_source(args.gateway_src)
    harness.check_prerequisites()
    load = os.getloadavg()
    started = time.monotonic()
    only = set(args.only.split(",")) if args.only else {"checks", "get"}
    with tempfile.TemporaryDirectory(prefix="ota-bench-scaling-") as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        ws = harness.make_workspace(base, 4096, 1024)
        certs = issue_certs(ws, args.clients * args.connections)
        origin_port = harness.free_port()
        conf = harness.write_nginx(
            base / "nginx-origin", harness.ORIGIN_BODY.format(port=origin_port, certs=ws.certs, origin=ws.origin)
        )
        stack.enter_context(harness.run_nginx("origin", conf, origin_port, ALL_CORES))  # type: ignore[arg-type]
        small = f"{harness.SMALL_VERSION}.zip"
        rows: list[Row] = []
        for n in (1, 2):
            cfg = harness.gateway_config(ws, base / f"gateway-{n}", origin_port)
            write_policy(ws, cfg)
            gw = stack.enter_context(harness.run_gateway(f"gateway-{n}", cfg, None, "--workers", str(n)))
            if "checks" in only:
                rows.append(Row(f"gateway --workers {n}, update checks", CHECK, gw, "/updates", harness.APP_DIR))
            if "get" in only:
                rows.append(
                    Row(f"gateway --workers {n}, directory origin", GET, gw, f"/bundles/{harness.APP_DIR}/{small}", "")
                )
                rows.append(
                    Row(f"gateway --workers {n}, HTTPS origin", GET, gw, f"/bundles/{harness.APP_CDN}/{small}", "")
                )
        if "get" in only:
            for n in (1, 2):
                port = harness.free_port()
                body = harness.PROXY_BODY.format(
                    dir=base / f"nginx-{n}",
                    port=port,
                    origin_port=origin_port,
                    certs=ws.certs,
                    origin=ws.origin,
                    ciphers=harness.CIPHERS,
                )
                conf = harness.write_nginx(base / f"nginx-{n}", body)
                conf.write_text(conf.read_text().replace("worker_processes 1;", f"worker_processes {n};"))
                server = stack.enter_context(harness.run_nginx(f"nginx-{n}", conf, port, ALL_CORES))  # type: ignore[arg-type]
                rows.append(Row(f"nginx worker_processes {n}", GET, server, f"/bundles/{harness.APP_CDN}/{small}", ""))
        for row in list(rows):
            row.client = args.client
            if row.label in ("gateway --workers 1, update checks", "nginx worker_processes 1"):
                rows += [
                    Row(f"{row.label} ({kind} client)", row.kind, row.server, row.path, row.app, kind)
                    for kind in args.compare_clients.split(",")
                    if kind and kind != args.client
                ]
        rows.sort(key=lambda r: (r.kind != CHECK, r.label))
        for i in range(args.rounds):
            for row in rows:
                drive(row, certs, ws.ca, args.clients, args.connections, args.seconds)
            print(f"bench: round {i + 1} of {args.rounds} done ({time.monotonic() - started:.0f}s)", file=sys.stderr)
        servers = list({id(r.server): r.server for r in rows}.values())
        memory = memory_rows(servers)
    report = render(rows, memory, args, load, time.monotonic() - started)
    harness.publish(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
