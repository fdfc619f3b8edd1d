"""A reader that stalls (a log collector, a terminal paused with Ctrl-S) never stops the writer, on a real pipe.

The server's log (gateway/logs.py `LineHandler`) and the audit log on standard output (gateway/audit.py) write to a
pipe whose reader does not read: a line longer than PIPE_BUF (4,096 bytes) that the pipe has no room for is lost
and counted, never written in part (a torn line) and never waited for; once the reader catches up, the next line
says what was lost.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import pytest

from gateway.audit import AuditLog, AuditRecord
from gateway.logs import LineHandler, TextFormatter

LONG = 6000  # bytes: more than PIPE_BUF, and more than the one free page left in the pipe below


@contextmanager
def stalled_pipe() -> Iterator[tuple[int, int]]:
    """(read end, write end) of a 64 KiB pipe filled but for one page, as a reader that stopped reading leaves it:
    `poll` still reports it writable."""
    read, write = os.pipe()
    try:
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 65536)
        os.write(write, b"f" * (65536 - 4096 - 1) + b"\n")
        yield read, write
    finally:
        for fd in (read, write):
            with suppress(OSError):
                os.close(fd)


def returns_promptly(action: Callable[[], None], read: int) -> bool:
    """Run `action` in a thread: True if it returned within 10 s; else close the read end (its blocked write then
    fails with EPIPE, the thread ends) and False."""
    done = threading.Event()

    def run() -> None:
        with suppress(OSError):
            action()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if done.wait(10):
        return True
    os.close(read)
    thread.join(10)
    return False


def drain(read: int) -> bytes:
    chunks = []
    while select.select([read], [], [], 0)[0]:
        chunk = os.read(read, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("ota_gateway.http", logging.WARNING, __file__, 1, message, (), None)


def test_a_log_record_past_pipe_buf_on_a_stalled_pipe_is_lost_whole_and_counted() -> None:
    with stalled_pipe() as (read, write), os.fdopen(os.dup(write), "w") as stream:
        handler = LineHandler(stream)
        handler.setFormatter(TextFormatter())
        long = record("x" * LONG)
        assert returns_promptly(lambda: handler.handle(long), read), "the handler waited for the stalled reader"
        assert handler.lost == 1
        data = drain(read)
        assert data.endswith(b"\n") and set(data.rstrip(b"\n")) == {ord("f")}, "a part of the record was written"
        handler.handle(record("after"))  # the reader caught up: the loss is said first, then the record
        handler.handle(long)
        lines = drain(read).decode().splitlines()
        assert lines == [
            "ota-gateway: warning: 1 log record(s) lost: stderr's reader did not keep up",
            "ota-gateway: warning: after",
            "ota-gateway: warning: " + "x" * LONG,
        ]
        assert handler.lost == 0 and handler.lost_total == 1
        handler.close()


def test_a_log_record_within_pipe_buf_on_a_full_pipe_is_lost_not_waited_for() -> None:
    with stalled_pipe() as (read, write), os.fdopen(os.dup(write), "w") as stream:
        os.write(write, b"g" * 4095 + b"\n")  # the last page: the pipe is full now
        handler = LineHandler(stream)
        handler.setFormatter(TextFormatter())
        assert returns_promptly(lambda: handler.handle(record("short")), read)
        assert handler.lost == 1
        assert b"short" not in drain(read)
        handler.close()


def _audit_record(path: str) -> AuditRecord:
    return AuditRecord(route="updates", method="GET", path=path, status=200)


def test_an_audit_line_past_pipe_buf_on_a_stalled_stdout_is_lost_whole_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with stalled_pipe() as (read, write), os.fdopen(os.dup(write), "w") as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        failures: list[int] = []
        audit = AuditLog("-", on_failure=lambda: failures.append(1))
        long = "/" + "p" * LONG
        assert returns_promptly(lambda: audit.write(_audit_record(long)), read), "the audit log waited"
        assert failures == [1] and audit.failing
        data = drain(read)
        assert data.endswith(b"\n") and set(data.rstrip(b"\n")) == {ord("f")}, "a part of the line was written"
        audit.write(_audit_record(long))  # the reader caught up: the gap record, then the line, both whole
        lines = [json.loads(line) for line in drain(read).splitlines()]
        assert [line.get("event") for line in lines] == ["audit_gap", None]
        assert lines[0]["lost"] == 1 and lines[1]["path"] == long
        assert not audit.failing
        audit.close()
