"""Cost of watching a bundle GET to the origin's end of stream (issue 8: `Connection: close`, one TLS handshake per
bundle). N sequential bundle GETs of SIZE bytes through HttpsOrigin.open_url against the test aiohttp TLS origin (in a
thread): wall ms and client-thread CPU ms per GET. Run it on two trees to compare, e.g.

    git archive <commit> gateway tests | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old taskset -c 0 .venv/bin/python bench/bundle_get_cost.py 300 65536
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

N, SIZE = int(sys.argv[1]), int(sys.argv[2])


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
    w, c = time.perf_counter(), cpu()
    for _ in range(N):
        await one()
    w, c = time.perf_counter() - w, cpu() - c
    print(f"{N} GETs of {SIZE} B: {w / N * 1e3:.2f} ms wall, {c / N * 1e3:.2f} ms CPU (client thread) per GET")
    await org.close()


with Srv(Path(tempfile.mkdtemp())) as srv:
    srv.publish("a.b", "1", os.urandom(SIZE), file="1.zip")
    asyncio.run(main(srv))
