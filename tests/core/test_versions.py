"""Version order (core/versions.py): semantic versions via `semver`, `builtin` below everything, no guessing."""

from __future__ import annotations

import pytest

from gateway.core.versions import BUILTIN, BundleVersion, VersionError, is_valid, major_jump, newest, parse


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("1.0.0", "1.0.1"),
        ("1.0.9", "1.0.10"),  # numeric, not lexical
        ("1.2.0-beta.1", "1.2.0"),  # a pre-release is below its release
        ("1.2.0-beta.2", "1.2.0-beta.10"),
        ("1.2.0-alpha", "1.2.0-beta"),
        (BUILTIN, "0.0.1"),
        (BUILTIN, "0.0.0-0"),
    ],
)
def test_order(lower: str, higher: str) -> None:
    assert parse(lower) < parse(higher)
    assert parse(higher) > parse(lower)
    assert not parse(higher) < parse(lower)


def test_build_metadata_does_not_order() -> None:
    assert parse("1.0.0+a") == parse("1.0.0+b")
    assert not parse("1.0.0+a") < parse("1.0.0+b")
    assert hash(parse("1.0.0+a")) == hash(parse("1.0.0+b"))


def test_builtin_equals_only_itself() -> None:
    assert parse(BUILTIN) == parse(BUILTIN)
    assert parse(BUILTIN) != parse("0.0.0")
    assert parse(BUILTIN).is_builtin and parse(BUILTIN).major is None


@pytest.mark.parametrize(
    "text", ["", "1", "1.0", "v1.0.0", "01.0.0", "1.0.0.0", "latest", "1.0.0-", "x" * 65, "Builtin"]
)
def test_unparsable_versions_are_refused(text: str) -> None:
    with pytest.raises(VersionError):
        parse(text)
    assert not is_valid(text)


def test_newest_skips_unparsable() -> None:
    assert newest(["1.0.0", "1.10.0", "1.9.0", "junk", "2.0.0-rc.1"]) == "2.0.0-rc.1"
    assert newest(["junk"]) is None and newest([]) is None


def test_major_jump() -> None:
    assert major_jump(parse("1.2.3"), parse("3.0.0")) == 2
    assert major_jump(parse("3.0.0"), parse("1.0.0")) == 0
    assert major_jump(parse(BUILTIN), parse("9.0.0")) == 0


def test_comparison_with_other_types_is_refused() -> None:
    with pytest.raises(TypeError):
        _ = parse("1.0.0") < "1.0.1"  # type: ignore[operator]
    assert parse("1.0.0") != "1.0.0"


def test_parsed_versions_are_shared_and_refusals_are_not_cached() -> None:
    assert parse("3.1.4") is parse("3.1.4")  # cached: an update check compares the same versions many times
    for _ in range(2):  # a refused text is refused every time, never remembered as valid
        with pytest.raises(VersionError):
            parse("3.1")
    for junk in (None, 3, ["1.0.0"]):  # not a string (and not hashable, for the list): refused, not a TypeError
        with pytest.raises(VersionError):
            parse(junk)  # type: ignore[arg-type]


_EDGE_VERSIONS = [
    "0.0.0",
    "0.0.1",
    "0.1.0",
    "1.0.0",
    "1.0.0+build.9",
    "1.0.0-0",
    "1.0.0-1",
    "1.0.0-2",
    "1.0.0-10",
    "1.0.0-0.0",
    "1.0.0-a",
    "1.0.0-A",
    "1.0.0--",
    "1.0.0-a-b",
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.2",
    "1.0.0-alpha.10",
    "1.0.0-alpha.beta",
    "1.0.0-alpha.1.1",
    "1.0.0-alpha1",
    "1.0.0-alpha10",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0-rc.1+b",
    "1.0.0-99999999999999999999999",
    "1.0.0-100000000000000000000000",
    "1.0.1",
    "1.1.0",
    "2.0.0",
    "10.0.0",
    "10.2.3-x.7.z.92",
    "99999999999999999999.0.0",
]


def test_the_order_is_semvers_own_on_every_pair() -> None:
    """Versions compare by a key made once per parse; it must order every pair exactly as semver's compare does
    (numeric pre-release parts by value and below alphanumeric ones, a shorter set of equal parts first, a release
    above its pre-releases, build metadata ignored), and equal versions must hash alike. Checked on all pairs,
    both ways round, so a key that gets any one of these wrong fails here."""
    import semver

    texts = [t for t in _EDGE_VERSIONS if semver.Version.is_valid(t)]
    assert len(texts) >= len(_EDGE_VERSIONS) - 1  # the list is made of valid versions
    for a in texts:
        for b in texts:
            expected = semver.Version.parse(a).compare(b)
            va, vb = BundleVersion(a), BundleVersion(b)
            assert ((va < vb), (va == vb), (va > vb)) == (expected < 0, expected == 0, expected > 0), (a, b)
            if expected == 0:
                assert hash(va) == hash(vb)
