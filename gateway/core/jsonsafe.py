"""Bounded JSON parsing for bytes that come from outside (client bodies, origin answers).

Pure: no I/O. `json.loads` recurses once per nesting level, so a body nested ~1,000 deep raises RecursionError
(an unexpected 500) and a deep but smaller one costs stack; a body that is too large costs memory before anyone
looks at it. `loads_bounded` checks size and nesting depth first, with one linear scan that never recurses, and
only then parses. Every rejection is a `JsonRejected` (a ValueError): callers turn it into their own refusal
(`bad_request` / `invalid_request` for a client, `origin_error` for an origin).
"""

from __future__ import annotations

import json
import json.encoder
import re
from typing import Any

DEFAULT_MAX_DEPTH = 32  # Capgo bodies and release indexes are 3-4 levels deep

# a JSON string (escapes included) as one token, or a bracket: strings are skipped whole, so brackets inside them
# never count; written "unrolled" so that the regex engine does not backtrack on long strings
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)


def _not_serializable(obj: object) -> object:
    raise TypeError(f"Object of type {obj.__class__.__name__} is not JSON serializable")


# compact JSON text (no spaces), the gateway's own answers and audit lines, as json.dumps(separators=(",", ":"))
# writes it. json.dumps() with `separators` builds a JSONEncoder per call, and JSONEncoder.encode builds its C
# encoder per call too (about 2 us of an audit line's 8): the C encoder is built once here. No circular-reference
# check (the gateway encodes only flat records and answers of its own making).
_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)  # CPython's _json; None elsewhere
_encode_chunks = (
    _C_ENCODER(None, _not_serializable, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
    if _C_ENCODER is not None
    else None
)
_FALLBACK = json.JSONEncoder(separators=(",", ":")).encode


def compact_json(obj: Any) -> str:
    """`obj` as compact JSON text (ASCII, no spaces)."""
    if _encode_chunks is None:
        return _FALLBACK(obj)
    return "".join(_encode_chunks(obj, 0))


class JsonRejected(ValueError):
    """Bytes that are not acceptable JSON: too large, nested too deep, not UTF-8 or not JSON."""


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


# Python's json reads NaN, Infinity and -Infinity; JSON (RFC 8259) and the Capgo backend's JSON.parse do not, and a
# NaN read here would be written on to an update server as `NaN`, which it cannot parse
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in `data` (0 for a scalar); malformed input gives a bound."""
    depth = deepest = 0
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in (b"]", b"}"):
            depth = max(0, depth - 1)
    return deepest


def loads_bounded(
    data: bytes | bytearray | str, *, max_depth: int = DEFAULT_MAX_DEPTH, max_bytes: int | None = None
) -> Any:
    """Parse JSON after checking its size (`max_bytes`, when given) and its nesting depth (`max_depth`)."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if max_bytes is not None and len(raw) > max_bytes:
        raise JsonRejected(f"JSON larger than {max_bytes} bytes")
    # the depth is at most the number of opening brackets (those inside strings included): a body with few of
    # them (a Capgo request has one) needs no scan
    depth = 0 if raw.count(b"[") + raw.count(b"{") <= max_depth else nesting_depth(raw)
    if depth > max_depth:
        raise JsonRejected(f"JSON nested deeper than {max_depth} levels")
    try:
        return _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))  # as json.loads reads bytes
    except UnicodeDecodeError:
        raise JsonRejected("JSON is not UTF-8") from None
    except (ValueError, RecursionError) as exc:  # RecursionError cannot happen below max_depth; kept as a net
        raise JsonRejected(f"not JSON: {exc}") from None
