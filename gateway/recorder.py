"""The recorder: the one place that writes a request's audit line and counts its outcome.

Owns the end of every request, like a mitmproxy addon that sees each flow once: `settle` turns what the handler
raised into the answer and the outcome, `finish` writes the audit line and counts `ota_gateway_requests_total`
and `ota_gateway_refusals_total` exactly once, and `low_level` does the same for answers the listener gives
before the application sees a request (parser 400s, header 408s); `release` writes the line and sets the metrics of
an event that is no request's outcome: a release halted (by its devices' failures or an operator) or resumed;
`halts_read` shows the halts read from the state store, `held_back` counts an offer a rollout or halt held back.
Handlers only return a response or raise an
outcome: a `Refusal` (answered in the route's shape), an `Answered` refusal that brings its own answer (a Capgo 200
decline, a 416 with Content-Range), or an `Answered(..., aborted=True)` for a stream cut after its headers went out.
Anything else becomes `internal_error` (500 problem details, traceback logged once); a cancelled request is
`client_gone` or `shutdown`. It never decides a refusal itself and never reads a client string into a label.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.answers import refusal_response
from gateway.audit import AuditLog, AuditRecord
from gateway.core.identity import ClientIdentity
from gateway.core.reasons import Reason, Refusal, for_http_error
from gateway.metrics import Metrics

log = logging.getLogger("ota_gateway.http")

ReleaseAction = Literal["HALT", "RESUME"]


class Answered(Refusal):
    """A refusal that carries its own answer; `aborted`: the answer had started and its connection was cut."""

    def __init__(self, refusal: Refusal, response: web.StreamResponse, *, aborted: bool = False) -> None:
        super().__init__(refusal.reason, refusal.detail)
        self.response = response
        self.aborted = aborted


@dataclass(frozen=True)
class Recorder:
    metrics: Metrics
    audit: AuditLog
    shutting_down: Callable[[], bool]

    def settle(self, record: AuditRecord, route: str, started: float, exc: BaseException) -> web.StreamResponse | None:
        """The answer to a handler's exception, its outcome noted on `record`; None: the caller re-raises it (a
        vanished client or a cancellation, recorded here; a redirect or an interpreter exit, not an outcome).

        Never raises `exc` itself: a frame holding the exception it raises is a reference cycle that would keep
        every aborted request's buffers alive until the garbage collector runs."""
        if isinstance(exc, Answered):
            self._note(record, "aborted" if exc.aborted else "refused", exc.reason, exc.detail)
            return exc.response
        if isinstance(exc, Refusal):
            self._note(record, "refused", exc.reason, exc.detail)
            resp = refusal_response(route, exc)  # Capgo-shaped on Capgo routes, problem details elsewhere
            if exc.reason is Reason.REQUEST_TIMEOUT:
                resp.force_close()  # the rest of the body is never read
            return resp
        if isinstance(exc, web.HTTPException) and exc.status >= 400:
            reason = for_http_error(exc.status)
            self._note(record, "refused", reason, record.detail)
            return refusal_response(route, Refusal(reason, exc.reason or "request refused"), exc.status)
        if isinstance(exc, HttpProcessingError):
            # a body the parser refused mid-way (bad chunked encoding, body past Content-Length): the client's fault
            detail = f"malformed HTTP request body ({type(exc).__name__})"
            self._note(record, "refused", Reason.BAD_REQUEST, detail)
            resp = refusal_response(route, Refusal(Reason.BAD_REQUEST, detail))
            resp.force_close()
            return resp
        if isinstance(exc, ConnectionError):  # the client went away while a handler wrote to it
            self._note(record, "aborted", Reason.CLIENT_GONE, record.detail)
            self.finish(record, route, started)
            return None
        if isinstance(exc, asyncio.CancelledError):
            # the client went away (handler_cancellation) or shutdown cancelled the request: still one audit line
            cancelled = Reason.SHUTDOWN if self.shutting_down() else Reason.CLIENT_GONE
            self._note(record, "aborted", cancelled, record.detail)
            self.finish(record, route, started)
            return None
        if not isinstance(exc, Exception) or isinstance(exc, web.HTTPException):
            return None  # a redirect, or SystemExit/KeyboardInterrupt: not a request outcome
        # a bug: logged once with its traceback, answered with problem details, audited and counted
        # the path as the client wrote it may hold a line break (%0A): escaped, it cannot forge a log line
        path = record.path.encode("unicode_escape").decode()
        log.error("unexpected error on %s %s", record.method, path, exc_info=exc)
        self._note(record, "refused", Reason.INTERNAL_ERROR, "internal error")
        resp = refusal_response(route, Refusal(Reason.INTERNAL_ERROR, "internal error"))
        resp.force_close()
        return resp

    def finish(
        self, record: AuditRecord, route: str, started: float | None, response: web.StreamResponse | None = None
    ) -> None:
        """Write the audit line and count the request: the only place a request is counted."""
        record.duration_ms = 0.0 if started is None else round((time.monotonic() - started) * 1000, 3)
        if response is not None and not record.status:
            record.status = response.status
        if record.outcome == "ok" and record.status >= 400:
            record.outcome = "refused"
        metrics = self.metrics
        if record.reason is not None:
            (metrics.refusal_count.get(record.reason) or metrics.refusals.labels(record.reason)).inc()
        (metrics.request_count.get((route, record.outcome)) or metrics.requests.labels(route, record.outcome)).inc()
        self.audit.write(record)

    def low_level(self, listener: str, peer: str | None, status: int, reason: Reason, detail: str) -> None:
        """Audit and count an answer the listener gave before the application saw a request (listener.py)."""
        entry = AuditRecord(route="other", method="-", path="-", peer=peer)
        self._note(entry, "refused", reason, detail)
        entry.status = status
        self.finish(entry, "other", None)

    def release(
        self, action: ReleaseAction, app_id: str, version: str, detail: str, *, tipped_by: ClientIdentity | None = None
    ) -> None:
        """A release halted or resumed: its audit line (route `release`, method `HALT` or `RESUME`) and metrics.
        `ota_gateway_release_halted{app,version}` follows the halt; an automatic halt (`tipped_by`: the client whose
        event reached the failure ratio, named in the line) also counts in `ota_gateway_release_halts_total{app}`."""
        record = AuditRecord(
            "release", action, f"/releases/{app_id}/{version}", detail=detail, app=app_id, version=version
        )
        record.set_identity(tipped_by)
        if action == "HALT" and tipped_by is not None:
            self.metrics.release_halts.labels(app_id).inc()
        self.metrics.halted_versions.setdefault(app_id, set()).add(version)
        self.metrics.release_halted.labels(app_id, version).set(1 if action == "HALT" else 0)
        self.audit.write(record)

    def halts_read(self, app_id: str, named: Iterable[str], halts: Mapping[str, str]) -> None:
        """The app's halts as just read from the state store: `ota_gateway_release_halted` is 1 or 0 for every
        version with a series and those the policy names (`named`), so a halt or resume made by another worker,
        host or the `release` command shows on this worker's next read."""
        shown = self.metrics.halted_versions.setdefault(app_id, set())
        shown.update(named)
        for version in shown:
            self.metrics.release_halted.labels(app_id, version).set(1 if version in halts else 0)

    def held_back(self, app_id: str, cause: str) -> None:
        """An update check whose offer a halt or the staged rollout held back (`halted`, `not_in_rollout`)."""
        self.metrics.held_back.labels(app_id, cause).inc()

    @staticmethod
    def _note(record: AuditRecord, outcome: str, reason: Reason, detail: str | None) -> None:
        record.outcome, record.reason, record.detail = outcome, reason.label, detail


RECORDER = web.AppKey("recorder", Recorder)
