"""When a failing dependency is reported: failing until a success, one log line per interval, recovery once."""

from __future__ import annotations

from gateway.core.faults import Fault


def test_healthy_operations_log_nothing() -> None:
    fault = Fault("state store")
    assert fault.succeeded(0.0) is None and fault.succeeded(1.0) is None
    assert not fault.failing


def test_first_failure_is_logged_at_once_then_once_per_interval() -> None:
    fault = Fault("audit log", interval=60.0)
    first = fault.failed(100.0, "No space left on device")
    assert first == "audit log failing: No space left on device"
    assert fault.failing and fault.since == 100.0
    assert [fault.failed(100.0 + i, "No space left on device") for i in range(1, 60)] == [None] * 59
    later = fault.failed(160.0, "No space left on device")
    assert later is not None and "(60 failed operations since the last report)" in later
    assert fault.failures == 61 and fault.since == 100.0


def test_a_success_ends_the_failure_and_is_logged_once() -> None:
    fault = Fault("state store")
    fault.failed(10.0, "Connection refused")
    fault.failed(11.0, "Connection refused")
    line = fault.succeeded(15.0)
    assert line == "state store recovered after 5.0 s and 2 failed operation(s)"
    assert not fault.failing
    assert fault.succeeded(16.0) is None  # not failing: nothing to report


def test_flapping_is_logged_at_most_once_per_interval_each_way() -> None:
    fault = Fault("state store", interval=60.0)
    lines = []
    for second in range(0, 120, 2):  # fails, recovers, fails ... every second for two minutes
        lines.append(fault.failed(float(second), "boom"))
        lines.append(fault.succeeded(float(second) + 1))
    reported = [line for line in lines if line is not None]
    assert len(reported) == 4  # one failure line and one recovery line per minute
    assert fault.failed(120.0, "boom") is not None  # a new minute: reported again


def test_describe_names_duration_count_and_last_detail() -> None:
    fault = Fault("state store")
    fault.failed(0.0, "first")
    fault.failed(3.0, "Connection refused")
    assert fault.describe(12.4) == "state store failing for 12 s (2 failed operations): Connection refused"
