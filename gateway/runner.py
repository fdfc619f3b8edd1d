"""Running the gateway: start listeners, wait for a stop signal, drain in a fixed order.

Owns the process lifecycle. Shutdown order (as uvicorn does it): stop accepting on every listener, close idle
keep-alive connections, let in-flight requests finish within `limits.shutdown_grace`, then cancel what is left
(a cancelled download is aborted, so its client sees a short transfer), then close origins and the audit log.
`serve()` returns the exit code: 0 after a clean drain, `EXIT_FORCED` when requests had to be aborted.
`shutdown_trigger` lets tests stop the gateway without signals.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.app import create_admin_app, create_app
from gateway.audit import AuditLog
from gateway.config import Config
from gateway.listener import TlsListenerServer
from gateway.metrics import Metrics
from gateway.origins import make_origin
from gateway.policy_store import load_policies
from gateway.state_keys import Runtime
from gateway.tls import server_context

log = logging.getLogger("ota_gateway")

EXIT_OK = 0
EXIT_FORCED = 3


def build_runtime(config: Config, metrics: Metrics | None = None) -> Runtime:
    """Everything `serve` loads, without opening a socket (also what `check` validates)."""
    policies = load_policies(config.policies, config)
    metrics = metrics or Metrics()
    origins = {name: make_origin(name, oc) for name, oc in config.origins.items()}
    for name in origins:
        metrics.origin(name)
    metrics.config_loaded.set(1)
    return Runtime(
        config=config, policies=policies, origins=origins, metrics=metrics, audit=AuditLog(config.audit.path)
    )


async def serve(
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    on_ready: Callable[[Runtime, list[TlsListenerServer]], None] | None = None,
) -> int:
    rt = build_runtime(config)
    contexts = {lst.name: server_context(lst) for lst in config.listeners}
    app = create_app(rt)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=config.limits.keepalive_timeout,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    assert runner.server is not None
    listeners: list[TlsListenerServer] = []
    admin_runner: web.AppRunner | None = None
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    forced = False
    try:
        for lst in config.listeners:
            listener = TlsListenerServer(
                lst.name,
                _current(contexts, lst.name),
                runner.server,
                rt.metrics,
                lst.handshake_timeout,
            )
            await listener.start(lst.address, lst.port)
            listeners.append(listener)
        if config.admin.enabled:
            admin_runner = web.AppRunner(create_admin_app(rt), access_log=None)
            await admin_runner.setup()
            await web.TCPSite(admin_runner, config.admin.address, config.admin.port).start()
        for listener in listeners:
            for sock in listener.sockets:
                host, port = sock.getsockname()[:2]
                print(
                    f"ota-gateway: listening on https://{host}:{port} ({listener.name})",
                    file=sys.stderr,
                    flush=True,
                )
        if admin_runner is not None:
            print(
                f"ota-gateway: admin on http://{config.admin.address}:{config.admin.port} (/metrics /healthz /readyz)",
                file=sys.stderr,
                flush=True,
            )
        if on_ready is not None:
            on_ready(rt, listeners)
        waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(stop.wait())]
        if shutdown_trigger is not None:
            waiters.append(asyncio.ensure_future(shutdown_trigger()))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        print("ota-gateway: shutting down, draining in-flight requests", file=sys.stderr, flush=True)
        forced = await _drain(rt, listeners, runner, config.limits.shutdown_grace, lambda: signals > 1)
    finally:
        rt.shutting_down = True
        for listener in listeners:
            listener.close()
            await listener.wait_closed()
        await runner.cleanup()
        if admin_runner is not None:
            await admin_runner.cleanup()
        for origin in rt.origins.values():
            await origin.close()
        rt.audit.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if forced:
        print("ota-gateway: stopped; in-flight requests were aborted after the grace period", file=sys.stderr)
        return EXIT_FORCED
    print("ota-gateway: stopped cleanly", file=sys.stderr)
    return EXIT_OK


def _current(contexts: dict[str, ssl.SSLContext], name: str) -> Callable[[], ssl.SSLContext]:
    """The listener asks for its context on every connection, so replacing `contexts[name]` takes effect at once."""
    return lambda: contexts[name]


async def _drain(
    rt: Runtime,
    listeners: list[TlsListenerServer],
    runner: web.AppRunner,
    grace: float,
    hurry: Callable[[], bool],
) -> bool:
    """Stop accepting, close idle connections, wait for active requests. True if some were still running."""
    rt.shutting_down = True
    for listener in listeners:
        listener.close()
    assert runner.server is not None
    runner.server.pre_shutdown()
    deadline = time.monotonic() + grace
    while rt.active > 0 and time.monotonic() < deadline and not hurry():  # noqa: ASYNC110 - shutdown-only poll
        await asyncio.sleep(0.05)
    return rt.active > 0
