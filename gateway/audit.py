"""The audit log: one JSON line per request decision, to standard output or a file.

Owns the record's fields (documented in the README). Never writes a ticket secret, a private key or a whole
certificate: identities appear as fingerprint and subject only.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from gateway.core.identity import ClientIdentity


@dataclass
class AuditRecord:
    route: str
    method: str
    path: str
    outcome: str = "ok"  # ok | refused | aborted
    status: int = 0
    reason: str | None = None
    detail: str | None = None
    app: str | None = None
    version: str | None = None
    origin: str | None = None
    identity_sha256: str | None = None
    identity_subject: str | None = None
    via_proxy: str | None = None
    peer: str | None = None
    bytes: int = 0
    duration_ms: float = 0.0
    time: str = ""

    def set_identity(self, identity: ClientIdentity | None) -> None:
        if identity is not None:
            self.identity_sha256 = identity.sha256
            self.identity_subject = identity.subject


class AuditLog:
    """Writes `AuditRecord`s as JSON lines; line-buffered so that a crash loses at most the current line."""

    def __init__(self, target: str) -> None:
        self._own: TextIO | None = None
        if target == "-":
            self._out: TextIO = sys.stdout
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._own = open(target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
            self._out = self._own

    def write(self, record: AuditRecord) -> None:
        record.time = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
        # vars(), not dataclasses.asdict(): the fields are flat and asdict deep-copies each one (~150 us a line)
        line = json.dumps({k: v for k, v in vars(record).items() if v is not None}, separators=(",", ":"))
        try:
            self._out.write(line + "\n")
            self._out.flush()
        except (OSError, ValueError):
            pass  # a closed stdout must not break serving

    def close(self) -> None:
        if self._own is not None:
            self._own.close()
            self._own = None
