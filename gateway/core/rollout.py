"""Staged rollouts and release halting: which device may be offered which release, and when a release stops.

Owns four pure decisions (see "Staged rollouts and halting" in the README):

- *who a device is*: `device_key` combines the admitted client certificate's SHA-256 with the body's `device_id`.
  With `identity: certificate` (the default, for per-device certificates) the key is the certificate alone, so one
  certificate cannot claim many device ids to enter a rollout early or to count as many failing devices; with
  `identity: device` (a certificate shared by a fleet) it is the pair, and the gateway trusts the fleet's ids;
- *membership*: a device is in the rollout of version V at p percent when SHA-256(app, V, device key), read as a
  number in [0, 100), is below p. The same device always gets the same answer, raising p only adds devices, and a
  version not listed in `rollout.releases` is at 100 %;
- *halting*: a release is halted when at least `min_devices` distinct devices tried it within `window` seconds and
  failing devices / devices that tried >= `failure_ratio`. Devices, not events, are counted (the store keeps one row
  per device and version);
- *the fallback*: a device held back from V (halted, or not in its rollout) gets the newest release of its channel
  from the release index that is older than V, newer than the device, not halted and whose own rollout admits it.

Pure: counts, halted versions and the index are passed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.core.capgo import ACTIONS
from gateway.core.releases import Release, ReleaseIndex
from gateway.core.versions import VersionError, parse

IDENTITIES = ("certificate", "device")
# device events that mean "this device could not run this release" (every *_fail of the closed action list)
FAILURE_ACTIONS = frozenset(a for a in ACTIONS if a.endswith("_fail"))
# device events that mean "this device tried this release and it worked so far"
SUCCESS_ACTIONS = frozenset({"set", "download_complete"})
HALTED = "halted"
NOT_IN_ROLLOUT = "not_in_rollout"
HELD_BACK = (HALTED, NOT_IN_ROLLOUT)


@dataclass(frozen=True, slots=True)
class Halt:
    failure_ratio: float = 0.2
    min_devices: int = 50
    window: float = 3600.0  # seconds
    offer_previous: bool = True


@dataclass(frozen=True, slots=True)
class Rollout:
    releases: Mapping[str, float] = field(default_factory=dict)  # version -> percent of devices, 0..100
    identity: str = "certificate"  # or "device"
    halt: Halt = field(default_factory=Halt)


NO_ROLLOUT = Rollout()  # an app without rollout or halt blocks: every release to everyone, unless halted


def device_key(cert_sha256: str, device_id: str, identity: str) -> str:
    """Who the device is for rollouts and halt counts (64 hex characters)."""
    if identity == "certificate":
        return cert_sha256
    return hashlib.sha256(f"{cert_sha256}/{device_id.lower()}".encode()).hexdigest()


def position(app_id: str, version: str, device: str) -> float:
    """The device's stable place in [0, 100) for this app and version."""
    digest = hashlib.sha256(f"{app_id}\x00{version}\x00{device}".encode()).digest()
    return int.from_bytes(digest[:8], "big") * 100.0 / 2**64


def in_rollout(rollout: Rollout, app_id: str, version: str, device: str) -> bool:
    percent = rollout.releases.get(version)
    return percent is None or position(app_id, version, device) < percent


def held_back(rollout: Rollout, app_id: str, version: str, device: str, halted: Mapping[str, object]) -> str | None:
    """Why `version` may not be offered to `device` (`halted`, `not_in_rollout`), or None."""
    if version in halted:
        return HALTED
    if not in_rollout(rollout, app_id, version, device):
        return NOT_IN_ROLLOUT
    return None


def event_kind(action: str) -> str | None:
    """`failed`, `tried` or None (an event that says nothing about the release)."""
    if action in FAILURE_ACTIONS:
        return "failed"
    if action in SUCCESS_ACTIONS:
        return "tried"
    return None


def should_halt(halt: Halt, tried: int, failed: int) -> bool:
    """Distinct devices that tried (failing ones included) and that failed, within the window."""
    return tried >= halt.min_devices and tried > 0 and failed >= halt.failure_ratio * tried


def previous_release(
    index: ReleaseIndex, channel: str, device_version: str, below: str, usable: Callable[[str], bool]
) -> Release | None:
    """The newest release of `channel` older than `below`, newer than the device, for which `usable` holds."""
    try:
        floor, ceiling = parse(device_version), parse(below)
    except VersionError:
        return None
    best: Release | None = None
    for release in index.releases:
        if release.channel != channel:
            continue
        try:
            version = parse(release.version)
        except VersionError:
            continue
        if floor < version < ceiling and (best is None or version > parse(best.version)) and usable(release.version):
            best = release
    return best
