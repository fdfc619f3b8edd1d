"""Version order for bundles: semantic versions (via the `semver` library), plus Capgo's `builtin`.

Owns parsing and comparing the versions that devices report and origins offer. `builtin` (the bundle shipped in
the store binary) is older than every version. Anything else must be a strict semantic version (MAJOR.MINOR.PATCH,
optional pre-release and build; no leading `v`); an unparsable version raises `VersionError` and is refused by the
caller, never guessed at. Build metadata does not take part in the order (SemVer 2.0.0 section 10).
"""

from __future__ import annotations

from functools import lru_cache, total_ordering

import semver

BUILTIN = "builtin"
MAX_LENGTH = 64


class VersionError(ValueError):
    """A version string that is neither `builtin` nor a semantic version."""


@total_ordering
class BundleVersion:
    """A parsed bundle version; `builtin` sorts below everything else."""

    __slots__ = ("_key", "_semver", "text")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text:
            raise VersionError(f"not a version: {text!r}")
        if len(text) > MAX_LENGTH:
            raise VersionError(f"a version has at most {MAX_LENGTH} characters, this one {len(text)}: {text[:80]!r}")
        self.text = text
        if text == BUILTIN:
            self._semver: semver.Version | None = None
            self._key: _Key | None = None
            return
        try:
            self._semver = semver.Version.parse(text)
        except (ValueError, TypeError):
            raise VersionError(f"not a semantic version (MAJOR.MINOR.PATCH): {text!r}") from None
        self._key = _order_key(self._semver)

    @property
    def is_builtin(self) -> bool:
        return self._semver is None

    @property
    def major(self) -> int | None:
        return None if self._semver is None else int(self._semver.major)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BundleVersion):
            return NotImplemented
        return self._key == other._key

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, BundleVersion):
            return NotImplemented
        mine, theirs = self._key, other._key
        if mine is None:
            return theirs is not None
        if theirs is None:
            return False
        return mine < theirs

    def __hash__(self) -> int:
        return hash(BUILTIN) if self._key is None else hash(self._key)

    def __repr__(self) -> str:
        return f"BundleVersion({self.text!r})"

    def __str__(self) -> str:
        return self.text


_Key = tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]


def _prerelease_key(identifier: str) -> tuple[int, int, str]:
    """semver's own order of one pre-release identifier (`semver.Version._nat_cmp`, semver 3.0): numeric ones by
    value and below alphanumeric ones, those in ASCII order."""
    if not identifier.isdigit():
        return (1, 0, identifier)
    if not identifier.isascii():
        identifier = str(int(identifier))
    normalized = identifier.lstrip("0") or "0"
    return (0, len(normalized), normalized)


def _order_key(version: semver.Version) -> _Key:
    """A tuple that sorts as `semver.Version.compare` orders (SemVer 2.0.0 section 11; build metadata left out),
    made once per parse: comparing two versions is then a tuple comparison, not semver's compare (which builds
    tuples and splits pre-release strings on every call). `tests/core/test_versions.py` checks the two orders
    agree on every pair of a list of edge cases."""
    major, minor, patch = int(version.major), int(version.minor), int(version.patch)
    pre = version.prerelease
    if not pre:
        return (major, minor, patch, 1, ())
    return (major, minor, patch, 0, tuple(_prerelease_key(part) for part in pre.split(".")))


def parse(text: str) -> BundleVersion:
    """Parse a version; raise `VersionError` if it is neither `builtin` nor a semantic version. Cached (a
    `BundleVersion` is never changed): an update check compares the same few versions several times, and semver's
    parser costs a few microseconds each time. A refused text is not cached (the error is raised anew)."""
    if not isinstance(text, str):
        return BundleVersion(text)  # raises VersionError (and is no key for the cache)
    return _parse(text)


@lru_cache(maxsize=4096)
def _parse(text: str) -> BundleVersion:
    return BundleVersion(text)


def is_valid(text: str) -> bool:
    try:
        parse(text)
    except VersionError:
        return False
    return True


def newest(texts: list[str] | tuple[str, ...]) -> str | None:
    """The highest parsable version among `texts` (unparsable ones are skipped), or None."""
    best: BundleVersion | None = None
    for text in texts:
        try:
            candidate = parse(text)
        except VersionError:
            continue
        if best is None or candidate > best:
            best = candidate
    return None if best is None else best.text


def major_jump(current: BundleVersion, offered: BundleVersion) -> int:
    """How many major versions `offered` is above `current` (0 when either is `builtin` or it is not higher)."""
    if current.major is None or offered.major is None:
        return 0
    return max(0, offered.major - current.major)
