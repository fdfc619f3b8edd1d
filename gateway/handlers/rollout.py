"""Staged rollouts and halting in the shell: the halted releases (read from the state store, cached at most one
second, so every worker and every host sharing a Redis agrees within a second), device events counted per release,
and the automatic halt. `core/rollout.py` decides; this module reads and writes; the recorder
(`Recorder.release`) writes a halt's audit line and metrics.

Only releases the operator named are watched: the versions in the app's `rollout.releases` and those of the
release index the origin knows without a network call (`Origin.published`: a directory origin's index). A stats
event for any other version counts nothing, so no client string ever becomes a state key or a metric label.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.core.capgo import StatsEvent
from gateway.core.policy import AppPolicy, Peer
from gateway.core.rollout import Rollout, device_key, event_kind, should_halt
from gateway.recorder import Recorder
from gateway.state_keys import Runtime, Snapshot

HALT_CACHE_SECONDS = 1.0


async def current_halts(rt: Runtime, recorder: Recorder, app: AppPolicy) -> dict[str, str]:
    """The app's halted versions, at most HALT_CACHE_SECONDS old; the recorder refreshes the release_halted gauge."""
    now = time.monotonic()
    cached = rt.live.halt_cache.get(app.app_id)
    if cached is not None and now - cached[0] < HALT_CACHE_SECONDS:
        return cached[1]
    halts = await rt.state.halts(app.app_id)
    rt.live.halt_cache[app.app_id] = (now, halts)
    recorder.halts_read(app.app_id, app.rollout.releases if app.rollout is not None else (), halts)
    return halts


async def _watched(snap: Snapshot, app: AppPolicy, rollout: Rollout) -> set[str]:
    return set(rollout.releases) | await snap.origins[app.origin].published(app.app_id)


async def count_events(
    rt: Runtime, snap: Snapshot, recorder: Recorder, app: AppPolicy, peer: Peer, events: Sequence[StatsEvent]
) -> list[str]:
    """Count accepted device events against their release; halt releases that reach the failure ratio (the
    recorder writes the halt). Returns the versions this call halted."""
    rollout = app.rollout
    if rollout is None:
        return []
    devices: dict[tuple[str, str], bool] = {}  # (version, device) -> failed; a batch counts each device once
    watched: set[str] | None = None
    for event in events:
        kind = event_kind(event.label)
        if kind is None:
            continue
        if watched is None:
            watched = await _watched(snap, app, rollout)
        version = event.info.version_name
        if version not in watched:
            continue
        key = (version, device_key(peer.identity.sha256, event.info.device_id, rollout.identity))
        devices[key] = devices.get(key, False) or kind == "failed"
    halted = []
    now = time.time()
    for (version, device), failed in devices.items():
        tried, failing = await rt.state.release_event(app.app_id, version, device, failed, now, rollout.halt.window)
        if failed and should_halt(rollout.halt, tried, failing):
            detail = (
                f"halted automatically: {failing} of {tried} devices failed within {rollout.halt.window:.0f} s "
                f"(failure_ratio {rollout.halt.failure_ratio})"
            )
            if await rt.state.halt(app.app_id, version, detail):
                halted.append(version)
                rt.live.halt_cache.pop(app.app_id, None)
                recorder.release("HALT", app.app_id, version, detail, tipped_by=peer.identity)
    return halted
