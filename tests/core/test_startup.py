"""Start-up problem messages and the supervisor's restart verdicts (core/startup.py)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from gateway.core.startup import (
    RestartPolicy,
    after_crash,
    after_failed_start,
    bind_problem,
    endpoints_overlap,
    file_problem,
    sqlite_header_problem,
)

USER = "otagw (uid 10001)"


def test_port_in_use_names_the_address_and_what_to_do() -> None:
    msg = bind_problem("127.0.0.1", 8443, errno.EADDRINUSE, "Address already in use", USER)
    assert msg.startswith("127.0.0.1:8443 is already in use")
    assert "choose another port" in msg


def test_privileged_port_names_the_user() -> None:
    msg = bind_problem("0.0.0.0", 443, errno.EACCES, "Permission denied", USER)
    assert USER in msg and "CAP_NET_BIND_SERVICE" in msg


def test_ipv6_address_is_bracketed() -> None:
    assert bind_problem("::1", 8443, errno.EADDRINUSE, "", USER).startswith("[::1]:8443 ")


def test_other_bind_errors_keep_the_system_text() -> None:
    assert bind_problem("127.0.0.1", 1, errno.EINVAL, "Invalid argument", USER).endswith(": Invalid argument")


def test_permission_denied_names_path_user_and_blocking_folder() -> None:
    key, folder = "/etc/ota/certs/server.key", "/etc/ota/certs"
    msg = file_problem("cannot read", key, errno.EACCES, "Permission denied", USER, folder)
    assert "/etc/ota/certs/server.key" in msg and USER in msg and "cannot enter the folder /etc/ota/certs" in msg
    plain = file_problem("cannot write into", "/var/lib/ota", errno.EACCES, "Permission denied", USER)
    assert "cannot enter" not in plain and "permission denied for otagw" in plain


@pytest.mark.parametrize(
    ("err", "words"),
    [(errno.EROFS, "read-only"), (errno.ENOENT, "no such file"), (errno.ENOSPC, "no space"), (errno.EIO, "I/O err")],
)
def test_file_problems_say_what_happened(err: int, words: str) -> None:
    assert words in file_problem("cannot open", "/x", err, "I/O error", USER)


def test_backoff_doubles_within_the_window_and_gives_up_at_the_limit() -> None:
    policy = RestartPolicy(max_crashes=5, window=60.0, first_delay=0.5, max_delay=30.0)
    history: tuple[float, ...] = ()
    delays = []
    for now in (100.0, 101.0, 102.0, 103.0):
        verdict = after_crash(policy, history, now)
        assert verdict.restart
        delays.append(verdict.delay)
        history = verdict.history
    assert delays == [0.5, 1.0, 2.0, 4.0]
    last = after_crash(policy, history, 104.0)
    assert not last.restart and last.crashes == 5


def test_deaths_outside_the_window_are_forgotten() -> None:
    policy = RestartPolicy(max_crashes=2, window=10.0)
    first = after_crash(policy, (), 0.0)
    assert first.restart
    later = after_crash(policy, first.history, 10.5)  # the first death is older than the window
    assert later.restart and later.crashes == 1 and later.delay == 0.5
    soon = after_crash(policy, later.history, 11.0)
    assert not soon.restart


def test_delay_is_capped() -> None:
    policy = RestartPolicy(max_crashes=100, window=1000.0, first_delay=1.0, max_delay=3.0)
    history: tuple[float, ...] = ()
    for now in range(10):
        verdict = after_crash(policy, history, float(now))
        history = verdict.history
    assert verdict.delay == 3.0


def test_one_crash_limit_stops_at_the_first_death() -> None:
    assert not after_crash(RestartPolicy(max_crashes=1), (), 5.0).restart


@pytest.mark.parametrize("kwargs", [{"max_crashes": 0}, {"window": 0}, {"first_delay": 5, "max_delay": 1}])
def test_nonsense_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("127.0.0.1", 8443), ("127.0.0.1", 8443)),
        (("0.0.0.0", 8443), ("127.0.0.1", 8443)),
        (("127.0.0.1", 8443), ("0.0.0.0", 8443)),
        (("::", 8443), ("::1", 8443)),
        (("localhost", 8443), ("127.0.0.1", 8443)),
        (("localhost", 8443), ("::1", 8443)),
        (("0.0.0.0", 8443), ("localhost", 8443)),
    ],
)
def test_listeners_that_take_the_same_port_overlap(a: tuple[str, int], b: tuple[str, int]) -> None:
    assert endpoints_overlap(a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("127.0.0.1", 8443), ("127.0.0.1", 8444)),  # another port
        (("127.0.0.1", 8443), ("127.0.0.2", 8443)),  # another address
        (("0.0.0.0", 8443), ("::", 8443)),  # IPv6 sockets are IPv6-only
        (("::", 8443), ("127.0.0.1", 8443)),
        (("localhost", 8443), ("127.0.0.2", 8443)),
        (("0.0.0.0", 8443), ("0.0.0.0", 9443)),
    ],
)
def test_listeners_on_other_ports_or_addresses_do_not_overlap(a: tuple[str, int], b: tuple[str, int]) -> None:
    assert not endpoints_overlap(a, b)


def test_a_replacement_that_cannot_start_is_tried_again_while_a_worker_serves() -> None:
    policy = RestartPolicy(first_delay=0.5, max_delay=30.0)
    delays = [after_failed_start(policy, failures, serving=1) for failures in range(1, 10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_replacement_that_cannot_start_with_no_worker_serving_stops_the_server() -> None:
    policy = RestartPolicy()
    assert after_failed_start(policy, 1, serving=0) is None
    assert after_failed_start(policy, 7, serving=0) is None


def _sqlite_file(tmp_path: Path) -> bytes:
    import sqlite3

    path = tmp_path / "s.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    return path.read_bytes()


def test_a_sqlite_file_or_an_empty_one_has_no_header_problem(tmp_path: Path) -> None:
    data = _sqlite_file(tmp_path)
    assert sqlite_header_problem(data[:100], len(data)) is None
    assert sqlite_header_problem(b"", 0) is None  # SQLite makes an empty file a new database


def test_what_is_not_a_whole_sqlite_file_is_named(tmp_path: Path) -> None:
    data = _sqlite_file(tmp_path)
    assert sqlite_header_problem(b"garbage" * 20, 8192) == "it is not a SQLite database"
    assert sqlite_header_problem(b"SQLite format 3\x00xyz", 19) == "it is not a SQLite database"
    assert "damaged" in (sqlite_header_problem(data[:100], len(data) - 100) or "")  # cut inside a page
    bad_page = data[:16] + (1000).to_bytes(2, "big") + data[18:100]
    assert "damaged" in (sqlite_header_problem(bad_page, len(data)) or "")


def test_a_server_certificates_dates_are_an_error_when_clients_refuse_it_and_a_warning_when_it_ends_soon() -> None:
    import datetime as dt

    from gateway.core.startup import EXPIRY_WARNING_DAYS, validity_problem

    now = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)
    day = dt.timedelta(days=1)
    expired = validity_problem("s.pem", now - 30 * day, now - day, now)
    assert expired is not None and expired[0] and "s.pem: the certificate expired (valid from 2026-11-03" in expired[1]
    future = validity_problem("s.pem", now + day, now + 400 * day, now)
    assert future is not None and future[0] and "not valid yet" in future[1]
    soon = validity_problem("s.pem", now - day, now + (EXPIRY_WARNING_DAYS - 1) * day, now)
    assert soon is not None and not soon[0] and "expires in 13.0 days" in soon[1]
    assert validity_problem("s.pem", now - day, now + (EXPIRY_WARNING_DAYS + 1) * day, now) is None
