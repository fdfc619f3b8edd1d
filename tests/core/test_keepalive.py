"""The keep-alive decision at the end of a declared body (core/keepalive.py): a connection goes back to the pool
only when nothing came or waits after the body and the origin did not announce its close."""

from __future__ import annotations

import itertools

import pytest

from gateway.core.keepalive import AfterBody, after_body


@pytest.mark.parametrize(("close_announced", "pending", "watched"), list(itertools.product((False, True), repeat=3)))
def test_bytes_in_the_same_read_are_an_overrun(close_announced: bool, pending: bool, watched: bool) -> None:
    decision = after_body(extra=1, close_announced=close_announced, pending=pending, watched=watched)
    assert decision is AfterBody.OVERRUN


@pytest.mark.parametrize("watched", [False, True])
def test_a_clean_end_goes_back_to_the_pool(watched: bool) -> None:
    assert after_body(extra=0, close_announced=False, pending=False, watched=watched) is AfterBody.POOL


@pytest.mark.parametrize(("close_announced", "pending"), [(True, False), (False, True), (True, True)])
def test_a_bundle_waits_for_the_end_when_more_may_come(close_announced: bool, pending: bool) -> None:
    assert after_body(extra=0, close_announced=close_announced, pending=pending, watched=True) is AfterBody.WAIT
    # the twin: an answer whose body is not held (an index, an API call) is only kept out of the pool
    assert after_body(extra=0, close_announced=close_announced, pending=pending, watched=False) is AfterBody.DROP
