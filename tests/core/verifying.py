"""Helpers for driving a `Verifier` in tests: random chunkings and a feed-all-then-finish run."""

from __future__ import annotations

import random

from gateway.core.reasons import Refusal
from gateway.core.verify import Verifier


def random_chunks(data: bytes, seed: int, largest: int = 1500) -> list[bytes]:
    """`data` cut at random places (reproducible by `seed`), pieces of 1 to `largest` bytes."""
    rnd = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        n = rnd.randint(1, largest)
        out.append(data[i : i + n])
        i += n
    return out


def run(verifier: Verifier, chunks: list[bytes]) -> tuple[bytes, Refusal | None]:
    """Feed all chunks and finish; return what was released and the refusal, if any."""
    released = b""
    try:
        for chunk in chunks:
            released += verifier.feed(chunk)
        released += verifier.finish()
    except Refusal as refusal:
        return released, refusal
    return released, None
