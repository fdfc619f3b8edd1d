"""Minimum transfer rates: is one side of a transfer (the origin, or the client) too slow?

Owns the rule behind `limits.origin_min_rate`, `limits.client_min_rate` and `limits.rate_window`. A side is too
slow when, after it has had a whole window, it moved fewer than `bytes_per_second * window` bytes in the last
`window` seconds. Only the time the gateway spends *waiting on that side* counts: while a slow client holds back
the origin reads (backpressure), the origin's clock stands still, and the other way round, so one slow side never
gets the other one cut.

Averaging over a window (rather than a timeout per read, which 1 byte every 29 s defeats) is what stops a trickle;
a burst does not buy credit beyond one window. Bytes are kept in `SLOTS` slots per window (bounded memory); a byte
counts until the end of its slot has left the window, so the rule errs by at most one slot on the lenient side.

Pure: the caller passes the byte counts and the times (any monotonic clock, in seconds).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

SLOTS = 20


@dataclass(frozen=True, slots=True)
class MinRate:
    """`bytes_per_second` averaged over `window` seconds of waiting; 0 disables the rule."""

    bytes_per_second: int
    window: float

    def __post_init__(self) -> None:
        if self.bytes_per_second < 0:
            raise ValueError(f"a minimum rate is at least 0 bytes/s, got {self.bytes_per_second}")
        if not self.window > 0:
            raise ValueError(f"the rate window must be positive, got {self.window}")

    @property
    def enabled(self) -> bool:
        return self.bytes_per_second > 0

    @property
    def need(self) -> float:
        """Bytes a side must move per window."""
        return self.bytes_per_second * self.window


class RateMeter:
    """One side of one transfer. Call `wait(now)` when the gateway starts waiting on the side and `moved(n, now)`
    when the side delivered (or accepted) n bytes; ask `too_slow(now)` and `deadline(now)`."""

    def __init__(self, rule: MinRate) -> None:
        self.rule = rule
        self.total = 0
        self._clock = 0.0  # seconds spent waiting on this side, up to the start of the current wait
        self._since: float | None = None  # when the current wait began
        self._slot = rule.window / SLOTS
        self._slots: deque[tuple[float, int]] = deque()  # (end of slot on the waiting clock, bytes), oldest first

    def clock(self, now: float) -> float:
        """Seconds spent waiting on this side so far, the current wait included."""
        return self._clock + (now - self._since if self._since is not None else 0.0)

    def wait(self, now: float) -> None:
        """The gateway starts waiting on this side (a second call during the same wait changes nothing)."""
        if self._since is None:
            self._since = now

    def moved(self, n: int, now: float) -> None:
        """The side moved `n` bytes at `now`; the current wait, if any, ends."""
        self._clock = self.clock(now)
        self._since = None
        if n <= 0:
            return
        self.total += n
        end = math.ceil(self._clock / self._slot) * self._slot
        if self._slots and self._slots[-1][0] >= end:
            last_end, last_n = self._slots.pop()
            self._slots.append((last_end, last_n + n))
        else:
            self._slots.append((end, n))
        while self._slots and self._slots[0][0] <= self._clock - self.rule.window:
            self._slots.popleft()

    def _in_window(self, at: float) -> int:
        return sum(n for end, n in self._slots if end > at - self.rule.window)

    def rate(self, now: float) -> float:
        """Bytes per second over the last window of waiting (over the time waited, if that is shorter)."""
        at = self.clock(now)
        span = min(at, self.rule.window)
        return self._in_window(at) / span if span > 0 else 0.0

    def too_slow(self, now: float) -> bool:
        at = self.clock(now)
        return self.rule.enabled and at >= self.rule.window and self._in_window(at) < self.rule.need

    def deadline(self, now: float) -> float:
        """When (on the caller's clock) the side becomes too slow if the gateway waits on it from `now` on and no
        byte moves; `math.inf` when the rule is disabled."""
        if not self.rule.enabled:
            return math.inf
        at = self.clock(now)
        first = max(at, self.rule.window)  # nobody is judged before a whole window
        held = [(end, n) for end, n in self._slots if end > first - self.rule.window]
        left = sum(n for _, n in held)
        when = first
        for end, n in held:
            if left < self.rule.need:
                break
            left -= n
            when = end + self.rule.window  # this slot leaves the window then
        return now + (max(when, first) - at)
