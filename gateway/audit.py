"""The audit log: one JSON line per request decision, to standard output or a file.

Owns the record's fields (documented in the README) and how a line reaches the disk: whole, or not at all.
Never writes a ticket secret, a private key or a whole certificate: identities appear as fingerprint and subject
only.
"""

from __future__ import annotations

import contextlib
import errno
import json.encoder
import logging
import math
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from gateway.core.faults import Fault
from gateway.core.identity import ClientIdentity
from gateway.core.jsonsafe import compact_json
from gateway.logs import LineSink

log = logging.getLogger("ota_gateway.audit")


@dataclass
class AuditRecord:
    route: str
    method: str
    path: str
    outcome: str = "ok"  # ok | refused | aborted
    status: int = 0
    reason: str | None = None
    detail: str | None = None
    app: str | None = None
    version: str | None = None
    origin: str | None = None
    identity_sha256: str | None = None
    identity_subject: str | None = None
    via_proxy: str | None = None
    peer: str | None = None
    bytes: int = 0
    duration_ms: float = 0.0
    time: str = ""

    def set_identity(self, identity: ClientIdentity | None) -> None:
        if identity is not None:
            self.identity_sha256 = identity.sha256
            self.identity_subject = identity.subject


class AuditLog:
    """Writes `AuditRecord`s as JSON lines, each with one `write(2)`, and never leaves a partial line behind.

    A write that fails (full disk, EIO, a file past its size limit) loses that line: it is counted (`on_failure`,
    ota_gateway_audit_write_failures_total), logged at most once a minute, and `failing` is true until a write
    succeeds again. On a pipe or terminal a line is written whole or not at all, without waiting for the reader
    (`logs.LineSink`): a reader that does not keep up loses lines. A short write (the disk filled up mid-line) is
    cut back to the line's start; where that is not possible (a terminal stopped mid-line, another worker taking a
    pipe's last room first) the next line starts with a newline, so a reader never sees two records run together.
    The first line written after a failure is an `audit_gap` record saying how many lines were lost since when;
    `probe()` (run periodically) writes it without waiting for the next request, and only once a whole line fits
    again.
    """

    def __init__(self, target: str, on_failure: Callable[[], None] | None = None) -> None:
        self._own: int | None = None
        self._stream: TextIO | None = None
        self._fd: int | None = None
        if target == "-":
            try:
                self._fd = sys.stdout.fileno()
            except (AttributeError, OSError, ValueError):  # a stdout without a descriptor (an embedding host)
                self._stream = sys.stdout
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._own = self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        self._seekable = self._fd is not None and stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._count_failure = on_failure or (lambda: None)
        self.fault = Fault("audit log")
        self._lost = 0
        self._lost_since = ""
        self._failed_size = 0  # bytes of the last line that could not be written
        self._torn = False  # the file may end in the middle of a line: start the next one on a new line
        self._sink: LineSink | None = None  # how lines reach standard output when it is a pipe or terminal

    @property
    def failing(self) -> bool:
        return self.fault.failing

    def write(self, record: AuditRecord) -> None:
        record.time = _now()
        self._emit(_line(record) + "\n", lines=1)

    def probe(self) -> None:
        """While failing: try to write the `audit_gap` record alone, so that recovery needs no request.

        The record is padded with spaces (still one JSON value per line) to the size of the line that failed:
        a small record fitting in the last free bytes of a full disk must not look like a recovery.
        """
        if self.fault.failing:
            self._emit("", lines=0)

    def _emit(self, text: str, lines: int) -> None:
        size = len(text) if text.isascii() else len(text.encode())  # compact_json writes ASCII
        if self.fault.failing:
            gap = {"time": _now(), "event": "audit_gap", "lost": self._lost, "since": self._lost_since}
            record = compact_json(gap)
            text = (record if text else record.ljust(self._failed_size - 1)) + "\n" + text
        if self._torn:
            text = "\n" + text
        data = text.encode()
        try:
            self._write(data)
        except (OSError, ValueError) as exc:  # ValueError: a closed stream
            if lines:
                if not self._lost:
                    self._lost_since = _now()
                self._lost += lines
                self._failed_size = size
                self._count_failure()
            message = self.fault.failed(time.monotonic(), (isinstance(exc, OSError) and exc.strerror) or str(exc))
            if message:
                log.error("%s (%d line(s) lost so far)", message, self._lost)
            return
        self._lost = 0
        if self.fault.failing:
            message = self.fault.succeeded(time.monotonic())
            if message:
                log.warning("%s", message)

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            if self._stream is None:
                raise ValueError("the audit log is closed")
            self._stream.write(data.decode())
            self._stream.flush()
            return
        if not self._seekable:  # a pipe or terminal: the line goes whole or not at all, never waiting (LineSink)
            if self._sink is None or self._sink.fd != self._fd:
                self._sink = LineSink(self._fd)
            written = self._sink.put(data)
            if written == len(data):
                self._torn = False
                return
            self._torn = self._torn or written > 0  # cut mid-line: the next line starts on a new line
            raise OSError(errno.EAGAIN, "its reader does not keep up (a stalled log collector or a paused terminal)")
        written = os.write(self._fd, data)
        if written == len(data):
            self._torn = False
            return
        # a regular file that filled up mid-line: cut the partial line off again, unless another worker has
        # appended after it meanwhile (then the next line starts on a new line instead)
        end = os.lseek(self._fd, 0, os.SEEK_CUR)  # with O_APPEND, the end of what this write put there
        cut = False
        with contextlib.suppress(OSError):
            if os.fstat(self._fd).st_size == end:
                os.ftruncate(self._fd, end - written)
                cut = True
        self._torn = self._torn or not cut
        raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes{', cut back' if cut else ''})")

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        if self._own is not None:
            os.close(self._own)
            self._own = self._fd = None


_escaped = json.encoder.encode_basestring_ascii  # a str as a JSON string literal (ASCII), what compact_json writes


def _line(record: AuditRecord) -> str:
    """The record as one compact JSON object, fields in their order and None left out: the same text as
    `compact_json` of that dict, built field by field (a record's fields are strings, ints and a float: half the
    cost of building the dict and encoding it). A value of any other type, or a float that is not finite, takes
    `compact_json` itself. vars(), not dataclasses.asdict(): asdict deep-copies each field (~150 us a line)."""
    parts = []
    for name, value in vars(record).items():
        kind = type(value)
        if kind is str:
            parts.append(f'"{name}":{_escaped(value)}')
        elif value is None:
            continue
        elif kind is int or (kind is float and math.isfinite(value)):
            parts.append(f'"{name}":{value!r}')
        else:
            return compact_json({k: v for k, v in vars(record).items() if v is not None})
    return "{" + ",".join(parts) + "}"


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def _now() -> str:
    """UTC time with milliseconds, ISO 8601; the date and time of day are formatted once a second."""
    global _second
    now = time.time()
    whole = int(now)
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int(now * 1000) % 1000:03d}Z"
