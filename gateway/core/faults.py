"""The health of something the gateway writes to on every request (the state store, the audit log).

Owns two decisions: whether the dependency is failing (from the first failed operation until one succeeds; /readyz
reports it meanwhile), and when a failure is worth a log line. A store that fails on every request must not write
a log line per request: the first failure is logged at once, then at most one line per `interval` seconds naming
how many failures went unreported since the last line; the recovery is logged once, at most once per `interval`
too, so a dependency that flaps cannot flood the log either.

Pure: the caller passes the monotonic time and writes the returned lines; nothing here reads a clock or logs.
"""

from __future__ import annotations

from dataclasses import dataclass

LOG_INTERVAL = 60.0


@dataclass
class Fault:
    """One dependency's failure state; `failed`/`succeeded` return the line to log now, or None."""

    name: str
    interval: float = LOG_INTERVAL
    failing: bool = False
    since: float = 0.0  # monotonic time the current failure began
    detail: str = ""  # the last failure's message
    failures: int = 0  # failed operations in the current failure
    _failure_logged: float | None = None
    _recovery_logged: float | None = None
    _unreported: int = 0

    def failed(self, now: float, detail: str) -> str | None:
        """Count one failed operation."""
        if not self.failing:
            self.failing, self.since, self.failures = True, now, 0
        self.failures += 1
        self.detail = detail
        self._unreported += 1
        if self._failure_logged is not None and now - self._failure_logged < self.interval:
            return None
        count, self._unreported, self._failure_logged = self._unreported, 0, now
        more = f" ({count} failed operations since the last report)" if count > 1 else ""
        return f"{self.name} failing: {detail}{more}"

    def succeeded(self, now: float) -> str | None:
        """Record one successful operation: the end of a failure, if there was one."""
        if not self.failing:
            return None
        self.failing = False
        if self._recovery_logged is not None and now - self._recovery_logged < self.interval:
            return None
        self._recovery_logged = now
        return f"{self.name} recovered after {now - self.since:.1f} s and {self.failures} failed operation(s)"

    def describe(self, now: float) -> str:
        """The /readyz line while failing."""
        return f"{self.name} failing for {now - self.since:.0f} s ({self.failures} failed operations): {self.detail}"
