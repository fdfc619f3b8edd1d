"""Test support: PKI from trustme, a real `ota-gateway serve` subprocess, a scriptable HTTPS origin, clients.

Everything binds to 127.0.0.1 and stops by itself (subprocesses get SIGTERM, then SIGKILL, at fixture teardown).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import certs as gw_certs

ROOT = Path(__file__).resolve().parent.parent
CAPGO_FIXTURES = ROOT / "tests" / "fixtures" / "capgo"  # made by tools/make_capgo_fixtures.sh
APP_ID = "com.example.app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def tls_server(ctx: ssl.SSLContext, answer: Callable[[ssl.SSLSocket], None], timeout: float = 5.0) -> Iterator[int]:
    """A TLS server on 127.0.0.1 in a thread, for the twins of the gateway's TLS tests: each connection is wrapped
    with `ctx` and handed to `answer`; yields the port and stops when the block ends."""
    listener = socket.create_server(("127.0.0.1", free_port()))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                conn.settimeout(timeout)
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    answer(tls)
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        thread.join(5)


@dataclass
class CertFiles:
    """A certificate and key on disk (PEM), with the two pin forms."""

    cert: Path
    key: Path
    sha256: str = ""
    spki: str = ""


@dataclass
class Pki:
    """Test PKI in one folder: a CA with server and client certificates, a rogue CA, and broken clients."""

    dir: Path
    ca: trustme.CA
    ca_pem: Path
    server: CertFiles
    client: CertFiles
    client2: CertFiles
    rogue_ca_pem: Path
    rogue_client: CertFiles
    expired_client: CertFiles
    server_only_eku_client: CertFiles  # EKU serverAuth only: OpenSSL refuses it as a client certificate
    no_eku_client: CertFiles  # no EKU at all: OpenSSL accepts it, the gateway does not

    def client_context(self, who: CertFiles | None, *, max_tls: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        if who is not None:
            ctx.load_cert_chain(who.cert, who.key)
        if max_tls is not None:
            ctx.maximum_version = max_tls
        return ctx


def _describe(cert_pem: bytes) -> tuple[str, str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    from gateway.core.identity import spki_pin

    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(), spki_pin(cert)


def _write_leaf(directory: Path, name: str, leaf: trustme.LeafCert) -> CertFiles:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    sha, spki = _describe(leaf.cert_chain_pems[0].bytes())
    return CertFiles(cert, key, sha, spki)


def _write_custom(directory: Path, name: str, ca: trustme.CA, **kwargs: Any) -> CertFiles:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    cert, key = gw_certs.make_leaf(ca_cert, ca_key, name, server=False, **kwargs)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / f"{name}.pem").write_bytes(cert_pem)
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    sha, spki = _describe(cert_pem)
    return CertFiles(directory / f"{name}.pem", directory / f"{name}.key", sha, spki)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    rogue = trustme.CA(key_type=trustme.KeyType.ECDSA)
    ca_pem, rogue_pem = directory / "ca.pem", directory / "rogue-ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    rogue.cert_pem.write_to_path(str(rogue_pem))
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    return Pki(
        dir=directory,
        ca=ca,
        ca_pem=ca_pem,
        server=_write_leaf(directory, "server", ca.issue_cert("localhost", "127.0.0.1", "::1")),
        client=_write_leaf(directory, "client", ca.issue_cert("device-1.example.app")),
        client2=_write_leaf(directory, "client2", ca.issue_cert("device-2.example.app")),
        rogue_ca_pem=rogue_pem,
        rogue_client=_write_leaf(directory, "rogue-client", rogue.issue_cert("device-1.example.app")),
        expired_client=_write_leaf(
            directory,
            "expired-client",
            ca.issue_cert("expired.example.app", not_before=past, not_after=past + dt.timedelta(days=1)),
        ),
        server_only_eku_client=_write_custom(directory, "server-eku", ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
        no_eku_client=_write_custom(directory, "no-eku", ca, eku=[]),
    )


def write_config(
    directory: Path,
    pki: Pki,
    *,
    origins: dict[str, Any],
    apps: list[dict[str, Any]] | None = None,
    port: int | None = None,
    admin_port: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write gateway.yaml and policies/ into `directory`; returns the config path."""
    directory.mkdir(parents=True, exist_ok=True)
    policies = directory / "policies"
    policies.mkdir(exist_ok=True)
    apps = (
        apps
        if apps is not None
        else [
            {
                "app_id": APP_ID,
                "origin": next(iter(origins)),
                "channels": {"default": "production", "allowed": ["production", "beta"]},
                "clients": [{"name": "fleet", "issuer": ["ca"]}],
            }
        ]
    )
    (policies / "apps.yaml").write_text(yaml.safe_dump({"apps": apps}))
    port = port or free_port()
    while admin_port is None or admin_port == port:  # two free_port() calls may name the same port
        admin_port = free_port()
    config: dict[str, Any] = {
        "listeners": [
            {
                "name": "main",
                "address": "127.0.0.1",
                "port": port,
                "cert": str(pki.server.cert),
                "key": str(pki.server.key),
                "client_ca": [str(pki.ca_pem)],
                "handshake_timeout": 5,
            }
        ],
        "admin": {"address": "127.0.0.1", "port": admin_port},
        "origins": origins,
        "policies": "policies",
        "state": {"path": "state/gateway.sqlite"},
        "audit": {"path": "audit.log"},
        "limits": {"shutdown_grace": 5},
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class GatewayProcess:
    """A running `python -m gateway serve` subprocess."""

    config_path: Path
    proc: subprocess.Popen[str]
    port: int
    admin_port: int
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def audit_path(self) -> Path:
        return self.config_path.parent / "audit.log"

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    def scrape(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"{self.admin_url}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample from /metrics (0.0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """GET /readyz on the admin listener: (status, JSON body), whether it answers 200 or 503."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.admin_url}/readyz", timeout=5) as resp:
                return int(resp.status), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return int(exc.code), json.loads(exc.read())

    def rss_peak_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("gateway did not stop in time") from None


READY_LINE = "ota-gateway: ready: "  # logged once, when every listener of every worker accepts connections


def is_ready_line(line: str) -> bool:
    """The readiness line, in the text or the JSON log format."""
    if line.startswith(READY_LINE):
        return True
    if line.startswith("{"):
        try:
            doc = json.loads(line)
        except ValueError:
            return False
        return isinstance(doc, dict) and doc.get("logger") == "ota_gateway.ready"
    return False


def _pump_stderr(proc: subprocess.Popen[str], lines: list[str], ready: threading.Event) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if is_ready_line(line):
            ready.set()
    ready.set()


@contextlib.contextmanager
def watch_gateway(
    config_path: Path, config: dict[str, Any], proc: subprocess.Popen[str], timeout: float
) -> Iterator[GatewayProcess]:
    """Wait for a started `serve`'s readiness line (reading its stderr meanwhile); stop it afterwards."""
    gw = GatewayProcess(config_path, proc, config["listeners"][0]["port"], config["admin"]["port"])
    ready = threading.Event()
    pump = threading.Thread(target=_pump_stderr, args=(proc, gw.stderr_lines, ready), daemon=True)
    pump.start()
    try:
        if not ready.wait(timeout) or proc.poll() is not None:
            raise AssertionError("gateway did not start:\n" + "\n".join(gw.stderr_lines))
        yield gw
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        pump.join(5)
        assert proc.stderr is not None
        proc.stderr.close()


@contextlib.contextmanager
def run_gateway(
    config_path: Path, *args: str, timeout: float = 20, nofile: int | None = None
) -> Iterator[GatewayProcess]:
    """Start `python -m gateway serve --config config_path` and wait until it listens; stop it afterwards.

    `nofile` sets the gateway's open-files limit (soft and hard), as systemd's LimitNOFILE would."""
    config = yaml.safe_load(config_path.read_text())
    workers = [] if any(a.startswith("--workers") for a in args) else ["--workers", "1"]  # one process: its pid is it
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), *workers, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=config_path.parent,
        preexec_fn=None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
    )
    with watch_gateway(config_path, config, proc, timeout) as gw:
        yield gw


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# ---- revocation, config edits and raw HTTPS requests (reload, revocation, front-proxy and plain-HTTP tests) ----


def leaf_certificate(files: CertFiles) -> x509.Certificate:
    """The leaf (first) certificate of a `CertFiles` chain."""
    return x509.load_pem_x509_certificate(files.cert.read_bytes())


def make_crl(
    pki: Pki,
    revoked: list[CertFiles],
    *,
    next_update: dt.datetime | None = None,
    last_update: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL signed by the test CA listing the serials of `revoked`; nextUpdate one day ahead by default."""
    from cryptography.hazmat.primitives import hashes

    now = dt.datetime.now(dt.UTC)
    key = serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    issuer = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes()).subject
    next_update = next_update or now + dt.timedelta(days=1)
    last_update = last_update or min(now - dt.timedelta(minutes=5), next_update - dt.timedelta(hours=1))
    builder = x509.CertificateRevocationListBuilder().issuer_name(issuer).last_update(last_update)
    builder = builder.next_update(next_update)
    for files in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(leaf_certificate(files).serial_number)
            .revocation_date(last_update)
            .build()
        )
    return builder.sign(key, hashes.SHA256())


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` in one step (new inode), as config management and cert-manager do."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_crl(path: Path, crl: x509.CertificateRevocationList, *, der: bool = False) -> Path:
    write_atomic(path, crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM))
    return path


def edit_config(path: Path, edit: Any) -> Path:
    """Load gateway.yaml, let `edit(dict)` change it in place, write it back."""
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Answer:
    """One HTTPS exchange on a fresh connection: status, headers, body and the server certificate's SHA-256."""

    status: int
    headers: dict[str, str]
    body: bytes
    server_sha256: str

    def json(self) -> Any:
        return json.loads(self.body)


def https_request(
    url: str,
    ctx: ssl.SSLContext,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10,
) -> Answer:
    """Send one request on a new TLS connection. A refused handshake raises OSError or http.client errors."""
    import http.client
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname or "127.0.0.1", parts.port, context=ctx, timeout=timeout)
    try:
        conn.connect()
        assert conn.sock is not None
        server_der = conn.sock.getpeercert(binary_form=True) or b""  # type: ignore[attr-defined]
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return Answer(
            resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, hashlib.sha256(server_der).hexdigest()
        )
    finally:
        conn.close()


def refused_request(url: str, ctx: ssl.SSLContext) -> BaseException:
    """Assert that the gateway gives no HTTP answer at all (handshake refused or connection cut); return why."""
    import http.client

    try:
        answer = https_request(url, ctx)
    except (OSError, http.client.HTTPException) as exc:
        return exc
    raise AssertionError(f"expected no HTTP answer, got {answer.status} {answer.body[:200]!r}")


def make_zip(path: Path, size: int) -> Path:
    """A zip of about `size` bytes of incompressible data (stored), for download tests."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("www/bundle.bin", os.urandom(size))
    return path


def metric_value(gw: GatewayProcess, name: str, labels: dict[str, str] | None = None) -> float:
    """Like `GatewayProcess.metric`, for label names that clash with its parameters (such as `name`)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(gw.scrape()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0


# ---- the Capgo protocol: device bodies, calls to /updates /stats /channel_self, the real Capgo fixtures ----

DEVICE_ID = "6f1c2f7e-3f5a-4c2e-9a55-0b1f7e9d2c11"
PLUGIN_AGENT = "CapacitorUpdater/8.51.14 ({app}) android/14"


def capgo_origin(directory: Path, capgo_dir: Path, versions: tuple[str, ...] = ("1.0.0", "1.1.0")) -> Path:
    """A directory origin at `directory` with the committed Capgo bundles of `versions` on channel production."""
    from gateway.publish import add_release

    directory.mkdir(parents=True)
    for version in versions:
        add_release(directory, APP_ID, version, "production", capgo_dir / f"app_{version}.zip")
    return directory


def capgo_fixture(version: str) -> dict[str, Any]:
    """One version of tests/fixtures/capgo/fixtures.json (checksum, encrypted_checksum, iv_session_key, files)."""
    for item in json.loads((CAPGO_FIXTURES / "fixtures.json").read_text()):
        if item["version"] == version:
            return dict(item)
    raise KeyError(version)


def device_body(app_id: str = APP_ID, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    """An update-check body as the Android plugin sends it."""
    return {
        "platform": "android",
        "device_id": DEVICE_ID,
        "app_id": app_id,
        "custom_id": "",
        "version_build": "1.0.0",
        "version_code": "1",
        "version_os": "14",
        "version_name": version,
        "plugin_version": "8.51.14",
        "is_emulator": False,
        "is_prod": True,
        "install_source": "google_play",
        **extra,
    }


def capgo_call(
    url: str, ctx: ssl.SSLContext, payload: Any, *, method: str = "POST", raw: bytes | None = None
) -> Answer:
    """POST (or PUT) JSON to a Capgo route the way the plugin's OkHttp does."""
    app = payload.get("app_id", APP_ID) if isinstance(payload, dict) else APP_ID
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": PLUGIN_AGENT.format(app=app)}
    body = raw if raw is not None else json.dumps(payload).encode()
    return https_request(url, ctx, method=method, headers=headers, body=body)


class RedisServer:
    """A real redis-server (Debian's package, installed by `make test`) on a loopback port, stoppable and restartable
    on the same port (for tests of a state store that goes away mid-run and comes back)."""

    def __init__(self) -> None:
        import shutil

        binary = shutil.which("redis-server")
        assert binary, "redis-server is installed by `make test` (Debian package redis-server)"
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert wait_until(lambda: _redis_ping(self.port), timeout=10), "redis-server did not start"

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A real redis-server on a free loopback port for the duration; yields its URL."""
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# ---- a full disk: a small tmpfs (needs root and mount) filled to the last page ----


@contextlib.contextmanager
def small_filesystem(directory: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `directory` for the duration; the test is skipped, saying why, if mount fails."""
    import pytest

    directory.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        pytest.skip(f"full-disk tests mount a small tmpfs, which needs root: {out.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], capture_output=True, check=False)


def fill_up(directory: Path) -> Path:
    """Write a filler file into `directory` until its filesystem has no free page left; returns its path."""
    import errno

    filler = directory / "filler"
    block = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        try:
            for _ in range(1 << 20):  # bounded: 4 GiB at most
                f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        else:
            raise AssertionError(f"{directory} did not fill up")
    return filler
