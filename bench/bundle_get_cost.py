"""Wall and CPU per bundle GET through `HttpsOrigin.open_url`, and how many TLS connections the origin saw.

N sequential bundle GETs of SIZE bytes against the test aiohttp TLS origin (in a thread of its own): wall ms and
client-thread CPU ms per GET. Since issue 12 a bundle GET reuses a pooled origin connection (one TLS handshake for
the whole run); before, each asked for `Connection: close` and cost one handshake (issue 8). Part of `make bench`
(300 GETs of 64 KiB). Run it on two trees to compare, e.g.

    git archive <commit> gateway tests | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old taskset -c 0 .venv/bin/python bench/bundle_get_cost.py 300 65536
    PYTHONPATH=.        taskset -c 0 .venv/bin/python bench/bundle_get_cost.py 300 65536
"""

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from yarl import URL

from gateway.config import HttpsOriginConfig
from gateway.origins import HttpsOrigin
from tests.origin_server import HttpsOrigin as Srv

N = int(sys.argv[1]) if len(sys.argv) > 1 else 300
SIZE = int(sys.argv[2]) if len(sys.argv) > 2 else 65536


def cpu() -> float:
    return time.thread_time()  # the origin runs in its own thread: only the client side is counted


async def main(srv: Srv) -> None:
    org = HttpsOrigin("cdn", HttpsOriginConfig(**srv.origin_config()))

    async def one() -> None:
        async with org.open_url(URL(org.locate("a.b", "1.zip"))) as body:
            async for _ in body.chunks:  # type: ignore[attr-defined]
                pass

    for _ in range(20):
        await one()
    first = len(srv.state.headers)
    ports = getattr(srv.state, "ports", None)  # recorded by tests/origin_server.py since issue 12
    first_port = len(ports) if ports is not None else 0
    w, c = time.perf_counter(), cpu()
    for _ in range(N):
        await one()
    w, c = time.perf_counter() - w, cpu() - c
    assert len(srv.state.headers) - first == N
    conns = "?" if ports is None else str(len(set(ports[first_port:])))
    print(
        f"bundle_get_cost: {N} GETs of {SIZE} B: {w / N * 1e3:.2f} ms wall, {c / N * 1e3:.2f} ms CPU (client thread)"
        f" per GET; origin TLS connections used: {conns}"
    )
    await org.close()


with Srv(Path(tempfile.mkdtemp())) as srv:
    srv.publish("a.b", "1", os.urandom(SIZE), file="1.zip")
    asyncio.run(main(srv))
