"""Benchmark harness: ota-gateway against nginx as an mTLS reverse proxy, on loopback, in one run.

Measures, each as the median of `--runs` repetitions:

1. a 200 MiB download that the client hashes (so the client side is the same everywhere):
   directly from the HTTPS origin (nginx serving files over TLS), through nginx as an mTLS reverse proxy, through
   nginx serving the file itself over mTLS, and through `ota-gateway serve` (directory origin and HTTPS origin,
   uvloop and `--no-uvloop`): wall-clock MB/s, CPU seconds of the proxy process(es), MB per CPU-second, peak RSS;
2. full mTLS handshakes: new connections each doing one 1 KiB request: CPU ms each; and (2b) the same with each
   connection offering the previous one's TLS session, in TLS 1.2 and 1.3, with how many the server resumed;
3. 1 KiB requests on one keep-alive connection: CPU us each.

CPU is utime+stime from /proc/<pid>/stat of the proxy process and all its children (nginx master + worker),
read before and after each repetition. The proxy is pinned to core 0; the client (this process) and the HTTPS
origin to core 1. MB is 10^6 bytes. Writes the Markdown report to stdout and to bench/results/latest.md.

    .venv/bin/python bench/run.py            # what `make bench` runs
    .venv/bin/python bench/run.py --quick    # fewer requests, one repetition: a smoke test of the harness
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_BIN = Path(sys.executable).parent
GATEWAY_BIN = VENV_BIN / "ota-gateway"
# How the gateway is started: the installed `ota-gateway` (this tree, editable install), or with `--gateway-src DIR`
# `python -m gateway` from another copy of the source (e.g. `git archive HEAD gateway | tar -x -C DIR`).
GATEWAY_CMD: list[str] = [str(GATEWAY_BIN)]
GATEWAY_ENV: dict[str, str] = {}
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
MB = 1_000_000

PROXY_CORE = 0
CLIENT_CORE = 1  # the client (this process) and the HTTPS origin

APP_DIR = "com.example.dir"  # served by the gateway's directory origin
APP_CDN = "com.example.cdn"  # served by the gateway's HTTPS origin (the nginx origin); nginx proxies the same path
BIG_VERSION = "9.0.0"
SMALL_VERSION = "1.0.0"

# Mozilla "intermediate", as gateway/tls.py configures it, so nginx and the gateway offer the same suites.
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


class BenchError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------------------
# processes: CPU, memory, pinning


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (nginx: master and worker)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its descendants (all threads), in seconds."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            f = _stat_fields(p)
            total += int(f[11]) + int(f[12])  # fields 14 and 15 of /proc/pid/stat
    return total / CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int, key: str = "VmHWM") -> int:
    """Sum over the process tree of VmHWM (peak RSS) or VmRSS, in KiB."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            total += _status_kib(p, key)
    return total


def pin_prefix(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on {port} within {timeout}s")


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------------------------
# the client: blocking TLS sockets, hashes every body


# Handshakes that got no answer within HANDSHAKE_TIMEOUT, per server port: the client gives up and reconnects.
# (Seen with the gateway under uvloop: a ClientHello that arrives before `loop.start_tls` is called is lost.)
STALLS: dict[int, int] = {}
CONNECTS: dict[int, int] = {}
HANDSHAKE_TIMEOUT = 0.25
HANDSHAKE_TRIES = 20


class Conn:
    """One TLS connection speaking just enough HTTP/1.1 (Content-Length bodies) to time requests precisely."""

    def __init__(
        self, port: int, ctx: ssl.SSLContext, timeout: float = 60, session: ssl.SSLSession | None = None
    ) -> None:
        for _ in range(HANDSHAKE_TRIES):
            CONNECTS[port] = CONNECTS.get(port, 0) + 1
            raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(HANDSHAKE_TIMEOUT)
            try:
                self.sock = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
                break
            except (TimeoutError, ssl.SSLEOFError, ConnectionResetError):
                raw.close()
                STALLS[port] = STALLS.get(port, 0) + 1

            except BaseException:
                raw.close()
                raise
        else:
            raise BenchError(f"no TLS handshake with port {port} in {HANDSHAKE_TRIES} tries")
        self.sock.settimeout(timeout)
        self.buf = bytearray()
        self.scratch = memoryview(bytearray(MIB))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise BenchError("connection closed before the response head")
        self.buf += data

    def get(self, path: str, *, close: bool = False) -> tuple[int, int, str]:
        """GET `path`; returns (status, body length, sha256 hex of the body)."""
        extra = "Connection: close\r\n" if close else ""
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[: end + 4]
        status = int(head[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
        if "content-length" not in headers:
            raise BenchError(f"{path}: answer without Content-Length (status {status}): {headers}")
        remaining = length = int(headers["content-length"])
        digest = hashlib.sha256()
        if self.buf:
            part = self.buf[:remaining]
            digest.update(part)
            remaining -= len(part)
            del self.buf[: len(part)]
        scratch, recv_into = self.scratch, self.sock.recv_into
        while remaining:
            n = recv_into(scratch, min(len(scratch), remaining))
            if not n:
                raise BenchError(f"{path}: body ended after {length - remaining} of {length} bytes")
            digest.update(scratch[:n])
            remaining -= n
        return status, length, digest.hexdigest()

    def describe(self) -> str:
        cipher = self.sock.cipher()
        return f"{self.sock.version()} {cipher[0] if cipher else '?'}"


# --------------------------------------------------------------------------------------------------------------
# fixtures: certificates, origin files, configs


@dataclass
class Workspace:
    dir: Path
    certs: Path
    origin: Path
    big_sha: str
    small_sha: str
    big_size: int
    small_size: int

    @property
    def ca(self) -> Path:
        return self.certs / "ca.pem"

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(self.certs / "client.pem", self.certs / "client.key")
        return ctx


def make_workspace(base: Path, big_size: int, small_size: int) -> Workspace:
    certs = base / "certs"
    subprocess.run(
        [*GATEWAY_CMD, "certs", "init", "--dir", str(certs)],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, **GATEWAY_ENV},
    )
    origin = base / "origin"
    big, small = os.urandom(big_size), os.urandom(small_size)
    big_sha, small_sha = hashlib.sha256(big).hexdigest(), hashlib.sha256(small).hexdigest()
    first: Path | None = None
    for app in (APP_DIR, APP_CDN):
        app_dir = origin / app
        app_dir.mkdir(parents=True)
        target = app_dir / f"{BIG_VERSION}.zip"
        if first is None:
            target.write_bytes(big)
            first = target
        else:
            os.link(first, target)  # one copy in the page cache
        (app_dir / f"{SMALL_VERSION}.zip").write_bytes(small)
        index = {
            "app_id": app,
            "releases": [
                {"version": v, "channel": "production", "file": f"{v}.zip", "size": size, "sha256": sha}
                for v, size, sha in ((BIG_VERSION, big_size, big_sha), (SMALL_VERSION, small_size, small_sha))
            ],
        }
        (app_dir / "releases.yaml").write_text(yaml.safe_dump(index, sort_keys=False))
        (app_dir / "releases.json").write_text(json.dumps(index))
    del big
    return Workspace(base, certs, origin, big_sha, small_sha, big_size, small_size)


NGINX_COMMON = """\
{user}worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    types {{ application/json json; application/zip zip; }}
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server_tokens off;
{body}
}}
"""

ORIGIN_BODY = """\
    access_log off;
    sendfile off;
    output_buffers 2 256k;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certs}/server.pem;
        ssl_certificate_key {certs}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
        root {origin};
    }}
"""

# The mTLS proxy: same TLS settings as the gateway (TLS 1.2+, intermediate suites and groups, no tickets, no session
# cache, client certificate required; towards the origin TLS 1.2+ (nginx 1.22's default is TLS 1.2 at most) and the
# gateway's TLS 1.3 suite order, ORIGIN_TLS13_SUITES of gateway/tls.py, so both decrypt the origin's bytes with
# AES-128-GCM), forwards the client's subject like a real deployment would, keeps upstream connections alive (as
# aiohttp's pool does), and streams without spooling to a temp file (bounded memory, as the gateway). /files/ serves
# the same files from disk: the peer of the gateway's directory origin.
PROXY_BODY = """\
    access_log {dir}/access.log;
    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certs}/server.pem;
        ssl_certificate_key {certs}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {ciphers};
        ssl_ecdh_curve X25519:prime256v1:secp384r1;
        ssl_session_tickets off;
        ssl_session_cache off;
        ssl_client_certificate {certs}/ca.pem;
        ssl_verify_client on;
        location /bundles/ {{
            proxy_pass https://origin/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost;
            proxy_set_header X-Client-Subject $ssl_client_s_dn;
            proxy_ssl_trusted_certificate {certs}/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_conf_command Ciphersuites
                TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256;
            proxy_max_temp_file_size 0;
            proxy_buffer_size 16k;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;
        }}
        location /files/ {{
            alias {origin}/;
            sendfile off;
            output_buffers 2 256k;
        }}
    }}
"""


# TLS session resumption in nginx, for the resumed-handshake rows: a session cache (TLS 1.2 session IDs and TLS 1.3
# stateful sessions) and tickets, as a site that wants resumption configures it. Replaces the two lines above.
NGINX_RESUME = "ssl_session_tickets on;\n        ssl_session_cache shared:SSL:10m;\n        ssl_session_timeout 5m;"


def write_nginx(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    user = "user root root;\n" if os.geteuid() == 0 else ""  # the worker reads files in our 0700 temp dir
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_COMMON.format(user=user, dir=directory, body=body))
    return conf


def write_gateway_config(
    ws: Workspace, directory: Path, origin_port: int, chunk_size: int | None = None, *, with_clients: bool = True
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    policies = directory / "policies"
    policies.mkdir(exist_ok=True)
    apps: list[dict[str, Any]] = [
        {"app_id": APP_DIR, "origin": "local", "channels": {"default": "production", "allowed": ["production"]}},
        {"app_id": APP_CDN, "origin": "cdn", "channels": {"default": "production", "allowed": ["production"]}},
    ]
    if with_clients:  # policies that name who may use an app: any certificate from the client CA (named by file stem)
        for app in apps:
            app["clients"] = [{"name": "bench", "issuer": [ws.ca.stem]}]
    (policies / "bench.yaml").write_text(yaml.safe_dump({"apps": apps}, sort_keys=False))
    config = {
        "listeners": [
            {
                "name": "main",
                "address": "127.0.0.1",
                "port": free_port(),
                "cert": str(ws.certs / "server.pem"),
                "key": str(ws.certs / "server.key"),
                "client_ca": [str(ws.ca)],
                "handshake_timeout": 10,
            }
        ],
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "origins": {
            "local": {"type": "directory", "path": str(ws.origin)},
            "cdn": {"type": "https", "url": f"https://127.0.0.1:{origin_port}/", "ca": str(ws.ca), "read_timeout": 60},
        },
        "policies": str(policies),
        "limits": {"shutdown_grace": 5, **({} if chunk_size is None else {"chunk_size": chunk_size})},
        "state": {"path": str(directory / "state" / "gateway.sqlite")},
        "audit": {"path": str(directory / "audit.log")},  # one line per request, like nginx's access_log
    }
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def gateway_command(src: Path | None) -> tuple[list[str], dict[str, str]]:
    """How to start the gateway: this tree's (or `--gateway-src`'s), or `python -m gateway` from `src`."""
    if src is None:
        return GATEWAY_CMD, GATEWAY_ENV
    return [sys.executable, "-m", "gateway"], {"PYTHONPATH": str(src.resolve())}


def gateway_config(
    ws: Workspace, directory: Path, origin_port: int, chunk_size: int | None = None, src: Path | None = None
) -> Path:
    """A config that `ota-gateway check` accepts: policies with a `clients` rule if this tree's schema wants one.
    `chunk_size` None leaves the gateway's default."""
    errors = ""
    cmd, env = gateway_command(src)
    for with_clients in (True, False):
        path = write_gateway_config(ws, directory, origin_port, chunk_size, with_clients=with_clients)
        out = subprocess.run(
            [*cmd, "check", "--config", str(path)],
            capture_output=True,
            text=True,
            cwd=directory,
            env={**os.environ, **env},
        )
        if out.returncode == 0:
            return path
        errors += out.stderr
    raise BenchError(f"ota-gateway check refuses the benchmark config:\n{errors}")


# --------------------------------------------------------------------------------------------------------------
# running servers


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[Any]
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def run_nginx(name: str, conf: Path, port: int, core: int) -> Iterator[Server]:
    cmd = [*pin_prefix(core), "nginx", "-p", str(conf.parent), "-e", str(conf.parent / "error.log")]
    proc = subprocess.Popen(
        [*cmd, "-c", str(conf), "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    server = Server(name, proc, port)
    try:
        try:
            wait_port(port, proc, name)
        except BenchError as exc:
            err = (conf.parent / "error.log").read_text() if (conf.parent / "error.log").exists() else ""
            raise BenchError(f"{name}: {exc}\n{err}") from None
        yield server
    finally:
        stop_process(proc, signal.SIGTERM)  # nginx: fast shutdown
        if proc.stderr:
            proc.stderr.close()


@contextlib.contextmanager
def run_nginx_proxy(
    name: str, base: Path, ws: Workspace, origin_port: int, *, resume: bool = False
) -> Iterator[Server]:
    """The nginx mTLS proxy to the HTTPS origin, configured like the gateway (or with its session cache and
    tickets on, `resume`), pinned to the proxy core."""
    body = (
        PROXY_BODY.replace("ssl_session_tickets off;\n        ssl_session_cache off;", NGINX_RESUME)
        if resume
        else PROXY_BODY
    )
    port = free_port()
    conf = write_nginx(
        base / name,
        body.format(
            dir=base / name, port=port, origin_port=origin_port, certs=ws.certs, origin=ws.origin, ciphers=CIPHERS
        ),
    )
    with run_nginx(name, conf, port, PROXY_CORE) as server:
        yield server


@contextlib.contextmanager
def serve_script(script: str, name: str, kind: str, config: Path, file: Path) -> Iterator[Server]:
    """`script --serve KIND CONFIG PORT FILE`: a floor server of `floor.py` or `stream_floor.py` in a process of its
    own on the proxy core, yielded once it listens; its stderr is in the error if it does not."""
    port = free_port()
    cmd = [*pin_prefix(PROXY_CORE), sys.executable, script, "--serve", kind, str(config), str(port), str(file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            wait_port(port, proc, name)
        except BenchError:
            err = proc.stderr.read().decode() if proc.poll() is not None and proc.stderr else ""
            raise BenchError(f"{name} did not start:\n{err}") from None
        yield Server(name, proc, port)
    finally:
        stop_process(proc)
        if proc.stderr:
            proc.stderr.close()


@contextlib.contextmanager
def run_gateway(name: str, config: Path, core: int | None, *extra: str, src: Path | None = None) -> Iterator[Server]:
    """`ota-gateway serve --config config` (from `src` if given), pinned to `core`; waits for the readiness line."""
    cfg = yaml.safe_load(config.read_text())
    port = cfg["listeners"][0]["port"]
    base, env = gateway_command(src)
    pin = pin_prefix(core) if core is not None else []
    proc = subprocess.Popen(
        [*pin, *base, "serve", "--config", str(config), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=config.parent,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
    )
    server = Server(name, proc, port)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            server.log.append(line.rstrip("\n"))
            # the readiness line; "admin on" is what sources before it printed last (A/B against older commits)
            if line.startswith(("ota-gateway: ready: ", "ota-gateway: admin on")):
                ready.set()
        ready.set()

    reader = threading.Thread(target=pump, name=f"stderr-{name}", daemon=True)
    reader.start()
    try:
        if not ready.wait(30) or proc.poll() is not None:
            raise BenchError(f"{name} did not start:\n" + "\n".join(server.log))
        yield server
    except BaseException:
        time.sleep(0.2)
        print(f"bench: {name} failed; its last log lines:", *server.log[-30:], sep="\n  ", file=sys.stderr)
        raise
    finally:
        stop_process(proc, signal.SIGTERM)
        reader.join(5)
        if proc.stderr:
            proc.stderr.close()


# --------------------------------------------------------------------------------------------------------------
# measurements


@dataclass
class Sample:
    wall: float
    cpu: float


def measure(pid: int, work: Callable[[], None]) -> Sample:
    c0, t0 = cpu_seconds(pid), time.perf_counter()
    work()
    t1 = time.perf_counter()
    time.sleep(0.02)  # let the proxy finish its bookkeeping (logs, connection close) before reading its CPU
    return Sample(t1 - t0, cpu_seconds(pid) - c0)


@dataclass
class StreamResult:
    label: str
    size: int
    samples: list[Sample]
    rss_peak_kib: int
    rss_idle_kib: int
    tls: str = ""

    @property
    def wall_mbps(self) -> float:
        return statistics.median(self.size / MB / s.wall for s in self.samples)

    @property
    def cpu(self) -> float:
        return statistics.median(s.cpu for s in self.samples)

    @property
    def mb_per_cpu(self) -> float:
        return statistics.median(self.size / MB / s.cpu if s.cpu > 0 else float("inf") for s in self.samples)


@dataclass
class CountResult:
    label: str
    count: int
    samples: list[Sample]

    @property
    def cpu_each(self) -> float:
        return statistics.median(s.cpu / self.count for s in self.samples)

    @property
    def rate(self) -> float:
        return statistics.median(self.count / s.wall for s in self.samples)


def download(port: int, path: str, ctx: ssl.SSLContext, expect_sha: str, expect_size: int) -> str:
    conn = Conn(port, ctx)
    try:
        status, length, sha = conn.get(path)
        if status != 200 or length != expect_size or sha != expect_sha:
            raise BenchError(f"{path} on {port}: status {status}, {length} bytes, sha256 {sha[:12]}...: not the file")
        return conn.describe()
    finally:
        conn.close()


def bench_stream(
    label: str, server_pid: int, port: int, path: str, ws: Workspace, runs: int, *, rss_pid: int | None = None
) -> StreamResult:
    ctx = ws.client_context()
    rss_pid = rss_pid or server_pid
    idle = rss_kib(rss_pid, "VmRSS")
    samples, tls = [], ""
    for _ in range(runs):

        def work() -> None:
            nonlocal tls
            tls = download(port, path, ctx, ws.big_sha, ws.big_size)

        samples.append(measure(server_pid, work))
    return StreamResult(label, ws.big_size, samples, rss_kib(rss_pid), idle, tls)


def bench_handshakes(label: str, server: Server, path: str, ws: Workspace, n: int, runs: int) -> CountResult:
    ctx = ws.client_context()  # no session is ever offered back: every connection is a full handshake

    def work() -> None:
        for _ in range(n):
            conn = Conn(server.port, ctx)
            try:
                status, _, sha = conn.get(path, close=True)
                if status != 200 or sha != ws.small_sha:
                    raise BenchError(f"{label}: {path} answered {status}")
            finally:
                conn.close()

    return CountResult(label, n, [measure(server.pid, work) for _ in range(runs)])


# 2b. Sessions offered back: each new connection offers the session of the one before (TLS 1.2: its session ID or
# ticket; TLS 1.3: the last ticket received), against a full handshake of the same version. Counts how many the
# server resumed, so the rows show what the wire does as well as what a reconnect costs.
RESUME_VERSIONS = {"TLS 1.2": ssl.TLSVersion.TLSv1_2, "TLS 1.3": ssl.TLSVersion.TLSv1_3}
NGINX_RESUME_LABEL = "nginx mTLS proxy, session cache + tickets"


@dataclass
class ResumeResult:
    label: str
    version: str
    count: int
    full: list[Sample] = field(default_factory=list)
    offered: list[Sample] = field(default_factory=list)
    resumed: int = 0
    attempts: int = 0

    def cpu_each(self, samples: list[Sample]) -> float:
        return statistics.median(s.cpu / self.count for s in samples)


def bench_resumed(
    label: str, server: Server, path: str, ws: Workspace, n: int, version: str, res: ResumeResult
) -> None:
    """One run of `n` full handshakes, then one of `n` connections each offering the previous session."""
    ctx = ws.client_context()
    ctx.minimum_version = ctx.maximum_version = RESUME_VERSIONS[version]

    def work(offer: bool) -> None:
        session: ssl.SSLSession | None = None
        for i in range(n):
            conn = Conn(server.port, ctx, session=session)
            try:
                status, _, sha = conn.get(path, close=True)
                if status != 200 or sha != ws.small_sha:
                    raise BenchError(f"{label}: {path} answered {status}")
                if offer:
                    res.resumed += conn.sock.session_reused
                    res.attempts += i > 0
                    session = conn.sock.session  # TLS 1.3: a ticket, if any, came before the answer
            finally:
                conn.close()

    res.full.append(measure(server.pid, lambda: work(False)))
    res.offered.append(measure(server.pid, lambda: work(True)))


def render_resumed(results: list[ResumeResult], n: int) -> str:
    lines = [
        f"## 2b. Sessions offered back ({n} new connections, each one 1 KiB request, Connection: close; each "
        "connection offers the session of the one before)",
        "",
        "| proxy | TLS | CPU ms per connection, full handshake | session offered | resumed | offered / full |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        full, offered = r.cpu_each(r.full), r.cpu_each(r.offered)
        lines.append(
            f"| {r.label} | {r.version} | {full * 1000:.2f} | {offered * 1000:.2f} | {r.resumed} of {r.attempts} | "
            f"{_ratio(offered, full)} |"
        )
    lines += [
        "",
        "The nginx proxy of sections 2 and 3 is configured like the gateway (`ssl_session_cache off`, "
        "`ssl_session_tickets off`); the row with a session cache and tickets shows what resumption would buy. "
        'The gateway resumes no session in either version (gateway/tls.py, README "TLS").',
        "",
    ]
    return "\n".join(lines)


def bench_keepalive(label: str, server: Server, path: str, ws: Workspace, n: int, runs: int) -> CountResult:
    ctx = ws.client_context()
    samples = []
    for _ in range(runs):
        conn = Conn(server.port, ctx)
        try:
            conn.get(path)  # the handshake is not part of this measurement

            def work(conn: Conn = conn) -> None:
                for _ in range(n):
                    status, _, sha = conn.get(path)
                    if status != 200 or sha != ws.small_sha:
                        raise BenchError(f"{label}: {path} answered {status}")

            samples.append(measure(server.pid, work))
        finally:
            conn.close()
    return CountResult(label, n, samples)


def loopback_rate(size: int = 256 * MIB, chunk: int = 256 * 1024) -> float:
    """MB/s of plain TCP over loopback from the proxy core to the client core: this machine's transport ceiling."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        pid = os.fork()
        if pid == 0:  # the sender, on the proxy core
            try:
                os.sched_setaffinity(0, {PROXY_CORE})
                conn, _ = srv.accept()
                data, sent = b"\0" * chunk, 0
                while sent < size:
                    sent += conn.send(data)
                conn.close()
            finally:
                os._exit(0)
        try:
            with socket.create_connection(srv.getsockname()) as sock:
                buf, got, t0 = bytearray(MIB), 0, time.perf_counter()
                while n := sock.recv_into(buf):
                    got += n
                rate = got / MB / (time.perf_counter() - t0)
        finally:
            os.waitpid(pid, 0)
    return rate


def sha256_rate(size: int = 256 * MIB, chunk: int = 256 * 1024) -> float:
    """MB/s of hashlib SHA-256 on this core (what verifying costs on top of proxying)."""
    data = memoryview(os.urandom(chunk))
    best = 0.0
    for _ in range(3):
        h = hashlib.sha256()
        t0 = time.process_time()
        for _ in range(size // chunk):
            h.update(data)
        best = max(best, size / MB / (time.process_time() - t0))
    return best


# --------------------------------------------------------------------------------------------------------------
# the report


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "?"


def machine_info() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import aiohttp
    import uvloop

    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{model}, {os.cpu_count()} cores",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "nginx": _tool_version(["nginx", "-v"]).replace("nginx version: ", ""),
        "aiohttp": aiohttp.__version__,
        "uvloop": uvloop.__version__,
        "gateway": gateway_revision(),
    }


def with_hash(mb_per_cpu: float, sha_mbps: float) -> float:
    """MB per CPU-second of a server doing `mb_per_cpu` that also computed SHA-256 (at `sha_mbps`) over every byte."""
    return 1 / (1 / mb_per_cpu + 1 / sha_mbps)


def hashing_estimates(by: dict[str, StreamResult], sha_mbps: float) -> dict[str, float]:
    """MB per CPU-second that each nginx row would reach if it also computed SHA-256 over every byte."""
    return {
        label: with_hash(by[label].mb_per_cpu, sha_mbps)
        for label in ("nginx mTLS proxy -> HTTPS origin", "nginx mTLS, file from disk")
        if label in by and by[label].mb_per_cpu > 0
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def render(
    info: dict[str, str],
    streams: list[StreamResult],
    handshakes: list[CountResult],
    keepalive: list[CountResult],
    stalls: dict[str, tuple[int, int]],
    sha_mbps: float,
    tcp_mbps: float,
    args: argparse.Namespace,
) -> str:
    by = {r.label: r for r in streams}
    ka = {r.label: r for r in keepalive}
    hs = {r.label: r for r in handshakes}
    lines = [
        "# ota-gateway benchmark",
        "",
        f"{info['date']}; {info['cpu']}; Linux {info['kernel']}; Python {info['python']}; {info['openssl']}; "
        f"nginx {info['nginx']}; aiohttp {info['aiohttp']}; uvloop {info['uvloop']}; gateway {info['gateway']}.",
        f"Proxy pinned to core {PROXY_CORE}; client (Python, hashes every body) and HTTPS origin (nginx, TLS) on "
        f"core {CLIENT_CORE}. Medians of {args.runs} run(s). MB = 10^6 bytes. CPU = utime+stime of the proxy "
        f"process tree (/proc/<pid>/stat, {1000 // CLK_TCK} ms ticks). Ceilings on this machine: plain TCP from "
        f"core {PROXY_CORE} to core {CLIENT_CORE} {tcp_mbps:.0f} MB/s; SHA-256 on one core {sha_mbps:.0f} MB/s.",
        "",
        f"## 1. {args.size_mib} MiB verified download",
        "",
        "| path | client TLS | wall MB/s | proxy CPU s | MB per CPU-second | peak RSS MiB (idle) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in streams:
        lines.append(
            f"| {r.label} | {r.tls} | {r.wall_mbps:.0f} | {r.cpu:.2f} | {r.mb_per_cpu:.0f} | "
            f"{r.rss_peak_kib / 1024:.1f} ({r.rss_idle_kib / 1024:.1f}) |"
        )
    estimates = hashing_estimates(by, sha_mbps)
    for label, est in estimates.items():
        lines.append(f"| *estimate: {label} that also hashes, 1 / (1/nginx + 1/SHA-256)* | | | | {est:.0f} | |")
    lines += [
        "",
        'For the direct row, "proxy CPU" is the origin\'s own (it moves to the proxy core for that row). '
        "Peak RSS: VmHWM summed over the process tree (nginx: master + worker); idle: VmRSS before the first "
        "download. Wall MB/s on this VM is bounded by cross-core wake-ups (see the TCP ceiling above) and by core "
        f"{CLIENT_CORE}, which runs both the client and the origin: compare CPU per MB first.",
    ]
    lines += ["", "Ratios (gateway / nginx; MB/s and MB per CPU-second: higher is better; RSS: lower is better):", ""]
    lines += ["| gateway row | vs | wall MB/s | MB per CPU-s | peak RSS |", "|---|---|---:|---:|---:|"]

    def peer(label: str) -> str:  # the nginx row a gateway row compares with
        return "nginx mTLS proxy -> HTTPS origin" if label.endswith("HTTPS origin") else "nginx mTLS, file from disk"

    gateway_rows = [r.label for r in streams if r.label.startswith("gateway (")]
    pairs = [(g, peer(g)) for g in gateway_rows]
    for g, n in pairs:
        if g in by and n in by:
            a, b = by[g], by[n]
            lines.append(
                f"| {g} | {n} | {_ratio(a.wall_mbps, b.wall_mbps)} | {_ratio(a.mb_per_cpu, b.mb_per_cpu)} | "
                f"{_ratio(a.rss_peak_kib, b.rss_peak_kib)} |"
            )
    for g, n in pairs:
        if g in by and n in estimates and "asyncio" not in g:
            ratio = _ratio(by[g].mb_per_cpu, estimates[n])
            lines.append(f"| {g} | {n} + hash (estimate) | | {ratio} (target >= 0.95x) | |")
    for a_label, b_label in (
        ("gateway (uvloop), directory origin", "gateway (asyncio), directory origin"),
        ("gateway (uvloop), HTTPS origin", "gateway (asyncio), HTTPS origin"),
    ):
        if a_label in by and b_label in by:
            lines.append(
                f"| {a_label} | {b_label} | {_ratio(by[a_label].wall_mbps, by[b_label].wall_mbps)} | "
                f"{_ratio(by[a_label].mb_per_cpu, by[b_label].mb_per_cpu)} | "
                f"{_ratio(by[a_label].rss_peak_kib, by[b_label].rss_peak_kib)} |"
            )
    lines += [
        "",
        f"## 2. Full mTLS handshakes ({args.handshakes} new connections, each one 1 KiB request, Connection: close)",
        "",
        "| proxy | CPU ms per connection | minus one keep-alive request = CPU ms per handshake | connections/s "
        "| stalled handshakes* |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in handshakes:
        req = ka.get(r.label)
        net = f"{(r.cpu_each - req.cpu_each) * 1000:.2f}" if req else ""
        stalled, opened = stalls.get(r.label, (0, 0))
        lines.append(f"| {r.label} | {r.cpu_each * 1000:.2f} | {net} | {r.rate:.0f} | {stalled} of {opened} |")
    lines += [
        "",
        f"\\* connections whose TLS handshake got no answer within {HANDSHAKE_TIMEOUT * 1000:.0f} ms, over the whole "
        "life of that proxy process; the client closed them and connected again (not counted in connections/s "
        "of successful ones, but their wait is in the wall time).",
    ]
    lines += [
        "",
        f"## 3. 1 KiB proxied requests ({args.requests} GETs on one keep-alive connection)",
        "",
        "| proxy | CPU us per request | requests/s |",
        "|---|---:|---:|",
    ]
    for r in keepalive:
        lines.append(f"| {r.label} | {r.cpu_each * 1e6:.0f} | {r.rate:.0f} |")
    lines += ["", "Ratios (gateway / nginx; CPU per unit of work: lower is better):", ""]
    lines += ["| measure | gateway | vs | ratio |", "|---|---|---|---:|"]
    nginx_label = "nginx mTLS proxy -> HTTPS origin"
    for label, res in hs.items():
        if label != nginx_label and nginx_label in hs:
            lines.append(
                f"| CPU per new connection | {label} | nginx | {_ratio(res.cpu_each, hs[nginx_label].cpu_each)} |"
            )
            if label in ka and nginx_label in ka:
                g_net = res.cpu_each - ka[label].cpu_each
                n_net = hs[nginx_label].cpu_each - ka[nginx_label].cpu_each
                lines.append(f"| CPU per handshake | {label} | nginx | {_ratio(g_net, n_net)} |")
    for label, res in ka.items():
        if label != nginx_label and nginx_label in ka:
            lines.append(
                f"| CPU per 1 KiB request | {label} | nginx | {_ratio(res.cpu_each, ka[nginx_label].cpu_each)} |"
            )
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=3, help="repetitions per measurement (median reported)")
    p.add_argument("--size-mib", type=int, default=200, help="size of the large download")
    p.add_argument("--handshakes", type=int, default=300, help="new connections per handshake run")
    p.add_argument("--requests", type=int, default=2000, help="keep-alive requests per run")
    p.add_argument("--quick", action="store_true", help="1 run, 50 MiB, 50 handshakes, 300 requests")
    p.add_argument("--no-asyncio", action="store_true", help="skip the --no-uvloop gateway rows")
    p.add_argument(
        "--asyncio-small", action="store_true", help="also handshakes and 1 KiB requests with --no-uvloop (slower)"
    )
    p.add_argument("--out", type=Path, default=BENCH / "results" / "latest.md")
    p.add_argument("--json", type=Path, help="also write raw samples as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--gateway-src", type=Path, help="run `python -m gateway` from this source folder instead")
    p.add_argument("--gateway-label", help="how the report names the gateway code (default: git commit or folder)")
    p.add_argument(
        "--compare-src",
        type=Path,
        action="append",
        default=[],
        help="also stream through a gateway (uvloop) from this source folder, in the same rounds (an A/B of the "
        "verified stream: e.g. the old commit's `git archive` against the work tree); repeatable",
    )
    p.add_argument("--streams-only", action="store_true", help="only section 1 (the large download)")
    p.add_argument("--deadline", type=int, default=540, help="abort the whole run after this many seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.size_mib, args.handshakes, args.requests = 1, 50, 50, 300
    return args


def use_gateway_source(src: Path | None) -> None:
    """Start the gateway from `src` (a folder holding `gateway/`) instead of the installed tree."""
    if src is None:
        return
    src = src.resolve()
    if not (src / "gateway" / "__main__.py").exists():
        raise SystemExit(f"bench: {src} holds no gateway/ package")
    GATEWAY_CMD[:] = [sys.executable, "-m", "gateway"]
    GATEWAY_ENV["PYTHONPATH"] = str(src)


def gateway_revision() -> str:
    """Which gateway code ran: the commit, and whether the work tree differs from it (read-only git commands)."""
    if GATEWAY_ENV.get("PYTHONPATH"):
        return f"source copy {GATEWAY_ENV['PYTHONPATH']}"
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(ROOT), "status", "--porcelain", "--", "gateway"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{head or '?'}{' + uncommitted changes in gateway/' if dirty else ''}"


def install_nginx() -> None:
    """Debian's nginx, if it is missing and we may install packages. The harness never uses /etc/nginx."""
    if shutil.which("nginx") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    print("bench: nginx is missing; installing Debian's nginx-light (apt-get)", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, stdout=subprocess.DEVNULL)
    for package in ("nginx-light", "nginx"):
        done = subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, stdout=subprocess.DEVNULL)
        if done.returncode == 0 and shutil.which("nginx"):
            return


def check_prerequisites() -> None:
    install_nginx()
    if not shutil.which("nginx"):
        raise BenchError(
            "nginx is not installed: apt-get update -qq && apt-get install -y -qq nginx-light (the harness never "
            "touches /etc/nginx; it runs nginx with its own config in a temporary directory)"
        )
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs 2 cores: the proxy on one, client and origin on the other")
    if not GATEWAY_ENV and not GATEWAY_BIN.exists():
        raise BenchError(f"{GATEWAY_BIN} missing: run `make install` first")


@contextlib.contextmanager
def origin_server(ws: Workspace) -> Iterator[Server]:
    port = free_port()
    conf = write_nginx(ws.dir / "nginx-origin", ORIGIN_BODY.format(port=port, certs=ws.certs, origin=ws.origin))
    with run_nginx("origin", conf, port, CLIENT_CORE) as server:
        yield server


def require_valgrind() -> None:
    """`--instructions` counts under valgrind's callgrind, which the bench does not install by itself."""
    if not shutil.which("valgrind"):
        raise SystemExit("--instructions needs valgrind: apt-get install -y valgrind")


def callgrind_window(pid: int, warm_up: Callable[[], object], counted: Callable[[], object]) -> None:
    """For a process started under `valgrind --tool=callgrind --instr-atstart=no`: run `warm_up` uncounted (valgrind
    also translates code then), then `counted` with the instrumentation on and the counters zeroed, and dump."""
    warm_up()
    for command in ("--instr=on", "--zero", "--dump"):
        if command == "--dump":
            counted()
            time.sleep(0.5)
        subprocess.run(["callgrind_control", command, str(pid)], check=True, capture_output=True)
    time.sleep(0.5)


def publish(report: str, out: Path) -> None:
    """Print a bench report and write it to `out` (under the git-ignored results/)."""
    print(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_gateway_source(args.gateway_src)
    check_prerequisites()

    def on_alarm(signum: int, frame: Any) -> None:
        raise BenchError(f"the benchmark took longer than --deadline {args.deadline}s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(args.deadline)
    os.sched_setaffinity(0, {CLIENT_CORE})
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="ota-bench-"))
    os.chmod(base, 0o700)
    big_cdn = f"/bundles/{APP_CDN}/{BIG_VERSION}.zip"
    small_cdn = f"/bundles/{APP_CDN}/{SMALL_VERSION}.zip"
    try:
        print(f"bench: preparing {args.size_mib} MiB of random data, certificates, origin in {base}", file=sys.stderr)
        ws = make_workspace(base, args.size_mib * MIB, 1024)
        sha_mbps = sha256_rate()
        tcp_mbps = loopback_rate()
        with origin_server(ws) as origin, contextlib.ExitStack() as stack:
            # Every proxy runs from the start and the repetitions go round-robin over them, so that drift on a noisy
            # machine hits all rows alike. Idle proxies use no CPU worth counting.
            nginx = stack.enter_context(run_nginx_proxy("nginx-proxy", base, ws, origin.port))
            nginx_label = "nginx mTLS proxy -> HTTPS origin"
            nginx_resume = stack.enter_context(run_nginx_proxy("nginx-resume", base, ws, origin.port, resume=True))
            # (label, server, big path, small path, measure small requests too)
            rows: list[tuple[str, Server, str, str, bool]] = [
                (
                    "direct from HTTPS origin (nginx, TLS, no proxy)",
                    origin,
                    f"/{APP_CDN}/{BIG_VERSION}.zip",
                    f"/{APP_CDN}/{SMALL_VERSION}.zip",
                    False,
                ),
                (nginx_label, nginx, big_cdn, small_cdn, True),
                ("nginx mTLS, file from disk", nginx, f"/files/{APP_DIR}/{BIG_VERSION}.zip", small_cdn, False),
            ]
            loops = [("uvloop", [])] + ([] if args.no_asyncio else [("asyncio", ["--no-uvloop"])])
            for loop_name, extra in loops:
                for origin_label, app in (("directory origin", APP_DIR), ("HTTPS origin", APP_CDN)):
                    label = f"gateway ({loop_name}), {origin_label}"
                    cfg = gateway_config(ws, base / f"gateway-{loop_name}-{app}", origin.port)
                    gw = stack.enter_context(run_gateway(label, cfg, PROXY_CORE, *extra))
                    big = f"/bundles/{app}/{BIG_VERSION}.zip"
                    small = f"/bundles/{app}/{SMALL_VERSION}.zip"
                    rows.append((label, gw, big, small, loop_name == "uvloop" or args.asyncio_small))
            for src in args.compare_src:
                for origin_label, app in (("directory origin", APP_DIR), ("HTTPS origin", APP_CDN)):
                    label = f"gateway (uvloop, {src.name}), {origin_label}"
                    cfg = gateway_config(ws, base / f"gateway-{src.name}-{app}", origin.port, src=src)
                    gw = stack.enter_context(run_gateway(label, cfg, PROXY_CORE, src=src))
                    big = f"/bundles/{app}/{BIG_VERSION}.zip"
                    rows.append((label, gw, big, f"/bundles/{app}/{SMALL_VERSION}.zip", False))
            print(f"bench: {len(rows) - 3} gateway processes up ({time.monotonic() - started:.0f}s)", file=sys.stderr)
            ctx = ws.client_context()
            for _, server, _, small, _ in rows:
                download(server.port, small, ctx, ws.small_sha, ws.small_size)  # warm-up: index, origin pool

            # 1. the large download
            results: dict[str, StreamResult] = {}
            idle = {label: rss_kib(server.pid, "VmRSS") for label, server, *_ in rows}
            for rnd in range(args.runs):
                for label, server, big, _, _ in rows if rnd % 2 == 0 else rows[::-1]:  # drift hits both orders
                    direct = server is origin
                    if direct:  # the origin itself moves to the proxy core for its own row
                        for p in process_tree(origin.pid):
                            os.sched_setaffinity(p, {PROXY_CORE})
                    try:
                        r = bench_stream(label, server.pid, server.port, big, ws, 1)
                    finally:
                        if direct:
                            for p in process_tree(origin.pid):
                                os.sched_setaffinity(p, {CLIENT_CORE})
                    if label in results:
                        results[label].samples += r.samples
                    else:
                        results[label] = r
                print(f"bench: downloads, round {rnd + 1} done ({time.monotonic() - started:.0f}s)", file=sys.stderr)
            for label, server, *_ in rows:
                results[label].rss_peak_kib = rss_kib(server.pid)
                results[label].rss_idle_kib = idle[label]
            streams = list(results.values())

            # 2 and 3: handshakes and small requests, round-robin too
            small_rows = [
                (label, server, small) for label, server, _, small, wanted in rows if wanted and not args.streams_only
            ]
            ka: dict[str, CountResult] = {}
            hs: dict[str, CountResult] = {}
            for rnd in range(args.runs):
                for label, server, small in small_rows:
                    r = bench_keepalive(label, server, small, ws, args.requests, 1)
                    ka.setdefault(label, CountResult(label, r.count, [])).samples.extend(r.samples)
                for label, server, small in small_rows:
                    r = bench_handshakes(label, server, small, ws, args.handshakes, 1)
                    hs.setdefault(label, CountResult(label, r.count, [])).samples.extend(r.samples)
                print(
                    f"bench: small requests, round {rnd + 1} done ({time.monotonic() - started:.0f}s)", file=sys.stderr
                )
            keepalive, handshakes = list(ka.values()), list(hs.values())

            # 2b. sessions offered back, round-robin too
            resume_rows = [(nginx_label, nginx, small_cdn), (NGINX_RESUME_LABEL, nginx_resume, small_cdn)]
            resume_rows += [(label, server, small) for label, server, small in small_rows if "directory" in label]
            if args.streams_only:
                resume_rows = []
            n_resume = max(2, args.handshakes // 2)
            resumes = {
                (label, version): ResumeResult(label, version, n_resume)
                for version in RESUME_VERSIONS
                for label, _, _ in resume_rows
            }
            for rnd in range(args.runs):
                for version in RESUME_VERSIONS:
                    for label, server, small in resume_rows:
                        bench_resumed(label, server, small, ws, n_resume, version, resumes[(label, version)])
                took = time.monotonic() - started
                print(f"bench: sessions offered, round {rnd + 1} done ({took:.0f}s)", file=sys.stderr)
            stalls = {
                label: (STALLS.get(server.port, 0), CONNECTS.get(server.port, 0)) for label, server, _ in small_rows
            }
        info = machine_info()
        if args.gateway_label:
            info["gateway"] = args.gateway_label
        report = render(info, streams, handshakes, keepalive, stalls, sha_mbps, tcp_mbps, args)
        report += "\n" + render_resumed(list(resumes.values()), n_resume)
        report += f"\nTotal harness time: {time.monotonic() - started:.0f} s. Command: `{' '.join(sys.argv)}`.\n"
        publish(report, args.out)
        if args.json:
            raw = {
                "streams": [
                    {
                        "label": r.label,
                        "samples": [vars(s) for s in r.samples],
                        "rss_peak_kib": r.rss_peak_kib,
                        "rss_idle_kib": r.rss_idle_kib,
                    }
                    for r in streams
                ],
                "handshakes": [
                    {"label": r.label, "n": r.count, "samples": [vars(s) for s in r.samples]} for r in handshakes
                ],
                "keepalive": [
                    {"label": r.label, "n": r.count, "samples": [vars(s) for s in r.samples]} for r in keepalive
                ],
                "resumed": [
                    {
                        "label": r.label,
                        "tls": r.version,
                        "n": r.count,
                        "full": [vars(x) for x in r.full],
                        "offered": [vars(x) for x in r.offered],
                        "resumed": r.resumed,
                        "attempts": r.attempts,
                    }
                    for r in resumes.values()
                ],
                "sha256_mbps": sha_mbps,
            }
            args.json.write_text(json.dumps(raw, indent=1))
        return 0
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        if args.keep:
            print(f"bench: kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
