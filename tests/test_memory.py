"""Memory stays bounded by the chunk size, whatever the bundle size (design: "Verified streaming with tail holdback").

A real `ota-gateway serve` streams a 512 MiB bundle from a directory origin to a real mTLS client that hashes what
it reads and keeps none of it; the gateway's peak resident set (VmHWM) must stay under 150 MiB. The throughput is
printed (`pytest -s`) as a rough figure, not asserted.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
from pathlib import Path

import yaml

from gateway.core.releases import Release, ReleaseIndex, index_document
from tests.support import APP_ID, Pki, run_gateway, write_config

MIB = 1024 * 1024
BUNDLE_MIB = 512
RSS_LIMIT_KIB = 150 * 1024


def _write_big_bundle(app_dir: Path, name: str) -> tuple[int, str]:
    """512 distinct 1 MiB blocks (one random block, each stamped with its number); returns size and SHA-256."""
    app_dir.mkdir(parents=True)
    block = bytearray(os.urandom(MIB))
    digest = hashlib.sha256()
    with (app_dir / name).open("wb") as fh:
        for i in range(BUNDLE_MIB):
            block[:8] = i.to_bytes(8, "big")
            digest.update(block)
            fh.write(block)
    return BUNDLE_MIB * MIB, digest.hexdigest()


def test_512_mib_bundle_streams_in_bounded_memory(tmp_path: Path, pki: Pki) -> None:
    origin = tmp_path / "origin"
    size, sha256 = _write_big_bundle(origin / APP_ID, "9.0.0.zip")
    index = ReleaseIndex(APP_ID, (Release("9.0.0", "production", "9.0.0.zip", size, sha256),))
    (origin / APP_ID / "releases.yaml").write_text(yaml.safe_dump(index_document(index), sort_keys=False))
    cfg = write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})

    with run_gateway(cfg) as gw:
        baseline_kib = gw.rss_peak_kib()
        conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=pki.client_context(pki.client), timeout=60)
        try:
            started = time.monotonic()
            conn.request("GET", f"/bundles/{APP_ID}/9.0.0.zip")
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.getheader("Content-Length") == str(size)
            received = hashlib.sha256()
            count = 0
            while chunk := resp.read(MIB):
                received.update(chunk)
                count += len(chunk)
            elapsed = time.monotonic() - started
            resp.close()
        finally:
            conn.close()
        peak_kib = gw.rss_peak_kib()

    assert count == size
    assert received.hexdigest() == sha256
    print(
        f"\n512 MiB through the gateway: {size / MIB / elapsed:.0f} MiB/s ({elapsed:.2f} s); gateway peak RSS "
        f"{peak_kib / 1024:.1f} MiB (after start {baseline_kib / 1024:.1f} MiB)"
    )
    assert peak_kib < RSS_LIMIT_KIB, f"gateway peak RSS {peak_kib} KiB while streaming {size} bytes"
