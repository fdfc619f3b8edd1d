"""The health probe's decisions (core/probe.py): where to connect, and what an answer means."""

from __future__ import annotations

import json

import pytest

from gateway.core.probe import HEALTHY, UNHEALTHY, judge, probe_host, probe_url, unreachable


@pytest.mark.parametrize(
    ("listen", "probe"),
    [("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("127.0.0.1", "127.0.0.1"), ("10.0.0.7", "10.0.0.7"), ("::1", "::1")],
)
def test_wildcards_are_probed_on_loopback(listen: str, probe: str) -> None:
    assert probe_host(listen) == probe


def test_urls() -> None:
    assert probe_url("0.0.0.0", 9901, tls=False, ready=False) == "http://127.0.0.1:9901/healthz"
    assert probe_url("::", 9901, tls=True, ready=True) == "https://[::1]:9901/readyz"


def test_200_is_healthy_anything_else_is_not() -> None:
    ok = judge("u", 200, json.dumps({"status": "ready", "reasons": []}).encode())
    assert (ok.code, ok.line) == (HEALTHY, "u: 200 ready")
    assert judge("u", 200, b"").line == "u: 200 ok"
    for status in (500, 503, 404, 301, 204):
        assert judge("u", status, b"").code == UNHEALTHY


def test_readyz_reasons_are_named_on_one_line() -> None:
    body = {"status": "not ready", "reasons": ["origin cdn failing:\nrefused", "shutting down"]}
    verdict = judge("u", 503, json.dumps(body).encode())
    assert verdict.code == UNHEALTHY
    assert verdict.line == "u: 503 not ready: origin cdn failing: refused; shutting down"
    assert "\n" not in verdict.line


def test_garbage_body_still_one_line() -> None:
    verdict = judge("u", 502, b"\x00\xff<html>\n</html>")
    assert (verdict.code, verdict.line) == (UNHEALTHY, "u: 502")


def test_unreachable_is_unhealthy() -> None:
    assert unreachable("u", "cannot connect: Connection refused").code == UNHEALTHY
