"""The minimum-rate rule (core/rates.py): bytes and times in, too slow or not out. No clock, no sockets."""

from __future__ import annotations

import math

import pytest

from gateway.core.rates import MinRate, RateMeter

RULE = MinRate(bytes_per_second=100, window=10.0)


def trickle(meter: RateMeter, per_second: int, seconds: int, start: float = 0.0) -> float:
    """One wait of a second, then `per_second` bytes, `seconds` times; returns the time at the end."""
    now = start
    for _ in range(seconds):
        meter.wait(now)
        now += 1.0
        meter.moved(per_second, now)
    return now


def test_a_side_at_the_minimum_rate_is_never_too_slow() -> None:
    meter = RateMeter(RULE)
    now = trickle(meter, 100, 60)
    assert not meter.too_slow(now)
    assert meter.rate(now) == pytest.approx(100, rel=0.1)


def test_a_trickle_below_the_minimum_is_too_slow_after_one_window() -> None:
    meter = RateMeter(RULE)
    now = trickle(meter, 1, 9)
    assert not meter.too_slow(now)  # nobody is judged before a whole window
    now = trickle(meter, 1, 2, start=now)
    assert meter.too_slow(now)
    assert meter.rate(now) < 2


def test_a_burst_buys_no_credit_beyond_one_window() -> None:
    meter = RateMeter(RULE)
    meter.wait(0.0)
    meter.moved(1_000_000, 1.0)  # far above the minimum, once
    now = trickle(meter, 1, 9, start=1.0)
    assert not meter.too_slow(now)  # the burst is still inside the window
    now = trickle(meter, 1, 3, start=now)
    assert meter.too_slow(now)


def test_a_stall_is_too_slow_at_the_deadline_and_not_before() -> None:
    meter = RateMeter(RULE)
    now = trickle(meter, 200, 20)  # well above the minimum for 20 s
    meter.wait(now)
    deadline = meter.deadline(now)
    assert now < deadline <= now + RULE.window + RULE.window / 20
    assert not meter.too_slow(deadline - 0.6)
    assert meter.too_slow(deadline)


def test_a_stall_from_the_start_is_cut_after_one_window() -> None:
    meter = RateMeter(RULE)
    meter.wait(5.0)
    assert meter.deadline(5.0) == pytest.approx(15.0)
    assert not meter.too_slow(14.9)
    assert meter.too_slow(15.0)


def test_time_spent_waiting_on_the_other_side_does_not_count() -> None:
    meter = RateMeter(RULE)
    now = 0.0
    for _ in range(30):
        meter.wait(now)
        meter.moved(100, now + 1.0)  # a second of waiting for 100 bytes: exactly the minimum
        now += 100.0  # then 99 s waiting on the client, which this side's clock does not see
    assert meter.clock(now) == pytest.approx(30.0)
    assert not meter.too_slow(now)
    meter.wait(now)
    assert meter.deadline(now) > now


def test_bytes_moved_without_a_wait_count_at_the_current_clock() -> None:
    meter = RateMeter(RULE)
    meter.moved(5000, 3.0)  # accepted at once (it fit into the buffers): no waiting time
    assert meter.clock(3.0) == 0.0
    meter.wait(3.0)
    assert not meter.too_slow(12.9)
    assert meter.total == 5000


def test_a_disabled_rule_never_judges() -> None:
    meter = RateMeter(MinRate(0, 10.0))
    meter.wait(0.0)
    assert not meter.too_slow(1e9)
    assert meter.deadline(0.0) == math.inf


def test_memory_is_bounded_by_the_slots() -> None:
    meter = RateMeter(RULE)
    now = 0.0
    for _ in range(10_000):
        meter.wait(now)
        now += 0.01
        meter.moved(1, now)
    assert len(meter._slots) <= 21


@pytest.mark.parametrize(("rate", "window"), [(-1, 10.0), (1, 0.0), (1, -5.0)])
def test_a_malformed_rule_is_refused(rate: int, window: float) -> None:
    with pytest.raises(ValueError):
        MinRate(rate, window)
