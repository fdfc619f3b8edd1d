"""Typed keys for the aiohttp application and request state, and the runtime object they hold."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field

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
from gateway.origins import DirectoryOrigin, HttpsOrigin
from gateway.state import MemoryState, StateStore
from gateway.tls import ListenerMaterial


@dataclass
class Runtime:
    """What handlers need: the current config, policies and TLS material, the origins, metrics and the audit log.

    `swap()` replaces config, policies and material together (validate-then-swap reloads); requests in flight
    keep the objects they already hold.
    """

    config: Config
    policies: PolicySet
    origins: dict[str, DirectoryOrigin | HttpsOrigin]
    metrics: Metrics
    audit: AuditLog
    material: dict[str, ListenerMaterial] = field(default_factory=dict)
    active: int = 0  # requests being handled, for draining
    shutting_down: bool = False
    last_reload_ok: bool = True
    cas: dict[str, tuple[str, x509.Certificate]] = field(default_factory=dict)
    proxies: dict[str, FrontProxy] = field(default_factory=dict)  # pin (spki or sha256) -> front proxy
    state: StateStore = field(default_factory=MemoryState)  # the runner opens the configured store at start
    state_fault: Fault = field(default_factory=lambda: Fault("state store"))  # GuardedState's; /readyz reads it
    _keyring: tuple[Config | None, tuple[TicketKey, ...]] = field(default=(None, ()), repr=False)
    origin_health: dict[str, tuple[bool, float, str]] = field(default_factory=dict)  # name -> (ok, when, detail)
    halt_cache: dict[str, tuple[float, dict[str, str]]] = field(default_factory=dict)  # app -> (read at, halts)

    def __post_init__(self) -> None:
        self._derive()

    def _derive(self) -> None:
        self.cas = {k: v for m in self.material.values() for k, v in m.cas.items()}
        self.proxies = {}
        for proxy in self.config.front_proxies:
            for pin in proxy.spki_pins:
                self.proxies[pin] = proxy
            for pin in proxy.cert_sha256:
                self.proxies[normalize_cert_sha256(pin)] = proxy

    def swap(self, config: Config, policies: PolicySet, material: dict[str, ListenerMaterial]) -> None:
        self.config, self.policies, self.material = config, policies, material
        self._derive()

    def ticket_keys(self) -> tuple[TicketKey, ...]:
        """The download-ticket keys of the current config (read once per config; the first signs)."""
        if self._keyring[0] is not self.config:
            from gateway.ticket_keys import load_keyring

            self._keyring = (self.config, load_keyring(self.config))
        return self._keyring[1]

    def front_proxy(self, identity: ClientIdentity) -> FrontProxy | None:
        return self.proxies.get(identity.spki_sha256) or self.proxies.get(identity.sha256)

    def origin_failed(self, name: str, detail: str) -> None:
        """Count an origin failure and remember it for /readyz."""
        self.metrics.origin_errors.labels(name).inc()
        self.origin_health[name] = (False, time.monotonic(), detail)

    def origin_ok(self, name: str) -> None:
        self.origin_health[name] = (True, time.monotonic(), "")

    def revoked(self, identity: ClientIdentity, now: dt.datetime) -> str | None:
        for material in self.material.values():
            why = material.revocation.check(identity, now)
            if why:
                return why
        return None


RUNTIME = web.AppKey("runtime", Runtime)
PEER_KEY = "ota_gateway.peer"
AUDIT_KEY = "ota_gateway.audit"


def request_peer(request: web.Request) -> Peer:
    peer = request.get(PEER_KEY)
    assert isinstance(peer, Peer), "identity middleware did not run"
    return peer


def request_audit(request: web.Request) -> AuditRecord:
    record = request.get(AUDIT_KEY)
    assert isinstance(record, AuditRecord), "audit middleware did not run"
    return record
