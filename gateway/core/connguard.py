"""Decisions about connections: which deadline applies to a connection now, whether a new one is admitted.

Pure: no I/O, no clock (times are passed in). The listener (gateway/listener.py) records what a connection is
doing (its `Phase` and since when), asks `deadline()` when to look again, and asks `admit()` at accept time;
the runner sizes the connection cap from the open-files limit with `auto_max_connections()`.

Timeouts, as nginx applies them:
- FIRST: from accept (or the end of the TLS handshake) until complete request headers: `header` timeout;
- IDLE: keep-alive, after a response, until the first byte of the next request: `idle` timeout (closed quietly);
- HEADERS: keep-alive, from the first byte of the next request until its headers are complete: `header` timeout;
- BODY: from complete headers until the request body is complete: `body` timeout;
- BUSY: the request is being answered; the listener sets no deadline (transfer rates are watched elsewhere).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class Phase(enum.Enum):
    FIRST = "first"
    IDLE = "idle"
    HEADERS = "headers"
    BODY = "body"
    BUSY = "busy"


# the closed set of the `cause` label of ota_gateway_timeouts_total
TIMEOUT_CAUSES = ("header", "body", "idle")
# the closed set of the `cause` label of ota_gateway_connections_refused_total
REFUSAL_CAUSES = ("max_connections", "listener_max_connections", "max_handshakes", "max_handshakes_per_address")


@dataclass(frozen=True)
class Timeouts:
    header: float
    body: float
    idle: float


class Expiry(NamedTuple):  # a tuple: made on every phase change of every connection, cheaper than a dataclass
    at: float  # loop time
    cause: str  # one of TIMEOUT_CAUSES
    answer: bool  # True: HTTP can still answer (408); False: close quietly


def due(phase: Phase, since: float, timeouts: Timeouts) -> float | None:
    """When a connection in `phase` since `since` times out (None: no listener deadline): what every phase change
    asks (three per request), without building the `Expiry` that only a firing timer needs (`deadline`)."""
    if phase is Phase.BUSY:
        return None
    if phase is Phase.IDLE:
        return since + timeouts.idle
    if phase is Phase.BODY:
        return since + timeouts.body
    return since + timeouts.header


# per phase with a deadline: the timeout cause (TIMEOUT_CAUSES) and whether HTTP can still answer (408)
_EXPIRY = {
    Phase.FIRST: ("header", True),
    Phase.HEADERS: ("header", True),
    Phase.IDLE: ("idle", False),
    Phase.BODY: ("body", True),
}


def deadline(phase: Phase, since: float, timeouts: Timeouts) -> Expiry | None:
    """When a connection in `phase` since `since` times out (`due`), and how; None: no listener deadline."""
    at = due(phase, since, timeouts)
    if at is None:
        return None
    cause, answer = _EXPIRY[phase]
    return Expiry(at, cause, answer)


# a timer that fires at most this much before its deadline counts as on time (event loops round timers to ms)
EARLY_SLACK = 0.002


def timer_needed(armed: float | None, due: float | None) -> bool:
    """Whether a connection entering a phase whose deadline is `due` (None: none) must arm a new timer, given the
    one armed for `armed` (None: no timer). One that fires no later than the deadline is kept, and re-armed when it
    fires early (`fired_early`): a keep-alive connection's requests (headers, busy, idle, headers...) then arm no
    timer each."""
    return due is not None and (armed is None or armed > due)


def fired_early(expiry: Expiry, now: float) -> bool:
    """A timer armed for an earlier phase fired before this phase's own deadline: wait on, do not act."""
    return expiry.at - now > EARLY_SLACK


@dataclass(frozen=True)
class Caps:
    """Per-worker connection caps. `connections` counts every open connection of every listener."""

    connections: int
    handshakes: int
    handshakes_per_address: int


class Counts(NamedTuple):  # a tuple: made for every new connection
    """What is open now (before the new connection)."""

    connections: int
    listener: int
    handshakes: int
    handshakes_from_address: int


def admit(caps: Caps, counts: Counts, *, tls: bool, listener_cap: int | None, overall: bool = True) -> str | None:
    """None to admit a new connection, else the refusal cause (one of REFUSAL_CAUSES).

    `overall=False` (the admin listener) is held to its own cap only, so that a flood of the public listeners
    never locks out the scraper that would show it.

    The per-address handshake cap is decided before the overall one: when both are reached, the room is made
    (`makes_room`) from the newcomer's own address, which frees a place under both caps. Deciding the overall
    cap first closed the oldest handshake of any address, and the newcomer was then refused all the same by its
    address's cap: a handshake closed for nothing."""
    if overall and counts.connections >= caps.connections:
        return "max_connections"
    if listener_cap is not None and counts.listener >= listener_cap:
        return "listener_max_connections"
    if tls:
        if counts.handshakes_from_address >= caps.handshakes_per_address:
            return "max_handshakes_per_address"
        if counts.handshakes >= caps.handshakes:
            return "max_handshakes"
    return None


# causes where the cap makes room instead of refusing: the oldest handshake in progress (of the same address, for
# the per-address cap) is closed for the new connection; at a listener's own cap (admin, plain HTTP) the oldest
# connection of that listener that has no request being answered (`waiting`). Silent or half-sent connections that
# fill the cap, and are renewed as each times out, would otherwise keep every new client out (the admin listener:
# every probe and scrape); this way they only churn among themselves, and a client whose handshake or request takes
# less than the flood needs to renew the whole cap gets in. At the overall cap a newcomer is refused.
MAKES_ROOM = frozenset({"max_handshakes", "max_handshakes_per_address", "listener_max_connections"})


def makes_room(cause: str | None) -> bool:
    """Whether a refusal for `cause` closes an older connection instead (see MAKES_ROOM)."""
    return cause in MAKES_ROOM


def waiting(phase: Phase) -> bool:
    """Whether a connection in `phase` may be closed to make room at its listener's cap: it has sent no complete
    request yet, or idles between two. One whose request is being answered (BUSY) never is."""
    return phase is not Phase.BUSY


RESERVED_FDS = 64  # listeners, the admin listener's own connections, the state store, the audit log, logs, pipes


def auto_max_connections(nofile: int) -> int:
    """The default per-worker connection cap: half of the open-files limit after `RESERVED_FDS`.

    Each connection may hold a second descriptor while it downloads (the bundle file of a directory origin, or
    the connection to an HTTPS origin), so a worker whose every connection downloads still stays below the
    limit: new handshakes, origin calls and the admin listener never fail for want of a descriptor."""
    return max(16, (nofile - RESERVED_FDS) // 2)


FD_PRESSURE = 0.8


def fd_pressure(open_fds: int, limit: int) -> bool:
    """True when open descriptors reach 80% of the limit (/readyz reports it)."""
    return limit > 0 and open_fds >= FD_PRESSURE * limit
