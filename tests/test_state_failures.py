"""A state store or audit log that fails mid-run, against real `serve` processes: a real redis-server stopped and
started again, SQLite and the audit file on a real full disk (a small tmpfs). Each failure is answered in the
route's own shape (never a 500 text), counted, logged once, shown by /readyz, and each has its recovery twin."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    APP_ID,
    GatewayProcess,
    Pki,
    RedisServer,
    capgo_call,
    capgo_origin,
    device_body,
    fill_up,
    https_request,
    run_gateway,
    small_filesystem,
    wait_until,
    write_config,
)

PROBE = 0.3  # state.probe_interval in these tests: recovery without traffic is seen within a few seconds


@pytest.fixture
def origin(tmp_path: Path, capgo_dir: Path) -> Path:
    return capgo_origin(tmp_path / "origin", capgo_dir)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _config(directory: Path, pki: Pki, origin: Path, *, state: dict[str, Any], audit: dict[str, Any]) -> Path:
    return write_config(
        directory,
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"state": {"probe_interval": PROBE, **state}, "audit": audit},
    )


def _state_errors(gw: GatewayProcess) -> dict[str, float]:
    return {op: gw.metric("ota_gateway_state_errors_total", op=op) for op in ("high_water", "record_offer", "hit")}


def _stats(gw: GatewayProcess, pki: Pki) -> Any:
    event = {**device_body(), "action": "set", "version_name": "1.1.0", "old_version_name": "1.0.0"}
    return capgo_call(f"{gw.base_url}/stats", pki.client_context(pki.client), event)


def _update(gw: GatewayProcess, pki: Pki) -> Any:
    return capgo_call(f"{gw.base_url}/updates", pki.client_context(pki.client), device_body(version="1.0.0"))


def _assert_state_failure_answer(answer: Any, status: int) -> None:
    assert answer.status == status and answer.headers["content-type"].startswith("application/json"), answer
    body = answer.json()
    assert body["error"] == "state_error" and body["kind"] == "failed", body
    assert "state store" in body["message"] and "redis" not in body["message"].lower()  # no internals to clients


# ---- Redis stopped mid-run, then started again ----


def test_redis_stopped_mid_run_fails_visibly_and_recovers(
    tmp_path: Path, pki: Pki, origin: Path, redis: RedisServer
) -> None:
    cfg = _config(tmp_path / "gw", pki, origin, state={"redis_url": redis.url}, audit={"path": "audit.log"})
    with run_gateway(cfg) as gw:
        assert _update(gw, pki).json()["version"] == "1.1.0"  # healthy: an offer
        assert gw.readyz()[0] == 200
        before = _state_errors(gw)
        failed_before = gw.metric("ota_gateway_update_answers_total", kind="failed")

        redis.stop()
        answer = _update(gw, pki)  # rate limit fails open, the channel mark cannot be read: kind failed
        _assert_state_failure_answer(answer, 200)
        after = _state_errors(gw)
        assert after["hit"] - before["hit"] == 1 and after["high_water"] - before["high_water"] == 1
        assert gw.metric("ota_gateway_update_answers_total", kind="failed") - failed_before == 1
        assert gw.metric("ota_gateway_refusals_total", reason="state_error") >= 1
        stats = _stats(gw, pki)  # fail_open (the default): events still pass the rate limit and are counted
        assert stats.status == 200 and stats.json() == {"status": "ok"}
        assert _state_errors(gw)["hit"] - before["hit"] == 2
        status, body = gw.readyz()
        assert status == 503 and any(r.startswith("state store failing") for r in body["reasons"]), body
        line = gw.audit()[-2]  # the update check
        assert (line["route"], line["outcome"], line["reason"]) == ("updates", "refused", "state_error")
        assert wait_until(lambda: any("state store failing" in x for x in gw.stderr_lines), timeout=5)

        redis.start()  # same port, empty: no request needed, the probe sees it back
        assert wait_until(lambda: gw.readyz()[0] == 200, timeout=10 * PROBE + 5), gw.readyz()
        assert wait_until(lambda: any("state store recovered" in x for x in gw.stderr_lines), timeout=5)
        assert _update(gw, pki).json()["version"] == "1.1.0"
        failing_lines = [x for x in gw.stderr_lines if "state store failing" in x]
        assert len(failing_lines) == 1, failing_lines  # many failed operations, one log line
        assert not any("Traceback" in x for x in gw.stderr_lines)


def test_redis_down_with_rate_limit_fail_closed_refuses_stats(
    tmp_path: Path, pki: Pki, origin: Path, redis: RedisServer
) -> None:
    state = {"redis_url": redis.url, "rate_limit_on_failure": "fail_closed"}
    cfg = _config(tmp_path / "gw", pki, origin, state=state, audit={"path": "audit.log"})
    with run_gateway(cfg) as gw:
        assert _stats(gw, pki).status == 200  # healthy twin
        redis.stop()
        before = _state_errors(gw)
        _assert_state_failure_answer(_stats(gw, pki), 503)  # the plugin retries a 5xx: no event is lost
        answer = _update(gw, pki)
        _assert_state_failure_answer(answer, 200)
        after = _state_errors(gw)
        assert after["hit"] - before["hit"] == 2 and after["high_water"] == before["high_water"]  # refused first
        assert gw.metric("ota_gateway_device_events_total", app=APP_ID, action="set") == 1  # only the healthy one
        channel = capgo_call(f"{gw.base_url}/channel_self", pki.client_context(pki.client), device_body(), method="PUT")
        assert channel.status == 200  # a route that needs no state keeps working
        redis.start()
        assert wait_until(lambda: gw.readyz()[0] == 200, timeout=10 * PROBE + 5)
        assert _stats(gw, pki).status == 200


# ---- SQLite on a full disk ----


def test_sqlite_on_a_full_disk_fails_offers_and_recovers(tmp_path: Path, pki: Pki, origin: Path) -> None:
    with small_filesystem(tmp_path / "disk", "512k") as disk:
        cfg = _config(
            tmp_path / "gw", pki, origin, state={"path": str(disk / "gateway.sqlite")}, audit={"path": "audit.log"}
        )
        with run_gateway(cfg) as gw:
            assert _stats(gw, pki).status == 200  # healthy: its rate-limit count is written
            before = _state_errors(gw)
            filler = fill_up(disk)
            answer = _update(gw, pki)  # the channel's first mark cannot be kept: no offer goes out
            _assert_state_failure_answer(answer, 200)
            after = _state_errors(gw)
            assert after["hit"] - before["hit"] == 1 and after["record_offer"] - before["record_offer"] == 1
            assert after["high_water"] == before["high_water"]  # reads still work on a full disk
            status, body = gw.readyz()
            assert status == 503 and "database or disk is full" in " ".join(body["reasons"]), body
            assert _stats(gw, pki).status == 200  # fail_open: events pass

            filler.unlink()
            assert wait_until(lambda: gw.readyz()[0] == 200, timeout=10 * PROBE + 5), gw.readyz()
            assert _update(gw, pki).json()["version"] == "1.1.0"
            assert _state_errors(gw)["record_offer"] == after["record_offer"]


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_sqlite_file_removed_or_replaced_under_the_gateway_is_reported(
    tmp_path: Path, pki: Pki, origin: Path, how: str
) -> None:
    """The open file outlives its name: writes keep succeeding into a file no other process will see (not
    `ota-gateway release halt`, not a worker started later, not the next start). The probe notices that the path
    no longer names the file it opened, and /readyz says so until a restart; the twin: the same file in place
    stays ready."""
    db = tmp_path / "state" / "gateway.sqlite"
    cfg = _config(tmp_path / "gw", pki, origin, state={"path": str(db)}, audit={"path": "audit.log"})
    with run_gateway(cfg) as gw:
        assert _stats(gw, pki).status == 200
        copy = db.with_name("copy.sqlite")
        copy.write_bytes(db.read_bytes())  # a backup of it, put back below as a new file
        time.sleep(5 * PROBE)
        assert gw.readyz()[0] == 200 and gw.metric("ota_gateway_state_errors_total", op="probe") == 0
        for suffix in ("", "-wal", "-shm"):
            db.with_name(db.name + suffix).unlink(missing_ok=True)
        if how == "replaced":
            copy.rename(db)
        assert wait_until(lambda: gw.readyz()[0] == 503, timeout=10 * PROBE + 5), gw.readyz()
        reasons = " ".join(gw.readyz()[1]["reasons"])
        assert f"{db} was {'removed' if how == 'removed' else 'replaced by another file'} while open" in reasons
        assert "restart the gateway" in reasons
        assert gw.metric("ota_gateway_state_errors_total", op="probe") >= 1
        assert _stats(gw, pki).status == 200  # still answering; only readiness and the log say it
    with run_gateway(cfg) as gw:  # a restart opens the file at the path again
        assert _stats(gw, pki).status == 200
        time.sleep(5 * PROBE)
        assert gw.readyz()[0] == 200


def test_a_locked_sqlite_file_fails_an_update_check_before_the_plugin_gives_up(
    tmp_path: Path, pki: Pki, origin: Path
) -> None:
    """Another process holds the write lock (`sqlite3` shell, a backup): an update check that must count its
    request and raise the channel's mark waits on the lock twice. It must answer `kind: failed` within the
    plugin's 10 s (with a 5 s busy timeout per statement it took over 10 s); the twin: once the lock is gone the
    same check gets its offer."""
    import sqlite3
    import threading

    db = tmp_path / "state" / "gateway.sqlite"
    cfg = _config(tmp_path / "gw", pki, origin, state={"path": str(db)}, audit={"path": "audit.log"})
    with run_gateway(cfg) as gw:
        assert _stats(gw, pki).status == 200
        locked, release = threading.Event(), threading.Event()

        def hold() -> None:
            conn = sqlite3.connect(db, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(30)
            conn.execute("ROLLBACK")
            conn.close()

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert locked.wait(10)
            started = time.monotonic()
            answer = _update(gw, pki)
            took = time.monotonic() - started
        finally:
            release.set()
            holder.join(10)
        _assert_state_failure_answer(answer, 200)
        assert took < 9.0, f"the update check took {took:.1f} s"
        assert _update(gw, pki).json()["version"] == "1.1.0"


# ---- the audit log on a full disk ----


def _audit_lines(path: Path) -> list[dict[str, Any]]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"partial last line: {data[-80:]!r}"
    return [json.loads(line) for line in data.splitlines()]


def _ping(gw: GatewayProcess, pki: Pki) -> Any:
    return https_request(f"{gw.base_url}/updates", pki.client_context(pki.client))


def _fill_audit_disk(gw: GatewayProcess, pki: Pki, disk: Path) -> tuple[Path, int]:
    """Fill the disk, then send requests until an audit line is lost; (filler, requests answered meanwhile)."""
    filler = fill_up(disk)
    for sent in range(1, 60):
        assert _ping(gw, pki).status in (200, 503)
        if gw.metric("ota_gateway_audit_write_failures_total") > 0:
            return filler, sent
    raise AssertionError("no audit line was lost on a full disk")


def test_audit_on_a_full_disk_keeps_serving_counts_and_records_the_gap(tmp_path: Path, pki: Pki, origin: Path) -> None:
    with small_filesystem(tmp_path / "disk", "64k") as disk:
        audit = disk / "audit.log"
        cfg = _config(tmp_path / "gw", pki, origin, state={}, audit={"path": str(audit)})
        with run_gateway(cfg) as gw:
            filler, _ = _fill_audit_disk(gw, pki, disk)
            for _ in range(4):  # keep_serving (the default): answered while their lines are lost
                assert _ping(gw, pki).status == 200
            assert gw.readyz()[0] == 200
            lost = gw.metric("ota_gateway_audit_write_failures_total")
            assert lost == 5
            lines = _audit_lines(audit)  # whole lines only
            assert all(line.get("route") == "other" for line in lines)
            failing = [x for x in gw.stderr_lines if "audit log failing" in x]
            assert len(failing) == 1, failing  # five lost lines, one log line

            filler.unlink()
            assert wait_until(lambda: any("audit log recovered" in x for x in gw.stderr_lines), timeout=5)
            assert _ping(gw, pki).status == 200
            assert gw.metric("ota_gateway_audit_write_failures_total") == lost
            tail = _audit_lines(audit)[len(lines) :]
            assert tail[0]["event"] == "audit_gap" and tail[0]["lost"] == lost, tail
            assert tail[-1]["route"] == "other" and tail[-1]["status"] == 200


def test_audit_to_a_stdout_nobody_reads_loses_lines_instead_of_stopping_the_gateway(
    tmp_path: Path, pki: Pki, origin: Path
) -> None:
    """`audit.path: -` with a reader that stops reading (a log collector that stalls, a terminal paused with
    Ctrl-S): once the pipe is full, a blocking write stopped the whole event loop, every request and the admin
    listener with it. Lines that cannot be written at once are lost and counted like a full disk's, and the
    `audit_gap` record follows when the reader catches up."""
    import fcntl
    import os
    import subprocess
    import sys

    import yaml

    from tests.support import watch_gateway

    cfg = _config(tmp_path / "gw", pki, origin, state={}, audit={"path": "-"})
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)  # one page: full after about a dozen lines
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--workers", "1"],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=cfg.parent,
    )
    os.close(write)
    try:
        with watch_gateway(cfg, yaml.safe_load(cfg.read_text()), proc, 40) as gw:
            for _ in range(40):  # nobody reads the pipe meanwhile
                assert https_request(f"{gw.base_url}/updates", pki.client_context(pki.client), timeout=5).status == 200
            assert gw.readyz()[0] == 200  # keep_serving
            lost = gw.metric("ota_gateway_audit_write_failures_total")
            assert lost >= 20, lost
            os.set_blocking(read, False)
            written = bytearray()

            def drained() -> bytes:  # what the reader has caught up with so far
                with contextlib.suppress(BlockingIOError):
                    while chunk := os.read(read, 65536):
                        written.extend(chunk)
                return bytes(written)

            drained()
            assert _ping(gw, pki).status == 200
            assert wait_until(lambda: b'"event":"audit_gap"' in drained(), timeout=5)
            assert json.loads(drained().splitlines()[-1])["route"] == "other"  # whole lines, the gap first
    finally:
        os.close(read)


def test_audit_fail_closed_refuses_while_lines_are_lost_and_recovers(tmp_path: Path, pki: Pki, origin: Path) -> None:
    with small_filesystem(tmp_path / "disk", "64k") as disk:
        audit = disk / "audit.log"
        cfg = _config(tmp_path / "gw", pki, origin, state={}, audit={"path": str(audit), "on_failure": "fail_closed"})
        with run_gateway(cfg) as gw:
            assert _ping(gw, pki).status == 200 and gw.readyz()[0] == 200  # healthy twin
            filler, _ = _fill_audit_disk(gw, pki, disk)
            refused = _ping(gw, pki)
            assert refused.status == 503 and refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["reason"] == "audit_unavailable"
            stats = _stats(gw, pki)  # a Capgo route answers in its own shape
            assert stats.status == 503 and stats.json()["error"] == "audit_unavailable"
            assert stats.json()["kind"] == "failed"
            assert gw.metric("ota_gateway_refusals_total", reason="audit_unavailable") == 2
            assert gw.metric("ota_gateway_device_events_total", app=APP_ID, action="set") == 0  # never reached
            status, body = gw.readyz()
            assert status == 503 and any("audit log failing" in r for r in body["reasons"]), body

            filler.unlink()  # no request needed: the probe writes the gap record and ends the failure
            assert wait_until(lambda: gw.readyz()[0] == 200, timeout=10 * PROBE + 5), gw.readyz()
            assert _ping(gw, pki).status == 200
            gap = [line for line in _audit_lines(audit) if line.get("event") == "audit_gap"]
            assert len(gap) == 1 and gap[0]["lost"] == gw.metric("ota_gateway_audit_write_failures_total") == 3
