"""The recorder (gateway/recorder.py) alone: for every outcome kind one audit line and each counter once, written to
a real audit file and a real metrics registry. The envelope around it is covered end to end elsewhere
(test_observability_scenario, test_app_errors, test_bundles)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.http_exceptions import TransferEncodingError

from gateway.audit import AuditLog, AuditRecord
from gateway.core.reasons import Reason, Refusal
from gateway.metrics import Metrics
from gateway.recorder import Answered, Recorder
from tests.core.test_plans import DEVICE


class _Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "audit.log"
        self.metrics = Metrics()
        self.audit = AuditLog(str(self.path))
        self.stopping = False
        self.recorder = Recorder(self.metrics, self.audit, lambda: self.stopping)

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def refusals(self, reason: str) -> float:
        return self.metrics.registry.get_sample_value("ota_gateway_refusals_total", {"reason": reason}) or 0.0

    def requests(self, route: str, outcome: str) -> float:
        labels = {"route": route, "outcome": outcome}
        return self.metrics.registry.get_sample_value("ota_gateway_requests_total", labels) or 0.0

    def all_refusals(self) -> float:
        return sum(self.refusals(r.label) for r in Reason)

    def run(self, route: str, exc: BaseException | None, response: web.StreamResponse | None = None) -> Any:
        """What the envelope does: settle an exception (if any), then finish unless it is to be re-raised."""
        record = AuditRecord(route=route, method="GET", path="/x")
        if exc is None:
            assert response is not None
            self.recorder.finish(record, route, 0.0, response)
            return response
        answer = self.recorder.settle(record, route, 0.0, exc)
        if answer is not None:
            self.recorder.finish(record, route, 0.0, answer)
        return answer


@pytest.fixture
def rec(tmp_path: Path) -> _Setup:
    return _Setup(tmp_path)


def test_an_answered_request_is_one_ok_line_and_no_refusal(rec: _Setup) -> None:
    rec.run("bundle", None, web.Response(status=200))
    (line,) = rec.lines()
    assert (line["outcome"], line["status"], line.get("reason")) == ("ok", 200, None)
    assert rec.requests("bundle", "ok") == 1
    assert rec.all_refusals() == 0


def test_an_error_status_without_a_reason_is_refused_but_counts_no_reason(rec: _Setup) -> None:
    rec.run("stats", None, web.Response(status=404))
    (line,) = rec.lines()
    assert (line["outcome"], line["status"], line.get("reason")) == ("refused", 404, None)
    assert rec.requests("stats", "refused") == 1
    assert rec.all_refusals() == 0


def test_a_refusal_is_answered_in_the_routes_shape_recorded_and_counted_once(rec: _Setup) -> None:
    problem = rec.run("bundle", Refusal(Reason.DENIED, "no"))
    capgo = rec.run("updates", Refusal(Reason.DENIED, "no"))
    assert problem.status == 403 and problem.content_type == "application/problem+json"
    assert capgo.status == 403 and json.loads(capgo.body)["error"] == "denied"
    lines = rec.lines()
    assert [(x["route"], x["outcome"], x["reason"], x["detail"]) for x in lines] == [
        ("bundle", "refused", "denied", "no"),
        ("updates", "refused", "denied", "no"),
    ]
    assert rec.refusals("denied") == 2 and rec.all_refusals() == 2
    assert rec.requests("bundle", "refused") == 1 and rec.requests("updates", "refused") == 1


def test_an_answered_refusal_keeps_its_own_answer(rec: _Setup) -> None:
    own = web.Response(status=200, text="declined")
    answer = rec.run("updates", Answered(Refusal(Reason.DOWNGRADE, "older"), own))
    assert answer is own
    (line,) = rec.lines()
    assert (line["outcome"], line["status"], line["reason"]) == ("refused", 200, "downgrade")
    assert rec.refusals("downgrade") == 1 and rec.all_refusals() == 1
    assert rec.requests("updates", "refused") == 1


def test_an_aborted_stream_is_one_aborted_line(rec: _Setup) -> None:
    started = web.StreamResponse(status=206)
    answer = rec.run("ticket", Answered(Refusal(Reason.CHECKSUM_MISMATCH, "bad"), started, aborted=True))
    assert answer is started
    (line,) = rec.lines()
    assert (line["outcome"], line["status"], line["reason"]) == ("aborted", 206, "checksum_mismatch")
    assert rec.refusals("checksum_mismatch") == 1 and rec.all_refusals() == 1
    assert rec.requests("ticket", "aborted") == 1 and rec.requests("ticket", "ok") == 0


@pytest.mark.parametrize(
    ("exc", "status", "reason"), [(web.HTTPNotFound(), 404, "not_found"), (web.HTTPBadRequest(), 400, "bad_request")]
)
def test_aiohttp_http_errors_are_refusals(rec: _Setup, exc: web.HTTPException, status: int, reason: str) -> None:
    answer = rec.run("other", exc)
    assert answer.status == status
    (line,) = rec.lines()
    assert (line["outcome"], line["status"], line["reason"]) == ("refused", status, reason)
    assert rec.refusals(reason) == 1 and rec.all_refusals() == 1


def test_a_redirect_is_no_outcome_of_the_recorder(rec: _Setup) -> None:
    assert rec.run("other", web.HTTPFound("/elsewhere")) is None
    assert not rec.path.exists() or rec.lines() == []
    assert rec.all_refusals() == 0


def test_a_body_the_parser_refused_is_a_bad_request_that_closes(rec: _Setup) -> None:
    answer = rec.run("stats", TransferEncodingError("bad chunk"))
    assert answer.status == 400 and answer.keep_alive is False
    (line,) = rec.lines()
    assert (line["reason"], line["detail"]) == ("bad_request", "malformed HTTP request body (TransferEncodingError)")
    assert rec.refusals("bad_request") == 1 and rec.all_refusals() == 1


def test_a_request_timeout_closes_the_connection(rec: _Setup) -> None:
    answer = rec.run("stats", Refusal(Reason.REQUEST_TIMEOUT, "slow body"))
    assert answer.status == 408 and answer.keep_alive is False
    assert rec.refusals("request_timeout") == 1


@pytest.mark.parametrize(
    ("exc", "stopping", "reason"),
    [
        (ConnectionResetError("reset"), False, "client_gone"),
        (asyncio.CancelledError(), False, "client_gone"),
        (asyncio.CancelledError(), True, "shutdown"),
    ],
)
def test_a_request_that_ends_without_an_answer_is_recorded_once_and_re_raised(
    rec: _Setup, exc: BaseException, stopping: bool, reason: str
) -> None:
    rec.stopping = stopping
    assert rec.run("bundle", exc) is None  # the envelope re-raises it
    (line,) = rec.lines()
    assert (line["outcome"], line["reason"]) == ("aborted", reason)
    assert rec.refusals(reason) == 1 and rec.all_refusals() == 1
    assert rec.requests("bundle", "aborted") == 1


def test_an_unexpected_exception_is_a_500_problem_logged_once(rec: _Setup, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="ota_gateway.http"):
        answer = rec.run("bundle", RuntimeError("kaboom SECRET"))
    assert answer.status == 500 and answer.content_type == "application/problem+json"
    assert b"SECRET" not in answer.body and answer.keep_alive is False
    (line,) = rec.lines()
    assert (line["outcome"], line["reason"], line["detail"]) == ("refused", "internal_error", "internal error")
    assert rec.refusals("internal_error") == 1 and rec.all_refusals() == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


def test_a_low_level_answer_is_one_line_of_the_other_route(rec: _Setup) -> None:
    rec.recorder.low_level("main", "127.0.0.1", 408, Reason.REQUEST_TIMEOUT, "headers too slow")
    (line,) = rec.lines()
    assert (line["route"], line["method"], line["status"], line["reason"], line["peer"]) == (
        "other",
        "-",
        408,
        "request_timeout",
        "127.0.0.1",
    )
    assert rec.refusals("request_timeout") == 1 and rec.all_refusals() == 1
    assert rec.requests("other", "refused") == 1


def _release_metrics(rec: _Setup, version: str) -> tuple[float, float]:
    registry = rec.metrics.registry
    halts = registry.get_sample_value("ota_gateway_release_halts_total", {"app": "com.example.app"}) or 0.0
    labels = {"app": "com.example.app", "version": version}
    return halts, registry.get_sample_value("ota_gateway_release_halted", labels) or 0.0


def test_an_automatic_halt_is_one_release_line_naming_the_device_counted_and_shown(rec: _Setup) -> None:
    rec.recorder.release("HALT", "com.example.app", "1.3.0", "halted automatically", tipped_by=DEVICE.identity)
    (line,) = rec.lines()
    assert (line["route"], line["method"], line["path"], line["app"], line["version"], line["outcome"]) == (
        "release",
        "HALT",
        "/releases/com.example.app/1.3.0",
        "com.example.app",
        "1.3.0",
        "ok",
    )
    assert line["identity_sha256"] == DEVICE.identity.sha256 and line["detail"] == "halted automatically"
    assert _release_metrics(rec, "1.3.0") == (1, 1)
    assert rec.all_refusals() == 0 and rec.requests("other", "ok") == 0  # no request: no request counters


def test_an_operators_halt_and_resume_are_lines_that_move_the_gauge_but_not_the_automatic_count(rec: _Setup) -> None:
    rec.recorder.release("HALT", "com.example.app", "1.3.0", "halted by operator")
    assert _release_metrics(rec, "1.3.0") == (0, 1)
    rec.recorder.release("RESUME", "com.example.app", "1.3.0", "resumed by operator")
    assert _release_metrics(rec, "1.3.0") == (0, 0)
    lines = rec.lines()
    assert [(x["method"], x["detail"], x.get("identity_sha256")) for x in lines] == [
        ("HALT", "halted by operator", None),
        ("RESUME", "resumed by operator", None),
    ]
    assert rec.metrics.halted_versions == {"com.example.app": {"1.3.0"}}  # current_halts keeps this series fresh


def test_halts_read_show_each_named_or_seen_version_as_halted_or_not(rec: _Setup) -> None:
    rec.recorder.halts_read("com.example.app", ("1.3.0",), {"1.2.0": "halted by operator"})
    assert _release_metrics(rec, "1.2.0")[1] == 0  # halted in the store, but neither named nor seen yet: no series
    assert (
        rec.metrics.registry.get_sample_value(
            "ota_gateway_release_halted", {"app": "com.example.app", "version": "1.3.0"}
        )
        == 0
    )  # named by the policy: a series at 0
    rec.recorder.halts_read("com.example.app", ("1.3.0",), {"1.3.0": "halted automatically"})
    assert _release_metrics(rec, "1.3.0") == (0, 1)  # another worker's halt: shown, not counted again here
    rec.recorder.halts_read("com.example.app", (), {})
    assert _release_metrics(rec, "1.3.0") == (0, 0)  # resumed elsewhere: back to 0 on the next read
    assert rec.lines() == []  # a read is no event: no audit line


def test_an_offer_held_back_is_counted_by_cause(rec: _Setup) -> None:
    rec.recorder.held_back("com.example.app", "halted")
    rec.recorder.held_back("com.example.app", "halted")
    rec.recorder.held_back("com.example.app", "not_in_rollout")
    registry = rec.metrics.registry
    name = "ota_gateway_rollout_held_back_total"
    assert registry.get_sample_value(name, {"app": "com.example.app", "cause": "halted"}) == 2
    assert registry.get_sample_value(name, {"app": "com.example.app", "cause": "not_in_rollout"}) == 1
