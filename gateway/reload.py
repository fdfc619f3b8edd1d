"""Reloads: validate everything, then swap it all at once, or keep the last good state.

Owns when and how config, policies and TLS material (server certificate and key, client CAs, CRLs, the CA files of HTTPS
origins, the admin listener's `admin.tls` certificate, key and CAs) are reloaded: on SIGHUP and when a watched file
changes (new mtime, new inode, a symlink swap as cert-manager and Kubernetes secrets do: files are watched through
`stat`, which follows links, and `lstat` of the link itself). A reload builds the whole new state off the event loop
(config, policies, TLS material, ticket keys; then the origins whose config or CA file changed), makes a new frozen
`Snapshot` of it and only then replaces the old one, in one assignment: new handshakes and requests see the new
snapshot, while requests in flight finish with the one they began with. Origins that changed or went away are closed
`limits.shutdown_grace` seconds later. A broken reload logs one line, keeps serving the last good snapshot (the same
object), sets `ota_gateway_config_last_reload_success` to 0 and counts a failure.
Listener addresses and ports are not changed by a reload (that needs a restart; a warning says so).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Config, HttpsOriginConfig, load_config_and_material
from gateway.core.policy import PolicySet
from gateway.core.tickets import TicketKey
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.origins import Origin, make_origin
from gateway.policy_store import load_policies, policy_files
from gateway.preflight import os_issue
from gateway.state_keys import Runtime, Snapshot
from gateway.ticket_keys import load_keyring
from gateway.tls import ListenerMaterial, admin_context

log = logging.getLogger("ota_gateway.reload")


@dataclass(frozen=True)
class Loaded:
    config: Config
    policies: PolicySet
    material: dict[str, ListenerMaterial]
    admin_tls: ssl.SSLContext | None = None  # the admin listener's context, with `admin.tls`


def load_all(config_path: Path) -> Loaded:
    """Everything `serve` needs from disk, checked; raises `ConfigError` (one line per problem)."""
    config, material = load_config_and_material(config_path)
    policies = load_policies(config.policies, config)
    admin_tls = None
    if config.admin.tls is not None:
        try:
            admin_tls = admin_context(config.admin.tls)
        except (OSError, ssl.SSLError) as exc:  # a file changed since the config's own check of it
            raise ConfigError.single(str(config_path), "admin.tls", None, f"cannot load: {exc}") from None
    return Loaded(config, policies, material, admin_tls)


def load_ticket_keys(config_path: Path, config: Config) -> tuple[TicketKey, ...]:
    """The config's download-ticket keys (generated into the state folder on first start); raises `ConfigError`."""
    try:
        return load_keyring(config)
    except OSError as exc:
        where = exc.filename or config.state.path.parent
        raise ConfigError([os_issue(str(config_path), "tickets", "cannot use the ticket key", where, exc)]) from None
    except ValueError as exc:
        raise ConfigError.single(str(config_path), "tickets", None, f"ticket keys: {exc}") from None


def _load_for_reload(config_path: Path) -> tuple[Loaded, tuple[TicketKey, ...]]:
    loaded = load_all(config_path)
    return loaded, load_ticket_keys(config_path, loaded.config)


def publish_state_metrics(metrics: Metrics, loaded: Loaded) -> None:
    metrics.config_loaded.set(1)
    metrics.config_load_time.set(time.time())
    if not metrics.multiprocess:  # prometheus_client cannot clear labels across worker processes
        metrics.expiry.clear()
    for material in loaded.material.values():
        for exp in material.expiries:
            metrics.expiry.labels(exp.kind, exp.name).set(exp.not_after.timestamp())


def watched_files(config_path: Path, config: Config) -> list[Path]:
    paths = [config_path, config.policies, *policy_files(config.policies)]
    for lst in config.listeners:
        paths += [lst.cert, lst.key]
        for ca in lst.client_ca:
            paths += [ca.file, *ca.crl]
    if config.admin.tls is not None:
        paths += [config.admin.tls.cert, config.admin.tls.key, *config.admin.tls.client_ca]
    return paths + [ca for ca in origin_cas(config).values() if ca is not None]


def origin_cas(config: Config) -> dict[str, Path | None]:
    """The CA file each HTTPS origin trusts (None: the system store), by origin name."""
    return {name: oc.ca for name, oc in config.origins.items() if isinstance(oc, HttpsOriginConfig)}


def trust_stamps(config: Config) -> dict[str, tuple[object, ...] | None]:
    """Per HTTPS origin, the stamp of its CA file now: an origin whose config is unchanged is kept only while the
    file it trusts is unchanged too (its TLS context holds what the file said when the origin was made)."""
    return {name: None if ca is None else _stamp(ca) for name, ca in origin_cas(config).items()}


def _alike(level: int) -> int:
    """The level of a line every worker would log alike (a reload and its outcome): `level` in one process; with
    several workers, a success (info) is logged by the worker in slot 0 only (`workers.reports`; debug in the
    others), so that one reload is one line. A warning (a failed reload, a stale CRL, a listener change that needs
    a restart) is logged by every worker: slot 0 may be dead or restarting exactly when the config on disk is
    broken, and one line per worker is better than none."""
    from gateway.workers import reports

    return level if level >= logging.WARNING or reports() else logging.DEBUG


def _stamp(path: Path) -> tuple[object, ...]:
    try:
        st, lst = os.stat(path), os.lstat(path)
    except OSError as exc:
        return (str(path), "missing", exc.errno)
    return (str(path), st.st_mtime_ns, st.st_ino, st.st_dev, st.st_size, lst.st_mtime_ns, lst.st_ino)


def fingerprint(paths: list[Path]) -> tuple[tuple[object, ...], ...]:
    return tuple(_stamp(p) for p in paths)


def _seen(before: tuple[tuple[object, ...], ...], paths: list[Path]) -> tuple[tuple[object, ...], ...]:
    """What a reload has read, as stamps: each file as it was before the load (a write that lands while the load
    reads, an editor's second write, is then still a change for the watcher), and a file the load newly names as
    not seen yet (it may have come after the load listed it; one more reload reads it)."""
    known = {str(stamp[0]): stamp for stamp in before}
    return tuple(known.get(str(p), (str(p), "unseen")) for p in paths)


class Reloader:
    def __init__(self, config_path: Path, rt: Runtime) -> None:
        self.config_path = config_path
        self.rt = rt
        self._lock = asyncio.Lock()
        self._last = fingerprint(watched_files(config_path, rt.snapshot.config))
        self._retired: set[asyncio.Task[None]] = set()
        self._reported_stale: set[str] = set()
        self._crl_cas: set[str] = set()  # CA names exported in ota_gateway_crl_stale
        self._trust = trust_stamps(rt.snapshot.config)  # HTTPS origins' CA files as their origins were made

    async def reload(self, trigger: str) -> bool:
        async with self._lock:
            before = fingerprint(watched_files(self.config_path, self.rt.snapshot.config))
            self._last = before
            try:
                loaded, keys = await asyncio.to_thread(_load_for_reload, self.config_path)
            except ConfigError as exc:
                self.rt.metrics.reloads.labels("failure").inc()
                self.rt.metrics.config_loaded.set(0)
                self.rt.live.last_reload_ok = False
                first = str(exc.issues[0]) + (f" (and {len(exc.issues) - 1} more)" if len(exc.issues) > 1 else "")
                log.log(_alike(logging.WARNING), "reload (%s) failed, keeping the last good state: %s", trigger, first)
                return False
            self._swap(loaded, keys)
            self._last = _seen(before, watched_files(self.config_path, loaded.config))
            self.rt.metrics.reloads.labels("success").inc()
            self.rt.live.last_reload_ok = True
            publish_state_metrics(self.rt.metrics, loaded)
            log.log(_alike(logging.INFO), "reloaded (%s): %d app(s)", trigger, len(loaded.policies.apps))
            return True

    def _swap(self, loaded: Loaded, keys: tuple[TicketKey, ...]) -> None:
        """Build the new snapshot whole (origins whose config is unchanged are kept), then replace the old one."""
        old = self.rt.snapshot
        for new_lst, old_lst in zip(loaded.config.listeners, old.config.listeners, strict=False):
            if (new_lst.address, new_lst.port) != (old_lst.address, old_lst.port):
                log.log(_alike(logging.WARNING), "listener %s: address/port change needs a restart", new_lst.name)
        origins: dict[str, Origin] = {}
        trust = trust_stamps(loaded.config)
        for name, oc in loaded.config.origins.items():
            kept = old.origins.get(name)
            if kept is not None and old.config.origins.get(name) == oc and self._trust.get(name) == trust.get(name):
                origins[name] = kept
            else:
                origins[name] = make_origin(name, oc, self.rt.metrics.origin_overruns.labels(name).inc)
                self.rt.metrics.origin(name)
        new = Snapshot.build(loaded.config, loaded.policies, loaded.material, origins, keys, loaded.admin_tls)
        self.rt.snapshot = new  # the one assignment: requests in flight keep the snapshot they hold
        self._trust = trust
        for name, origin in old.origins.items():
            if new.origins.get(name) is not origin:
                self._retire(origin, loaded.config.limits.shutdown_grace)

    def _retire(self, origin: Origin, after: float) -> None:
        async def close_later() -> None:
            try:
                await asyncio.sleep(after)  # requests in flight keep using it until then
            finally:  # also when the gateway stops first
                await origin.retire()  # for good: a request past the grace gets an error, not a new pool

        task = asyncio.get_running_loop().create_task(close_later(), name="retire-origin")
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def report_stale_crls(self) -> None:
        """Log each CRL once when it goes past its nextUpdate, and keep `ota_gateway_crl_stale` current."""
        now = dt.datetime.now(dt.UTC)
        all_stale: set[str] = set()
        # per CA name: stale if any of its CRLs is; a CA whose CRLs a reload removed goes back to 0
        by_ca = dict.fromkeys(self._crl_cas, 0)
        for name, material in self.rt.snapshot.material.items():
            stale = {crl.source for crl in material.revocation.stale_lists(now)}
            all_stale |= stale
            for crl in material.revocation.lists:
                by_ca[crl.ca_name] = max(by_ca.get(crl.ca_name, 0), 1 if crl.source in stale else 0)
                if crl.source in stale and crl.source not in self._reported_stale:
                    mode = material.revocation.expired_mode
                    effect = (
                        "clients of this CA are refused" if mode == "fail_closed" else "still applied (keep_serving)"
                    )
                    log.log(
                        _alike(logging.WARNING),
                        "listener %s: CRL %s is past its nextUpdate %s; %s",
                        name,
                        crl.source,
                        f"{crl.next_update:%Y-%m-%dT%H:%M:%SZ}",
                        effect,
                    )
        self._reported_stale = all_stale
        for ca_name, value in by_ca.items():
            self.rt.metrics.crl_stale.labels(ca_name).set(value)
        self._crl_cas = set(by_ca)

    async def watch(self) -> None:
        """Poll the watched files every `reload.interval` seconds; reload on any change."""
        while True:
            self.report_stale_crls()
            await asyncio.sleep(self.rt.snapshot.config.reload.interval)
            if not self.rt.snapshot.config.reload.watch:
                continue
            current = await asyncio.to_thread(fingerprint, watched_files(self.config_path, self.rt.snapshot.config))
            if current != self._last:
                await self.reload("file change")

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
        await asyncio.gather(*self._retired, return_exceptions=True)
