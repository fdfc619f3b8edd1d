"""Giving freed memory back to the operating system after connection churn.

Owns one background task per worker. Each connection allocates TLS buffers, parser state and an HTTP protocol in
many small and medium blocks; when thousands of connections end (client aborts, handshake timeouts, resets),
glibc keeps the freed pages inside its heaps: only memory at the top of a heap is returned by itself, and live
objects scattered between the free ones pin the rest. Measured (bench/README.md, "Hostile"): after 3,000 bad
connections RSS went from 70 to 121 MiB and `malloc_trim(0)` brought it back to 71 MiB, so nothing leaked;
MALLOC_ARENA_MAX and a fixed mmap threshold did not help. So: after at least `CHURN` connections closed, at most
every `INTERVAL` seconds, call `malloc_trim(0)` (in a thread; it takes a few milliseconds). Without glibc (musl,
macOS) this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

INTERVAL = 5.0  # seconds between two checks
CHURN = 64  # connections closed since the last trim that make one worthwhile


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


async def trim_after_churn(closed: Callable[[], int], interval: float = INTERVAL, churn: int = CHURN) -> None:
    """Run until cancelled: trim the heap when `closed()` (connections closed so far) grew by `churn` or more."""
    trim = _malloc_trim()
    if trim is None:
        return
    last = closed()
    while True:
        await asyncio.sleep(interval)
        now = closed()
        if now - last >= churn:
            last = now
            await asyncio.to_thread(trim, 0)
