"""Release indexes (core/releases.py): parsing, the first problem named by its key path, lookups, round trip."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import pytest
import yaml

from gateway.core.releases import (
    CapgoSignature,
    Release,
    ReleaseIndex,
    ReleaseIndexError,
    index_document,
    parse_index,
)

APP = "com.example.app"
SHA = hashlib.sha256(b"bundle").hexdigest()
CHECKSUM = "ab" * 256
SESSION_KEY = "b3hMblA0bTRvY1Q0akpBZw==:bldQdWc2YVUzcG41clNpSg=="


def release(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"version": "1.0.0", "channel": "production", "file": "1.0.0.zip", "size": 10, "sha256": SHA}
    raw.update(over)
    return raw


def doc(*releases: dict[str, Any], **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"app_id": APP, "releases": list(releases)}
    out.update(over)
    return out


def test_parses_a_full_index() -> None:
    capgo = {"checksum": CHECKSUM, "session_key": SESSION_KEY}
    index = parse_index(
        APP,
        doc(
            release(),
            release(version="1.1.0", channel="beta", file="bundles/1.1.0.enc.zip", size=99, capgo=capgo),
            release(version="2.0.0", capgo=None),
        ),
    )
    assert index.app_id == APP
    assert index.releases == (
        Release("1.0.0", "production", "1.0.0.zip", 10, SHA),
        Release("1.1.0", "beta", "bundles/1.1.0.enc.zip", 99, SHA, CapgoSignature(CHECKSUM, SESSION_KEY)),
        Release("2.0.0", "production", "1.0.0.zip", 10, SHA),
    )


def test_app_id_is_optional_and_releases_may_be_empty() -> None:
    assert parse_index(APP, {"releases": []}) == ReleaseIndex(APP, ())


def test_find() -> None:
    index = parse_index(APP, doc(release(), release(version="1.1.0")))
    found = index.find("1.1.0")
    assert found is not None and found.version == "1.1.0"
    assert index.find("1.0.0") is index.releases[0]
    assert index.find("9.9.9") is None
    assert index.find("1.1.0 ") is None


def test_round_trip_through_yaml_and_json() -> None:
    capgo = {"checksum": CHECKSUM, "session_key": SESSION_KEY}
    index = parse_index(APP, doc(release(), release(version="1.1.0", capgo=capgo)))
    plain = index_document(index)
    assert "capgo" not in plain["releases"][0]
    assert plain["releases"][1]["capgo"] == capgo
    assert parse_index(APP, yaml.safe_load(yaml.safe_dump(plain))) == index
    assert parse_index(APP, json.loads(json.dumps(plain))) == index


def test_parse_does_not_change_its_input() -> None:
    raw = doc(release(), release(version="1.1.0"))
    before = copy.deepcopy(raw)
    parse_index(APP, raw)
    assert raw == before


def _problem(data: Any) -> ReleaseIndexError:
    with pytest.raises(ReleaseIndexError) as info:
        parse_index(APP, data)
    return info.value


@pytest.mark.parametrize(
    ("data", "key_path", "message"),
    [
        (None, "", "an index is a mapping"),
        ([], "", "an index is a mapping"),
        ("releases: []", "", "an index is a mapping"),
        ({"releases": [], "extra": 1}, "", "an index is a mapping"),
        (doc(app_id="com.other.app"), "app_id", "not 'com.example.app'"),
        ({"app_id": APP}, "releases", "must be a list"),
        (doc(releases={"1.0.0": release()}), "releases", "must be a list"),
        ({"releases": ["1.0.0"]}, "releases[0]", "must be a mapping"),
        (doc(release(colour="blue")), "releases[0].colour", "unknown key"),
        (doc(release(), {k: v for k, v in release().items() if k != "sha256"}), "releases[1].sha256", "missing"),
        (doc({k: v for k, v in release().items() if k != "size"}), "releases[0].size", "missing"),
        (doc(release(version="../1.0.0")), "releases[0].version", "not a valid version"),
        (doc(release(version=1.0)), "releases[0].version", "not a valid version"),
        (doc(release(version="1.0.0\n")), "releases[0].version", "not a valid version"),
        (doc(release(channel="be ta")), "releases[0].channel", "not a valid channel"),
        (doc(release(channel=None)), "releases[0].channel", "not a valid channel"),
        (doc(release(file="../secret.zip")), "releases[0].file", "relative file name"),
        (doc(release(file="/etc/passwd")), "releases[0].file", "relative file name"),
        (doc(release(file="a\\b.zip")), "releases[0].file", "relative file name"),
        (doc(release(file="")), "releases[0].file", "relative file name"),
        (doc(release(file=["x.zip"])), "releases[0].file", "relative file name"),
        (doc(release(size=0)), "releases[0].size", "positive integer"),
        (doc(release(size=-1)), "releases[0].size", "positive integer"),
        (doc(release(size="10")), "releases[0].size", "positive integer"),
        (doc(release(size=10.0)), "releases[0].size", "positive integer"),
        (doc(release(size=True)), "releases[0].size", "positive integer"),
        (doc(release(sha256=SHA.upper())), "releases[0].sha256", "64 lowercase hex"),
        (doc(release(sha256=SHA[:-1])), "releases[0].sha256", "64 lowercase hex"),
        (doc(release(sha256="sha256:" + SHA)), "releases[0].sha256", "64 lowercase hex"),
        (doc(release(sha256=None)), "releases[0].sha256", "64 lowercase hex"),
        (doc(release(capgo="x")), "releases[0].capgo", "exactly checksum and session_key"),
        (doc(release(capgo={"checksum": CHECKSUM})), "releases[0].capgo", "exactly checksum and session_key"),
        (
            doc(release(capgo={"checksum": CHECKSUM, "session_key": SESSION_KEY, "x": 1})),
            "releases[0].capgo",
            "exactly checksum and session_key",
        ),
        (
            doc(release(capgo={"checksum": CHECKSUM[:-2], "session_key": SESSION_KEY})),
            "releases[0].capgo.checksum",
            "512 lowercase hex",
        ),
        (
            doc(release(capgo={"checksum": CHECKSUM.upper(), "session_key": SESSION_KEY})),
            "releases[0].capgo.checksum",
            "512 lowercase hex",
        ),
        (
            doc(release(capgo={"checksum": CHECKSUM, "session_key": "no-colon"})),
            "releases[0].capgo.session_key",
            "<iv base64>:<rsa block base64>",
        ),
        (
            doc(release(capgo={"checksum": CHECKSUM, "session_key": "a:b:c"})),
            "releases[0].capgo.session_key",
            "<iv base64>:<rsa block base64>",
        ),
        (
            doc(release(capgo={"checksum": CHECKSUM, "session_key": ":b"})),
            "releases[0].capgo.session_key",
            "<iv base64>:<rsa block base64>",
        ),
        (
            doc(release(capgo={"checksum": CHECKSUM, "session_key": 5})),
            "releases[0].capgo.session_key",
            "<iv base64>:<rsa block base64>",
        ),
        (doc(release(), release(file="other.zip")), "releases[1].version", "listed twice"),
    ],
)
def test_the_first_problem_is_named_by_its_key_path(data: Any, key_path: str, message: str) -> None:
    problem = _problem(data)
    assert problem.key_path == key_path
    assert message in problem.message
    assert str(problem) == f"{key_path}: {problem.message}"


def test_a_release_index_error_is_a_value_error() -> None:
    assert issubclass(ReleaseIndexError, ValueError)


def test_models_are_frozen() -> None:
    index = parse_index(APP, doc(release()))
    with pytest.raises(AttributeError):
        index.releases[0].size = 11  # type: ignore[misc]
    with pytest.raises(AttributeError):
        index.app_id = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    "data",
    [
        doc(release(version="1" * 100_000)),
        doc(release(channel="c" * 100_000)),
        doc(release(file="/" * 100_000)),
        doc(release(size="9" * 100_000)),
        doc(release(**{"k" * 100_000: 1})),
        doc(app_id="com." + "a" * 100_000),
    ],
)
def test_an_error_quotes_at_most_a_short_piece_of_the_index(data: Any) -> None:
    """An index is an origin's (up to 4 MiB): the value an error quotes is cut, so that a detail, an audit line and
    /readyz stay short. The twin: a short value is quoted whole (the cases above)."""
    problem = _problem(data)
    assert len(str(problem)) < 200, str(problem)[:300]
    assert len(str(_problem(doc(release(version="1.0.0\n" + "x" * 40))))) > 60  # quoted whole
