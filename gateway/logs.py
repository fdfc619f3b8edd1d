"""The server's own log: how `serve` speaks on stderr, and its one readiness line.

Owns the `logging` set-up, done once when `serve` starts (`setup`), in the supervisor and in every worker alike.
Every module logs through its own logger under `ota_gateway` (`ota_gateway.runner`, `ota_gateway.reload`, ...);
nothing on the server path prints. Lifecycle is `info`, failures are `warning` (or `error` for a bug or lost audit
lines); per-connection trouble that metrics already count is `debug`. Two formats:

- `text` (default): `ota-gateway: <message>` for info and debug, `ota-gateway: warning: <message>` (or `error:`)
  above, as operators read it in a terminal or `journalctl` (which adds the time and pid itself);
- `json`: one object per line (`time`, `level`, `logger`, `pid`, `message`, and `traceback` when there is one), for
  container log collectors; a traceback stays inside its line.

Each record is written with one `write(2)` on stderr's file descriptor, so the workers, which share it, never
interleave half lines, and never waits for stderr's reader (`LineSink`): a record it has no room for is lost and
counted, and the next record written says how many were lost. The readiness line (`ready_line`) is logged on
`ota_gateway.ready`, shown at every `--log-level`, once per server: by the supervisor when every worker has said
ready, or by the single process when its last listener is bound. Start-up errors are not log records: the CLI
prints them as one line each (`problem`), exactly as for every other command.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import select
import stat
import struct
import sys
import termios
import traceback
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from gateway.config import Config

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
PREFIX = "ota-gateway: "
READY = "ready: "  # the readiness line is `ota-gateway: ready: <addresses>`
ROOT = "ota_gateway"
READY_LOGGER = "ota_gateway.ready"


class TextFormatter(logging.Formatter):
    """`ota-gateway: message`, with `warning: ` or `error: ` before the message above info, traceback appended."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        text = f"{PREFIX}{level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(doc, ensure_ascii=False)


class LineSink:
    """Writes whole lines to one descriptor (stderr, the audit log's stdout) and never waits for its reader.

    A regular file takes every write. A pipe is written on the shared descriptor only when the write cannot wait:
    a line up to PIPE_BUF (4,096 bytes) when `poll` reports a free page (the kernel then takes it whole), a longer
    one only when the pipe's free room (its size less the bytes queued, less one page of slack) holds it all. A
    pipe is never opened a second time: that second writer would keep the reader from seeing its end of file after
    the stream is closed. A terminal is written through a private non-blocking open of it (`/proc/self/fd/N`; the
    shared descriptor's own flags stay as they are, for the shell and the other workers). A reader that stalls (a
    log collector, a terminal paused with Ctrl-S) therefore loses lines, and `put` says so, instead of stopping the
    event loop. A socket (journald's stream) is written when `poll` reports room, as the kernel's socket buffer
    (hundreds of KiB) takes a line whole then.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = 0
        self.regular = stat.S_ISREG(mode)
        self.pipe = stat.S_ISFIFO(mode)
        self._out = fd
        self._private = False
        self._poller: select.poll | None = None
        if not self.regular and not self.pipe and os.isatty(fd):
            # a terminal only: a pipe opened again would be a second writer of its own, which keeps the reader from
            # seeing its end of file once the stream is closed (a caller waiting for EOF would wait for ever)
            flags = os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            with contextlib.suppress(OSError):
                self._out = os.open(f"/proc/self/fd/{fd}", flags)
                self._private = True
        if not self.regular and not self._private:
            self._poller = select.poll()  # one per descriptor; not select.select: it refuses fds past 1023
            self._poller.register(fd, select.POLLOUT)

    def put(self, data: bytes) -> int:
        """Write `data` (one or more whole lines) now or not at all: the number of bytes written, `len(data)` when
        whole, 0 when lost whole, fewer (a torn line: the next one must start on a new line) only when a terminal
        stops mid-line or another worker takes a pipe's last room between the check and the write."""
        if self.regular:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            return len(data)
        if not self.fits(len(data)):
            return 0
        try:
            return os.write(self._out, data)
        except BlockingIOError:
            return 0

    def fits(self, size: int) -> bool:
        """Whether a line of `size` bytes can be written now without waiting (see the class)."""
        if self.pipe and size > select.PIPE_BUF:
            try:
                queued = struct.unpack("i", fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0"))[0]
                free = fcntl.fcntl(self.fd, fcntl.F_GETPIPE_SZ) - queued
            except OSError:
                return False
            if free - _PAGE < size:  # a pipe stores pages: the last one's unused tail may not take the line
                return False
        if self._poller is not None:
            try:
                events = self._poller.poll(0)
            except OSError:
                return True  # not pollable: the write itself will say
            return any(ev & (select.POLLOUT | select.POLLERR | select.POLLHUP) for _, ev in events)
        return True

    def close(self) -> None:
        if self._private:
            self._private = False
            os.close(self._out)
            self._out = self.fd


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class LineHandler(logging.Handler):
    """Writes each formatted record and its newline with a single write through a `LineSink` on the stream's file
    descriptor (falling back to the stream's `write` where it has none, as under pytest's capture).

    A record its reader has no room for is lost and counted (`lost`); the next record written is preceded by a
    warning saying how many were lost, and starts on a new line should a record have been cut mid-line."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self.lost = 0  # records lost since the last one written
        self.lost_total = 0
        self._torn = False
        self._sink: LineSink | None = None

    def _sink_for(self, fd: int) -> LineSink:
        if self._sink is None or self._sink.fd != fd:
            if self._sink is not None:
                self._sink.close()
            self._sink = LineSink(fd)
        return self._sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            try:
                fd = self.stream.fileno()
            except (OSError, ValueError, AttributeError):
                self.stream.write(line)
                self.stream.flush()
                return
            sink = self._sink_for(fd)
            self.stream.flush()  # anything the stream still holds goes first
            if self.lost:
                line = self.format(_lost_record(self.lost)) + "\n" + line
            if self._torn:
                line = "\n" + line
            data = line.encode("utf-8", "replace")
            written = sink.put(data)
            if written == len(data):
                self.lost = 0
                self._torn = False
                return
            self.lost += 1  # a stalled reader loses the record, the server keeps running
            self.lost_total += 1
            self._torn = self._torn if written == 0 else True
        except Exception:  # logging must never take the server down
            self.handleError(record)

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        super().close()


def _lost_record(count: int) -> logging.LogRecord:
    return logging.makeLogRecord(
        {
            "name": "ota_gateway.logs",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "%d log record(s) lost: stderr's reader did not keep up",
            "args": (count,),
        }
    )


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the process's logging once: one handler on the root logger (so asyncio's and aiohttp's records
    share the format), `level` for everything, the readiness logger always at info. Calling it again replaces it."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, LineHandler)]:
        root.removeHandler(old)
        old.close()
    handler = LineHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.getLogger(READY_LOGGER).setLevel(logging.INFO)
    logging.captureWarnings(True)


def addresses(config: Config) -> list[str]:
    """Every address the server listens on, as `scheme://host:port (name)`."""
    found = [f"https://{lst.address}:{lst.port} ({lst.name})" for lst in config.listeners]
    if config.plain_http.enabled:
        found.append(f"http://{config.plain_http.address}:{config.plain_http.port} (plain_http)")
    if config.admin.enabled:
        scheme = "https" if config.admin.tls else "http"
        found.append(f"{scheme}://{config.admin.address}:{config.admin.port} (admin)")
    return found


def ready_line(config: Config, workers: int) -> str:
    return f"{READY}{', '.join(addresses(config))}; {workers} worker(s)"


def announce_ready(config: Config, workers: int) -> None:
    """The one line that says the whole server accepts connections on every listener."""
    logging.getLogger(READY_LOGGER).info("%s", ready_line(config, workers))


def problem(message: str) -> None:
    """A user error: one `ota-gateway: ` line per line of `message` on stderr (not a log record)."""
    for line in message.splitlines() or [message]:
        print(f"{PREFIX}{line}", file=sys.stderr, flush=True)
