"""The server's log (gateway/logs.py): formats, one write per record, levels, and the one readiness line.

Unit tests for the formatters and the handler on a real pipe; then real `serve` subprocesses: with `--workers 2`
the readiness line comes once, after both workers are up, and every listener answers the moment it is seen;
`--log-level warning` hides the lifecycle but not a failed reload; `--log-format json` is one object a line, while
a start-up error stays one plain line.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from gateway.logs import JsonFormatter, LineHandler, TextFormatter
from tests.support import (
    APP_ID,
    Pki,
    free_port,
    https_request,
    is_ready_line,
    run_gateway,
    wait_until,
    write_config,
)


def record(level: int, message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("ota_gateway.reload", level, __file__, 1, message, args, exc_info)


def failure() -> BaseException:
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        return exc


# --- formats -----------------------------------------------------------------------------------------------------


def test_text_format_says_the_level_only_above_info() -> None:
    fmt = TextFormatter()
    assert fmt.format(record(logging.INFO, "reloaded (%s): %d app(s)", "SIGHUP", 2)) == (
        "ota-gateway: reloaded (SIGHUP): 2 app(s)"
    )
    assert fmt.format(record(logging.DEBUG, "tls handshake failed")) == "ota-gateway: tls handshake failed"
    assert fmt.format(record(logging.WARNING, "reload failed")) == "ota-gateway: warning: reload failed"
    assert fmt.format(record(logging.ERROR, "bug")) == "ota-gateway: error: bug"


def test_text_format_appends_the_traceback() -> None:
    lines = TextFormatter().format(record(logging.ERROR, "unexpected", exc=failure())).splitlines()
    assert lines[0] == "ota-gateway: error: unexpected"
    assert lines[1] == "Traceback (most recent call last):" and lines[-1] == "RuntimeError: boom"


def test_json_format_is_one_line_with_the_traceback_inside() -> None:
    text = JsonFormatter().format(record(logging.ERROR, "unexpected on %s", "/x", exc=failure()))
    assert "\n" not in text
    doc = json.loads(text)
    assert (doc["level"], doc["logger"], doc["message"], doc["pid"]) == (
        "error",
        "ota_gateway.reload",
        "unexpected on /x",
        os.getpid(),
    )
    assert doc["traceback"].rstrip().endswith("RuntimeError: boom")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", doc["time"])
    assert "traceback" not in json.loads(JsonFormatter().format(record(logging.INFO, "fine")))


def test_a_record_with_its_traceback_is_one_write() -> None:
    read, write = os.pipe()
    writes: list[bytes] = []
    real_write = os.write

    def counting(fd: int, data: bytes) -> int:  # os.write as the handler calls it, counted
        writes.append(bytes(data))
        return real_write(fd, data)

    with os.fdopen(write, "w") as stream:
        handler = LineHandler(stream)
        handler.setFormatter(TextFormatter())
        mp = pytest.MonkeyPatch()
        mp.setattr(os, "write", counting)
        try:
            handler.handle(record(logging.ERROR, "unexpected", exc=failure()))
            handler.handle(record(logging.INFO, "second"))
        finally:
            mp.undo()
    with os.fdopen(read, "rb") as out:
        data = out.read()
    assert len(writes) == 2 and b"".join(writes) == data
    assert writes[0].startswith(b"ota-gateway: error: unexpected\nTraceback") and writes[0].endswith(b"boom\n")
    assert writes[1] == b"ota-gateway: second\n"


# --- the readiness line --------------------------------------------------------------------------------------------


def _site(tmp_path: Path, pki: Pki, **extra: object) -> Path:
    origin = tmp_path / "origin"
    origin.mkdir(exist_ok=True)
    origins = {"local": {"type": "directory", "path": str(origin)}}
    return write_config(tmp_path / "gw", pki, origins=origins, extra=extra)


def _plain_status(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status
    finally:
        conn.close()


def test_with_two_workers_the_readiness_line_comes_once_after_both_and_every_listener_answers(
    tmp_path: Path, pki: Pki
) -> None:
    plain_port = free_port()
    cfg = _site(tmp_path, pki, plain_http={"enabled": True, "address": "127.0.0.1", "port": plain_port})
    with run_gateway(cfg, "--workers", "2") as gw:
        # connect at once: run_gateway returned the moment the readiness line was read
        ctx = pki.client_context(pki.client)
        for _ in range(6):  # SO_REUSEPORT spreads connections over both workers
            assert https_request(f"{gw.base_url}/bundles/{APP_ID}/9.9.9.zip", ctx).status == 404
            assert _plain_status(plain_port) in (308, 426)
            with urllib.request.urlopen(f"{gw.admin_url}/healthz", timeout=10) as answer:
                assert answer.status == 200
        lines = list(gw.stderr_lines)
        ready = [i for i, line in enumerate(lines) if is_ready_line(line)]
        assert len(ready) == 1, lines
        before = lines[: ready[0]]
        assert sum(bool(re.fullmatch(r"ota-gateway: worker \d+ ready", line)) for line in before) == 2, lines
        assert sum(line.startswith("ota-gateway: admin on ") for line in before) == 2, lines
        assert sum(line.startswith("ota-gateway: plain HTTP on ") for line in before) == 2, lines
        port = gw.port
        assert lines[ready[0]] == (
            f"ota-gateway: ready: https://127.0.0.1:{port} (main), http://127.0.0.1:{plain_port} (plain_http), "
            f"http://127.0.0.1:{gw.admin_port} (admin); 2 worker(s)"
        )
        assert gw.stop() == 0
    # nothing interleaved: every line the supervisor and both workers wrote is whole
    assert all(line.startswith("ota-gateway: ") for line in gw.stderr_lines), gw.stderr_lines
    assert sum(is_ready_line(line) for line in gw.stderr_lines) == 1


def test_a_single_process_says_ready_once_after_its_last_listener(tmp_path: Path, pki: Pki) -> None:
    with run_gateway(_site(tmp_path, pki)) as gw:
        lines = list(gw.stderr_lines)
        ready = [i for i, line in enumerate(lines) if is_ready_line(line)]
        assert len(ready) == 1 and lines[ready[0]].endswith("; 1 worker(s)"), lines
        assert any(line.startswith("ota-gateway: admin on ") for line in lines[: ready[0]]), lines
        assert not any("worker" in line and "ready" in line and not is_ready_line(line) for line in lines)


# --- levels and formats on a running server --------------------------------------------------------------------------


def _break_and_reload(gw_proc: subprocess.Popen[str], cfg: Path) -> int:
    """Make `limits.header_timeout` invalid and send SIGHUP; return the line of the bad key."""
    data = yaml.safe_load(cfg.read_text())
    data["limits"] = {**data.get("limits", {}), "header_timeout": "soon"}
    cfg.write_text(yaml.safe_dump(data, sort_keys=False))
    line = next(i for i, text in enumerate(cfg.read_text().splitlines(), 1) if "header_timeout" in text)
    gw_proc.send_signal(signal.SIGHUP)
    return line


def test_log_level_warning_hides_lifecycle_but_not_a_failed_reload(tmp_path: Path, pki: Pki) -> None:
    cfg = _site(tmp_path, pki, reload={"watch": False})
    with run_gateway(cfg, "--log-level", "warning") as gw:
        bad = _break_and_reload(gw.proc, cfg)
        assert wait_until(lambda: any("reload" in line for line in gw.stderr_lines), timeout=10), gw.stderr_lines
        failed = [line for line in gw.stderr_lines if "reload" in line]
        assert len(failed) == 1, gw.stderr_lines
        expected = f"ota-gateway: warning: reload (SIGHUP) failed, keeping the last good state: {cfg}:{bad}: "
        assert failed[0].startswith(expected), failed[0]
        assert "limits.header_timeout" in failed[0]
    assert not any("listening on" in line or "admin on" in line or "open-files" in line for line in gw.stderr_lines)
    assert not any("stopped cleanly" in line for line in gw.stderr_lines)
    assert sum(is_ready_line(line) for line in gw.stderr_lines) == 1  # shown at every level


def test_one_reload_is_one_line_with_several_workers(tmp_path: Path, pki: Pki) -> None:
    """The supervisor passes SIGHUP to every worker and each reloads; a success is logged once (by the worker in
    slot 0, also after it was replaced), a failure by each worker (never only at debug, as it was when slot 0 was
    dead), while the metrics count every worker's reload."""
    cfg = _site(tmp_path, pki, reload={"watch": False})
    good = cfg.read_text()
    with run_gateway(cfg, "--workers", "2") as gw:
        assert sum(is_ready_line(line) for line in gw.stderr_lines) == 1  # every worker is ready
        _break_and_reload(gw.proc, cfg)
        assert wait_until(lambda: gw.metric("ota_gateway_config_reloads_total", result="failure") == 2, timeout=10)
        time.sleep(0.5)
        assert sum("warning: reload (SIGHUP) failed" in line for line in gw.stderr_lines) == 2, gw.stderr_lines
        cfg.write_text(good)
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: gw.metric("ota_gateway_config_reloads_total", result="success") == 2, timeout=10)
        time.sleep(0.5)
        assert sum("reloaded (SIGHUP)" in line for line in gw.stderr_lines) == 1, gw.stderr_lines


def test_log_level_info_shows_the_lifecycle(tmp_path: Path, pki: Pki) -> None:
    cfg = _site(tmp_path, pki)
    with run_gateway(cfg) as gw:
        assert any(line.startswith("ota-gateway: listening on https://127.0.0.1:") for line in gw.stderr_lines)
        assert any(line.startswith("ota-gateway: open-files limit ") for line in gw.stderr_lines)
        assert gw.stop() == 0
    assert wait_until(lambda: any(line == "ota-gateway: stopped cleanly" for line in gw.stderr_lines))


def test_json_format_is_one_object_a_line(tmp_path: Path, pki: Pki) -> None:
    cfg = _site(tmp_path, pki, reload={"watch": False})
    with run_gateway(cfg, "--log-format", "json") as gw:
        _break_and_reload(gw.proc, cfg)
        assert wait_until(lambda: any("reload" in line for line in gw.stderr_lines), timeout=10), gw.stderr_lines
        assert gw.stop() == 0
    docs = [json.loads(line) for line in gw.stderr_lines]
    assert all(set(doc) >= {"time", "level", "logger", "pid", "message"} for doc in docs)
    ready = [doc for doc in docs if doc["logger"] == "ota_gateway.ready"]
    assert len(ready) == 1 and ready[0]["message"].startswith("ready: https://127.0.0.1:")
    reload = [doc for doc in docs if "reload" in doc["message"]]
    assert [(d["level"], d["logger"]) for d in reload] == [("warning", "ota_gateway.reload")]
    assert any(doc["level"] == "info" and doc["message"].startswith("listening on ") for doc in docs)


def test_a_start_up_error_stays_one_plain_line_in_json_format(tmp_path: Path, pki: Pki) -> None:
    cfg = _site(tmp_path, pki)
    port = int(yaml.safe_load(cfg.read_text())["listeners"][0]["port"])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--workers", "2", "--log-format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    plain = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert len(plain) == 1, done.stderr
    assert plain[0].startswith(f"ota-gateway: {cfg}: listeners[0].port: 127.0.0.1:{port} is already in use")
    assert "Traceback" not in done.stderr
    assert all(json.loads(line)["level"] == "info" for line in done.stderr.splitlines() if line.startswith("{"))


def test_a_stderr_nobody_reads_loses_log_lines_instead_of_stopping_the_gateway(tmp_path: Path, pki: Pki) -> None:
    """`--log-level debug` logs every failed handshake; with stderr a full pipe (a stalled collector), a blocking
    write stopped the event loop. The record is dropped and the gateway keeps answering."""
    import fcntl

    cfg = _site(tmp_path, pki)
    config = yaml.safe_load(cfg.read_text())
    port, admin = config["listeners"][0]["port"], config["admin"]["port"]
    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--workers", "1", "--log-level", "debug"],
        stdout=subprocess.DEVNULL,
        stderr=write,
        cwd=cfg.parent,
    )
    os.close(write)
    try:

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=2).status == 200
            except OSError:
                return False

        assert wait_until(healthy, timeout=40)
        for _ in range(80):  # each an aborted handshake: a debug line, until the pipe is full
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"\x16\x03\x01\x00\x05hello")
        answer = https_request(f"https://127.0.0.1:{port}/updates", pki.client_context(pki.client), timeout=5)
        assert answer.status == 200
        assert healthy()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(read)
