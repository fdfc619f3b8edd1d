"""Revocation: is this client certificate on a CRL of its issuing CA, and is that CRL still current?

Owns the decision, from CRLs already parsed and signature-checked by `tls.py` into frozen `RevocationList`s.
A CRL past its nextUpdate is stale: with `fail_closed` every certificate of that CA is refused until a fresh CRL is
loaded; with `keep_serving` the stale list still revokes what it lists and the staleness is only reported.
Pure: the current time is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from gateway.core.identity import ClientIdentity

ExpiredMode = Literal["fail_closed", "keep_serving"]


@dataclass(frozen=True, slots=True)
class RevocationList:
    ca_name: str
    issuer: str  # RFC 4514 subject of the CA that signed the CRL
    serials: frozenset[str]  # revoked serial numbers, lowercase hex
    next_update: datetime | None
    source: str

    def stale(self, now: datetime) -> bool:
        return self.next_update is not None and now > self.next_update


@dataclass(frozen=True, slots=True)
class RevocationSet:
    lists: tuple[RevocationList, ...] = ()
    expired_mode: ExpiredMode = "fail_closed"

    def check(self, identity: ClientIdentity, now: datetime) -> str | None:
        """None if the certificate may be used, else why not (for the audit detail and the client's answer, so it
        names the CA whose CRL refused, never the CRL's file on the server)."""
        for crl in self.lists:
            if crl.issuer != identity.issuer:
                continue
            if identity.serial in crl.serials:
                return f"serial {identity.serial} is revoked by a CRL of CA {crl.ca_name}"
            if crl.stale(now) and self.expired_mode == "fail_closed":
                return (
                    f"a CRL of CA {crl.ca_name} expired at {crl.next_update:%Y-%m-%dT%H:%M:%SZ} "
                    "(crl_expired: fail_closed)"
                )
        return None

    def stale_lists(self, now: datetime) -> tuple[RevocationList, ...]:
        return tuple(crl for crl in self.lists if crl.stale(now))
