"""`ota-gateway release status|halt|resume`: the operator's view of a release's rollout and halt, and control over it.

Works against the state store of a running gateway (the SQLite file or the Redis of `state` in gateway.yaml), so
every worker and host sees a change within a second. `halt` and `resume` write one audit line each (route
`release`) to the configured audit log, through the recorder (`Recorder.release`) as the server's halts are;
`resume` clears the halt and the device counts behind it.
"""

from __future__ import annotations

import getpass
import time
from pathlib import Path

from gateway.audit import AuditLog
from gateway.config import Config
from gateway.core.policy import AppPolicy
from gateway.core.rollout import NO_ROLLOUT
from gateway.core.versions import VersionError, parse
from gateway.metrics import Metrics
from gateway.recorder import Recorder, ReleaseAction

_ACTIONS: dict[str, tuple[ReleaseAction, str, str]] = {  # action -> (audit method, done, nothing to do)
    "halt": ("HALT", "halted", "was already halted"),
    "resume": ("RESUME", "resumed", "was not halted"),
}


class ReleaseOpError(ValueError):
    """A user error: unknown app, malformed version."""


def _app(config_path: Path, app_id: str, version: str) -> tuple[AppPolicy, Config]:
    from gateway.reload import load_all

    loaded = load_all(config_path)
    app = loaded.policies.app(app_id)
    if app is None:
        raise ReleaseOpError(f"no policy names app {app_id!r}")
    try:
        parse(version)
    except VersionError:
        raise ReleaseOpError(f"--version must be a semantic version, got {version!r}") from None
    return app, loaded.config


async def release_command(action: str, config_path: Path, app_id: str, version: str) -> list[str]:
    """Run `status`, `halt` or `resume`; the lines to print. Raises `ConfigError` or `ReleaseOpError`."""
    from gateway.runner import open_store

    app, config = _app(config_path, app_id, version)
    store = await open_store(config_path, config)
    try:
        rollout = app.rollout or NO_ROLLOUT
        lines = []
        if action in _ACTIONS:
            method, done, unchanged = _ACTIONS[action]
            who = f"operator {getpass.getuser()} (ota-gateway release {action})"
            if action == "halt":
                changed = await store.halt(app_id, version, f"halted by {who}")
            else:
                changed = await store.resume(app_id, version)
            lines.append(f"{app_id} {version}: {done if changed else unchanged}")
            if changed:
                audit = AuditLog(config.audit.path)
                try:  # this process's metrics are its own: the server's gauge follows the store within a second
                    Recorder(Metrics(), audit, lambda: False).release(method, app_id, version, f"{done} by {who}")
                finally:
                    audit.close()
        halts = await store.halts(app_id)
        tried, failed = await store.release_counts(app_id, version, time.time(), rollout.halt.window)
    finally:
        await store.close()
    percent = rollout.releases.get(version)
    halt = rollout.halt
    ratio = f"{failed / tried:.2f}" if tried else "-"
    lines += [
        f"app {app_id} version {version}",
        f"  state:    {'HALTED: ' + halts[version] if version in halts else 'offered'}",
        f"  rollout:  {'100 % (not in rollout.releases)' if percent is None else f'{percent:g} % of devices'}"
        f" (identity: {rollout.identity})",
        f"  devices:  {tried} tried, {failed} failed in the last {halt.window:.0f} s (ratio {ratio})",
        f"  halts at: failure_ratio {halt.failure_ratio:g} after {halt.min_devices} devices"
        + ("" if app.rollout is not None else " (no rollout or halt block in the policy: halting is off)"),
    ]
    return lines
