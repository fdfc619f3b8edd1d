"""Hostile section of `make bench`, slow readers: what a slow client costs the gateway, against nginx, on loopback.

Issue 8, item 1 (bench/hostile.py measures churn and floods). `--readers` clients (100) each download the same
64 MiB bundle over mTLS with a 4 KiB receive buffer (SO_RCVBUF, set before connecting) and read it at `--rate`
bytes/s (1,000). After `--settle` seconds, when every server-side buffer has filled, the growth of the server's
resident set (VmRSS of the whole process tree, minus the value before the readers came) is divided by the number of
readers: the memory a slow reader costs. Rows: the gateway with its directory origin and with its HTTPS origin (an
nginx), nginx serving the file from disk over mTLS (`output_buffers 2 256k`, its per-connection knob), and nginx as
an mTLS proxy (`proxy_buffers 8 64k`, `proxy_max_temp_file_size 0`); each row has a fresh server process. The
gateway runs with its defaults except `limits.client_min_rate`, lowered below the readers' rate so that they are not
cut during the measurement.

    .venv/bin/python bench/slow_readers.py            # what `make bench` runs after bench/hostile.py
    .venv/bin/python bench/slow_readers.py --readers 20 --settle 8    # quicker

Uses the helpers of bench/run.py (workspace, certificates, nginx and gateway processes, RSS of a process tree).
Everything binds to 127.0.0.1 and stops by itself. Prints a Markdown table and writes it to
bench/results/slow_readers.md (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # bench/run.py, next to this file

MIB = 1024 * 1024


@dataclass
class Row:
    label: str
    readers: int
    connected: int
    base_kib: int
    loaded_kib: int
    knob: str

    @property
    def per_reader_mib(self) -> float:
        return (self.loaded_kib - self.base_kib) / 1024 / max(1, self.connected)


class SlowReader(threading.Thread):
    """One download read at `rate` bytes/s through a 4 KiB receive buffer; stops when `stop` is set."""

    def __init__(self, port: int, path: str, ctx: ssl.SSLContext, rate: int, stop: threading.Event) -> None:
        super().__init__(daemon=True, name="slow-reader")
        self.port, self.path, self.ctx, self.rate, self.stop = port, path, ctx, rate, stop
        self.connected = threading.Event()
        self.received = 0
        self.error: str | None = None

    def run(self) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            raw.settimeout(30)
            raw.connect(("127.0.0.1", self.port))
            with self.ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(f"GET {self.path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                first = tls.recv(1024)
                if not first.startswith(b"HTTP/1.1 200"):
                    self.error = first[:80].decode(errors="replace")
                    return
                self.received = len(first)
                self.connected.set()
                started = time.monotonic()
                while not self.stop.is_set():
                    due = started + self.received / self.rate
                    if due > time.monotonic():
                        self.stop.wait(due - time.monotonic())
                        continue
                    data = tls.recv(1024)
                    if not data:
                        self.error = "closed by the server"
                        return
                    self.received += len(data)
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            raw.close()


def slow_readers(label: str, knob: str, pid: int, port: int, path: str, ws: Any, args: argparse.Namespace) -> Row:
    ctx = ws.client_context()
    # warm up: one whole download at full speed, so that the baseline includes what any download allocates
    harness.download(port, path, ctx, ws.big_sha, ws.big_size)
    base = harness.rss_kib(pid, "VmRSS")
    stop = threading.Event()
    readers = [SlowReader(port, path, ctx, args.rate, stop) for _ in range(args.readers)]
    for reader in readers:
        reader.start()
        time.sleep(0.01)
    for reader in readers:
        reader.connected.wait(10)
    time.sleep(args.settle)
    loaded = harness.rss_kib(pid, "VmRSS")
    connected = sum(1 for r in readers if r.connected.is_set() and r.error is None)
    stop.set()
    for reader in readers:
        reader.join(10)
    errors = sorted({r.error for r in readers if r.error})
    if errors:
        print(f"bench: {label}: reader errors: {errors[:3]}", file=sys.stderr)
    return Row(label, args.readers, connected, base, loaded, knob)


def gateway_config(ws: Any, directory: Path, origin_port: int, min_rate: int, limits: list[str]) -> Path:
    path = harness.gateway_config(ws, directory, origin_port)
    config = yaml.safe_load(path.read_text())
    config["limits"].pop("chunk_size", None)  # the defaults, except a minimum rate below the readers' rate
    config["limits"]["client_min_rate"] = min_rate
    for item in limits:
        key, _, value = item.partition("=")
        config["limits"][key] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def render(rows: list[Row], args: argparse.Namespace) -> str:
    lines = [
        f"## Hostile: slow readers ({args.readers} clients reading a {args.size_mib} MiB bundle at {args.rate} "
        f"bytes/s, 4 KiB receive buffer, measured after {args.settle:g} s)",
        "",
        "| server | knob | readers served | RSS before MiB | RSS loaded MiB | MiB per slow reader |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.knob} | {r.connected} of {r.readers} | {r.base_kib / 1024:.1f} | "
            f"{r.loaded_kib / 1024:.1f} | {r.per_reader_mib:.2f} |"
        )
    by = {r.label: r for r in rows}
    pairs = [
        ("gateway, directory origin", "nginx mTLS, file from disk"),
        ("gateway, HTTPS origin", "nginx mTLS proxy -> HTTPS origin"),
    ]
    lines += ["", "| ratio | gateway / nginx |", "|---|---:|"]
    for gw, ng in pairs:
        if gw in by and ng in by and by[ng].per_reader_mib > 0:
            lines.append(f"| MiB per slow reader: {gw} / {ng} | {by[gw].per_reader_mib / by[ng].per_reader_mib:.1f} |")
    return "\n".join(lines) + "\n"


def finish(rows: list[Row], args: argparse.Namespace) -> int:
    report = render(rows, args)
    harness.publish(report, args.out)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--readers", type=int, default=100)
    p.add_argument("--rate", type=int, default=1000, help="bytes per second each reader takes")
    p.add_argument("--settle", type=float, default=15.0, help="seconds between the last reader's start and the RSS")
    p.add_argument("--size-mib", type=int, default=64)
    p.add_argument("--out", type=Path, default=harness.BENCH / "results" / "slow_readers.md")
    p.add_argument("--deadline", type=int, default=600, help="abort the whole run after this many seconds")
    p.add_argument("--gateway-only", action="store_true", help="skip the nginx rows")
    p.add_argument("--limit", action="append", default=[], help="limits.KEY=VALUE for the gateway (repeatable)")
    p.add_argument("--gateway-arg", action="append", default=[], help="extra `serve` argument, e.g. --no-uvloop")
    p.add_argument("--gateway-src", type=Path, help="run the gateway from this source folder (git archive) instead")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.check_prerequisites()

    def on_alarm(signum: int, frame: Any) -> None:
        raise harness.BenchError(f"the slow-reader benchmark took longer than --deadline {args.deadline}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.deadline)
    base = Path(tempfile.mkdtemp(prefix="ota-slow-readers-"))
    os.chmod(base, 0o700)
    rows: list[Row] = []
    try:
        ws = harness.make_workspace(base, args.size_mib * MIB, 1024)
        big = f"{harness.BIG_VERSION}.zip"
        with harness.origin_server(ws) as origin:
            gateways = (("gateway, directory origin", harness.APP_DIR), ("gateway, HTTPS origin", harness.APP_CDN))
            for label, app in gateways:
                cfg = gateway_config(ws, base / f"gw-{app}", origin.port, max(1, args.rate // 4), args.limit)
                with harness.run_gateway(label, cfg, harness.PROXY_CORE, *args.gateway_arg, src=args.gateway_src) as gw:
                    knob = ", ".join(args.limit) or "limits.client_buffer 128 KiB, chunk_size 1 MiB (defaults)"
                    rows.append(slow_readers(label, knob, gw.pid, gw.port, f"/bundles/{app}/{big}", ws, args))
            if args.gateway_only:
                return finish(rows, args)
            nginx_rows = (
                ("nginx mTLS, file from disk", "output_buffers 2 256k", f"/files/{harness.APP_DIR}/{big}"),
                (
                    "nginx mTLS proxy -> HTTPS origin",
                    "proxy_buffers 8 64k, proxy_max_temp_file_size 0",
                    f"/bundles/{harness.APP_CDN}/{big}",
                ),
            )
            for i, (label, knob, path) in enumerate(nginx_rows):  # a fresh nginx per row
                port = harness.free_port()
                folder = base / f"nginx-proxy-{i}"
                conf = harness.write_nginx(
                    folder,
                    harness.PROXY_BODY.format(
                        dir=folder,
                        port=port,
                        origin_port=origin.port,
                        certs=ws.certs,
                        origin=ws.origin,
                        ciphers=harness.CIPHERS,
                    ),
                )
                with harness.run_nginx(label, conf, port, harness.PROXY_CORE) as nginx:
                    rows.append(slow_readers(label, knob, nginx.pid, port, path, ws, args))
        return finish(rows, args)
    except harness.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        with contextlib.suppress(OSError):
            shutil.rmtree(base)


if __name__ == "__main__":
    sys.exit(main())
