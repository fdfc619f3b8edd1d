"""Policy evaluation: may this identity ask this app for this thing?

Owns the frozen policy types and the decision. Pure: the policy files are read and validated by
`policy_store.py`; this module only decides. In this first form every client certificate that the listener's
CA chain admitted may use every app a policy names; identity rules, pins and deny lists grow here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.core.identity import ClientIdentity
from gateway.core.reasons import Reason, Refusal


@dataclass(frozen=True, slots=True)
class Channels:
    default: str
    allowed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AppPolicy:
    app_id: str
    origin: str
    channels: Channels
    source: str  # the policy file that defines the app, for messages


@dataclass(frozen=True, slots=True)
class PolicySet:
    apps: Mapping[str, AppPolicy]

    def app(self, app_id: str) -> AppPolicy | None:
        return self.apps.get(app_id)


def admit(policies: PolicySet, identity: ClientIdentity, app_id: str) -> AppPolicy:
    """Return the app's policy if `identity` may use it, else raise `Refusal`.

    The listener has already checked the chain and the clientAuth EKU; this first form admits any such identity.
    """
    del identity  # identity rules (subjects, SANs, pins, deny lists) are evaluated here once policies carry them
    app = policies.app(app_id)
    if app is None:
        raise Refusal(Reason.APP_UNKNOWN, f"no policy names app {app_id!r}")
    return app


def channel_allowed(app: AppPolicy, channel: str) -> bool:
    return channel in app.channels.allowed
