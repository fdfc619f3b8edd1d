"""Prometheus metrics: every metric the gateway exports, on a registry of its own.

Owns metric names (prefix `ota_gateway_`) and label sets. Label values come only from closed sets (reasons,
handshake causes, routes, outcomes) or from names in the operator's config (listeners, origins, apps in policy);
never from a string a client sent.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, multiprocess

from gateway.core.capgo import ACTION_LABELS, KIND_LABELS
from gateway.core.connguard import REFUSAL_CAUSES, TIMEOUT_CAUSES
from gateway.core.handshake import CAUSES
from gateway.core.reasons import ALL_LABELS
from gateway.state import STATE_OPS

# `_created` series double the exposition and no dashboard uses them
disable_created_metrics()  # type: ignore[no-untyped-call]

ROUTES = ("bundle", "admin", "other", "updates", "stats", "channel", "ticket")
TICKET_RESULTS = ("issued", "redeemed", "refused")
VERIFICATION_RESULTS = (
    "passed",
    "checksum_mismatch",
    "signature_invalid",
    "size_exceeded",
    "short_body",
    "origin_error",
    "origin_too_slow",
)
OUTCOMES = ("ok", "refused", "aborted")


def exposition_registry(own: CollectorRegistry) -> CollectorRegistry:
    """What /metrics serves: this process's registry, or in multi-worker mode the sum over all workers."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return own
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


class Metrics:
    """All metric objects, registered on `registry` (one per process; tests make their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        r = self.registry
        self.requests = Counter(
            "ota_gateway_requests",
            "Requests answered, by route and outcome.",
            ["route", "outcome"],
            registry=r,
        )
        self.refusals = Counter(
            "ota_gateway_refusals",
            "Refused or aborted requests, by reason (a closed set).",
            ["reason"],
            registry=r,
        )
        self.handshakes = Counter(
            "ota_gateway_tls_handshakes", "TLS handshakes completed, by listener.", ["listener"], registry=r
        )
        self.handshake_failures = Counter(
            "ota_gateway_tls_handshake_failures",
            "TLS handshakes that failed, by listener and cause.",
            ["listener", "cause"],
            registry=r,
        )
        self.bytes_streamed = Counter("ota_gateway_bundle_bytes_sent", "Bundle bytes sent to clients.", registry=r)
        self.verifications = Counter(
            "ota_gateway_bundle_verifications",
            "Bundle verifications finished, by result (passed or a refusal reason).",
            ["result"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "ota_gateway_worker_restarts",
            "Workers started again by the `serve --workers N` supervisor after one died.",
            registry=r,
        )
        self.in_flight = Gauge(
            "ota_gateway_downloads_in_flight", "Bundle downloads in progress.", registry=r, multiprocess_mode="livesum"
        )
        self.origin_latency = Histogram(
            "ota_gateway_origin_response_seconds",
            "Time until the origin's response headers (or the file open), by origin.",
            ["origin"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.origin_errors = Counter("ota_gateway_origin_errors", "Origin failures, by origin.", ["origin"], registry=r)
        self.origin_overruns = Counter(
            "ota_gateway_origin_overruns",
            "Origin connections dropped for bytes after a complete answer (past its Content-Length, or while idle).",
            ["origin"],
            registry=r,
        )
        self.config_loaded = Gauge(
            "ota_gateway_config_last_reload_success",
            "1 if the last load or reload of config, policies and certificates succeeded, else 0.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.config_load_time = Gauge(
            "ota_gateway_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful load or reload.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.reloads = Counter(
            "ota_gateway_config_reloads", "Reload attempts, by result (success, failure).", ["result"], registry=r
        )
        self.expiry = Gauge(
            "ota_gateway_certificate_expiry_timestamp_seconds",
            "End of validity (Unix time) of the server certificates, client CAs (not_after) and CRLs (nextUpdate).",
            ["kind", "name"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.crl_stale = Gauge(
            "ota_gateway_crl_stale",
            "1 while a CRL is past its nextUpdate (see crl_expired for whether its CA's clients are refused).",
            ["name"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.spoofed_identity_headers = Counter(
            "ota_gateway_spoofed_identity_headers",
            "Requests carrying Client-Cert or x-forwarded-client-cert from a client that is not a front proxy.",
            registry=r,
        )
        self.plain_http = Counter(
            "ota_gateway_plain_http_requests",
            "Requests on the plain-HTTP listener, by answer (redirect, upgrade_required).",
            ["answer"],
            registry=r,
        )
        self.device_events = Counter(
            "ota_gateway_device_events",
            "Device events received on /stats, by app (apps named in policy) and action (a closed list, else other).",
            ["app", "action"],
            registry=r,
        )
        self.update_answers = Counter(
            "ota_gateway_update_answers",
            "Answers to update checks, by kind (new_version, builtin, up_to_date, blocked, failed).",
            ["kind"],
            registry=r,
        )
        self.tickets = Counter(
            "ota_gateway_download_tickets",
            "Download tickets, by result (issued, redeemed, refused).",
            ["result"],
            registry=r,
        )
        self.state_errors = Counter(
            "ota_gateway_state_errors",
            "Failed state-store operations (SQLite, Redis), by operation.",
            ["op"],
            registry=r,
        )
        self.audit_write_failures = Counter(
            "ota_gateway_audit_write_failures",
            "Audit lines that could not be written (full disk, I/O error); each is a lost line.",
            registry=r,
        )
        self.timeouts = Counter(
            "ota_gateway_timeouts",
            "Connections cut by a listener timeout, by listener and cause (header, body, idle).",
            ["listener", "cause"],
            registry=r,
        )
        self.connections_refused = Counter(
            "ota_gateway_connections_refused",
            "New connections closed at once because a connection cap was reached, by listener and cause.",
            ["listener", "cause"],
            registry=r,
        )
        self.connections_open = Gauge(
            "ota_gateway_connections_open",
            "Open connections, by listener (TLS listeners: handshakes in progress included).",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.open_fds_ratio = Gauge(
            "ota_gateway_open_fds_ratio",
            "Open file descriptors divided by the open-files limit (the busiest worker); /readyz fails at 0.8.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.release_halted = Gauge(
            "ota_gateway_release_halted",
            "1 while a release (a version from the policy's rollout or the release index) is halted, else 0.",
            ["app", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.release_halts = Counter(
            "ota_gateway_release_halts",
            "Releases halted automatically by their devices' failures.",
            ["app"],
            registry=r,
        )
        self.held_back = Counter(
            "ota_gateway_rollout_held_back",
            "Update checks whose offer was held back, by app and cause (halted, not_in_rollout).",
            ["app", "cause"],
            registry=r,
        )
        self.halted_versions: dict[str, set[str]] = {}  # app -> versions with a release_halted series
        self._event_apps: set[str] = set()
        for op in STATE_OPS:
            self.state_errors.labels(op)
        for kind in KIND_LABELS:
            self.update_answers.labels(kind)
        for result in TICKET_RESULTS:
            self.tickets.labels(result)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for answer in ("redirect", "upgrade_required"):
            self.plain_http.labels(answer)
        # children bound once: every request counts through these (`labels()` costs a lock and a tuple each call)
        self.verification_count = {result: self.verifications.labels(result) for result in VERIFICATION_RESULTS}
        self.origin_seconds: dict[str, Histogram] = {}  # origin -> its `origin_latency` child (`origin()`)
        self.refusal_count = {reason: self.refusals.labels(reason) for reason in ALL_LABELS}
        self.request_count = {(r, o): self.requests.labels(r, o) for r in ROUTES for o in OUTCOMES}
        self.update_answer_count = {kind: self.update_answers.labels(kind) for kind in KIND_LABELS}
        self.ticket_count = {result: self.tickets.labels(result) for result in TICKET_RESULTS}

    def listener(self, name: str) -> None:
        """Create the label sets of one listener, so that zeros are exported before the first event."""
        self.handshakes.labels(name)
        for cause in CAUSES:
            self.handshake_failures.labels(name, cause)
        self.http_listener(name)

    def http_listener(self, name: str) -> None:
        """Label sets every listener has (TLS, plain-HTTP and admin): timeouts, refused and open connections."""
        for cause in TIMEOUT_CAUSES:
            self.timeouts.labels(name, cause)
        for cause in REFUSAL_CAUSES:
            self.connections_refused.labels(name, cause)
        self.connections_open.labels(name)

    def origin(self, name: str) -> None:
        self.origin_errors.labels(name)
        self.origin_overruns.labels(name)
        self.origin_seconds[name] = self.origin_latency.labels(name)

    def app_events(self, app_id: str) -> None:
        """Create an app's device-event label sets (zeros for every action) the first time it sends events."""
        if app_id in self._event_apps:
            return
        self._event_apps.add(app_id)
        for action in ACTION_LABELS:
            self.device_events.labels(app_id, action)
