"""The request envelope (app.py) around a handler that fails unexpectedly: 500 `internal_error` as problem details,
audited and counted, the traceback logged once; on the real listener stack (mTLS, GuardedAppRunner) in process,
because no configuration makes the shipped handlers raise on purpose."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from aiohttp import web

from gateway.app import create_app, low_level_headers, low_level_recorder
from gateway.core.connguard import Caps, Timeouts
from gateway.listener import ConnectionBudget, GuardedAppRunner, HttpGuard, TlsListenerServer
from gateway.reload import load_all
from gateway.runner import build_runtime
from tests.support import Answer, Pki, https_request, write_config

FORGED = "/boom%0Aota-gateway:%20ready:%20forged"  # a path that decodes to a second line


@pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")  # str request keys, as in serve
def test_an_unexpected_exception_is_a_counted_audited_500_logged_once(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    cfg = write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})
    answers: dict[str, Answer] = {}

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("kaboom SECRET")

    async def main() -> None:
        rt = build_runtime(load_all(cfg))
        app = create_app(rt)
        app.router.add_get("/boom{tail:[\\s\\S]*}", boom)
        budget = ConnectionBudget(Caps(100, 100, 100), rt.metrics)
        guard = HttpGuard(
            "main", Timeouts(5, 5, 5), budget, low_level_recorder(rt), lambda: low_level_headers(rt.snapshot, tls=True)
        )
        runner = GuardedAppRunner(app, guard, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        assert runner.server is not None
        listener = TlsListenerServer(
            "main", lambda: rt.snapshot.material["main"], runner.server, rt.metrics, 5.0, budget
        )
        await listener.start("127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        ctx = pki.client_context(pki.client)
        try:
            for path in (FORGED, "/updates"):
                answers[path] = await asyncio.to_thread(https_request, f"https://127.0.0.1:{port}{path}", ctx)
        finally:
            listener.close()
            await listener.wait_closed()
            await runner.cleanup()
            rt.audit.close()
        sample = rt.metrics.registry.get_sample_value
        assert sample("ota_gateway_refusals_total", {"reason": "internal_error"}) == 1
        assert sample("ota_gateway_requests_total", {"route": "other", "outcome": "refused"}) == 1

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    boom_answer = answers[FORGED]
    assert boom_answer.status == 500
    assert boom_answer.headers["content-type"] == "application/problem+json"
    assert boom_answer.headers["strict-transport-security"].startswith("max-age=")
    assert json.loads(boom_answer.body)["reason"] == "internal_error"
    assert b"SECRET" not in boom_answer.body and b"Traceback" not in boom_answer.body
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1 and "kaboom" in str(tracebacks[0].exc_info[1])  # type: ignore[index]
    assert "\n" not in tracebacks[0].getMessage()  # the request path cannot forge a log line (text format)
    audit = [json.loads(line) for line in (tmp_path / "gw" / "audit.log").read_text().splitlines()]
    assert [(a["path"], a["status"], a.get("reason")) for a in audit] == [
        ("/boom\nota-gateway: ready: forged", 500, "internal_error"),
        ("/updates", 200, None),
    ]
    assert answers["/updates"].status == 200  # the twin: a working handler on the same stack
