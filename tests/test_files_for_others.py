"""Files for other users: `release add` and `certs` follow the umask, `certs --group` shares keys with a service
group, and no error a client receives names a path on the server (the log does).

The gateway runs as uid 10001, as a service account would, against files root published.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.as_user import SERVICE_UID, SHARED_GID, STRANGER_UID, can_read, needs_root, open_dir, serve_as
from tests.support import APP_ID, Pki, https_request, make_pki, make_zip, run_gateway, write_config


def gateway(*args: str | Path, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)], capture_output=True, text=True, timeout=60, umask=umask
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass
class Site:
    config: Path
    origin: Path
    pki: Pki

    def publish(self, version: str, umask: int) -> Path:
        bundle = make_zip(self.config.parent / f"src-{version}.zip", 3000)
        done = gateway(
            "release", "add", "--origin", self.origin, "--app", APP_ID, "--version", version, bundle, umask=umask
        )
        assert done.returncode == 0, done.stderr
        return self.origin / APP_ID / f"{version}.zip"


@pytest.fixture
def site() -> Iterator[Site]:
    with open_dir() as folder:
        pki = make_pki(folder / "certs")
        origin = folder / "origin"
        origin.mkdir()
        config = write_config(
            folder, pki, origins={"local": {"type": "directory", "path": "origin"}}, extra={"audit": {"path": "-"}}
        )
        state = folder / "state"
        state.mkdir()
        os.chown(state, SERVICE_UID, SERVICE_UID)
        yield Site(config, origin, pki)


def test_release_add_follows_the_umask_so_the_service_account_serves_it(site: Site) -> None:
    needs_root()
    shared = site.publish("1.0.0", umask=0o022)
    assert mode(shared) == 0o644
    assert mode(site.origin / APP_ID / "releases.yaml") == 0o644
    assert mode(site.origin / APP_ID) == 0o755
    private = site.publish("1.1.0", umask=0o077)  # the twin: an operator's umask that shares nothing
    assert mode(private) == 0o600
    assert mode(site.origin / APP_ID / "releases.yaml") == 0o600
    os.chmod(site.origin / APP_ID / "releases.yaml", 0o644)  # the index readable, the 1.1.0 bundle not
    with serve_as(SERVICE_UID, site.config) as gw:
        ok = https_request(f"{gw.base_url}/bundles/{APP_ID}/1.0.0.zip", site.pki.client_context(site.pki.client))
        assert ok.status == 200 and ok.body == shared.read_bytes()
        refused = https_request(f"{gw.base_url}/bundles/{APP_ID}/1.1.0.zip", site.pki.client_context(site.pki.client))
        assert refused.status == 502
        problem = refused.json()
        assert problem["reason"] == "origin_error"
        assert problem["detail"] == f"origin local: cannot open {APP_ID}/1.1.0.zip: Permission denied"
        assert str(site.origin) not in refused.body.decode() and "/tmp" not in refused.body.decode()
        with pytest.raises(urllib.error.HTTPError) as readyz:
            urllib.request.urlopen(f"{gw.admin_url}/readyz", timeout=5)
        assert str(site.origin) not in readyz.value.read().decode()
    assert any(str(private) in line and "Permission denied" in line for line in gw.stderr_lines), gw.stderr_lines


@pytest.mark.parametrize("broken", ["index", "bundle"])
def test_origin_errors_name_no_server_path(tmp_path: Path, pki: Pki, broken: str) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    config = write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}})
    bundle = make_zip(tmp_path / "b.zip", 2000)
    assert gateway("release", "add", "--origin", origin, "--app", APP_ID, "--version", "1.0.0", bundle).returncode == 0
    target = origin / APP_ID / ("releases.yaml" if broken == "index" else "1.0.0.zip")
    target.unlink()
    target.mkdir()  # a folder where a file should be: unreadable even for root
    with run_gateway(config) as gw:
        answer = https_request(f"{gw.base_url}/bundles/{APP_ID}/1.0.0.zip", pki.client_context(pki.client))
        assert answer.status == 502 and answer.json()["reason"] == "origin_error"
        assert str(tmp_path) not in answer.body.decode()
        assert f"{APP_ID}/{target.name}" in answer.json()["detail"]  # relative to the origin: still useful
    assert any(str(target) in line for line in gw.stderr_lines), gw.stderr_lines


# --- certificates ------------------------------------------------------------------------------------------------


def test_certs_init_group_lets_the_service_group_read_keys(site: Site) -> None:
    needs_root()
    folder = site.config.parent / "dev-pki"
    done = gateway("certs", "init", "--dir", folder, "--group", str(SHARED_GID), umask=0o077)
    assert done.returncode == 0, done.stderr
    assert folder.stat().st_gid == SHARED_GID and mode(folder) & 0o050 == 0o050
    key = folder / "server.key"
    assert (mode(key), key.stat().st_gid) == (0o640, SHARED_GID)
    assert can_read(SERVICE_UID, key, groups=[SHARED_GID])
    assert not can_read(STRANGER_UID, key)
    assert not can_read(SERVICE_UID, key)  # without the group
    for ca_key in (folder / "ca.key", folder / "rogue-ca.key"):  # the gateway never needs a CA's key
        assert mode(ca_key) == 0o600 and not can_read(SERVICE_UID, ca_key, groups=[SHARED_GID]), ca_key
    issued = gateway("certs", "issue-client", "--dir", folder, "--group", str(SHARED_GID), "tablet-1")
    assert issued.returncode == 0, issued.stderr
    assert (mode(folder / "tablet-1.key"), (folder / "tablet-1.key").stat().st_gid) == (0o640, SHARED_GID)
    assert mode(folder / "tablet-1.pem") == 0o644


def test_certs_init_without_group_keeps_keys_private(site: Site) -> None:
    needs_root()
    folder = site.config.parent / "dev-pki"
    done = gateway("certs", "init", "--dir", folder)
    assert done.returncode == 0, done.stderr
    assert mode(folder) == 0o755 and mode(folder / "ca.pem") == 0o644
    key = folder / "server.key"
    assert mode(key) == 0o600
    assert not can_read(SERVICE_UID, key, groups=[SHARED_GID])
    assert can_read(SERVICE_UID, folder / "server.pem")
    # --group on an existing PKI shares its keys without replacing them
    before = key.read_bytes()
    again = gateway("certs", "init", "--dir", folder, "--group", str(SHARED_GID))
    assert again.returncode == 0, again.stderr
    assert key.read_bytes() == before and mode(key) == 0o640
    assert can_read(SERVICE_UID, key, groups=[SHARED_GID])
    assert mode(folder / "ca.key") == 0o600 and not can_read(SERVICE_UID, folder / "ca.key", groups=[SHARED_GID])


def test_certs_group_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    done = gateway("certs", "init", "--dir", tmp_path / "p", "--group", "no-such-group-here")
    assert done.returncode == 2
    assert done.stderr == "ota-gateway: no such group: 'no-such-group-here' (give a group name or a numeric gid)\n"
