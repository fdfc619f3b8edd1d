"""Download-ticket keys: read from the files gateway.yaml names, or generated once into the state folder.

Owns where ticket secrets come from. Configured keys (`tickets.keys`) are read from their files: the first signs,
all verify. Without configured keys the gateway generates a 32-byte key into `<state folder>/ticket.key` (0600)
the first time it is needed and reuses it afterwards, so every worker on the host and every restart shares it.
Several workers may race to create it: the file is written under a temporary name and linked into place, so a
reader never sees half a key. Secrets never reach a log line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from gateway.config import Config
from gateway.core.tickets import MIN_SECRET_BYTES, TicketKey

AUTO_KEY_ID = "auto"
AUTO_KEY_FILE = "ticket.key"


def _auto_key(folder: Path) -> bytes:
    path = folder / AUTO_KEY_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{AUTO_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_hex(MIN_SECRET_BYTES).encode() + b"\n")
        with contextlib.suppress(FileExistsError):  # another worker was first: its key is the key
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes().strip()


def load_keyring(config: Config) -> tuple[TicketKey, ...]:
    """The ticket keys in order (the first signs); raises OSError or ValueError if a key cannot be used."""
    if config.tickets.keys:
        return tuple(TicketKey(k.id, k.secret_file.read_bytes().strip()) for k in config.tickets.keys)
    return (TicketKey(AUTO_KEY_ID, _auto_key(config.state.path.parent)),)
