"""CPU cost of `verification.zip_scan`: the verifier's SHA-256 alone against SHA-256 plus the zip scan
(`core/digests.ScanningDigest`), in process, over a bundle of about 8 MiB fed in 64 KiB slices as a download feeds it.

Two bundles: entries with their sizes in the local headers (what the Capgo CLI writes: the scan skips each entry's
data), and entries with data descriptors (a streaming writer's zip: the scan inflates each entry to find its end).
A/B interleaved, 7 rounds, medians of process CPU time; prints the load average beside the figures.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time

from gateway.core.digests import ScanningDigest
from gateway.core.zipscan import ZipRules
from tests.core.test_zipscan import make_zip  # the tests' zip writer: sizes in the headers, or data descriptors

SLICE = 64 * 1024
ROUNDS = 7


def bundle(streamed: bool) -> bytes:
    """64 entries of 256 KiB: half random (incompressible), half repetitive script."""
    script = b"function x(){return 1}\n" * 11_000
    entries = [(f"assets/f{i}.js", os.urandom(256 * 1024) if i % 2 else script) for i in range(64)]
    return make_zip(entries, streamed=streamed)


def cpu(data: bytes, scan: bool) -> float:
    digest = ScanningDigest(ZipRules(), hashlib.sha256(data).hexdigest()) if scan else hashlib.sha256()
    view = memoryview(data)
    started = time.process_time()
    for i in range(0, len(data), SLICE):
        digest.update(view[i : i + SLICE])
    digest.hexdigest()
    return time.process_time() - started


def main() -> None:
    print(f"zip scan cost, load average {os.getloadavg()[0]:.2f}")
    for label, data in (("sizes in local headers", bundle(False)), ("data descriptors", bundle(True))):
        base: list[float] = []
        scanned: list[float] = []
        for _ in range(ROUNDS):
            base.append(cpu(data, False))
            scanned.append(cpu(data, True))
        b, s = statistics.median(base), statistics.median(scanned)
        mib = len(data) / 2**20
        print(
            f"  {label}: {mib:.1f} MiB, sha256 {b * 1000:.1f} ms CPU, sha256 + zip scan {s * 1000:.1f} ms CPU "
            f"({(s / b - 1) * 100:+.0f} %, {(s - b) / mib * 1e6:.0f} us per MiB)"
        )
    print(f"  load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
