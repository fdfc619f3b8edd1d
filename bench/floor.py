"""The floor: what the Python stack under the gateway costs per 1 KiB request and per full mTLS handshake (issue 12).

One run, every server pinned to core 0 and the client (this process) on core 1, the same certificates and TLS
settings everywhere (client certificate required, TLS 1.3, X25519; the Python servers use the gateway's own
listener context, built by `gateway/tls.py` from the benchmark's gateway.yaml):

- `nginx`: `bench/run.py`'s nginx mTLS proxy, its `/files/` location (the 1 KiB file from disk);
- `uvloop Protocol`: a bare `asyncio.Protocol` served by `loop.create_server(ssl=ctx)` under uvloop that answers a
  fixed 1 KiB HTTP/1.1 response to each request by hand (the TLS layer and the event loop, no HTTP framework);
- `aiohttp web.Server`: aiohttp's low-level server, a handler returning the 1 KiB (HTTP parsing and writing);
- `aiohttp web.Application`: the same with an application, one route and its router (what the gateway builds on);
- `gateway listener + web.Server`: the gateway's `TlsListenerServer` (accept, `start_tls` hand-over, identity, pins,
  revocation, metrics, connection budget) in front of aiohttp's `web.Server` with the same handler: what the
  gateway's handshake path adds to aiohttp's;
- `gateway`: `ota-gateway serve --workers 1`, the directory origin's 1 KiB bundle (policy, audit, verification);
- the same gateway's `GET /updates` (the liveness answer: identity, revocation, audit line, no feature) and a
  404 (no route): the same connection set-up with a cheaper first request, so that the rows split what a new
  connection costs from what its first request costs on top of a keep-alive one (a request on a fresh connection
  runs with cold caches after the handshake; see bench/README.md, "Handshakes, session 4").

Columns: CPU us per 1 KiB request on a keep-alive connection; CPU ms per connection (new connection, one request,
`Connection: close`) and per full handshake (that minus one keep-alive request); ratios to nginx. CPU is
utime+stime of each server's process tree (`bench/run.py`), medians over `--rounds` rounds that go over all
servers in turn (a different order each round), so load from elsewhere hits every row alike.

    .venv/bin/python bench/floor.py                 # part of `make bench`, about a minute and a half
    .venv/bin/python bench/floor.py --rounds 7 --handshakes 400 --requests 4000
    .venv/bin/python bench/floor.py --rounds 0 --instructions 50   # instructions per connection instead (valgrind)

`--instructions N` adds a column counted by callgrind (`bench/handshake_ab.py --instructions`): instructions per
new connection with one request, each server started once more under valgrind: a figure load does not move.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feature_cost  # the nginx of `/files/`
import handshake_ab  # instructions per connection under callgrind
import run as harness  # workspace, gateway config, pinned servers, CPU accounting, the client
import yaml

KINDS = {
    "protocol": "uvloop Protocol (ssl=ctx)",
    "server": "aiohttp web.Server",
    "app": "aiohttp web.Application",
    "listener": "gateway listener + web.Server",
}
BUNDLE = f"/bundles/{harness.APP_DIR}/{harness.SMALL_VERSION}.zip"  # the path every Python server answers
# the gateway's rows (`--only` names): label, path, status, whether the body is the 1 KiB file; one gateway serves all
GATEWAY_ROWS = {
    "gateway": ("gateway (1 KiB bundle, directory origin)", BUNDLE, 200, True),
    "gateway-liveness": ("gateway, GET /updates (liveness)", "/updates", 200, False),
    "gateway-404": ("gateway, a 404 (no route)", "/nothing/here", 404, False),
}


# --------------------------------------------------------------------------------------------------------------
# the servers (run as `floor.py --serve KIND CONFIG PORT FILE` in a process of their own)


class FixedAnswer(asyncio.Protocol):
    """HTTP/1.1 by hand: every request (head only, no body) gets the same 1 KiB answer; `Connection: close` closes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            self.transport.write(self.answer)
            if b"\r\nconnection: close" in head.lower():
                self.transport.close()
                return


def serve(kind: str, config: Path, port: int, small_file: Path) -> None:
    import uvloop
    from aiohttp import web

    from gateway.config import load_config_and_material
    from gateway.listener import TlsListenerServer
    from gateway.metrics import Metrics

    cfg, materials = load_config_and_material(config)
    material = materials[cfg.listeners[0].name]
    body = small_file.read_bytes()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\nContent-Length: {len(body)}\r\n\r\n"
    answer = head.encode() + body

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(body=body, content_type="application/zip")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ctx = material.context
        if kind == "protocol":
            await loop.create_server(lambda: FixedAnswer(answer), "127.0.0.1", port, ssl=ctx, backlog=1024)
        elif kind == "server":
            await loop.create_server(web.Server(handler, access_log=None), "127.0.0.1", port, ssl=ctx, backlog=1024)
        elif kind == "app":
            app = web.Application()
            app.router.add_get("/bundles/{app_id}/{version}.zip", handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx, backlog=1024).start()
        elif kind == "listener":
            http = web.Server(handler, access_log=None)
            listener = TlsListenerServer("main", lambda: material, http, Metrics(), 10.0)
            await listener.start("127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


# --------------------------------------------------------------------------------------------------------------
# measuring


@dataclass
class Row:
    server: harness.Server
    path: str
    start: tuple[list[str], dict[str, str], Path, int]  # how to start it again under valgrind: argv, env, cwd, port
    label: str = ""  # the row's name (the server's when empty): rows may share a server with another path
    status: int = 200  # the answer's status
    serves_file: bool = True  # the body is the 1 KiB file (checked by its SHA-256)
    request_us: list[float] = field(default_factory=list)
    connection_ms: list[float] = field(default_factory=list)
    instructions: float = 0.0  # per connection (callgrind), with --instructions

    @property
    def request(self) -> float:
        return statistics.median(self.request_us) if self.request_us else float("nan")

    @property
    def connection(self) -> float:
        return statistics.median(self.connection_ms) if self.connection_ms else float("nan")

    @property
    def handshake(self) -> float:
        return self.connection - self.request / 1000

    @property
    def name(self) -> str:
        return self.label or self.server.name

    def check(self, answer: tuple[int, int, str], ws: harness.Workspace) -> None:
        status, _, sha = answer
        if status != self.status or (self.serves_file and sha != ws.small_sha):
            raise harness.BenchError(f"{self.name}: {self.path} answered {status}")


def keepalive_cpu(row: Row, ws: harness.Workspace, n: int) -> float:
    """CPU seconds of the row's server per request, `n` requests on one connection opened (and used once) before."""
    conn = harness.Conn(row.server.port, ws.client_context())
    try:
        row.check(conn.get(row.path), ws)

        def work() -> None:
            for _ in range(n):
                row.check(conn.get(row.path), ws)

        return harness.measure(row.server.pid, work).cpu / n
    finally:
        conn.close()


def connection_cpu(row: Row, ws: harness.Workspace, n: int) -> float:
    """CPU seconds of the row's server per new connection (full handshake, one request, `Connection: close`)."""
    ctx = ws.client_context()  # no session is ever offered back

    def work() -> None:
        for _ in range(n):
            conn = harness.Conn(row.server.port, ctx)
            try:
                row.check(conn.get(row.path, close=True), ws)
            finally:
                conn.close()

    return harness.measure(row.server.pid, work).cpu / n


def measure(rows: list[Row], ws: harness.Workspace, rounds: int, requests: int, handshakes: int) -> list[float]:
    """`rounds` rounds over every row in a shuffled order; returns the 1-minute load average after each round."""
    load = [os.getloadavg()[0]]
    for row in rows:  # warm-up
        keepalive_cpu(row, ws, 50)
        connection_cpu(row, ws, 10)
    for rnd in range(rounds):
        order = rows[:]
        random.Random(rnd).shuffle(order)
        for row in order:
            row.request_us.append(keepalive_cpu(row, ws, requests) * 1e6)
            row.connection_ms.append(connection_cpu(row, ws, handshakes) * 1e3)
        load.append(os.getloadavg()[0])
        print(f"floor: round {rnd + 1} of {rounds} done, load {load[-1]:.2f}", file=sys.stderr)
    return load


def render(rows: list[Row], load: list[float], args: argparse.Namespace, revision: str, seconds: float) -> str:
    nginx = rows[0]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 else "-"

    counted = any(row.instructions for row in rows)
    extra_head = " M instructions per connection (callgrind) | vs nginx |" if counted else ""

    lines = [
        f"## Floor: what the Python stack costs per 1 KiB request and per mTLS handshake ({revision})",
        "",
        f"{args.rounds} rounds, {args.requests} keep-alive requests and {args.handshakes} new connections per server "
        f"and round, medians; servers on core {harness.PROXY_CORE}, client on core {harness.CLIENT_CORE}; "
        f"TLS 1.3, X25519, client certificate required; load average (1 min) {min(load):.1f} to {max(load):.1f}.",
        "",
        "| server | CPU us per keep-alive 1 KiB request | vs nginx | CPU ms per connection | CPU ms per full "
        "handshake | vs nginx |" + extra_head,
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if counted else ""),
    ]
    for row in rows:
        extra = f" {row.instructions / 1e6:.3f} | {ratio(row.instructions, nginx.instructions)} |" if counted else ""
        lines.append(
            f"| {row.name} | {row.request:.0f} | {ratio(row.request, nginx.request)} | {row.connection:.2f} | "
            f"{row.handshake:.2f} | {ratio(row.handshake, nginx.handshake)} |" + extra
        )
    lines += [
        "",
        "Per round (request us / connection ms): "
        + "; ".join(
            f"{r.name}: " + " ".join(f"{a:.0f}/{b:.2f}" for a, b in zip(r.request_us, r.connection_ms, strict=True))
            for r in rows
        ),
        "",
        f"Harness time {seconds:.0f} s. Command: `{' '.join(sys.argv)}`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 6 and sys.argv[1] == "--serve":
        serve(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=2000, help="keep-alive requests per server and round")
    p.add_argument("--handshakes", type=int, default=250, help="new connections per server and round")
    rows = ",".join(["nginx", *KINDS, *GATEWAY_ROWS])
    p.add_argument("--only", default=rows, help="comma-separated rows (nginx first)")
    p.add_argument("--out", type=Path, default=harness.BENCH / "results" / "floor.md")
    p.add_argument("--instructions", type=int, default=0, metavar="N", help="instructions per connection (callgrind)")
    args = p.parse_args(argv)
    harness.check_prerequisites()
    if args.instructions:
        harness.require_valgrind()
    wanted = args.only.split(",")
    os.sched_setaffinity(0, {harness.CLIENT_CORE})
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ota-bench-floor-") as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        ws = harness.make_workspace(base, 4096, 1024)
        config = harness.gateway_config(ws, base / "gw", 1)  # the HTTPS origin is never asked
        small = ws.origin / harness.APP_DIR / f"{harness.SMALL_VERSION}.zip"
        rows: list[Row] = []
        if "nginx" in wanted:
            nginx = stack.enter_context(feature_cost.run_nginx_files(ws))
            if nginx is not None:
                nginx.name = "nginx (file from disk)"
                cmd, port = handshake_ab.nginx_single_process(base / "nginx-valgrind", ws, 1)
                path = f"/files/{harness.APP_DIR}/{harness.SMALL_VERSION}.zip"
                rows.append(Row(nginx, path, (cmd, {}, base / "nginx-valgrind", port)))
        for kind in KINDS:
            if kind in wanted:
                port = harness.free_port()
                cmd = [sys.executable, __file__, "--serve", kind, str(config), str(port), str(small)]
                server = stack.enter_context(harness.serve_script(__file__, KINDS[kind], kind, config, small))
                rows.append(Row(server, BUNDLE, (cmd, {}, base, port)))
        gateway_rows = [name for name in GATEWAY_ROWS if name in wanted]
        if gateway_rows:
            gw = stack.enter_context(harness.run_gateway("gateway", config, harness.PROXY_CORE, "--workers", "1"))
            cmd = [*harness.GATEWAY_CMD, "serve", "--config", str(config), "--workers", "1"]
            port = yaml.safe_load(config.read_text())["listeners"][0]["port"]
            for name in gateway_rows:
                label, path, status, serves_file = GATEWAY_ROWS[name]
                start = (cmd, dict(harness.GATEWAY_ENV), config.parent, port)
                rows.append(Row(gw, path, start, label, status, serves_file))
        load = measure(rows, ws, args.rounds, args.requests, args.handshakes)
        if args.instructions:  # each server again, alone, under valgrind (the gateway's port is free once it stops)
            stack.close()
            for row in rows:
                cmd, env, cwd, port = row.start
                split = handshake_ab.instructions(
                    row.name, cmd, env, cwd, port, row.path, ws, args.instructions, base, row.status
                )
                row.instructions = sum(split.values())
                print(f"floor: {row.name}: {row.instructions / 1e6:.3f} M instructions", file=sys.stderr)
    report = render(rows, load, args, harness.gateway_revision(), time.monotonic() - started)
    harness.publish(report, args.out)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
