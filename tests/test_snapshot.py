"""The runtime's shape (gateway/state_keys.py): a frozen `Snapshot` of everything a reload swaps, replaced whole by
a successful reload and left untouched, the very same object, by a failed one; the mutable `Live` health beside it.
In process, on a real config, real TLS material and the real `Reloader`."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.core.identity import ClientIdentity, identity_from_der
from gateway.reload import Reloader, load_all
from gateway.runner import build_runtime
from gateway.state_keys import Live, Runtime
from tests.support import CertFiles, Pki, edit_config, write_config


def _identity(who: CertFiles) -> ClientIdentity:
    cert = x509.load_pem_x509_certificate(who.cert.read_bytes())
    return identity_from_der(cert.public_bytes(serialization.Encoding.DER))


def _config(tmp_path: Path, pki: Pki) -> Path:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    return write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(one)}, "other": {"type": "directory", "path": str(two)}},
        extra={
            "reload": {"watch": False},
            "front_proxies": [{"name": "edge", "cert_sha256": [pki.client2.sha256]}],
        },
    )


def _reload(rt: Runtime, cfg: Path) -> bool:
    async def main() -> bool:
        reloader = Reloader(cfg, rt)
        try:
            return await reloader.reload("test")
        finally:
            await reloader.close()  # closes the origins the reload retired

    return asyncio.run(main())


def test_the_snapshot_refuses_every_assignment(tmp_path: Path, pki: Pki) -> None:
    rt = build_runtime(load_all(_config(tmp_path, pki)))
    snap = rt.snapshot
    try:
        for name in [f.name for f in dataclasses.fields(snap)]:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(snap, name, getattr(snap, name))
        with pytest.raises((AttributeError, TypeError)):  # nor a new attribute (TypeError: CPython 3.11's frozen slots)
            snap.extra = 1  # type: ignore[attr-defined]
        for mapping in (snap.material, snap.origins, snap.cas, snap.proxies):
            with pytest.raises(TypeError):  # read-only views, not dicts someone could fill
                mapping["x"] = None  # type: ignore[index]
        assert snap.front_proxy(_identity(pki.client2)) is not None
        # the twin: the live health beside it is meant to change
        live: Any = rt.live
        live.shutting_down = True
        live.active += 1
        assert isinstance(live, Live) and live.shutting_down and live.active == 1
    finally:
        rt.audit.close()


def test_a_successful_reload_replaces_the_snapshot_whole(tmp_path: Path, pki: Pki) -> None:
    cfg = _config(tmp_path, pki)
    rt = build_runtime(load_all(cfg))
    old = rt.snapshot
    proxy_client, device = _identity(pki.client2), _identity(pki.client)
    assert old.front_proxy(proxy_client) is not None and old.front_proxy(device) is None
    moved = tmp_path / "moved"
    moved.mkdir()

    def edit(config: dict[str, Any]) -> None:
        config["front_proxies"] = [{"name": "edge", "cert_sha256": [pki.client.sha256]}]  # the pin moves
        config["origins"]["other"]["path"] = str(moved)
        config["tickets"] = {"ttl": 120}

    edit_config(cfg, edit)
    try:
        assert _reload(rt, cfg)
        new = rt.snapshot
        assert new is not old
        # derived values recomputed: the removed pin no longer matches, the new one does
        assert new.front_proxy(proxy_client) is None
        assert new.front_proxy(device) is not None
        assert new.config.tickets.ttl == 120
        # an unchanged origin is kept, a changed one is new
        assert new.origins["local"] is old.origins["local"]
        assert new.origins["other"] is not old.origins["other"]
        # and the old snapshot, which requests in flight still hold, is exactly what it was
        assert old.front_proxy(proxy_client) is not None and old.front_proxy(device) is None
        assert old.config.tickets.ttl != 120
        assert rt.live.last_reload_ok
    finally:
        rt.audit.close()


@pytest.mark.parametrize("breakage", ["bad_key", "unknown_origin", "missing_ticket_key"])
def test_a_failed_reload_leaves_the_very_same_snapshot(tmp_path: Path, pki: Pki, breakage: str) -> None:
    cfg = _config(tmp_path, pki)
    rt = build_runtime(load_all(cfg))
    old = rt.snapshot
    before = (dict(old.proxies), dict(old.origins), old.config, old.policies, old.ticket_keys)

    def edit(config: dict[str, Any]) -> None:
        config["front_proxies"] = [{"name": "edge", "cert_sha256": [pki.client.sha256]}]  # valid on its own
        if breakage == "bad_key":
            config["listeners"][0]["key"] = str(pki.client.key)  # not the certificate's key
        elif breakage == "unknown_origin":
            config["origins"]["other"]["type"] = "ftp"
        else:
            config["tickets"] = {"keys": [{"id": "k1", "secret_file": str(tmp_path / "absent.key")}]}

    edit_config(cfg, edit)
    try:
        assert not _reload(rt, cfg)
        assert rt.snapshot is old
        assert (dict(old.proxies), dict(old.origins), old.config, old.policies, old.ticket_keys) == before
        assert old.front_proxy(_identity(pki.client2)) is not None
        assert not rt.live.last_reload_ok
    finally:
        rt.audit.close()


def _reads_of_current_snapshot(path: Path) -> list[int]:
    """Lines of `path` that read a runtime's current snapshot (`<anything>.snapshot`)."""
    tree = ast.parse(path.read_text())
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "snapshot"]


def test_request_code_reads_only_the_snapshot_its_request_began_with() -> None:
    """Handlers and the peer check get the request's snapshot (`request_snapshot`, or as an argument); reading
    `rt.snapshot` there would see a reload in the middle of a request."""
    gateway = Path(__file__).resolve().parent.parent / "gateway"
    request_code = [*sorted((gateway / "handlers").glob("*.py")), gateway / "peer.py"]
    assert len(request_code) >= 8
    assert {p.name: _reads_of_current_snapshot(p) for p in request_code if _reads_of_current_snapshot(p)} == {}
    # the twin: the check does see the one place that takes it, the envelope
    assert _reads_of_current_snapshot(gateway / "app.py")
