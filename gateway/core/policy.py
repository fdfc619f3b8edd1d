"""Policy evaluation: may this client ask this app for this thing?

Owns the frozen policy types and the decision `admit(policies, peer, app_id)`. Pure: the policy files are read
and validated by `policy_store.py`; this module only decides.

A client is admitted to an app when it is not denied (by certificate fingerprint or serial) and at least one of
the app's client rules matches. Within a rule every condition given must hold (issuer CA, subject CN/O/OU
patterns, SAN DNS/URI/email patterns, pins); across rules any one suffices. Pins are checked in addition to the
certificate chain, which the listener has already verified: they never replace it.

Patterns: `*` matches within one DNS label (DNS SANs, CN), within one path segment (URI SANs), or anything in
O/OU/email; `**` matches anything. Everything else is literal and case-sensitive, except DNS names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from gateway.core.identity import ClientIdentity
from gateway.core.reasons import Reason, Refusal
from gateway.core.rollout import Rollout
from gateway.core.zipscan import ZipRules


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is asking: the certificate identity, the name of the configured CA that issued it, and whether the
    identity came from a trusted front proxy's header rather than from the TLS handshake itself."""

    identity: ClientIdentity
    issuer_ca: str | None = None
    via_proxy: str | None = None  # name of the front proxy that vouched for this identity


@dataclass(frozen=True, slots=True)
class ClientRule:
    name: str
    issuers: tuple[str, ...] = ()
    cn: tuple[str, ...] = ()
    o: tuple[str, ...] = ()
    ou: tuple[str, ...] = ()
    san_dns: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()
    san_email: tuple[str, ...] = ()
    spki_pins: frozenset[str] = frozenset()
    cert_sha256: frozenset[str] = frozenset()
    pin_only: bool = False

    @property
    def has_pins(self) -> bool:
        return bool(self.spki_pins or self.cert_sha256)


@dataclass(frozen=True, slots=True)
class Deny:
    cert_sha256: frozenset[str] = frozenset()
    serials: frozenset[str] = frozenset()  # lowercase hex without leading zeros


@dataclass(frozen=True, slots=True)
class Channels:
    default: str
    allowed: tuple[str, ...]
    self_set: bool = False


@dataclass(frozen=True, slots=True)
class Versions:
    min_version: str | None = None
    blocked: tuple[str, ...] = ()
    rollback_to: str | None = None
    max_version_jump: int | None = None  # largest allowed increase of the major version in one update
    allow_builtin: bool = True  # may the origin reset devices to the bundle of their store binary


@dataclass(frozen=True, slots=True)
class Verification:
    require_checksum: bool = True
    public_keys: tuple[str, ...] = ()  # PEM, Capgo v2 RSA public keys (several during a rotation)
    max_bundle_bytes: int | None = None
    bundle_urls: tuple[str, ...] = ()  # core/bundle_urls.py patterns; empty: any url on the origin's hosts
    zip_scan: ZipRules | None = None  # core/zipscan.py rules for every bundle's zip; None: no scan (the default)


@dataclass(frozen=True, slots=True)
class RateLimits:
    updates_per_minute: int = 60
    stats_per_minute: int = 120


@dataclass(frozen=True, slots=True)
class AppPolicy:
    app_id: str
    origin: str
    channels: Channels
    source: str  # the policy file that defines the app, for messages
    clients: tuple[ClientRule, ...] = ()
    deny: Deny = field(default_factory=Deny)
    versions: Versions = field(default_factory=Versions)
    verification: Verification = field(default_factory=Verification)
    rate_limits: RateLimits = field(default_factory=RateLimits)
    rollout: Rollout | None = None  # staged rollouts and halting (core/rollout.py); None: every release to everyone


@dataclass(frozen=True, slots=True)
class PolicySet:
    apps: Mapping[str, AppPolicy]

    def app(self, app_id: str) -> AppPolicy | None:
        return self.apps.get(app_id)


@lru_cache(maxsize=1024)
def _compile(pattern: str, kind: str) -> re.Pattern[str]:
    one = {"dns": r"[^.]*", "uri": r"[^/]*"}.get(kind, r".*")
    parts = []
    for token in re.split(r"(\*\*|\*)", pattern):
        if token == "**":
            parts.append(r".*")
        elif token == "*":
            parts.append(one)
        else:
            parts.append(re.escape(token))
    flags = re.IGNORECASE if kind == "dns" else 0
    return re.compile("".join(parts), flags)


def matches(pattern: str, value: str, kind: str = "text") -> bool:
    """Does `value` match `pattern` (see the module docstring for `*` and `**`)? `kind`: dns, uri or text."""
    return _compile(pattern, kind).fullmatch(value) is not None


def _any(patterns: tuple[str, ...], values: tuple[str, ...], kind: str) -> bool:
    return any(matches(p, v, kind) for p in patterns for v in values)


def _names_match(rule: ClientRule, peer: Peer) -> bool:
    ident = peer.identity
    if rule.issuers and peer.issuer_ca not in rule.issuers:
        return False
    checks = (
        (rule.cn, (ident.common_name,) if ident.common_name else (), "dns"),
        (rule.o, ident.organizations, "text"),
        (rule.ou, ident.organizational_units, "text"),
        (rule.san_dns, ident.san_dns, "dns"),
        (rule.san_uri, ident.san_uri, "uri"),
        (rule.san_email, ident.san_email, "text"),
    )
    return all(not patterns or _any(patterns, values, kind) for patterns, values, kind in checks)


def _pins_match(rule: ClientRule, identity: ClientIdentity) -> bool:
    if not rule.has_pins:
        return True
    return identity.spki_sha256 in rule.spki_pins or identity.sha256 in rule.cert_sha256


def admit(policies: PolicySet, peer: Peer, app_id: str) -> AppPolicy:
    """Return the app's policy if `peer` may use it, else raise `Refusal` with the most specific reason."""
    app = policies.app(app_id)
    if app is None:
        raise Refusal(Reason.APP_UNKNOWN, f"no policy names app {app_id!r}")
    ident = peer.identity
    if ident.sha256 in app.deny.cert_sha256 or ident.serial in app.deny.serials:
        raise Refusal(Reason.DENIED, f"certificate {ident.sha256[:16]}... is on the deny list of {app_id}")
    pin_failed = False
    for rule in app.clients:
        if _names_match(rule, peer):
            if _pins_match(rule, ident):
                return app
            pin_failed = True
    if pin_failed:
        raise Refusal(Reason.PIN_MISMATCH, f"certificate key matches no pin of the rules for {app_id}")
    raise Refusal(Reason.IDENTITY_NOT_ALLOWED, f"no client rule of {app_id} admits {ident.subject!r}")


def channel_allowed(app: AppPolicy, channel: str) -> bool:
    return channel in app.channels.allowed
