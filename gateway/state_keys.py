"""Typed keys for the aiohttp application and request state, and the runtime object they hold.

Owns the shape of the running gateway's state, in three parts:
- `Snapshot`: everything a reload swaps (config, policies, listener and admin TLS material, origins, ticket keys) and
  what is derived from them (client CAs by subject, front proxies by pin). Frozen: a reload builds a new one whole and
  replaces it with one assignment (`Runtime.snapshot`); a failed reload leaves the old object in place. A request takes
  the snapshot once, in the envelope (`request_snapshot`), and uses that object to its end.
- `Live`: the small mutable health of the process (requests in flight, shutting down, last reload result, origin
  health, the state store's fault, the cached release halts).
- `Runtime`: the current snapshot, the live health and the long-lived services (metrics, audit log, state store).
"""

from __future__ import annotations

import datetime as dt
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from aiohttp import web
from cryptography import x509

from gateway.audit import AuditLog, AuditRecord
from gateway.config import Config, FrontProxy
from gateway.core.faults import Fault
from gateway.core.identity import ClientIdentity
from gateway.core.pins import normalize_cert_sha256
from gateway.core.policy import Peer, PolicySet
from gateway.core.tickets import TicketKey
from gateway.metrics import Metrics
from gateway.origins import Origin
from gateway.state import MemoryState, StateStore
from gateway.tls import ListenerMaterial


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a reload swaps, and what is derived from it; immutable (build a new one with `Snapshot.build`)."""

    config: Config
    policies: PolicySet
    material: Mapping[str, ListenerMaterial]  # listener name -> TLS material
    origins: Mapping[str, Origin]  # exactly the config's origins
    ticket_keys: tuple[TicketKey, ...]  # the first signs, all verify
    cas: Mapping[str, tuple[str, x509.Certificate]]  # CA subject -> (client CA name, certificate), all listeners
    proxies: Mapping[str, FrontProxy]  # pin (spki base64 or certificate sha256 hex) -> front proxy
    admin_tls: ssl.SSLContext | None = None  # the admin listener's (admin.tls); new handshakes switch to it

    @classmethod
    def build(
        cls,
        config: Config,
        policies: PolicySet,
        material: Mapping[str, ListenerMaterial],
        origins: Mapping[str, Origin],
        ticket_keys: tuple[TicketKey, ...],
        admin_tls: ssl.SSLContext | None = None,
    ) -> Snapshot:
        """A snapshot with its derived values computed; the mappings are read-only copies."""
        cas = {k: v for m in material.values() for k, v in m.cas.items()}
        proxies: dict[str, FrontProxy] = {}
        for proxy in config.front_proxies:
            for pin in proxy.spki_pins:
                proxies[pin] = proxy
            for pin in proxy.cert_sha256:
                proxies[normalize_cert_sha256(pin)] = proxy
        return cls(
            config=config,
            policies=policies,
            material=MappingProxyType(dict(material)),
            origins=MappingProxyType(dict(origins)),
            ticket_keys=tuple(ticket_keys),
            cas=MappingProxyType(cas),
            proxies=MappingProxyType(proxies),
            admin_tls=admin_tls,
        )

    def front_proxy(self, identity: ClientIdentity) -> FrontProxy | None:
        return self.proxies.get(identity.spki_sha256) or self.proxies.get(identity.sha256)

    def revoked(self, identity: ClientIdentity, now: dt.datetime) -> str | None:
        for material in self.material.values():
            why = material.revocation.check(identity, now)
            if why:
                return why
        return None


@dataclass(slots=True)
class Live:
    """The process's mutable health, beside the snapshot (a reload does not touch it)."""

    active: int = 0  # requests being handled, for draining
    shutting_down: bool = False
    last_reload_ok: bool = True
    origin_health: dict[str, tuple[bool, float, str]] = field(default_factory=dict)  # name -> (ok, when, detail)
    state_fault: Fault = field(default_factory=lambda: Fault("state store"))  # GuardedState's; /readyz reads it
    halt_cache: dict[str, tuple[float, dict[str, str]]] = field(default_factory=dict)  # app -> (read at, halts)


@dataclass(slots=True)
class Runtime:
    """The current snapshot (replaced whole by a reload), the live health and the long-lived services.

    Code serving a request reads the snapshot it was given (`request_snapshot`), never `snapshot` here again.
    """

    snapshot: Snapshot
    metrics: Metrics
    audit: AuditLog
    live: Live = field(default_factory=Live)
    state: StateStore = field(default_factory=MemoryState)  # the runner opens the configured store at start

    def origin_failed(self, name: str, detail: str) -> None:
        """Count an origin failure and remember it for /readyz."""
        self.metrics.origin_errors.labels(name).inc()
        self.live.origin_health[name] = (False, time.monotonic(), detail)

    def origin_ok(self, name: str) -> None:
        self.live.origin_health[name] = (True, time.monotonic(), "")


RUNTIME = web.AppKey("runtime", Runtime)
PEER_KEY = "ota_gateway.peer"
AUDIT_KEY = "ota_gateway.audit"
SNAPSHOT_KEY = "ota_gateway.snapshot"


def request_peer(request: web.Request) -> Peer:
    peer = request.get(PEER_KEY)
    assert isinstance(peer, Peer), "identity middleware did not run"
    return peer


def request_audit(request: web.Request) -> AuditRecord:
    record = request.get(AUDIT_KEY)
    assert isinstance(record, AuditRecord), "audit middleware did not run"
    return record


def request_snapshot(request: web.Request) -> Snapshot:
    """The snapshot this request began with (taken once by the envelope)."""
    snap = request.get(SNAPSHOT_KEY)
    assert isinstance(snap, Snapshot), "the envelope did not run"
    return snap
