"""The per-connection TLS listener (listener.py), in process, on both event loops the gateway runs on.

Regression: uvloop starts reading a new connection right after `connection_made`, so the client's ClientHello can
reach the accepting protocol before `start_tls` takes the transport over. Those bytes must be handed to the TLS
protocol; otherwise the handshake waits for a ClientHello that never comes and times out (seen as the first
connection to a freshly started gateway failing after `handshake_timeout`).
"""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop
from aiohttp import web

from gateway import listener as listener_module
from gateway.config import TlsListener
from gateway.metrics import Metrics
from gateway.tls import build_material
from tests.support import Pki

RUNNERS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.mark.parametrize("loop", sorted(RUNNERS))
def test_client_hello_read_before_start_tls_is_not_lost(pki: Pki, monkeypatch: pytest.MonkeyPatch, loop: str) -> None:
    early: list[int] = []
    original = listener_module._Acceptor._handshake

    async def late_handshake(self: listener_module._Acceptor, raw: asyncio.Transport) -> None:
        await asyncio.sleep(0.2)  # let the ClientHello arrive first, as it can with uvloop
        early.append(len(self._pending))
        await original(self, raw)

    monkeypatch.setattr(listener_module._Acceptor, "_handshake", late_handshake)
    config = TlsListener.model_validate(
        {"cert": str(pki.server.cert), "key": str(pki.server.key), "client_ca": [str(pki.ca_pem)]}
    )
    material = build_material(config)
    metrics = Metrics()
    answers: list[tuple[int, bytes]] = []

    async def hello(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="hello")

    def client(port: int) -> None:
        for _ in range(2):
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=pki.client_context(pki.client), timeout=5)
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                answers.append((resp.status, resp.read()))
            finally:
                conn.close()

    async def main() -> None:
        server = web.Server(hello)
        tls = listener_module.TlsListenerServer("main", lambda: material, server, metrics, 3.0)
        await tls.start("127.0.0.1", 0)
        try:
            await asyncio.to_thread(client, tls.sockets[0].getsockname()[1])
        finally:
            tls.close()
            await tls.wait_closed()
            await server.shutdown(0.5)

    RUNNERS[loop](main())
    assert early and all(n > 0 for n in early), early  # the scenario happened: bytes were read before start_tls
    assert answers == [(200, b"hello"), (200, b"hello")]
    assert metrics.registry.get_sample_value("ota_gateway_tls_handshakes_total", {"listener": "main"}) == 2


def test_at_a_listener_cap_only_a_connection_waiting_for_a_request_makes_room() -> None:
    """At the admin or plain-HTTP listener's cap the oldest connection that waits for a request is closed for the
    newcomer; one being answered never is, and with every connection being answered the newcomer is refused."""
    from gateway.core.connguard import Caps

    closed: list[str] = []
    busy = {"a": True, "b": False, "c": False, "d": True}

    def open_slot(budget: listener_module.ConnectionBudget, name: str) -> listener_module.Slot | None:
        return budget.open_slot(
            "admin", "127.0.0.1", tls=False, abort=lambda: closed.append(name), waiting=lambda: not busy[name]
        )

    async def main() -> None:
        metrics = Metrics()
        budget = listener_module.ConnectionBudget(Caps(100, 10, 10), metrics, {"admin": 3}, frozenset({"admin"}))
        for name in "abc":
            assert open_slot(budget, name) is not None
        assert open_slot(budget, "d") is not None and closed == ["b"]  # "a" is older, but being answered
        busy["c"] = True
        assert open_slot(budget, "e") is None and closed == ["b"]  # a, c and d are being answered: refused
        refused = metrics.registry.get_sample_value
        assert (
            refused("ota_gateway_connections_refused_total", {"listener": "admin", "cause": "listener_max_connections"})
            == 2
        )
        assert refused("ota_gateway_connections_open", {"listener": "admin"}) == 3

    asyncio.run(main())
