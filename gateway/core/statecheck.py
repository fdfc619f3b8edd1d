"""What a request asks of the state store in one trip, and what it makes of the answer.

Owns the decisions around the store's rate-limit counters and channel high-water marks; the stores
(`gateway/state.py`) only execute them:
- the fixed rate-limit window a request falls in, and whether a count is over the limit (`window_start`,
  `retry_after`);
- the new high-water mark for an offer (`raised`: only up, but for a rollback the policy allows);
- what one trip does (`Trip`): count the request against its rate limit and, in the same trip, read the channel's
  high-water mark that the review will need. The mark is read only when it will be used: not for a request over
  its limit, and not after a failed count that refuses the request (`state.rate_limit_on_failure: fail_closed`);
- whether an offer must still be recorded after the review (`must_record`): only when it moves the mark read in
  that trip. Marks only rise (but for a rollback), so an offer at or below the mark it was reviewed against is
  already covered by it: the offer takes effect at that read, and the usual check (the channel's newest release
  offered again, or a device already up to date) costs the store one trip. An offer that raises the mark (the
  first of a new release) or lowers it takes a second trip, which compares again under the store's write lock.

Pure: the caller passes the clock; errors are data (`TripResult`), raised by the shell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.core.versions import VersionError, parse


def window_start(now: float, window: float) -> float:
    """The start of the fixed `window`-second window that `now` falls in."""
    return math.floor(now / window) * window


def retry_after(count: int, limit: int, start: float, window: float, now: float) -> float | None:
    """None if `count` requests are within `limit` for the window that began at `start`; else whole seconds (at
    least 1) until the window ends."""
    return None if count <= limit else max(1.0, math.ceil(start + window - now))


def raised(current: str | None, version: str, lower: bool) -> str | None:
    """The new mark after offering `version` (with `lower`: a rollback the policy allows), or None to keep the
    current one."""
    if current is None or lower:
        return version
    try:
        return version if parse(version) > parse(current) else None
    except VersionError:  # a mark written by something else: replace it with a version that parses
        return version


def must_record(read: str | None, version: str, lower: bool) -> bool:
    """Whether an offer of `version`, reviewed against the mark `read` in this request's trip, must still be
    recorded: only if it would change that mark (a rollback always is)."""
    return raised(read, version, lower) is not None


@dataclass(frozen=True, slots=True)
class Trip:
    """One request's trip to the store: count it under `key` (at most `limit` per `window` seconds at `now`), and
    read the high-water mark of `mark` (app id, channel) if given. `read_after_failed_count`: whether a count the
    store failed to make lets the request go on (the rate limit fails open), so that the mark is still needed."""

    key: str
    limit: int
    window: float
    now: float
    mark: tuple[str, str] | None = None
    read_after_failed_count: bool = True

    def reads_mark(self, *, counted: bool, retry: float | None) -> bool:
        """Whether the trip goes on to read the mark, after a count that succeeded (`counted`, with `retry`) or
        failed."""
        if self.mark is None:
            return False
        if not counted:
            return self.read_after_failed_count
        return retry is None


@dataclass(frozen=True, slots=True)
class TripResult:
    """What a trip found: the count's verdict (`retry`: None within the limit, else seconds to wait) or the error
    that failed it, and the mark read (None: no mark yet, or not read) or the error that failed the read."""

    retry: float | None = None
    count_error: BaseException | None = None
    mark: str | None = None
    mark_read: bool = False
    mark_error: BaseException | None = None
