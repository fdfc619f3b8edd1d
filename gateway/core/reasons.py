"""The closed set of refusal reasons.

Every refusal, abort and audit `reason` is one of these values, and they are the only values the `reason`
metric label may take. Nothing a client sends can add to this set. Each reason carries the HTTP status the
gateway answers with when the refusal happens before the response has started.
"""

from __future__ import annotations

import enum


class Reason(enum.Enum):
    """A refusal reason: the value is the label and audit string, `status` the HTTP answer."""

    NO_CLIENT_CERT = ("no_client_cert", 401)
    UNTRUSTED_CERT = ("untrusted_cert", 403)
    REVOKED = ("revoked", 403)
    PIN_MISMATCH = ("pin_mismatch", 403)
    IDENTITY_NOT_ALLOWED = ("identity_not_allowed", 403)
    DENIED = ("denied", 403)
    APP_UNKNOWN = ("app_unknown", 404)
    RELEASE_UNKNOWN = ("release_unknown", 404)
    NOT_HTTPS = ("not_https", 426)
    FOREIGN_HOST = ("foreign_host", 502)  # an https url the origin offered on a host that is not one of its own
    FOREIGN_APP = ("foreign_app", 502)  # a url outside the app's own bundle_urls (another app's bundle)
    DOWNGRADE = ("downgrade", 409)
    ROLLBACK = ("rollback", 409)
    BUILTIN_NOT_ALLOWED = ("builtin_not_allowed", 409)
    BELOW_FLOOR = ("below_floor", 409)
    VERSION_JUMP = ("version_jump", 409)
    CHANNEL_NOT_ALLOWED = ("channel_not_allowed", 403)
    CHECKSUM_MISMATCH = ("checksum_mismatch", 502)
    SIGNATURE_INVALID = ("signature_invalid", 502)
    KEY_ID_MISMATCH = ("key_id_mismatch", 409)  # the device embeds a key the app's policy does not list
    UNVERIFIABLE = ("unverifiable", 502)
    ZIP_CONTENT = ("zip_content", 502)  # verification.zip_scan: an entry escapes the bundle, is native code, ...
    SIZE_EXCEEDED = ("size_exceeded", 502)
    SHORT_BODY = ("short_body", 502)
    CLIENT_TOO_SLOW = ("client_too_slow", 408)  # the client took bytes below limits.client_min_rate
    ORIGIN_TOO_SLOW = ("origin_too_slow", 504)  # the origin sent below limits.origin_min_rate, or over total_timeout
    TICKET_INVALID = ("ticket_invalid", 403)
    RATE_LIMITED = ("rate_limited", 429)
    RANGE_NOT_SATISFIABLE = ("range_not_satisfiable", 416)
    BAD_REQUEST = ("bad_request", 400)
    REQUEST_TIMEOUT = ("request_timeout", 408)
    NOT_FOUND = ("not_found", 404)
    ORIGIN_ERROR = ("origin_error", 502)
    STATE_ERROR = ("state_error", 503)  # the state store (SQLite, Redis) failed
    AUDIT_UNAVAILABLE = ("audit_unavailable", 503)  # audit.on_failure: fail_closed and the audit log fails
    CLIENT_GONE = ("client_gone", 499)
    SHUTDOWN = ("shutdown", 503)
    INTERNAL_ERROR = ("internal_error", 500)

    def __init__(self, label: str, status: int) -> None:
        self.label = label
        self.status = status

    def __str__(self) -> str:
        return self.label


ALL_LABELS: tuple[str, ...] = tuple(r.label for r in Reason)


def for_http_error(status: int) -> Reason:
    """The reason for an error the HTTP layer answers itself (aiohttp's 404 and 405, a 400 it raises): no route,
    or no route for that method (the set has no reason of its own for 405: `not_found` is the closest, the status
    says which), else `bad_request`."""
    return Reason.NOT_FOUND if status in (404, 405) else Reason.BAD_REQUEST


class Refusal(Exception):
    """Raised by the core (and the shell) to refuse a request for one closed-set reason."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.label}: {detail}")
        self.reason = reason
        self.detail = detail
