"""Origin keep-alive: what becomes of an HTTPS origin connection once an answer's declared body has been read.

Owns one decision, taken at the instant the last byte of a Content-Length body reaches the gateway and before the
connection can go back to the pool:

- bytes already came past the declared length (in the same read): `OVERRUN` (a bundle is `size_exceeded`; the
  connection is dropped, what followed is never parsed);
- a bundle GET whose origin announced its close (`Connection: close`, HTTP/1.0), or whose socket already holds
  unread bytes (or its end of stream): `WAIT`, the body ends only at the origin's end of stream, more bytes
  (`OVERRUN`) or `close_grace` seconds of silence, and the connection is never reused;
- any other answer with unread bytes waiting or an announced close: `DROP` (never reused, nothing to wait for);
- nothing more had arrived: `POOL`, the answer is complete and its connection may carry the next request.

Bytes that arrive on a pooled connection later, before its next request is sent, are an overrun too (counted and
the connection dropped); the shell watches for them. They cannot change a bundle that was already verified: it was
hashed over exactly its declared length.

Pure: the shell passes what it saw; nothing here reads a socket.
"""

from __future__ import annotations

from enum import Enum


class AfterBody(Enum):
    POOL = "pool"
    WAIT = "wait"
    DROP = "drop"
    OVERRUN = "overrun"


def after_body(*, extra: int, close_announced: bool, pending: bool, watched: bool) -> AfterBody:
    """The fate of a connection at the end of a declared body. `extra`: bytes that came after it in the same read;
    `close_announced`: the origin said it closes; `pending`: unread bytes (or the end of stream) wait in the socket;
    `watched`: the answer is a bundle's, whose last bytes are held until this is known."""
    if extra:
        return AfterBody.OVERRUN
    if close_announced or pending:
        return AfterBody.WAIT if watched else AfterBody.DROP
    return AfterBody.POOL
