"""Running the gateway: start listeners, wait for a stop signal, drain in a fixed order.

Owns the process lifecycle. Shutdown order (as uvicorn does it): stop accepting on every listener, close idle
keep-alive connections, let in-flight requests finish within `limits.shutdown_grace`, then cancel what is left
(a cancelled download is aborted, so its client sees a short transfer), then close origins and the audit log.
While it runs, a probe writes to the state store every `state.probe_interval` seconds (and retries a failing
audit log), so that /readyz sees a failing store, and its recovery, without waiting for traffic.
`serve()` returns the exit code: 0 after a clean drain, `EXIT_FORCED` when requests had to be aborted. Start-up
(until every listener is bound) either completes or raises `ConfigError`: a port in use, a state folder, audit log
or Redis that cannot be used are one line each, never a traceback.
`shutdown_trigger` lets tests stop the gateway without signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import resource
import signal
import sqlite3
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from gateway.app import create_admin_app, create_app, create_plain_app, low_level_headers, low_level_recorder
from gateway.audit import AuditLog
from gateway.config import Config
from gateway.core.connguard import Caps, Timeouts, auto_max_connections
from gateway.core.tickets import TicketKey
from gateway.errors import ConfigError
from gateway.listener import (
    ConnectionBudget,
    GuardedAppRunner,
    HttpGuard,
    PlainListener,
    TlsListenerServer,
    quiet_handshake_reports,
)
from gateway.logs import announce_ready
from gateway.memory import trim_after_churn
from gateway.metrics import Metrics
from gateway.origins import make_origin
from gateway.preflight import bind_issue, certificate_issues, current_user, damaged_store, os_issue
from gateway.reload import Loaded, Reloader, load_all, load_ticket_keys, publish_state_metrics
from gateway.state import GuardedState, RedisState, SqliteState, StateError, StateStore
from gateway.state_keys import Runtime, Snapshot
from gateway.ticket_keys import load_keyring
from gateway.tls import ListenerMaterial, admin_context, follow_admin_context
from gateway.workers import reports

log = logging.getLogger("ota_gateway.runner")

EXIT_OK = 0
EXIT_FORCED = 3


def build_runtime(
    loaded: Loaded, metrics: Metrics | None = None, ticket_keys: tuple[TicketKey, ...] | None = None
) -> Runtime:
    """The runtime of a checked config: its first snapshot (ticket keys read now unless given), metrics, audit log."""
    metrics = metrics or Metrics()
    overruns = metrics.origin_overruns
    origins = {name: make_origin(name, oc, overruns.labels(name).inc) for name, oc in loaded.config.origins.items()}
    for name in origins:
        metrics.origin(name)
    publish_state_metrics(metrics, loaded)
    keys = load_keyring(loaded.config) if ticket_keys is None else ticket_keys
    return Runtime(
        snapshot=Snapshot.build(loaded.config, loaded.policies, loaded.material, origins, keys, loaded.admin_tls),
        metrics=metrics,
        audit=AuditLog(loaded.config.audit.path, on_failure=metrics.audit_write_failures.inc),
    )


async def _open_runtime(config_path: Path, loaded: Loaded) -> Runtime:
    """The runtime, with the ticket keys (generated on first start); problems are config errors."""
    keys = await asyncio.to_thread(load_ticket_keys, config_path, loaded.config)
    try:
        return build_runtime(loaded, ticket_keys=keys)
    except OSError as exc:
        path = loaded.config.audit.path
        raise ConfigError([os_issue(str(config_path), "audit.path", "cannot open the audit log", path, exc)]) from None


async def open_state(config_path: Path, rt: Runtime) -> StateStore:
    """The state store at `state.path` (or `state.redis_url`); problems are config errors, except a Redis that
    does not answer yet (a reboot that starts the gateway first): that is a store failure, which /readyz reports
    and the periodic probe ends once Redis is up."""
    return await open_store(config_path, rt.snapshot.config, redis_must_answer=False)


async def open_store(config_path: Path, config: Config, *, redis_must_answer: bool = True) -> StateStore:
    """The configured state store (SQLite or Redis); problems are config errors. `release status` uses it too."""
    redis_url = config.state.redis_url
    if redis_url is not None:
        from redis.exceptions import RedisError

        try:
            return await RedisState.open(redis_url, ping=redis_must_answer)
        except ValueError as exc:  # a url redis cannot parse (a port that is no number, ...): it can never work
            raise ConfigError.single(
                str(config_path), "state.redis_url", None, f"not a usable Redis url: {exc}"
            ) from None
        except (OSError, RedisError) as exc:
            raise ConfigError.single(
                str(config_path),
                "state.redis_url",
                None,
                f"cannot reach the Redis state store: {exc}; start it, or fix the url (check tests it)",
            ) from None
    path = config.state.path
    try:
        return await SqliteState.open(path)
    except OSError as exc:
        issue = os_issue(str(config_path), "state.path", "cannot open the state store", path, exc)
        raise ConfigError([issue]) from None
    except sqlite3.OperationalError as exc:
        raise ConfigError.single(
            str(config_path),
            "state.path",
            None,
            f"cannot open the state store {path}: {exc}; {current_user()} must be able to write the file and its "
            "folder (SQLite keeps -wal and -shm files next to it)",
        ) from None
    except sqlite3.Error as exc:  # "file is not a database", "database disk image is malformed"
        raise ConfigError.single(str(config_path), "state.path", None, damaged_store(path, str(exc))) from None


def guard_state(rt: Runtime, store: StateStore) -> StateStore:
    """The store with its failures counted, logged and reported (`GuardedState`)."""
    return GuardedState(store, rt.live.state_fault, lambda op: rt.metrics.state_errors.labels(op).inc())


async def _probe(rt: Runtime) -> None:
    """Write to the state store every `state.probe_interval` s; retry a failing audit log. Failures are recorded."""
    while True:
        await asyncio.sleep(rt.snapshot.config.state.probe_interval)
        with contextlib.suppress(StateError):
            await rt.state.probe()
        rt.audit.probe()


def raise_open_files_limit() -> int:
    """Raise the RLIMIT_NOFILE soft limit to the hard limit (systemd's soft default is 1,024); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def _budget(rt: Runtime, nofile: int) -> tuple[ConnectionBudget, Timeouts]:
    config = rt.snapshot.config
    limits = config.limits
    caps = Caps(
        connections=limits.max_connections or auto_max_connections(nofile),
        handshakes=limits.max_handshakes,
        handshakes_per_address=limits.max_handshakes_per_address,
    )
    listener_caps = {"plain_http": config.plain_http.max_connections, "admin": config.admin.max_connections}
    for name in listener_caps:
        rt.metrics.http_listener(name)
    budget = ConnectionBudget(caps, rt.metrics, listener_caps, own_cap_only=frozenset({"admin"}))
    return budget, Timeouts(header=limits.header_timeout, body=limits.body_timeout, idle=limits.keepalive_timeout)


async def serve(
    config_path: Path,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    reuse_port: bool = False,
    on_ready: Callable[[], None] | None = None,
    restarted: bool = False,
) -> int:
    """Run until SIGTERM/SIGINT (or `shutdown_trigger`), then drain; return the exit code.

    Start-up ends when every listener is bound: then `on_ready` is called (a worker tells its supervisor), or
    without it the readiness line is logged (`gateway/logs.py`). A problem before that (config, state
    store, audit log, a port in use) raises `ConfigError` with one line per problem. `restarted`: this process
    replaces a worker that died (counted in `ota_gateway_worker_restarts_total`).
    """
    rt = await _open_runtime(config_path, await asyncio.to_thread(load_all, config_path))
    if restarted:
        rt.metrics.worker_restarts.inc()
    config = rt.snapshot.config
    if reports():  # the server certificates' dates, said once at start (`check` fails on an expired one)
        expired, ending = certificate_issues(str(config_path), config, dt.datetime.now(dt.UTC))
        for issue in expired:
            log.error("%s (/readyz answers 503 until a valid one is loaded)", issue)
        for issue in ending:
            log.warning("%s", issue)
    rt.state = guard_state(rt, await open_state(config_path, rt))
    if config.state.redis_url is not None:  # a Redis not up yet: one line now, /readyz not ready until the probe
        with contextlib.suppress(StateError):  # succeeds (every `state.probe_interval` s); requests meanwhile get
            await rt.state.probe()  # the store-failure answers (`state.rate_limit_on_failure`, `state_error`)
    reloader = Reloader(config_path, rt)
    nofile = raise_open_files_limit()
    budget, timeouts = _budget(rt, nofile)
    log.info("open-files limit %d; at most %d connections per worker", nofile, budget.caps.connections)
    record = low_level_recorder(rt)

    def guard(name: str, *, tls: bool) -> HttpGuard:
        return HttpGuard(name, timeouts, budget, record, lambda: low_level_headers(rt.snapshot, tls=tls))

    runner = GuardedAppRunner(
        create_app(rt),
        guard(config.listeners[0].name, tls=True),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    assert runner.server is not None
    listeners: list[TlsListenerServer] = []
    side_runners: list[PlainListener] = []
    tasks: set[asyncio.Task[object]] = set()
    stop = asyncio.Event()
    signals = 0

    def on_stop() -> None:
        nonlocal signals
        signals += 1
        stop.set()

    def on_hup() -> None:
        task = loop.create_task(reloader.reload("SIGHUP"), name="reload-sighup")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop = asyncio.get_running_loop()
    quiet_handshake_reports(loop)
    loop.add_signal_handler(signal.SIGTERM, on_stop)
    loop.add_signal_handler(signal.SIGINT, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    forced = False
    source = str(config_path)
    try:
        for i, lst in enumerate(config.listeners):
            listener = TlsListenerServer(
                lst.name, _current(rt, lst.name), runner.server, rt.metrics, lst.handshake_timeout, budget
            )
            try:
                await listener.start(lst.address, lst.port, reuse_port=reuse_port)
            except OSError as exc:
                raise ConfigError([bind_issue(source, f"listeners[{i}].port", lst.address, lst.port, exc)]) from None
            listeners.append(listener)
            for sock in listener.sockets:
                host, port = sock.getsockname()[:2]
                log.info("listening on https://%s:%s (%s)", host, port, lst.name)
        if config.plain_http.enabled:
            https_port = config.plain_http.https_port or config.listeners[0].port
            plain = config.plain_http
            plain_app = create_plain_app(rt, https_port)
            plain_guard = guard("plain_http", tls=False)
            side_runners.append(
                await _site(plain_app, plain_guard, source, "plain_http", plain.address, plain.port, reuse_port)
            )
            log.info("plain HTTP on http://%s:%s (redirects only)", plain.address, plain.port)
        if config.admin.enabled:
            admin_tls = (
                follow_admin_context(lambda: rt.snapshot.admin_tls, admin_context(config.admin.tls))
                if config.admin.tls
                else None
            )
            admin = create_admin_app(rt)
            admin_guard = guard("admin", tls=admin_tls is not None)
            side_runners.append(
                await _site(
                    admin, admin_guard, source, "admin", config.admin.address, config.admin.port, reuse_port, admin_tls
                )
            )
            scheme = "https" if admin_tls else "http"
            log.info("admin on %s://%s:%s (/metrics /healthz /readyz)", scheme, config.admin.address, config.admin.port)
        if on_ready is not None:
            on_ready()
        else:
            announce_ready(config, 1)
        watcher = loop.create_task(reloader.watch(), name="reload-watch")
        tasks.add(watcher)
        tasks.add(loop.create_task(trim_after_churn(lambda: budget.closed_total), name="malloc-trim"))
        tasks.add(loop.create_task(_probe(rt), name="health-probe"))
        waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(stop.wait())]
        if shutdown_trigger is not None:
            waiters.append(asyncio.ensure_future(shutdown_trigger()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        log.info("shutting down, draining in-flight requests")
        forced = await _drain(rt, listeners, runner, config.limits.shutdown_grace, lambda: signals > 1)
    finally:
        rt.live.shutting_down = True
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in listeners:
            listener.close()
            await listener.wait_closed()
        await runner.cleanup()
        for side in side_runners:
            await side.cleanup()
        await reloader.close()
        for origin in rt.snapshot.origins.values():
            await origin.close()
        await rt.state.close()
        rt.audit.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a late reload must not end the process (exit 129)
    if forced:
        log.warning("stopped; in-flight requests were aborted after the grace period")
        return EXIT_FORCED
    log.info("stopped cleanly")
    return EXIT_OK


async def _site(
    app: web.Application,
    guard: HttpGuard,
    source: str,
    key: str,
    address: str,
    port: int,
    reuse_port: bool,
    ssl_context: ssl.SSLContext | None = None,
) -> PlainListener:
    """A listener for the plain-HTTP or admin app, held to the same timeouts and caps as the TLS listeners.
    A bind failure is a `ConfigError` naming `key`.port."""
    runner = GuardedAppRunner(app, guard, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = PlainListener(runner)
    try:
        await site.start(address, port, reuse_port=reuse_port, ssl_context=ssl_context)
    except OSError as exc:
        await site.cleanup()
        raise ConfigError([bind_issue(source, f"{key}.port", address, port, exc)]) from None
    return site


def _current(rt: Runtime, name: str) -> Callable[[], ListenerMaterial]:
    """The listener asks for its material on every connection, so a reload's swap takes effect at once."""
    return lambda: rt.snapshot.material[name]


async def _drain(
    rt: Runtime,
    listeners: list[TlsListenerServer],
    runner: web.AppRunner,
    grace: float,
    hurry: Callable[[], bool],
) -> bool:
    """Stop accepting, close idle connections, wait for active requests. True if some were still running."""
    rt.live.shutting_down = True
    for listener in listeners:
        listener.close()
    assert runner.server is not None
    runner.server.pre_shutdown()
    deadline = time.monotonic() + grace
    while rt.live.active > 0 and time.monotonic() < deadline and not hurry():  # noqa: ASYNC110 - shutdown-only poll
        await asyncio.sleep(0.05)
    return rt.live.active > 0
