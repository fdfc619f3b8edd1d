"""Policy files: reading `policies/*.yaml` into a frozen `PolicySet`.

Owns the schema of a policy file (pydantic, strict, unknown keys are errors) and loading a whole folder: every
problem in every file is collected and reported at once, each naming file, key path and line. An app named in two
files, an origin or client CA that gateway.yaml does not define, a malformed pin, version or public key are errors.
Reloading (validate, then swap) is `reload.py`'s job; this module only loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import pydantic
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import AfterValidator, Field

from gateway.config import Config, Model, client_ca_names
from gateway.core.bundle_urls import parse_pattern
from gateway.core.names import is_app_id, is_channel, is_lower_hex
from gateway.core.pins import check_spki_pin, normalize_cert_sha256
from gateway.core.policy import (
    AppPolicy,
    Channels,
    ClientRule,
    Deny,
    PolicySet,
    RateLimits,
    Verification,
    Versions,
)
from gateway.core.rollout import Halt, Rollout
from gateway.core.versions import VersionError
from gateway.core.versions import parse as parse_version
from gateway.core.zipscan import ZipRules
from gateway.errors import ConfigError, ConfigIssue
from gateway.yamlsrc import read_yaml, validation_issues


def _app_id(value: str) -> str:
    if not is_app_id(value):
        raise ValueError(f"app_id must be a reverse-domain name like com.example.app, got {value!r}")
    return value


def _channel(value: str) -> str:
    if not is_channel(value):
        raise ValueError(f"not a valid channel name: {value!r}")
    return value


def _version(value: str) -> str:
    """Checked with the parser the core compares with (`core/versions.parse`), so that a value `check` accepts can
    never fail later, on every update check."""
    try:
        parsed = parse_version(value)
    except VersionError as exc:
        raise ValueError(str(exc)) from None
    if parsed.is_builtin:
        raise ValueError(f"not a semantic version (MAJOR.MINOR.PATCH): {value!r}")
    return value


def _spki(value: str) -> str:
    return check_spki_pin(value)


def _cert_sha256(value: str) -> str:
    return normalize_cert_sha256(value)


def _serial(value: str | int) -> str:
    if isinstance(value, int):
        return format(value, "x")
    text = value.replace(":", "").lower().lstrip("0") or "0"
    if not is_lower_hex(text):
        raise ValueError(f"serial must be hex (colons allowed) or an integer, got {value!r}")
    return text


def _public_key(value: str) -> str:
    try:
        key = serialization.load_pem_public_key(value.encode())
    except ValueError:
        raise ValueError("not a PEM public key (expected -----BEGIN RSA PUBLIC KEY----- or PUBLIC KEY)") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("a Capgo v2 public key is an RSA key")
    return value


ChannelName = Annotated[str, AfterValidator(_channel)]
Version = Annotated[str, AfterValidator(_version)]
Patterns = list[Annotated[str, Field(min_length=1, max_length=256)]]


class ChannelsModel(Model):
    default: ChannelName = "production"
    allowed: list[ChannelName] = []
    self_set: bool = False

    @pydantic.model_validator(mode="after")
    def _default_allowed(self) -> ChannelsModel:
        if self.allowed and self.default not in self.allowed:
            raise ValueError(f"default channel {self.default!r} is not in allowed")
        return self


class SubjectModel(Model):
    cn: Patterns = []
    o: Patterns = []
    ou: Patterns = []


class ClientRuleModel(Model):
    name: str = ""
    issuer: list[str] = []  # names of client CAs from gateway.yaml
    subject: SubjectModel = SubjectModel()
    san_dns: Patterns = []
    san_uri: Patterns = []
    san_email: Patterns = []
    spki_pins: list[Annotated[str, AfterValidator(_spki)]] = []
    cert_sha256: list[Annotated[str, AfterValidator(_cert_sha256)]] = []
    pin_only: bool = False

    @pydantic.model_validator(mode="after")
    def _explicit(self) -> ClientRuleModel:
        names = self.issuer or self.subject.cn or self.subject.o or self.subject.ou
        names = names or self.san_dns or self.san_uri or self.san_email
        pins = self.spki_pins or self.cert_sha256
        if not names and not pins:
            raise ValueError("a client rule needs at least one condition (issuer, subject, SAN or pins)")
        if pins and not names and not self.pin_only:
            raise ValueError(
                "this rule admits by pin alone: say so with 'pin_only: true' (the certificate chain is still verified)"
            )
        if self.pin_only and not pins:
            raise ValueError("pin_only is set but the rule has no spki_pins or cert_sha256")
        return self


class DenyModel(Model):
    cert_sha256: list[Annotated[str, AfterValidator(_cert_sha256)]] = []
    serials: list[Annotated[str | int, AfterValidator(_serial)]] = []


class VersionsModel(Model):
    min_version: Version | None = None
    blocked_versions: list[Version] = []
    rollback_to: Version | None = None
    max_version_jump: Annotated[int, Field(ge=0)] | None = None
    allow_builtin: bool = True


class ZipScanModel(Model):
    allow_native_code: bool = False


class VerificationModel(Model):
    require_checksum: bool = True
    public_keys: list[Annotated[str, AfterValidator(_public_key)]] = []
    max_bundle_bytes: Annotated[int, Field(gt=0)] | None = None
    bundle_urls: list[Annotated[str, AfterValidator(parse_pattern)]] = []
    zip_scan: ZipScanModel | None = None


class RateLimitsModel(Model):
    updates_per_minute: Annotated[int, Field(gt=0, le=100000)] = 60
    stats_per_minute: Annotated[int, Field(gt=0, le=100000)] = 120


_DURATION_RE = re.compile(r"^([0-9]{1,7})(s|m|h|d)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: int | str) -> int:
    match = _DURATION_RE.fullmatch(str(value))
    if match is None or isinstance(value, bool):
        raise ValueError(f"a duration is seconds or a number with s, m, h or d (1h, 30m), got {value!r}")
    seconds = int(match[1]) * _UNITS[match[2] or "s"]
    if not 60 <= seconds <= 30 * 86400:
        raise ValueError(f"window must be between 1 minute and 30 days, got {value!r}")
    return seconds


class RolloutReleaseModel(Model):
    percent: Annotated[int | float, Field(ge=0, le=100)]


class RolloutModel(Model):
    identity: Literal["certificate", "device"] = "certificate"
    releases: dict[Version, RolloutReleaseModel] = {}


class HaltModel(Model):
    failure_ratio: Annotated[int | float, Field(gt=0, le=1)] = 0.2
    min_devices: Annotated[int, Field(ge=1, le=10_000_000)] = 50
    window: Annotated[int | str, AfterValidator(_duration)] = "1h"
    offer_previous: bool = True


class AppModel(Model):
    app_id: Annotated[str, AfterValidator(_app_id)]
    origin: str
    channels: ChannelsModel = ChannelsModel()
    clients: Annotated[list[ClientRuleModel], Field(min_length=1)]
    deny: DenyModel = DenyModel()
    versions: VersionsModel = VersionsModel()
    verification: VerificationModel = VerificationModel()
    rate_limits: RateLimitsModel = RateLimitsModel()
    rollout: RolloutModel | None = None
    halt: HaltModel | None = None


class PolicyFile(Model):
    apps: Annotated[list[AppModel], Field(min_length=1)]


def _to_policy(app: AppModel, source: str) -> AppPolicy:
    rules = tuple(
        ClientRule(
            name=r.name or f"rule{i}",
            issuers=tuple(r.issuer),
            cn=tuple(r.subject.cn),
            o=tuple(r.subject.o),
            ou=tuple(r.subject.ou),
            san_dns=tuple(r.san_dns),
            san_uri=tuple(r.san_uri),
            san_email=tuple(r.san_email),
            spki_pins=frozenset(r.spki_pins),
            cert_sha256=frozenset(r.cert_sha256),
            pin_only=r.pin_only,
        )
        for i, r in enumerate(app.clients)
    )
    return AppPolicy(
        app_id=app.app_id,
        origin=app.origin,
        channels=Channels(
            app.channels.default, tuple(app.channels.allowed) or (app.channels.default,), app.channels.self_set
        ),
        source=source,
        clients=rules,
        deny=Deny(frozenset(app.deny.cert_sha256), frozenset(str(s) for s in app.deny.serials)),
        versions=Versions(
            app.versions.min_version,
            tuple(app.versions.blocked_versions),
            app.versions.rollback_to,
            app.versions.max_version_jump,
            app.versions.allow_builtin,
        ),
        verification=Verification(
            app.verification.require_checksum,
            tuple(app.verification.public_keys),
            app.verification.max_bundle_bytes,
            tuple(app.verification.bundle_urls),
            _zip_rules(app.verification.zip_scan),
        ),
        rate_limits=RateLimits(app.rate_limits.updates_per_minute, app.rate_limits.stats_per_minute),
        rollout=_rollout(app),
    )


def _zip_rules(model: ZipScanModel | None) -> ZipRules | None:
    """The zip scan is on for an app with a `verification.zip_scan` block (`{}` for the defaults)."""
    return None if model is None else ZipRules(allow_native_code=model.allow_native_code)


def _rollout(app: AppModel) -> Rollout | None:
    """Staged rollouts and halting are on for an app with a `rollout` or a `halt` block (defaults for the other)."""
    if app.rollout is None and app.halt is None:
        return None
    rollout, halt = app.rollout or RolloutModel(), app.halt or HaltModel()
    return Rollout(
        {v: float(r.percent) for v, r in rollout.releases.items()},
        rollout.identity,
        Halt(float(halt.failure_ratio), halt.min_devices, float(_duration(halt.window)), halt.offer_previous),
    )


def policy_files(folder: Path) -> list[Path]:
    return sorted(p for p in [*folder.glob("*.yaml"), *folder.glob("*.yml")] if p.is_file())


def load_policies(folder: Path, config: Config) -> PolicySet:
    """Read every `*.yaml` in `folder`; raise `ConfigError` listing every problem in every file."""
    files = policy_files(folder)
    issues: list[ConfigIssue] = []
    apps: dict[str, AppPolicy] = {}
    where: dict[str, str] = {}
    if not files:
        raise ConfigError.single(str(folder), "", None, "no policy files (*.yaml) in this folder")
    ca_names = client_ca_names(config)
    for path in files:
        try:
            doc = read_yaml(path)
        except ConfigError as exc:
            issues.extend(exc.issues)
            continue
        try:
            parsed = PolicyFile.model_validate(doc.data)
        except pydantic.ValidationError as exc:
            issues.extend(validation_issues(doc, exc))
            continue
        for i, app in enumerate(parsed.apps):
            key = ("apps", i)
            if app.origin not in config.origins:
                known = ", ".join(sorted(config.origins))
                issues.append(doc.issue((*key, "origin"), f"unknown origin {app.origin!r} (configured: {known})"))
            for j, rule in enumerate(app.clients):
                for k, issuer in enumerate(rule.issuer):
                    if issuer not in ca_names:
                        known = ", ".join(sorted(ca_names))
                        issues.append(
                            doc.issue(
                                (*key, "clients", j, "issuer", k), f"unknown client CA {issuer!r} (configured: {known})"
                            )
                        )
            if app.app_id in apps:
                issues.append(
                    doc.issue((*key, "app_id"), f"app {app.app_id} is already defined in {where[app.app_id]}")
                )
                continue
            apps[app.app_id] = _to_policy(app, str(path))
            where[app.app_id] = f"{path}:{doc.line_of(key)}"
    if issues:
        raise ConfigError(issues)
    return PolicySet(apps)
