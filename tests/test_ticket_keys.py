"""Ticket keys (gateway/ticket_keys.py and the `tickets` config): generated once and shared, or read from files;
short secrets, duplicate ids and bad endpoint paths are config errors."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.ticket_keys import AUTO_KEY_FILE, load_keyring
from tests.support import Pki, write_config


def config(tmp_path: Path, pki: Pki, **extra: Any) -> Path:
    origin = tmp_path / "origin"
    origin.mkdir(exist_ok=True)
    return write_config(tmp_path, pki, origins={"local": {"type": "directory", "path": str(origin)}}, extra=extra)


def test_generated_key_is_made_once_and_private(tmp_path: Path, pki: Pki) -> None:
    cfg = load_config(config(tmp_path, pki))
    first = load_keyring(cfg)
    key_file = cfg.state.path.parent / AUTO_KEY_FILE
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert load_keyring(cfg) == first and first[0].key_id == "auto" and len(first[0].secret) >= 32
    assert [p.name for p in key_file.parent.iterdir()] == [AUTO_KEY_FILE]  # no temporary file left


def test_configured_keys_in_order(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "new.key").write_text("n" * 64 + "\n")
    (tmp_path / "old.key").write_text("o" * 64)
    keys = [{"id": "new", "secret_file": "new.key"}, {"id": "old", "secret_file": "old.key"}]
    cfg = load_config(config(tmp_path, pki, tickets={"keys": keys, "ttl": 600}))
    ring = load_keyring(cfg)
    assert [k.key_id for k in ring] == ["new", "old"] and ring[0].secret == b"n" * 64
    assert cfg.tickets.ttl == 600


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tickets": {"keys": [{"id": "k", "secret_file": "short.key"}]}}, "secret_file: holds 5 bytes"),
        (
            {"tickets": {"keys": [{"id": "k", "secret_file": "ok.key"}, {"id": "k", "secret_file": "ok.key"}]}},
            "is used twice",
        ),
        ({"tickets": {"keys": [{"id": "a b", "secret_file": "ok.key"}]}}, "tickets.keys[0].id"),
        ({"tickets": {"public_url": "http://gw.example"}}, "public_url must be https"),
        ({"tickets": {"ttl": 1}}, "tickets.ttl"),
    ],
)
def test_ticket_config_errors(tmp_path: Path, pki: Pki, extra: dict[str, Any], message: str) -> None:
    (tmp_path / "short.key").write_text("abcde")
    (tmp_path / "ok.key").write_text("k" * 64)
    with pytest.raises(ConfigError) as err:
        load_config(config(tmp_path, pki, **extra))
    assert message in str(err.value)


@pytest.mark.parametrize("path", ["https://other.example/updates", "../updates", "updates?x=1", ""])
def test_capgo_endpoint_paths_are_relative(tmp_path: Path, pki: Pki, path: str) -> None:
    (tmp_path / "ca.pem").write_bytes(pki.ca_pem.read_bytes())
    origins = {"capgo": {"type": "https", "url": "https://origin.example/", "updates_path": path}}
    cfg = write_config(tmp_path, pki, origins=origins)
    with pytest.raises(ConfigError, match="updates_path"):
        load_config(cfg)
