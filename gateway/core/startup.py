"""Start-up problems in words an operator can act on, and when the worker supervisor restarts or gives up.

Owns three decisions, all pure: whether two listen addresses of the config would take the same port (two sockets
that the kernel would refuse, or, with SO_REUSEPORT under `--workers`, silently share, spreading connections between
listeners of different rules); how a failed operating-system call at start-up (binding a port, opening a file or a
folder) is described, naming what was tried, on what, as whom, and what to do about it; and what the supervisor does
when a worker dies (`after_crash`: restart after an exponential backoff, or stop once `max_crashes` deaths fell
within `window` seconds) or when a replacement fails its start-up (`after_failed_start`). The shell
(`gateway/preflight.py`, `gateway/runner.py`, `gateway/workers.py`) makes the calls, reads the clock and carries the
verdict out.
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
from dataclasses import dataclass

_DENIED = (errno.EACCES, errno.EPERM)


def _bound(address: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses a listener on `address` binds: `localhost` resolves to the loopback of both families."""
    if address == "localhost":
        return [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    return [ipaddress.ip_address(address)]


def endpoints_overlap(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether listeners on `a` and `b` (address, port) would take the same port: the same port, and in one
    address family the same address or a wildcard (0.0.0.0, ::) on either side. IPv6 sockets are IPv6-only
    (asyncio sets IPV6_V6ONLY), so :: and 0.0.0.0 do not overlap."""
    if a[1] != b[1]:
        return False
    return any(
        x.version == y.version and (x == y or x.is_unspecified or y.is_unspecified)
        for x in _bound(a[0])
        for y in _bound(b[0])
    )


def endpoint_text(address: str, port: int) -> str:
    """`address:port`, an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def bind_problem(address: str, port: int, err: int, strerror: str, user: str) -> str:
    """Why a listener could not bind `address:port`, and what to do."""
    where = endpoint_text(address, port)
    if err == errno.EADDRINUSE:
        return f"{where} is already in use: stop the process that holds it, or choose another port"
    if err in _DENIED:
        return (
            f"cannot listen on {where} as {user}: ports below 1024 need root or CAP_NET_BIND_SERVICE; "
            "use a port above 1023"
        )
    if err == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: this host has no such address; use one of its addresses (0.0.0.0 for all)"
    return f"cannot listen on {where}: {strerror}"


def file_problem(action: str, path: str, err: int, strerror: str, user: str, blocked_by: str | None = None) -> str:
    """Why `action` (e.g. "cannot read", "cannot write into") failed on `path`, and what to do.

    `blocked_by` names the folder above `path` that `user` may not enter, when that is the cause.
    """
    if err in _DENIED:
        if blocked_by is not None:
            return (
                f"{action} {path}: permission denied for {user}, who cannot enter the folder {blocked_by}; "
                "give that user (or its group) search permission on it"
            )
        return f"{action} {path}: permission denied for {user}; give that user (or its group) access to it"
    if err == errno.EROFS:
        return f"{action} {path}: read-only file system; put it on a writable volume"
    if err == errno.ENOENT:
        return f"{action} {path}: no such file or folder"
    if err == errno.ENOSPC:
        return f"{action} {path}: no space left on the device"
    return f"{action} {path}: {strerror}"


@dataclass(frozen=True)
class RestartPolicy:
    """`max_crashes` worker deaths within `window` seconds stop the server; before that each death is followed by
    a restart after `first_delay` seconds, doubled for every other death in the window, at most `max_delay`."""

    max_crashes: int = 5
    window: float = 60.0
    first_delay: float = 0.5
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.max_crashes < 1 or self.window <= 0 or self.first_delay < 0 or self.max_delay < self.first_delay:
            raise ValueError("a restart policy needs max_crashes >= 1, window > 0 and 0 <= first_delay <= max_delay")


@dataclass(frozen=True)
class CrashVerdict:
    """What to do after a worker died: restart it after `delay` seconds, or stop the server."""

    restart: bool
    delay: float
    crashes: int  # deaths within the window, this one included
    history: tuple[float, ...]  # the times of those deaths: pass it to the next `after_crash`


def after_crash(policy: RestartPolicy, history: tuple[float, ...], now: float) -> CrashVerdict:
    """The verdict for a worker death at `now` (a monotonic clock), given the earlier deaths in `history`."""
    recent = (*(t for t in history if now - t < policy.window), now)
    if len(recent) >= policy.max_crashes:
        return CrashVerdict(False, 0.0, len(recent), recent)
    delay = min(policy.first_delay * 2 ** (len(recent) - 1), policy.max_delay)
    return CrashVerdict(True, delay, len(recent), recent)


def after_failed_start(policy: RestartPolicy, failures: int, serving: int) -> float | None:
    """A replacement worker failed during its start-up (the config on disk no longer loads, say), the `failures`-th
    in a row, while `serving` workers still serve: seconds until the next try, or None to stop the server.

    While a worker serves, the server keeps running on the last good config, as a failed reload does: the
    replacement is tried again after `first_delay` doubled per failure, at most `max_delay` (a slow, bounded
    retry that picks up a fixed config), outside the crash count, since nothing crashed. With no worker left
    serving, a start-up error is what it is at the first start: the server stops (exit 2)."""
    if serving < 1:
        return None
    return float(min(policy.first_delay * 2 ** max(failures - 1, 0), policy.max_delay))


SQLITE_MAGIC = b"SQLite format 3\x00"


def sqlite_header_problem(head: bytes, size: int) -> str | None:
    """Why a file of `size` bytes starting with `head` (its first 100 bytes, or all of a shorter file) is not a
    SQLite database, or None if its header is one's (an empty file is a new database). Read without opening it as
    a database, which would create -wal and -shm files as the user that checks."""
    if size == 0:
        return None
    if size < 100 or not head.startswith(SQLITE_MAGIC):
        return "it is not a SQLite database"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or page & (page - 1) or size % page:
        return "it is a damaged SQLite database (its size does not fit its page size)"
    return None


EXPIRY_WARNING_DAYS = 14  # a server certificate that ends within this many days is a warning of `check` and `serve`


def validity_problem(
    path: str, not_before: dt.datetime, not_after: dt.datetime, now: dt.datetime, warn_days: int = EXPIRY_WARNING_DAYS
) -> tuple[bool, str] | None:
    """A server certificate's validity at `now`: (True, text) when clients refuse it now (expired, or not yet
    valid), (False, text) when it ends within `warn_days` days, None when it is good for longer."""
    dates = f"valid from {not_before:%Y-%m-%dT%H:%M:%SZ} to {not_after:%Y-%m-%dT%H:%M:%SZ}"
    if now > not_after:
        return True, f"{path}: the certificate expired ({dates}); every client refuses it: renew it"
    if now < not_before:
        return True, f"{path}: the certificate is not valid yet ({dates}); clients refuse it until then"
    left = not_after - now
    if left <= dt.timedelta(days=warn_days):
        days = left.total_seconds() / 86400
        return False, f"{path}: the certificate expires in {days:.1f} days ({dates}): renew it"
    return None
