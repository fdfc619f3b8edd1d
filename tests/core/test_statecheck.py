"""One trip to the state store per request: the rate-limit window and verdict, the high-water mark's rise, when the
trip reads the mark, and when an offer must still be recorded after it."""

from __future__ import annotations

import pytest

from gateway.core.statecheck import Trip, must_record, raised, retry_after, window_start


def test_fixed_windows_and_the_wait_until_the_next() -> None:
    assert window_start(1_800_000_010.0, 60) == 1_800_000_000.0
    assert window_start(1_800_000_060.0, 60) == 1_800_000_060.0
    start = window_start(1_800_000_010.0, 60)
    assert retry_after(2, 2, start, 60, 1_800_000_010.0) is None  # the limit itself is allowed
    assert retry_after(3, 2, start, 60, 1_800_000_010.0) == 50  # one past it waits for the next window
    assert retry_after(3, 2, start, 60, 1_800_000_059.9) == 1  # at least one second


def test_the_mark_only_rises_but_for_a_rollback() -> None:
    assert raised(None, "1.0.0", False) == "1.0.0"
    assert raised("1.0.0", "1.10.0", False) == "1.10.0"
    assert raised("1.10.0", "1.9.0", False) is None
    assert raised("1.10.0", "1.10.0", False) is None
    assert raised("1.10.0", "1.2.0", True) == "1.2.0"  # a rollback the policy allows sets it
    assert raised("not a version", "1.0.0", False) == "1.0.0"  # a mark written by something else is replaced


def test_an_offer_at_or_below_the_mark_it_was_reviewed_against_needs_no_record() -> None:
    assert not must_record("2.0.0", "2.0.0", False)  # the channel's newest release offered again
    assert not must_record("2.0.0", "1.5.0", False)  # a staged fallback below the mark
    assert must_record("2.0.0", "2.1.0", False)  # a new release raises it
    assert must_record(None, "1.0.0", False)  # no mark yet
    assert must_record("2.0.0", "1.5.0", True)  # a rollback is always recorded
    assert must_record("2.0.0", "2.0.0", True)


@pytest.mark.parametrize(
    ("counted", "retry", "fail_open", "reads"),
    [
        (True, None, True, True),  # within the limit: the review needs the mark
        (True, 30.0, True, False),  # over the limit: answered 429, no review
        (False, None, True, True),  # the count failed, the limit fails open: the check goes on
        (False, None, False, False),  # the count failed, the limit fails closed: refused
        (True, None, False, True),
    ],
)
def test_the_trip_reads_the_mark_only_when_the_check_goes_on(
    counted: bool, retry: float | None, fail_open: bool, reads: bool
) -> None:
    trip = Trip("k", 10, 60, 0.0, ("com.example.app", "production"), read_after_failed_count=fail_open)
    assert trip.reads_mark(counted=counted, retry=retry) is reads


def test_a_trip_without_a_mark_never_reads_one() -> None:
    trip = Trip("k", 10, 60, 0.0)  # a stats event, or a check the plan declines before asking the origin
    assert not trip.reads_mark(counted=True, retry=None)
    assert not trip.reads_mark(counted=False, retry=None)
