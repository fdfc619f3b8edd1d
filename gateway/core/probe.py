"""What `ota-gateway health` asks and how it reads the answer: pure decisions about the admin listener's probe.

The shell (`gateway/health.py`) opens the connection; this module says where to connect (a wildcard listen address
is probed on loopback), which path to ask, and whether an answer means healthy, in one line for a human or a
container runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

HEALTHY = 0
UNHEALTHY = 1

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # wildcard listen address -> loopback


def probe_host(listen_address: str) -> str:
    """The address to probe a listener bound to `listen_address` at: wildcards become loopback."""
    return _WILDCARDS.get(listen_address, listen_address)


def probe_url(listen_address: str, port: int, *, tls: bool, ready: bool) -> str:
    host = probe_host(listen_address)
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}{'/readyz' if ready else '/healthz'}"


@dataclass(frozen=True)
class Verdict:
    code: int  # HEALTHY or UNHEALTHY
    line: str


def judge(url: str, status: int, body: bytes) -> Verdict:
    """A 200 is healthy, anything else is not; /readyz's reasons are named in the line."""
    summary = ""
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        state = doc.get("status")
        reasons = doc.get("reasons")
        if isinstance(state, str):
            summary = " ".join(state.split())[:64]
        if isinstance(reasons, list) and reasons:
            summary += ": " + "; ".join(" ".join(str(r).split())[:200] for r in reasons[:5])
    elif status == 200:
        summary = "ok"
    line = f"{url}: {status}" + (f" {summary}" if summary else "")
    return Verdict(HEALTHY if status == 200 else UNHEALTHY, line)


def unreachable(url: str, why: str) -> Verdict:
    return Verdict(UNHEALTHY, f"{url}: {why}")
