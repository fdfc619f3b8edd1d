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
interleave half lines (a pipe keeps writes up to 4,096 bytes whole). The readiness line (`ready_line`) is logged on
`ota_gateway.ready`, shown at every `--log-level`, once per server: by the supervisor when every worker has said
ready, or by the single process when its last listener is bound. Start-up errors are not log records: the CLI
prints them as one line each (`problem`), exactly as for every other command.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import select
import sys
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


def writable_now(fd: int) -> bool:
    """Whether a write of a line (up to PIPE_BUF) to `fd` completes without waiting: always for a file; for a pipe,
    socket or terminal only while its reader keeps up. A reader that stalls (a log collector, a terminal paused
    with Ctrl-S) must never stop the event loop in a blocking write."""
    poller = select.poll()  # not select.select: it refuses descriptors past 1023
    poller.register(fd, select.POLLOUT)
    try:
        return any(events & (select.POLLOUT | select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except OSError:
        return True  # not pollable: the write itself will say


class LineHandler(logging.Handler):
    """Writes each formatted record and its newline with a single `os.write` on the stream's file descriptor
    (falling back to the stream's `write` where it has none, as under pytest's capture)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            try:
                fd = self.stream.fileno()
            except (OSError, ValueError, AttributeError):
                self.stream.write(line)
                self.stream.flush()
                return
            data = line.encode("utf-8", "replace")
            self.stream.flush()  # anything the stream still holds goes first
            while data and writable_now(fd):  # a stalled reader loses the record, the server keeps running
                data = data[os.write(fd, data) :]
        except Exception:  # logging must never take the server down
            self.handleError(record)


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the process's logging once: one handler on the root logger (so asyncio's and aiohttp's records
    share the format), `level` for everything, the readiness logger always at info. Calling it again replaces it."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, LineHandler)]:
        root.removeHandler(old)
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
