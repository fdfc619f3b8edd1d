"""Typed keys for the aiohttp application and request state, and the runtime object they hold."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from gateway.audit import AuditLog, AuditRecord
from gateway.config import Config
from gateway.core.identity import ClientIdentity
from gateway.core.policy import PolicySet
from gateway.metrics import Metrics
from gateway.origins import DirectoryOrigin, HttpsOrigin


@dataclass
class Runtime:
    """What handlers need: the current config and policies, the origins, metrics and the audit log."""

    config: Config
    policies: PolicySet
    origins: dict[str, DirectoryOrigin | HttpsOrigin]
    metrics: Metrics
    audit: AuditLog
    active: int = 0  # requests being handled, for draining
    shutting_down: bool = False


RUNTIME = web.AppKey("runtime", Runtime)
IDENTITY_KEY = "ota_gateway.identity"
AUDIT_KEY = "ota_gateway.audit"


def request_identity(request: web.Request) -> ClientIdentity:
    identity = request.get(IDENTITY_KEY)
    assert isinstance(identity, ClientIdentity), "identity middleware did not run"
    return identity


def request_audit(request: web.Request) -> AuditRecord:
    record = request.get(AUDIT_KEY)
    assert isinstance(record, AuditRecord), "audit middleware did not run"
    return record
