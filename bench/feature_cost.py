"""Where an update check's CPU goes: the cost of each feature (issue 12), end to end and stage by stage.

Two parts, one report (Markdown, also written to `bench/results/feature_cost.md`):

1. **End to end**: CPU (utime+stime from /proc) per request of processes pinned to core 0, the client on core 1,
   each over one keep-alive mTLS connection, all servers up at once and driven in turn for `--runs` rounds
   (medians), so that load from elsewhere hits every row alike:
   - `aiohttp alone`: a bare aiohttp app with the same TLS (uvloop, client certificate required) that reads the
     body of `POST /updates` and answers a fixed JSON of the same size: what HTTP + TLS + aiohttp cost at least;
   - `GET /updates`: the gateway's liveness answer: envelope, identity and revocation, audit line, metrics, no
     feature;
   - `update check, offer (SQLite)`: the default config; a device below the newest release gets it offered: body,
     policy, rate limit and state (one trip to the store: the count and the high-water mark read; the offer is at
     the mark after the first round, so nothing more is written), index, review, rollout step, ticket, audit,
     metrics;
   - `update check, up to date (SQLite)`: the same gateway, a device already on the newest release: no ticket
     (the same one trip to the store);
   - `update check, offer (Redis)`: `state.redis_url` to a redis-server this script starts (127.0.0.1, no
     persistence), if one is installed; the Redis server's own CPU is shown apart;
   - `GET 1 KiB bundle`: the 1 KiB bundle of the directory origin and of the HTTPS origin (`bench/run.py`'s nginx
     origin, on the client's core) (the per-request figures of `bench/run.py`).
2. **In process**: each stage's own function on the same inputs as part 1 (the same config, policies, release
   index, client certificate), timed with `time.process_time` over many calls (all threads: the SQLite store's
   worker thread counts). The rest of a check (HTTP parsing, TLS, aiohttp, the envelope, the event loop) is the
   end-to-end figure minus the stages.

    .venv/bin/python bench/feature_cost.py                  # part of `make bench` (about 1 to 2 minutes)
    .venv/bin/python bench/feature_cost.py --compare-src DIR # A/B: every gateway row also from another source copy
                                                             #   (git archive <commit> gateway | tar -x -C DIR)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # bench/run.py: workspace, pinned gateway, CPU accounting

OLD_VERSION, OLD_BUILD = "0.9.0", "0.1.0"  # below the index's releases: the newest is offered
BIG = harness.BIG_VERSION  # the newest release of the index: a device on it is up to date


def device_body(device: str, version: str) -> bytes:
    return json.dumps(
        {
            "platform": "android",
            "device_id": device,
            "app_id": harness.APP_DIR,
            "version_build": version,
            "version_name": version,
            "plugin_version": "8.51.14",
            "is_emulator": False,
            "is_prod": True,
        }
    ).encode()


# --------------------------------------------------------------------------------------------------------------
# servers


def write_config(ws: harness.Workspace, directory: Path, redis_url: str | None, origin_port: int = 1) -> Path:
    """`bench/run.py`'s gateway config, the update checks' rate limit raised out of the way (every request still
    counts against it), and optionally the Redis state store; its HTTPS origin `cdn` on `origin_port`."""
    config = harness.write_gateway_config(ws, directory, origin_port)
    data = yaml.safe_load(config.read_text())
    policies = Path(data["policies"]) / "bench.yaml"
    apps = yaml.safe_load(policies.read_text())
    for app in apps["apps"]:
        app["rate_limits"] = {"updates_per_minute": 100000}
    policies.write_text(yaml.safe_dump(apps, sort_keys=False))
    if redis_url:
        data["state"] = {"path": data["state"]["path"], "redis_url": redis_url}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


@contextlib.contextmanager
def gateway_from(src: Path | None, name: str, config: Path) -> Iterator[harness.Server]:
    """`ota-gateway serve`, one worker, pinned, from this tree or from the source copy `src`."""
    saved_cmd, saved_env = list(harness.GATEWAY_CMD), dict(harness.GATEWAY_ENV)
    harness.use_gateway_source(src)
    try:
        cm = harness.run_gateway(name, config, harness.PROXY_CORE, "--workers", "1")
        server = cm.__enter__()  # the process is started: the command may be put back
    finally:
        harness.GATEWAY_CMD[:] = saved_cmd
        harness.GATEWAY_ENV.clear()
        harness.GATEWAY_ENV.update(saved_env)
    try:
        yield server
    finally:
        cm.__exit__(None, None, None)


FLOOR_ANSWER = {"version": BIG, "url": "https://localhost/bundles/t/" + "x" * 300 + "/9.0.0.zip", "checksum": "0" * 64}


def floor_server(certs: Path, port: int, small_file: Path) -> None:
    """The `aiohttp alone` rows: same TLS as the gateway's listener, no gateway code: `POST /updates` reads the
    body and answers a fixed offer; a bundle GET answers the 1 KiB file from memory (no hashing)."""
    import uvloop
    from aiohttp import web

    answer = json.dumps(FLOOR_ANSWER, separators=(",", ":")).encode()

    async def updates(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(body=answer, content_type="application/json", headers={"Cache-Control": "no-store"})

    small = small_file.read_bytes()

    async def bundle(request: web.Request) -> web.Response:
        return web.Response(body=small, content_type="application/zip", headers={"Cache-Control": "no-store"})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/updates", updates)
        app.router.add_get("/bundles/{app_id}/{version}.zip", bundle)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
        ctx.load_verify_locations(certs / "ca.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
        print("ota-gateway: admin on (floor server ready)", file=sys.stderr, flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


@contextlib.contextmanager
def run_floor(ws: harness.Workspace) -> Iterator[harness.Server]:
    port = harness.free_port()
    small = ws.origin / harness.APP_DIR / f"{harness.SMALL_VERSION}.zip"
    cmd = [*harness.pin_prefix(harness.PROXY_CORE), sys.executable, __file__, "--floor-server", str(ws.certs)]
    proc = subprocess.Popen([*cmd, str(port), str(small)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        harness.wait_port(port, proc, "aiohttp alone")
        yield harness.Server("aiohttp alone", proc, port)
    finally:
        harness.stop_process(proc)


@contextlib.contextmanager
def run_nginx_files(ws: harness.Workspace) -> Iterator[harness.Server | None]:
    """`bench/run.py`'s nginx mTLS proxy, for its `/files/` location only (files from disk, the directory origin's
    peer); None if nginx is not installed."""
    if shutil.which("nginx") is None:
        yield None
        return
    port, directory = harness.free_port(), ws.dir / "nginx-files"
    body = harness.PROXY_BODY.format(
        dir=directory, port=port, origin_port=1, certs=ws.certs, origin=ws.origin, ciphers=harness.CIPHERS
    )
    with harness.run_nginx("nginx", harness.write_nginx(directory, body), port, harness.PROXY_CORE) as server:
        yield server


def nginx_file(conn: http.client.HTTPSConnection) -> None:
    conn.request("GET", f"/files/{harness.APP_DIR}/{harness.SMALL_VERSION}.zip")
    resp = conn.getresponse()
    if resp.status != 200 or len(resp.read()) != 1024:
        raise harness.BenchError(f"nginx GET answered {resp.status}")


@contextlib.contextmanager
def run_redis(directory: Path) -> Iterator[subprocess.Popen[Any] | None]:
    """A throwaway redis-server on 127.0.0.1 (no persistence), on the client's core; None if none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = harness.free_port()
    directory.mkdir(parents=True, exist_ok=True)
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory)]
    proc = subprocess.Popen(
        [*harness.pin_prefix(harness.CLIENT_CORE), binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        harness.wait_port(port, proc, "redis-server")
        proc.url = f"redis://127.0.0.1:{port}/0"  # type: ignore[attr-defined]
        yield proc
    finally:
        harness.stop_process(proc)


# --------------------------------------------------------------------------------------------------------------
# part 1: end to end


@dataclass
class Row:
    label: str
    server: harness.Server
    work: Callable[[http.client.HTTPSConnection], None]
    source: str = "this tree"
    helper: int | None = None  # another process whose CPU this row causes (the Redis server), counted apart
    scale: int = 1  # this many times the requests per round (nginx: ~50 us each would be a few 10 ms ticks)
    samples: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    helper_samples: list[float] = field(default_factory=list)


def check(conn: http.client.HTTPSConnection, version: str, expect: str) -> None:
    conn.request(
        "POST", "/updates", body=device_body(str(uuid.uuid4()), version), headers={"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    if resp.status != 200 or (expect == "offer" and answer.get("version") != BIG):
        raise harness.BenchError(f"update check answered {resp.status}: {answer}")
    if expect == "up to date" and answer.get("kind") != "up_to_date":
        raise harness.BenchError(f"update check of an up-to-date device answered {resp.status}: {answer}")


def liveness(conn: http.client.HTTPSConnection) -> None:
    conn.request("GET", "/updates")
    resp = conn.getresponse()
    if resp.status != 200 or json.loads(resp.read()) != {"status": "ok"}:
        raise harness.BenchError(f"GET /updates answered {resp.status}")


def bundle(conn: http.client.HTTPSConnection, app: str = harness.APP_DIR) -> None:
    conn.request("GET", f"/bundles/{app}/{harness.SMALL_VERSION}.zip")
    resp = conn.getresponse()
    if resp.status != 200 or len(resp.read()) != 1024:
        raise harness.BenchError(f"bundle GET answered {resp.status}")


def connect(row: Row, ctx: ssl.SSLContext) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection("127.0.0.1", row.server.port, context=ctx, timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def drive(rows: list[Row], n: int, runs: int, ws: harness.Workspace) -> None:
    """Each row's round on a connection of its own, opened (and used a few times) before its CPU is read: a row
    that waits for the others longer than the keep-alive timeout would find its connection closed."""
    ctx = ws.client_context()
    for row in rows:  # warm-up: the index cache, SQLite pages, the Redis connection
        with contextlib.closing(connect(row, ctx)) as conn:
            for _ in range(100):
                row.work(conn)
    for rnd in range(runs):
        order = rows if rnd % 2 == 0 else rows[::-1]  # alternate the order: no row always runs after another
        for row in order:
            with contextlib.closing(connect(row, ctx)) as conn:
                for _ in range(5):
                    row.work(conn)
                h0 = harness.cpu_seconds(row.helper) if row.helper else 0.0
                count = n * row.scale
                c0, t0 = harness.cpu_seconds(row.server.pid), time.perf_counter()
                for _ in range(count):
                    row.work(conn)
                row.wall.append((time.perf_counter() - t0) / count * 1e6)
                time.sleep(0.02)
                row.samples.append((harness.cpu_seconds(row.server.pid) - c0) / count * 1e6)
                if row.helper:
                    row.helper_samples.append((harness.cpu_seconds(row.helper) - h0) / count * 1e6)


def instructions_per_request(
    src: Path | None, config: Path, work: Callable[[http.client.HTTPSConnection], None], n: int, ws: harness.Workspace
) -> float:
    """Instructions per request of a gateway (`serve --workers 1` from this tree or `src`) run under valgrind's
    callgrind: counted from after a warm-up (instrumentation switched on with callgrind_control) over `n`
    requests of `work` on one keep-alive connection. Deterministic, unlike CPU time on a shared machine: an
    A/B of a few per cent resolves (it does not see cache misses, so CPU time stays the measure that counts)."""
    cmd, env = harness.gateway_command(src if src is not None else harness.ROOT)
    out = config.parent / "callgrind"
    out.mkdir(exist_ok=True)
    vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/cg.%p"]
    port = yaml.safe_load(config.read_text())["listeners"][0]["port"]
    proc = subprocess.Popen(
        [*harness.pin_prefix(harness.PROXY_CORE), *vg, *cmd, "serve", "--config", str(config), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=config.parent,
        env={**os.environ, **env},
    )
    try:
        harness.wait_port(port, proc, "gateway under valgrind", timeout=300)
        time.sleep(2)  # the listener is up: let start-up finish
        row = Row("callgrind", harness.Server("callgrind", proc, port), work)
        with contextlib.closing(connect(row, ws.client_context())) as conn:

            def requests(count: int, conn: Any = conn) -> None:
                for _ in range(count):
                    work(conn)

            harness.callgrind_window(proc.pid, lambda: requests(30), lambda: requests(n))
    finally:
        harness.stop_process(proc, timeout=60)
    dump = max(out.glob(f"cg.{proc.pid}.*"), key=lambda f: f.stat().st_mtime)
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1]) / n
    raise harness.BenchError(f"no totals in {dump}")


# --------------------------------------------------------------------------------------------------------------
# part 2: in process


def timed(fn: Callable[[], object], n: int) -> float:
    """CPU us per call of `fn` (process time: every thread of this process)."""
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


def timed_async(loop: asyncio.AbstractEventLoop, fn: Callable[[], Awaitable[object]], n: int) -> float:
    async def many() -> None:
        for _ in range(n):
            await fn()

    t0 = time.process_time()
    loop.run_until_complete(many())
    return (time.process_time() - t0) / n * 1e6


def stages(config_path: Path, ws: harness.Workspace, redis_url: str | None, n: int) -> list[tuple[str, str, float]]:
    """(stage, what is timed, CPU us per check) for each stage of an update check that gets an offer."""
    import datetime as dt

    import uvloop

    from gateway.audit import AuditLog, AuditRecord
    from gateway.core.capgo import parse_info
    from gateway.core.identity import identity_from_der
    from gateway.core.jsonsafe import loads_bounded
    from gateway.core.plans import plan_offer, plan_staged, plan_update
    from gateway.core.policy import Peer
    from gateway.core.review import Offer, index_answer, load_public_keys, review_answer
    from gateway.core.tickets import TicketKey

    try:
        from gateway.answers import capgo_json
    except ImportError:  # sources before gateway/answers.py (--stages-only of an older copy)
        from gateway.handlers.capgo_common import capgo_json  # type: ignore[attr-defined,no-redef]
    from gateway.metrics import Metrics
    from gateway.origins import make_origin
    from gateway.reload import load_all
    from gateway.state import MemoryState, RedisState, SqliteState

    loaded = load_all(config_path)
    der = (ws.certs / "client.pem").read_text()
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der_bytes = x509.load_pem_x509_certificate(der.encode()).public_bytes(Encoding.DER)
    identity = identity_from_der(der_bytes)
    material = list(loaded.material.values())
    cas = {k: v for m in material for k, v in m.cas.items()}
    peer = Peer(identity, cas.get(identity.issuer, (None, None))[0])
    body = device_body(str(uuid.uuid4()), OLD_VERSION)
    device = parse_info(loads_bounded(body))
    plan = plan_update(loaded.policies, peer, device)
    assert not isinstance(plan, Exception), plan
    app, channel = plan.app, plan.channel
    origin = make_origin("local", loaded.config.origins["local"])
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    index = loop.run_until_complete(origin.index(app.app_id))  # type: ignore[union-attr]
    key = TicketKey("bench", os.urandom(32))
    out: list[tuple[str, str, float]] = []

    def review() -> object:
        answer, release = index_answer(index, channel, device)
        assert release is not None
        served = (answer.setdefault("url", release.file), None)[1]
        keys = load_public_keys(app.verification.public_keys)
        return review_answer(answer, device, app, public_keys=keys, high_water=None, hosts=None, served=served)

    offer = review()
    assert isinstance(offer, Offer), offer
    from gateway.core.review import Served

    _, release = index_answer(index, channel, device)
    assert release is not None
    served = Served(release.sha256, release.size)

    def ticket() -> object:
        return plan_offer(
            offer,
            served,
            app_id=app.app_id,
            origin="local",
            peer=peer,
            key=key,
            now=time.time(),
            ttl=3600,
            public_url=None,
            host_header="127.0.0.1:8443",
        )

    planned = ticket()
    answer_body = planned.body  # type: ignore[union-attr]

    def revocation() -> object:
        now = dt.datetime.now(dt.UTC)
        identity_from_der(der_bytes)
        return [m.revocation.check(identity, now) for m in material]

    out.append(("request body", "JSON (bounded) + `parse_info`", timed(lambda: parse_info(loads_bounded(body)), n)))
    out.append(("identity", "cached DER parse + revocation check", timed(revocation, n)))
    policy = timed(lambda: plan_update(loaded.policies, peer, device), n)
    out.append(("policy", "`plan_update` (admission, channel)", policy))
    index_us = timed_async(loop, lambda: origin.index(app.app_id), n)  # type: ignore[union-attr]
    out.append(("release index", "directory origin, cached (one `stat`)", index_us))
    out.append(("review", "`index_answer` + `review_answer`", timed(review, n)))
    halts: dict[str, str] = {}
    rollout = lambda: plan_staged(app, offer, cert_sha256=identity.sha256, device_id=device.device_id, halts=halts)  # noqa: E731
    out.append(("rollout step", "`plan_staged` (no rollout block, no halt)", timed(rollout, n)))
    out.append(("ticket", "`plan_offer`: ticket sealed (MAC) into the url", timed(ticket, n)))
    out.append(("answer", "`capgo_json` of the offer", timed(lambda: capgo_json(answer_body), n)))

    with tempfile.TemporaryDirectory(prefix="ota-bench-fc-") as tmp:
        audit = AuditLog(str(Path(tmp) / "audit.log"))

        def audit_line() -> None:
            record = AuditRecord(route="updates", method="POST", path="/updates", peer="127.0.0.1")
            record.set_identity(identity)
            record.app, record.version, record.origin = app.app_id, OLD_VERSION, "local"
            record.status, record.detail, record.duration_ms = 200, f"offered {BIG}", 0.8
            audit.write(record)

        out.append(("audit", "`AuditRecord` + `AuditLog.write` to a file", timed(audit_line, n)))
        audit.close()
        metrics = Metrics()

        def counters() -> None:
            metrics.update_answers.labels("new_version").inc()
            metrics.tickets.labels("issued").inc(1)
            metrics.requests.labels("updates", "ok").inc()

        out.append(("metrics", "the three counters an offer increments", timed(counters, n)))

        stores: list[tuple[str, Any]] = [("memory", MemoryState())]
        sqlite = loop.run_until_complete(SqliteState.open(Path(tmp) / "state.sqlite"))
        stores.append(("SQLite", sqlite))
        if redis_url:
            stores.append(("Redis", loop.run_until_complete(RedisState.open(redis_url))))
        rate_key = f"updates|{app.app_id}|{identity.sha256}"
        for name, store in stores:
            if hasattr(store, "check"):  # one trip: the count and the mark read; an offer at the mark records nothing
                from gateway.core.statecheck import Trip

                def trip(s: Any = store) -> Awaitable[object]:
                    return s.check(Trip(rate_key, 10**9, 60.0, time.time(), (app.app_id, channel)))

                what = "`check`: one trip, the count and the mark read (an offer at the mark records nothing)"
                out.append((f"rate limit + state ({name})", what, timed_async(loop, trip, n)))
                continue
            out.append(  # sources before session 3: three trips
                (
                    f"rate limit ({name})",
                    "`hit`",
                    timed_async(loop, lambda s=store: s.hit(rate_key, 10**9, 60.0, time.time()), n),
                )
            )

            async def marks(s: Any = store) -> None:
                await s.high_water(app.app_id, channel)
                await s.record_offer(app.app_id, channel, BIG, lower=False)

            out.append((f"state ({name})", "`high_water` + `record_offer`", timed_async(loop, marks, n)))
        statements = sqlite_statements(loop, sqlite, rate_key, app.app_id, channel, n)
        if statements is not None:
            out.append(("of which SQL (SQLite)", "the trip's statements alone, on the store's thread", statements))
        out += trip_costs(loop, n)
        for _, store in stores:
            loop.run_until_complete(store.close())
    loop.close()
    return out


def trip_costs(loop: asyncio.AbstractEventLoop, n: int) -> list[tuple[str, str, float]]:
    """CPU us of a trip to a store's thread and back alone (a no-op call awaited): the store's own thread
    (`StoreThread`, session 3) and, for comparison, `run_in_executor` on a one-thread pool as before."""
    from concurrent.futures import ThreadPoolExecutor

    out: list[tuple[str, str, float]] = []
    try:
        from gateway.state import StoreThread
    except ImportError:
        pass
    else:
        worker = StoreThread("bench-trip")
        what = "a no-op call on the store's thread (`StoreThread`: SimpleQueue, `call_soon_threadsafe`)"
        out.append(("of which the trip", what, timed_async(loop, lambda: worker.run(int), n)))
        worker.stop()
    with ThreadPoolExecutor(max_workers=1) as pool:
        us = timed_async(loop, lambda: loop.run_in_executor(pool, int), n)
    out.append(("(a trip by `run_in_executor`)", "the same no-op call, as the store made it before session 3", us))
    return out


def sqlite_statements(
    loop: asyncio.AbstractEventLoop, store: Any, key: str, app_id: str, channel: str, n: int
) -> float | None:
    """CPU us of the SQL an offered check runs (the rate-limit count and the high-water read; before session 3 also
    the raise), timed on the store's own thread without the trip to it; None if the store's private methods have
    other names now."""
    try:
        hit, high_water = store._hit, store._high_water
    except AttributeError:
        return None
    check = getattr(store, "_check", None)
    if check is not None:
        from gateway.core.statecheck import Trip

        def one() -> None:
            check(Trip(key, 10**9, 60.0, time.time(), (app_id, channel)))
    else:  # three trips

        def one() -> None:
            hit(key, 10**9, 60.0, time.time())
            high_water(app_id, channel)
            store._record(app_id, channel, BIG, False)

    def run() -> float:
        t0 = time.thread_time()
        for _ in range(n):
            one()
        return (time.thread_time() - t0) / n * 1e6

    result: float = loop.run_until_complete(store._run(run))
    return result


# --------------------------------------------------------------------------------------------------------------
# report


def render(rows: list[Row], parts: list[tuple[str, str, float]], n: int, runs: int) -> str:
    lines = [
        "# Where an update check's CPU goes (bench/feature_cost.py)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; gateway {harness.gateway_revision()}; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min) at the end.",
        f"Server pinned to core 0, client on core 1; {n} requests per round (nginx: {n * 5}) on one keep-alive mTLS "
        f"connection, {runs} rounds, medians.",
        "",
        "## 1. End to end: CPU us per request",
        "",
        "| request | source | CPU us (median) | rounds | wall us per request (median) |",
        "|---|---|---:|---|---:|",
    ]
    for row in rows:
        rounds = " ".join(f"{s:.0f}" for s in row.samples)
        cpu, wall = statistics.median(row.samples), statistics.median(row.wall)
        lines.append(f"| {row.label} | {row.source} | {cpu:.0f} | {rounds} | {wall:.0f} |")
    for row in rows:
        if row.helper_samples:
            us = statistics.median(row.helper_samples)
            what = f"{row.label}, {row.source}"
            lines.append(f"\n{what}: the Redis server's own CPU per check (not in the row): {us:.0f} us.")
    med = {(r.label, r.source): statistics.median(r.samples) for r in rows}
    others = sorted({r.source for r in rows} - {"this tree"})
    for other in others:  # an A/B run (--compare-src): this tree against the other source, row by row
        lines += ["", f"This tree against {other} (CPU per request, medians; the rounds alternate):", ""]
        lines += [
            f"| request | this tree | {other} | change of the medians | change, median of the rounds' (range) |",
            "|---|---:|---:|---:|---:|",
        ]
        by = {(r.label, r.source): r.samples for r in rows}
        for label in dict.fromkeys(r.label for r in rows if r.source == other):
            new, old = med[(label, "this tree")], med[(label, other)]
            # each round of the two ran close in time: the ratio round by round cancels slow drift in the load
            ratios = [a / b - 1 for a, b in zip(by[(label, "this tree")], by[(label, other)], strict=True)]
            paired = f"{statistics.median(ratios) * 100:+.1f} % ({min(ratios) * 100:+.0f}..{max(ratios) * 100:+.0f})"
            lines.append(f"| {label} | {new:.0f} | {old:.0f} | {(new / old - 1) * 100:+.1f} % | {paired} |")
    total = med.get(("update check, offer (SQLite)", "this tree"))
    lines += ["", "## 2. An offered update check, stage by stage (in process, SQLite store)", ""]
    if total is None:
        return "\n".join(lines) + "\n"
    lines += ["| stage | what is timed | CPU us per check | share of the check |", "|---|---|---:|---:|"]
    own = 0.0
    for stage, what, us in parts:
        other_store = ("memory" in stage or "Redis" in stage) and ("rate limit" in stage or "state" in stage)
        if stage.startswith(("of which", "(")):  # a part of the rows above, or a comparison
            part = "(for comparison)" if stage.startswith("(") else f"({us / total * 100:.1f} % of the check)"
            lines.append(f"| {stage} | {what} | {us:.1f} | {part} |")
            continue
        if not other_store:
            own += us
        share = "(instead of SQLite)" if other_store else f"{us / total * 100:.1f} %"
        lines.append(f"| {stage} | {what} | {us:.1f} | {share} |")
    floor = med.get(("aiohttp alone: POST /updates", "this tree"))
    rest = total - own
    lines.append(
        f"| **the rest** | end to end ({total:.0f} us) minus the stages: HTTP parsing, TLS, aiohttp, the envelope "
        f"(identity lookup, route, audit record), the event loop | {rest:.0f} | {rest / total * 100:.1f} % |"
    )
    ngx = med.get(("nginx mTLS: GET 1 KiB file from disk", "this tree"))
    gw_get = med.get(("GET 1 KiB bundle (directory origin)", "this tree"))
    small_floor = med.get(("aiohttp alone: GET 1 KiB", "this tree"))
    gw_cdn = med.get(("GET 1 KiB bundle (HTTPS origin)", "this tree"))
    if ngx and gw_get and small_floor:
        cdn = f", HTTPS origin {gw_cdn / ngx:.2f}x (against nginx's file from disk)" if gw_cdn else ""
        lines.append(
            f"\n1 KiB GET against nginx (same run): gateway, directory origin {gw_get / ngx:.2f}x{cdn}; aiohttp alone "
            f"{small_floor / ngx:.2f}x (the floor of any gateway built on aiohttp)."
        )
    if floor is not None:
        lines.append(
            f"\nOf the rest, aiohttp alone (same TLS, same body read, a fixed answer) costs {floor:.0f} us: "
            f"{floor / total * 100:.0f} % of a check is the HTTP server the gateway is built on."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 5 and sys.argv[1] == "--floor-server":
        floor_server(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=600, help="requests per round and row")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--calls", type=int, default=3000, help="calls per in-process stage")
    p.add_argument("--compare-src", type=Path, help="also run every gateway row from this source copy")
    p.add_argument("--compare-label", default=None, help="how the report names the --compare-src rows")
    p.add_argument("--no-redis", action="store_true")
    p.add_argument("--only", help="comma-separated: drive only the rows whose label contains one of these")
    p.add_argument("--out", type=Path, default=harness.BENCH / "results" / "feature_cost.md")
    p.add_argument("--stages-only", action="store_true", help="part 2 only, with the `gateway` package on sys.path")
    p.add_argument(
        "--instructions",
        type=int,
        default=0,
        metavar="N",
        help="only: instructions per request (callgrind, N requests) of GET /updates, the offer and the 1 KiB GETs "
        "(directory and HTTPS origin), "
        "from this tree and --compare-src",
    )
    args = p.parse_args(argv)
    if args.instructions:
        return instructions_only(args)
    if args.stages_only:  # e.g. PYTHONPATH=DIR to time another source copy's stages
        import gateway

        with tempfile.TemporaryDirectory(prefix="ota-bench-fc-") as tmp:
            ws = harness.make_workspace(Path(tmp), 4096, 1024)
            parts = stages(write_config(ws, Path(tmp) / "gw", None), ws, None, args.calls)
        print(f"stages of {Path(gateway.__file__).parent}:")
        for stage, _, us in parts:
            print(f"  {stage:24} {us:8.1f} us")
        return 0
    os.sched_setaffinity(0, {harness.CLIENT_CORE})
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ota-bench-fc-") as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        ws = harness.make_workspace(base, 4096, 1024)
        redis = None if args.no_redis else stack.enter_context(run_redis(base / "redis"))
        redis_url = getattr(redis, "url", None)
        floor = stack.enter_context(run_floor(ws))
        nginx = stack.enter_context(run_nginx_files(ws))
        # the HTTPS origin of the `GET 1 KiB bundle (HTTPS origin)` rows: bench/run.py's nginx origin, on core 1
        cdn = None if nginx is None else stack.enter_context(harness.origin_server(ws))
        rows = [] if nginx is None else [Row("nginx mTLS: GET 1 KiB file from disk", nginx, nginx_file, scale=5)]
        rows += [
            Row("aiohttp alone: POST /updates", floor, lambda c: check(c, OLD_VERSION, "any")),
            Row("aiohttp alone: GET 1 KiB", floor, bundle),
        ]
        sources: list[tuple[Path | None, str]] = [(None, "this tree")]
        if args.compare_src:
            sources.append((args.compare_src, args.compare_label or str(args.compare_src)))
        sqlite_config = None
        for i, (src, label) in enumerate(sources):
            config = write_config(ws, base / f"gw-sqlite-{i}", None, cdn.port if cdn else 1)
            sqlite_config = sqlite_config or config
            gw = stack.enter_context(gateway_from(src, f"gateway-{i}", config))
            rows += [
                Row("GET /updates (no feature)", gw, liveness, label),
                Row("update check, offer (SQLite)", gw, lambda c: check(c, OLD_VERSION, "offer"), label),
                Row("update check, up to date (SQLite)", gw, lambda c: check(c, BIG, "up to date"), label),
                Row("GET 1 KiB bundle (directory origin)", gw, bundle, label),
            ]
            if cdn is not None:
                rows.append(Row("GET 1 KiB bundle (HTTPS origin)", gw, lambda c: bundle(c, harness.APP_CDN), label))
            if redis_url:
                config = write_config(ws, base / f"gw-redis-{i}", redis_url)
                gw = stack.enter_context(gateway_from(src, f"gateway-redis-{i}", config))
                offer = lambda c: check(c, OLD_VERSION, "offer")  # noqa: E731
                rows.append(Row("update check, offer (Redis)", gw, offer, label, helper=redis.pid))
        if args.only:
            rows = [r for r in rows if any(part in r.label for part in args.only.split(","))]
        print(f"feature_cost: {len(rows)} rows up ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        drive(rows, args.requests, args.runs, ws)
        print(f"feature_cost: end to end done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
        assert sqlite_config is not None
        os.sched_setaffinity(0, {harness.PROXY_CORE})  # in-process timing on the servers' core, now idle
        parts = stages(sqlite_config, ws, redis_url, args.calls)
        os.sched_setaffinity(0, {harness.CLIENT_CORE})
    report = render(rows, parts, args.requests, args.runs)
    report += f"\nHarness time {time.monotonic() - started:.0f} s. Command: `{' '.join(sys.argv)}`.\n"
    harness.publish(report, args.out)
    return 0


def instructions_only(args: argparse.Namespace) -> int:
    """`--instructions N`: each gateway row's instructions per request, this tree against `--compare-src`."""
    harness.require_valgrind()
    os.sched_setaffinity(0, {harness.CLIENT_CORE})
    works: list[tuple[str, Callable[[http.client.HTTPSConnection], None]]] = [
        ("GET /updates (no feature)", liveness),
        ("update check, offer (SQLite)", lambda c: check(c, OLD_VERSION, "offer")),
        ("GET 1 KiB bundle (directory origin)", bundle),
        ("GET 1 KiB bundle (HTTPS origin)", lambda c: bundle(c, harness.APP_CDN)),
    ]
    if args.only:
        works = [w for w in works if any(part in w[0] for part in args.only.split(","))]
    sources: list[tuple[Path | None, str]] = [(None, "this tree")]
    if args.compare_src:
        sources.append((args.compare_src, args.compare_label or str(args.compare_src)))
    lines = [
        f"Instructions per request (callgrind, {args.instructions} keep-alive requests after 30 not counted; "
        f"gateway {harness.gateway_revision()}):",
        "",
        "| request | " + " | ".join(label for _, label in sources) + (" | change |" if len(sources) > 1 else ""),
        "|---|" + "---:|" * (len(sources) + (len(sources) > 1)),
    ]
    with tempfile.TemporaryDirectory(prefix="ota-bench-fc-") as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        ws = harness.make_workspace(base, 4096, 1024)
        # the HTTPS origin row's origin: bench/run.py's nginx origin, on the client's core (not counted)
        https = any("HTTPS" in label for label, _ in works) and shutil.which("nginx") is not None
        cdn_port = stack.enter_context(harness.origin_server(ws)).port if https else 1
        for label, work in works:
            counts = []
            for i, (src, _) in enumerate(sources):
                config = write_config(ws, base / f"gw-{len(counts)}-{i}-{uuid.uuid4().hex[:6]}", None, cdn_port)
                counts.append(instructions_per_request(src, config, work, args.instructions, ws))
            cells = " | ".join(f"{c / 1000:,.0f} k" for c in counts)
            change = f" | {(counts[0] / counts[1] - 1) * 100:+.1f} %" if len(counts) > 1 else ""
            lines.append(f"| {label} | {cells}{change} |")
            print(lines[-1], file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
