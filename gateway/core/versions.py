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

    __slots__ = ("_semver", "text")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text:
            raise VersionError(f"not a version: {text!r}")
        if len(text) > MAX_LENGTH:
            raise VersionError(f"a version has at most {MAX_LENGTH} characters, this one {len(text)}: {text[:80]!r}")
        self.text = text
        if text == BUILTIN:
            self._semver: semver.Version | None = None
            return
        try:
            self._semver = semver.Version.parse(text)
        except (ValueError, TypeError):
            raise VersionError(f"not a semantic version (MAJOR.MINOR.PATCH): {text!r}") from None

    @property
    def is_builtin(self) -> bool:
        return self._semver is None

    @property
    def major(self) -> int | None:
        return None if self._semver is None else int(self._semver.major)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BundleVersion):
            return NotImplemented
        mine, theirs = self._semver, other._semver
        if mine is None or theirs is None:
            return mine is theirs
        return bool(mine.compare(theirs) == 0)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, BundleVersion):
            return NotImplemented
        mine, theirs = self._semver, other._semver
        if mine is None:
            return theirs is not None
        if theirs is None:
            return False
        return bool(mine.compare(theirs) < 0)

    def __hash__(self) -> int:
        if self._semver is None:
            return hash(BUILTIN)
        return hash(self._semver.replace(build=None))

    def __repr__(self) -> str:
        return f"BundleVersion({self.text!r})"

    def __str__(self) -> str:
        return self.text


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
