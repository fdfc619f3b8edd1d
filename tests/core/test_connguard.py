"""Connection decisions (core/connguard.py): which deadline applies in each phase, and admission at accept."""

from __future__ import annotations

import pytest

from gateway.core.connguard import (
    REFUSAL_CAUSES,
    RESERVED_FDS,
    TIMEOUT_CAUSES,
    Caps,
    Counts,
    Expiry,
    Phase,
    Timeouts,
    admit,
    auto_max_connections,
    deadline,
    due,
    fd_pressure,
    fired_early,
    makes_room,
    timer_needed,
    waiting,
)

T = Timeouts(header=10, body=30, idle=75)


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        (Phase.FIRST, Expiry(110, "header", True)),
        (Phase.HEADERS, Expiry(110, "header", True)),
        (Phase.IDLE, Expiry(175, "idle", False)),
        (Phase.BODY, Expiry(130, "body", True)),
        (Phase.BUSY, None),
    ],
)
def test_deadline_per_phase(phase: Phase, expected: Expiry | None) -> None:
    assert deadline(phase, 100.0, T) == expected
    if expected is not None:
        assert expected.cause in TIMEOUT_CAUSES


@pytest.mark.parametrize("phase", list(Phase))
def test_due_is_the_deadlines_time(phase: Phase) -> None:
    """The per-phase-change shortcut and the full deadline never disagree (one timeout per phase, distinct values)."""
    expiry = deadline(phase, 100.0, T)
    assert due(phase, 100.0, T) == (None if expiry is None else expiry.at)


CAPS = Caps(connections=100, handshakes=10, handshakes_per_address=3)


def counts(connections: int = 0, listener: int = 0, handshakes: int = 0, from_address: int = 0) -> Counts:
    return Counts(connections, listener, handshakes, from_address)


def test_admitted_below_every_cap() -> None:
    assert admit(CAPS, counts(99, 50, 9, 2), tls=True, listener_cap=51) is None


@pytest.mark.parametrize(
    ("c", "tls", "listener_cap", "cause"),
    [
        (counts(connections=100), True, None, "max_connections"),
        (counts(connections=100), False, None, "max_connections"),
        (counts(listener=8), False, 8, "listener_max_connections"),
        (counts(handshakes=10), True, None, "max_handshakes"),
        (counts(from_address=3), True, None, "max_handshakes_per_address"),
    ],
)
def test_refused_at_each_cap(c: Counts, tls: bool, listener_cap: int | None, cause: str) -> None:
    assert admit(CAPS, c, tls=tls, listener_cap=listener_cap) == cause
    assert cause in REFUSAL_CAUSES


def test_at_both_handshake_caps_the_newcomers_own_address_makes_room() -> None:
    """Both caps reached: the cause is the per-address cap, so the handshake closed to make room is one of the
    newcomer's address, which frees a place under both caps; closing another address's (for `max_handshakes`)
    would leave the newcomer refused by its address's cap anyway."""
    cause = admit(CAPS, counts(handshakes=10, from_address=3), tls=True, listener_cap=None)
    assert cause == "max_handshakes_per_address" and makes_room(cause)
    after = admit(CAPS, counts(handshakes=9, from_address=2), tls=True, listener_cap=None)  # one of its own closed
    assert after is None
    # only the overall cap: any address's oldest handshake makes room, and the newcomer's address is below its cap
    assert admit(CAPS, counts(handshakes=10, from_address=2), tls=True, listener_cap=None) == "max_handshakes"
    assert admit(CAPS, counts(handshakes=9, from_address=2), tls=True, listener_cap=None) is None


def test_handshake_caps_do_not_apply_to_plain_listeners() -> None:
    assert admit(CAPS, counts(handshakes=10, from_address=3), tls=False, listener_cap=None) is None


def test_a_listener_outside_the_overall_cap_keeps_its_own() -> None:
    assert admit(CAPS, counts(connections=100, listener=3), tls=False, listener_cap=32, overall=False) is None
    assert admit(CAPS, counts(connections=100, listener=32), tls=False, listener_cap=32, overall=False) == (
        "listener_max_connections"
    )


@pytest.mark.parametrize(("nofile", "cap"), [(1024, 480), (256, 96), (100, 18), (20, 16), (1 << 20, 524256)])
def test_auto_max_connections_leaves_room_below_the_open_files_limit(nofile: int, cap: int) -> None:
    assert auto_max_connections(nofile) == cap


@pytest.mark.parametrize("nofile", [256, 1024, 4096, 65536])
def test_every_connection_downloading_still_fits_the_open_files_limit(nofile: int) -> None:
    """A connection and the descriptor its download holds (bundle file or origin connection), for every admitted
    connection, plus the reserve for listeners, stores and the admin listener's own cap of 32."""
    assert 2 * auto_max_connections(nofile) + RESERVED_FDS <= nofile


def test_fd_pressure_at_80_percent() -> None:
    assert not fd_pressure(818, 1024)
    assert fd_pressure(820, 1024)
    assert not fd_pressure(5, 0)


@pytest.mark.parametrize(
    ("armed", "at", "needed"),
    [
        (None, 10.0, True),  # no timer yet: arm one
        (5.0, 10.0, False),  # the armed one fires first: keep it (it re-arms when it fires early)
        (10.0, 10.0, False),
        (75.0, 10.0, True),  # the idle timer would fire after the header deadline: arm an earlier one
        (5.0, None, False),  # no deadline in this phase (busy): nothing to arm
        (None, None, False),
    ],
)
def test_a_timer_is_armed_only_when_none_fires_by_the_deadline(
    armed: float | None, at: float | None, needed: bool
) -> None:
    assert timer_needed(armed, at) is needed


def test_a_timer_of_an_earlier_phase_waits_for_this_phases_deadline() -> None:
    idle = Expiry(75.0, "idle", False)
    assert fired_early(idle, 10.0)  # the header timer of the last request fired: the idle deadline is later
    assert not fired_early(idle, 75.0)  # its own deadline: act
    assert not fired_early(idle, 74.999)  # a loop that rounds timers to ms fires a little early: still on time
    assert not fired_early(idle, 80.0)


def test_the_handshake_and_listener_caps_make_room_the_overall_cap_does_not() -> None:
    """At a handshake cap the oldest handshake in progress is closed for the new connection, at a listener's own cap
    (admin, plain HTTP) the oldest connection waiting for a request; at the overall connection cap the new one is
    refused (an established client is never closed for a newcomer)."""
    assert makes_room("max_handshakes") and makes_room("max_handshakes_per_address")
    assert makes_room("listener_max_connections")
    assert not makes_room("max_connections")
    assert not makes_room(None)


def test_only_a_connection_being_answered_is_never_closed_to_make_room() -> None:
    assert waiting(Phase.FIRST) and waiting(Phase.HEADERS) and waiting(Phase.IDLE) and waiting(Phase.BODY)
    assert not waiting(Phase.BUSY)
    assert set(REFUSAL_CAUSES) >= {"max_handshakes", "max_handshakes_per_address"}
