"""Staged rollouts and halting (core/rollout.py): membership within binomial bounds, sticky and monotonic; who a
device is; the halting rule at its edges; the fallback release."""

from __future__ import annotations

import math
import uuid

import pytest

from gateway.core.releases import Release, ReleaseIndex
from gateway.core.rollout import (
    FAILURE_ACTIONS,
    HALTED,
    NOT_IN_ROLLOUT,
    Halt,
    Rollout,
    device_key,
    event_kind,
    held_back,
    in_rollout,
    position,
    previous_release,
    should_halt,
)

APP = "com.example.app"
CERT = "ab" * 32
IDS = [str(uuid.UUID(int=i * 7919 + 12345)) for i in range(20_000)]


def _fraction(percent: float, version: str = "1.3.0") -> float:
    rollout = Rollout({version: percent}, identity="device")
    inside = sum(in_rollout(rollout, APP, version, device_key(CERT, d, "device")) for d in IDS)
    return inside / len(IDS)


@pytest.mark.parametrize("percent", [1, 10, 25, 50, 90])
def test_the_fraction_in_the_rollout_is_within_binomial_bounds(percent: float) -> None:
    p, n = percent / 100, len(IDS)
    bound = 4 * math.sqrt(p * (1 - p) / n)  # 4 sigma: a false failure about once in 16,000 runs
    assert abs(_fraction(percent) - p) <= bound


def test_zero_and_hundred_percent_are_exact() -> None:
    assert _fraction(0) == 0.0
    assert _fraction(100) == 1.0


def test_membership_is_sticky_and_raising_only_adds_devices() -> None:
    keys = [device_key(CERT, d, "device") for d in IDS[:3000]]
    at10 = {k for k in keys if in_rollout(Rollout({"1.3.0": 10}), APP, "1.3.0", k)}
    again = {k for k in keys if in_rollout(Rollout({"1.3.0": 10}), APP, "1.3.0", k)}
    at50 = {k for k in keys if in_rollout(Rollout({"1.3.0": 50}), APP, "1.3.0", k)}
    assert at10 == again and at10 < at50


def test_each_version_and_app_draws_its_own_cohort() -> None:
    keys = [device_key(CERT, d, "device") for d in IDS[:3000]]
    a = {k for k in keys if position(APP, "1.3.0", k) < 10}
    b = {k for k in keys if position(APP, "1.4.0", k) < 10}
    c = {k for k in keys if position("com.other.app", "1.3.0", k) < 10}
    assert a != b and a != c  # the same 10 % are not always the guinea pigs


def test_a_version_not_listed_is_at_100_percent() -> None:
    assert all(in_rollout(Rollout({"1.3.0": 0}), APP, "1.2.0", device_key(CERT, d, "device")) for d in IDS[:100])


def test_with_certificate_identity_one_certificate_cannot_claim_many_device_ids() -> None:
    keys = {device_key(CERT, d, "certificate") for d in IDS[:500]}
    assert keys == {CERT}  # 500 claimed ids, one device: all in or all out, together
    other = device_key("cd" * 32, IDS[0], "certificate")
    assert other != CERT


def test_with_device_identity_the_pair_is_the_device() -> None:
    assert len({device_key(CERT, d, "device") for d in IDS[:500]}) == 500
    assert device_key(CERT, IDS[0].upper(), "device") == device_key(CERT, IDS[0], "device")
    assert device_key("cd" * 32, IDS[0], "device") != device_key(CERT, IDS[0], "device")  # same id, other cert


def test_held_back_names_the_cause() -> None:
    rollout = Rollout({"1.3.0": 0})
    assert held_back(rollout, APP, "1.3.0", CERT, {}) == NOT_IN_ROLLOUT
    assert held_back(rollout, APP, "1.2.0", CERT, {"1.2.0": "operator"}) == HALTED
    assert held_back(Rollout({"1.3.0": 100}), APP, "1.3.0", CERT, {}) is None


def test_event_kinds() -> None:
    named = {"download_fail", "checksum_fail", "decrypt_fail", "update_fail", "set_fail", "unzip_fail"}
    assert named <= FAILURE_ACTIONS
    assert event_kind("set") == event_kind("download_complete") == "tried"
    assert event_kind("update_fail") == "failed"
    assert event_kind("app_moved_to_foreground") is None and event_kind("download_50") is None


@pytest.mark.parametrize(
    ("tried", "failed", "halt"),
    [
        (49, 49, False),  # below min_devices: no decision, however bad
        (50, 9, False),  # 18 %
        (50, 10, True),  # exactly 20 %
        (100, 30, True),
        (0, 0, False),
    ],
)
def test_the_halting_rule(tried: int, failed: int, halt: bool) -> None:
    assert should_halt(Halt(failure_ratio=0.2, min_devices=50), tried, failed) is halt


def _index(*releases: tuple[str, str]) -> ReleaseIndex:
    return ReleaseIndex(APP, tuple(Release(v, c, f"{v}.zip", 1, "0" * 64) for v, c in releases))


def test_the_fallback_is_the_newest_usable_release_between_the_device_and_the_held_back_one() -> None:
    index = _index(("1.0.0", "production"), ("1.1.0", "production"), ("1.2.0", "beta"), ("1.3.0", "production"))
    found = previous_release(index, "production", "1.0.0", "1.3.0", lambda v: True)
    assert found is not None and found.version == "1.1.0"  # 1.2.0 is on another channel
    assert previous_release(index, "production", "1.1.0", "1.3.0", lambda v: True) is None  # nothing newer
    assert previous_release(index, "production", "1.0.0", "1.3.0", lambda v: v != "1.1.0") is None
    found = previous_release(index, "production", "builtin", "1.3.0", lambda v: v != "1.1.0")
    assert found is not None and found.version == "1.0.0"
