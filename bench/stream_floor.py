"""The floor of the verified stream: what the Python stack under the gateway costs per 200 MiB download (issue 12).

`bench/floor.py` asks the question for 1 KiB requests and handshakes; this asks it for the large download, whose
targets are MB per CPU-second >= 0.95x an nginx that also hashes, and wall MB/s >= 1.0x nginx. One run, every
server pinned to core 0 and the client (this process) on core 1, the same certificates and TLS settings everywhere
(client certificate required, TLS 1.3; the Python servers use the gateway's own listener context, built by
`gateway/tls.py` from the benchmark's gateway.yaml), the same 200 MiB file from the page cache:

- `nginx, file from disk`: `bench/run.py`'s nginx mTLS proxy, its `/files/` location (no hash; the ratios add
  SHA-256 at the speed measured at the start of the run, as `run.py` does);
- `uvloop Protocol, SHA-256`: a bare `asyncio.Protocol` under uvloop (`loop.create_server(ssl=ctx)`: the
  memory-BIO TLS the gateway's connections use) that answers a fixed head and the file in 1 MiB slices, each read
  with `os.pread` and hashed on the event loop, honouring `pause_writing` (no HTTP framework, no policy, no thread);
- `uvloop Protocol, no hash`: the same without the hash: the TLS transport and the event loop alone;
- `stdlib ssl socket, SHA-256`: a blocking `ssl.SSLSocket` in a thread per connection (OpenSSL reading and writing
  the socket itself, as nginx does): the file in 1 MiB slices, hashed, `sendall`;
- `gateway, directory origin`: `ota-gateway serve --workers 1` (uvloop), the same file as a verified bundle.

If the bare uvloop row is itself below the targets, the stream targets sit below the stack (uvloop's memory-BIO
TLS), as the 1 KiB and handshake targets do; the socket row shows what OpenSSL on the socket would save.

    .venv/bin/python bench/stream_floor.py                # about a minute
    .venv/bin/python bench/stream_floor.py --runs 7 --size-mib 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # workspace, gateway config, pinned servers, CPU accounting, the client

KINDS = {
    "protocol": "uvloop Protocol, SHA-256",
    "protocol-nohash": "uvloop Protocol, no hash",
    "socket": "stdlib ssl socket, SHA-256",
}
SLICE = 1024 * 1024
NGINX_ROW = "nginx, file from disk"
GATEWAY_ROW = "gateway, directory origin"


# --------------------------------------------------------------------------------------------------------------
# the servers (run as `stream_floor.py --serve KIND CONFIG PORT FILE` in a process of their own)


def _head(size: int) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\nContent-Length: {size}\r\n\r\n".encode()


class FileAnswer(asyncio.Protocol):
    """Every request (head only) gets the file: 1 MiB slices read with pread, hashed unless told not to, written
    while the transport takes them (`pause_writing` stops the loop of slices until `resume_writing`)."""

    def __init__(self, fd: int, size: int, hashing: bool) -> None:
        self.fd, self.size, self.hashing = fd, size, hashing
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.offset = -1  # not sending
        self.paused = False
        self.digest = hashlib.sha256()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.offset < 0 and (end := self.buf.find(b"\r\n\r\n")) >= 0:
            self.buf = self.buf[end + 4 :]
            assert self.transport is not None
            self.transport.write(_head(self.size))
            self.offset, self.digest = 0, hashlib.sha256()
            self._send()

    def _send(self) -> None:
        assert self.transport is not None
        while not self.paused and 0 <= self.offset < self.size:
            piece = os.pread(self.fd, SLICE, self.offset)
            if self.hashing:
                self.digest.update(piece)
            self.offset += len(piece)
            self.transport.write(piece)
        if self.offset >= self.size:
            self.offset = -1

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._send()


def _serve_socket(ctx: ssl.SSLContext, port: int, path: Path) -> None:
    size = path.stat().st_size

    def one(raw: socket.socket) -> None:
        with contextlib.suppress(OSError), ctx.wrap_socket(raw, server_side=True) as conn, open(path, "rb") as f:
            buf = bytearray(SLICE)
            view = memoryview(buf)
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    got = conn.recv(4096)
                    if not got:
                        return
                    head += got
                conn.sendall(_head(size))
                digest = hashlib.sha256()
                f.seek(0)
                while n := f.readinto(buf):
                    digest.update(view[:n])
                    conn.sendall(view[:n])

    with socket.create_server(("127.0.0.1", port), backlog=128) as listener:
        while True:
            raw, _ = listener.accept()
            threading.Thread(target=one, args=(raw,), daemon=True).start()


def serve(kind: str, config: Path, port: int, big_file: Path) -> None:
    import uvloop

    from gateway.config import load_config_and_material

    cfg, materials = load_config_and_material(config)
    ctx = materials[cfg.listeners[0].name].context
    if kind == "socket":
        _serve_socket(ctx, port, big_file)
        return
    fd, size = os.open(big_file, os.O_RDONLY), big_file.stat().st_size

    async def main() -> None:
        loop = asyncio.get_running_loop()
        hashing = kind == "protocol"
        await loop.create_server(lambda: FileAnswer(fd, size, hashing), "127.0.0.1", port, ssl=ctx, backlog=1024)
        await asyncio.Event().wait()

    uvloop.run(main())


# --------------------------------------------------------------------------------------------------------------
# measuring and the report


def render(
    results: dict[str, harness.StreamResult], sha_mbps: float, load: list[float], args: argparse.Namespace
) -> str:
    nginx = results[NGINX_ROW]
    nginx_hash = harness.with_hash(nginx.mb_per_cpu, sha_mbps)
    lines = [
        "# The floor of the verified stream (bench/stream_floor.py)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; gateway {harness.gateway_revision()}; "
        f"{args.size_mib} MiB from the page cache, medians of {args.runs} downloads per row (round-robin); servers "
        f"pinned to core 0, the client to core 1; load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}. "
        f"SHA-256 here: {sha_mbps:.0f} MB/s; nginx + that hash (estimate): {nginx_hash:.0f} MB per CPU-s.",
        "",
        "| server | CPU s | MB per CPU-s | vs nginx + hash (target >= 0.95x) | wall MB/s "
        "| vs nginx wall (target >= 1.0x) | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        per_cpu = "" if label == NGINX_ROW else harness._ratio(r.mb_per_cpu, nginx_hash)
        wall = "" if label == NGINX_ROW else harness._ratio(r.wall_mbps, nginx.wall_mbps)
        lines.append(
            f"| {label} | {r.cpu:.3f} | {r.mb_per_cpu:.0f} | {per_cpu} | {r.wall_mbps:.0f} | {wall} "
            f"| {r.rss_peak_kib / 1024:.1f} |"
        )
    lines += ["", f"Command: `{' '.join(sys.argv)}`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--serve":
        kind, config, port, big = sys.argv[2:6]
        serve(kind, Path(config), int(port), Path(big))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=5, help="downloads per row, round-robin over the rows")
    p.add_argument("--size-mib", type=int, default=200)
    p.add_argument("--out", type=Path, default=harness.BENCH / "results" / "stream_floor.md")
    args = p.parse_args(argv)
    harness.check_prerequisites()
    os.sched_setaffinity(0, {harness.CLIENT_CORE})
    load = list(os.getloadavg())
    base = Path(tempfile.mkdtemp(prefix="ota-bench-floor-"))
    os.chmod(base, 0o700)
    try:
        ws = harness.make_workspace(base, args.size_mib * harness.MIB, 1024)
        big_file = ws.origin / harness.APP_DIR / f"{harness.BIG_VERSION}.zip"
        sha_mbps = harness.sha256_rate()
        with harness.origin_server(ws) as origin, contextlib.ExitStack() as stack:
            cfg = harness.gateway_config(ws, base / "gateway", origin.port)
            nginx = stack.enter_context(harness.run_nginx_proxy("nginx-proxy", base, ws, origin.port))
            gateway = stack.enter_context(harness.run_gateway(GATEWAY_ROW, cfg, harness.PROXY_CORE))
            big = f"/bundles/{harness.APP_DIR}/{harness.BIG_VERSION}.zip"
            rows: list[tuple[str, harness.Server, str]] = [
                (NGINX_ROW, nginx, f"/files/{harness.APP_DIR}/{harness.BIG_VERSION}.zip")
            ]
            for k in KINDS:
                floor = harness.serve_script(__file__, KINDS[k], k, cfg, big_file)
                rows.append((KINDS[k], stack.enter_context(floor), big))
            rows.append((GATEWAY_ROW, gateway, big))
            results: dict[str, harness.StreamResult] = {}
            for rnd in range(args.runs):
                for label, server, path in rows if rnd % 2 == 0 else rows[::-1]:  # drift hits both orders
                    r = harness.bench_stream(label, server.pid, server.port, path, ws, 1)
                    if label in results:
                        results[label].samples += r.samples
                    else:
                        results[label] = r
                print(f"stream_floor: round {rnd + 1} of {args.runs} done", file=sys.stderr)
            for label, server, _ in rows:
                results[label].rss_peak_kib = harness.rss_kib(server.pid)
        report = render({label: results[label] for label, _, _ in rows}, sha_mbps, load, args)
        harness.publish(report, args.out)
        return 0
    except harness.BenchError as exc:
        print(f"stream_floor: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
