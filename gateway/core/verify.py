"""The verifier: a state machine that decides which streamed bytes may reach the client.

Owns tail holdback. The expected digest (and size, when known) is fixed before the first byte. Every chunk is
hashed; the previous chunk is released when the next one arrives, so the newest chunk is always held back.
Only `finish()` after a matching digest releases the tail. Any failure (overflow, short body, digest mismatch,
origin error) moves to FAILED and nothing more is ever released, so a client can never hold a complete body
that failed verification. Chunks may be slices of a larger buffer (memoryviews): `detach()` copies the held slice
out, so that the buffer it came from can be freed while the slice waits.

Written as a transition table in the style of h11: `_TRANSITIONS` lists every legal (state, event) pair; an
illegal one raises `VerifierStateError` naming both. Pure: no I/O, no clock, no event loop.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.core.names import is_lower_hex
from gateway.core.reasons import Reason, Refusal


class Digest(Protocol):
    """What the verifier needs of a hash: hashlib's sha256, or one that decrypts first (Capgo bundles)."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class State(enum.Enum):
    STREAMING = "streaming"
    PASSED = "passed"
    FAILED = "failed"


class Event(enum.Enum):
    CHUNK = "chunk"
    END = "end"
    ERROR = "error"


_TRANSITIONS: dict[tuple[State, Event], frozenset[State]] = {
    (State.STREAMING, Event.CHUNK): frozenset({State.STREAMING, State.FAILED}),
    (State.STREAMING, Event.END): frozenset({State.PASSED, State.FAILED}),
    (State.STREAMING, Event.ERROR): frozenset({State.FAILED}),
    # An error reported after the end (the client went away while the tail was written) changes nothing.
    (State.PASSED, Event.ERROR): frozenset({State.PASSED}),
    (State.FAILED, Event.ERROR): frozenset({State.FAILED}),
}


class VerifierStateError(RuntimeError):
    """An event arrived that the current state does not allow: a bug in the caller, never a client's doing."""


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the bytes must be, known before the first byte: lowercase hex SHA-256, and the size if known."""

    sha256: str
    size: int | None = None
    max_bytes: int | None = None  # cap when the size is not known

    def __post_init__(self) -> None:
        if not is_lower_hex(self.sha256, 64):
            raise ValueError(f"expected digest must be 64 lowercase hex characters, got {self.sha256!r}")
        if self.size is not None and self.size <= 0:
            raise ValueError(f"expected size must be positive, got {self.size}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")

    @property
    def limit(self) -> int | None:
        if self.size is not None:
            return self.size if self.max_bytes is None else min(self.size, self.max_bytes)
        return self.max_bytes


class Verifier:
    """Feed it the origin's chunks; send what it returns; call `finish()` at the end for the tail.

    `send_from` supports Range answers: bytes before that offset are hashed but never released.
    """

    def __init__(
        self,
        expect: Expectation,
        *,
        send_from: int = 0,
        digest_factory: Callable[[], Digest] = hashlib.sha256,
    ) -> None:
        if send_from < 0 or (expect.size is not None and send_from >= expect.size):
            raise ValueError(f"send_from {send_from} outside the body")
        self.expect = expect
        self.state = State.STREAMING
        self.reason: Reason | None = None
        self.received = 0
        self.released = 0
        self._send_from = send_from
        self._digest = digest_factory()
        self._held: bytes | memoryview = b""

    def _move(self, event: Event, new: State) -> None:
        allowed = _TRANSITIONS.get((self.state, event))
        if allowed is None or new not in allowed:
            raise VerifierStateError(f"verifier in state {self.state.value} cannot take event {event.value}")
        self.state = new

    def _fail(self, event: Event, reason: Reason, detail: str) -> Refusal:
        self._move(event, State.FAILED)
        self.reason = reason
        self._held = b""
        return Refusal(reason, detail)

    def _sendable(self, chunk: bytes | memoryview, start: int) -> bytes | memoryview:
        """The part of `chunk` (which starts at body offset `start`) at or after `send_from`."""
        if start >= self._send_from:
            return chunk
        cut = self._send_from - start
        return chunk[cut:] if cut < len(chunk) else b""

    def feed(self, chunk: bytes | memoryview) -> bytes | memoryview:
        """Take one chunk from the origin; return the bytes that may be sent now (the previously held ones)."""
        if self.state is not State.STREAMING:
            self._move(Event.CHUNK, State.STREAMING)  # raises with state and event named
        if not chunk:
            return b""
        start = self.received
        self.received += len(chunk)
        limit = self.expect.limit
        if limit is not None and self.received > limit:
            what = "declared size" if self.expect.size == limit else "size limit"
            raise self._fail(Event.CHUNK, Reason.SIZE_EXCEEDED, f"origin sent more than the {what} of {limit} bytes")
        self._digest.update(chunk)
        out = self._held
        self._held = self._sendable(chunk, start)
        self.released += len(out)
        self._move(Event.CHUNK, State.STREAMING)
        return out

    def detach(self) -> None:
        """Hold a copy of the held bytes rather than a view into the caller's buffer (at most one chunk)."""
        if isinstance(self._held, memoryview):
            self._held = bytes(self._held)

    def finish(self) -> bytes | memoryview:
        """The origin's body ended. Return the held tail if everything matches, else raise `Refusal`."""
        if self.expect.size is not None and self.received < self.expect.size:
            raise self._fail(
                Event.END,
                Reason.SHORT_BODY,
                f"origin ended after {self.received} of {self.expect.size} bytes",
            )
        try:
            actual = self._digest.hexdigest()
        except Refusal as refusal:  # a digest that also judges the content (core/digests.ScanningDigest)
            raise self._fail(Event.END, refusal.reason, refusal.detail) from None
        if not hmac.compare_digest(actual, self.expect.sha256):
            raise self._fail(
                Event.END,
                Reason.CHECKSUM_MISMATCH,
                f"sha256 {actual} does not match expected {self.expect.sha256}",
            )
        self._move(Event.END, State.PASSED)
        out, self._held = self._held, b""
        self.released += len(out)
        return out

    def error(self, reason: Reason, detail: str) -> Refusal:
        """The transfer broke outside the verifier (origin error, timeout, client gone). Nothing more is released."""
        if self.state is State.STREAMING:
            return self._fail(Event.ERROR, reason, detail)
        self._move(Event.ERROR, self.state)
        return Refusal(self.reason or reason, detail)
