"""The audit writer on a real full filesystem (a small tmpfs filled to its last page): whole lines or none, every
lost line counted, one log line for many failures, and an `audit_gap` record once the disk has room again."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.audit import AuditLog, AuditRecord
from tests.support import fill_up, small_filesystem


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_filesystem(tmp_path / "disk", "64k") as mounted:
        yield mounted


def _record(i: int) -> AuditRecord:
    return AuditRecord(route="updates", method="POST", path="/updates", status=200, detail="x" * 300 + str(i))


def _lines(path: Path) -> list[dict[str, object]]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"the file ends in a partial line: {data[-80:]!r}"
    return [json.loads(line) for line in data.splitlines()]  # a torn line would not parse


def test_the_filled_filesystem_gives_short_writes(disk: Path) -> None:
    """What the writer must survive: on this filesystem a plain write of a line is cut at the last free page."""
    path = disk / "plain.log"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b"a" * 100)
        fill_up(disk)
        line = b"b" * 5000 + b"\n"  # longer than what is left of the file's last page
        written = os.write(fd, line)
        assert 0 < written < len(line)  # a partial line: exactly what the audit writer must not leave behind
    finally:
        os.close(fd)


def test_a_full_disk_loses_whole_lines_counted_logged_once(disk: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = disk / "audit.log"
    failures = []
    audit = AuditLog(str(path), on_failure=lambda: failures.append(1))
    try:
        audit.write(_record(0))
        filler = fill_up(disk)
        size_before = path.stat().st_size
        with caplog.at_level(logging.WARNING, logger="ota_gateway.audit"):
            written = 1
            for i in range(1, 40):  # the last page's free bytes take a few lines, then a line is cut, then none fit
                audit.write(_record(i))
                if audit.failing:
                    break
                written += 1
            assert audit.failing, "the disk never filled"
            for i in range(100, 105):
                audit.write(_record(i))
            lost = 1 + 5
            assert len(failures) == lost
            assert path.stat().st_size > size_before or written == 1
            lines = _lines(path)  # whole lines only: the cut line was taken back
            assert [line["detail"] for line in lines] == ["x" * 300 + str(i) for i in range(written)]
            failing_lines = [r for r in caplog.records if "audit log failing" in r.getMessage()]
            assert len(failing_lines) == 1 and "short write" in failing_lines[0].getMessage()

            filler.unlink()  # room again: the next line is preceded by a record of the gap
            audit.write(_record(200))
            assert not audit.failing
            assert any("audit log recovered" in r.getMessage() for r in caplog.records)
        tail = _lines(path)[written:]
        assert tail[0]["event"] == "audit_gap" and tail[0]["lost"] == lost and tail[0]["since"]
        assert tail[1]["detail"] == "x" * 300 + "200" and len(tail) == 2
        assert len(failures) == lost  # nothing more lost
    finally:
        audit.close()


def test_probe_writes_the_gap_record_without_a_request(disk: Path) -> None:
    path = disk / "audit.log"
    audit = AuditLog(str(path))
    try:
        filler = fill_up(disk)
        audit.write(_record(1))  # a new file on a full disk: not even the first byte fits
        assert audit.failing and path.read_bytes() == b""
        audit.probe()  # still full: still failing, nothing written
        assert audit.failing and path.read_bytes() == b""
        filler.unlink()
        audit.probe()
        assert not audit.failing
        [gap] = _lines(path)
        assert gap["event"] == "audit_gap" and gap["lost"] == 1
        audit.probe()  # healthy: a probe writes nothing
        assert len(_lines(path)) == 1
    finally:
        audit.close()


def test_healthy_disk_writes_every_line_and_no_gap(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    failures = []
    audit = AuditLog(str(path), on_failure=lambda: failures.append(1))
    for i in range(50):
        audit.write(_record(i))
    audit.probe()
    audit.close()
    lines = _lines(path)
    assert len(lines) == 50 and not failures and all("event" not in line for line in lines)


def test_a_gap_record_in_the_last_free_bytes_is_not_a_recovery(disk: Path) -> None:
    """200 bytes free after a lost 400-byte line: the bare gap record would fit, but the probe only ends the
    failure (and fail_closed's refusals) once a line of the size that failed fits again."""
    path = disk / "audit.log"
    empty = json.dumps({"route": "other", "detail": ""})
    path.write_text(json.dumps({"route": "other", "detail": "x" * (4096 - 200 - 1 - len(empty))}) + "\n")
    assert path.stat().st_size == 4096 - 200
    audit = AuditLog(str(path))
    try:
        filler = fill_up(disk)
        audit.write(_record(1))  # ~400 bytes: cut at 200, taken back
        assert audit.failing and path.stat().st_size == 4096 - 200
        for _ in range(3):
            audit.probe()
        assert audit.failing and path.stat().st_size == 4096 - 200  # nothing written, not even the gap record
        filler.unlink()
        audit.probe()
        assert not audit.failing
        gap = _lines(path)[-1]
        assert gap["event"] == "audit_gap" and gap["lost"] == 1
    finally:
        audit.close()


def _every_kind() -> AuditRecord:
    record = AuditRecord(route="bundle", method="GET", path='/b/"q"\\\u00e9\x01\u2028/1.0.zip', status=206, bytes=0)
    record.detail, record.peer, record.duration_ms = "line\nbreak \ud7ff \U0001f600", "::1", 1.5e-7
    record.identity_subject = "CN=d\u00e9vice,O=\u4f8b"
    return record


def test_a_line_is_the_compact_json_of_its_fields_character_for_character(tmp_path: Path) -> None:
    """The line is built field by field (strings escaped by json's own C escaper); it must be exactly the text
    json.dumps gives for the record's non-None fields, in order: quotes, backslashes, control and non-ASCII
    characters escaped, ints and floats as JSON writes them, None left out."""
    path = tmp_path / "audit.log"
    audit = AuditLog(str(path))
    record = _every_kind()
    audit.write(record)
    audit.close()
    line = path.read_bytes()
    fields = {k: v for k, v in vars(record).items() if v is not None}
    assert line == json.dumps(fields, separators=(",", ":")).encode() + b"\n"
    assert json.loads(line) == fields and line.isascii()


def test_a_field_of_another_type_still_gives_the_same_json_text(tmp_path: Path) -> None:
    """Twin: values the field-by-field path does not take (a bool, an int subclass, a str subclass) go through
    the generic encoder and still give json.dumps's text, not Python's repr."""

    class Status(int):
        pass

    class Text(str):
        pass

    path = tmp_path / "audit.log"
    audit = AuditLog(str(path))
    record = _every_kind()
    record.status, record.bytes, record.app = Status(416), True, Text("com.example.app")  # type: ignore[assignment]
    audit.write(record)
    audit.close()
    fields = {k: v for k, v in vars(record).items() if v is not None}
    assert path.read_bytes() == json.dumps(fields, separators=(",", ":")).encode() + b"\n"
    assert json.loads(path.read_bytes())["bytes"] is True
