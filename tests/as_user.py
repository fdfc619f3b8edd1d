"""Running the gateway as another user (uid 10001, as a service account would), for tests that need root.

`python_for_others()` finds an interpreter that uid 10001 can run with this checkout and its venv's packages (the
venv's own python may live under a folder only root can enter; a system Python of the same minor version then
serves, with PYTHONPATH). `open_dir` is a temporary folder other users can reach (pytest's tmp_path is not).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml

from tests.deploy_support import SERVICE_UID  # the gateway's service account, as in the image
from tests.support import ROOT, GatewayProcess, watch_gateway

SERVICE_GID = SERVICE_UID
SHARED_GID = 10002  # a group the service account may be given (certs --group)
STRANGER_UID = 10003  # some other user


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("running as another user needs root")


@functools.cache
def python_for_others() -> tuple[str, dict[str, str]]:
    """(interpreter, extra environment) with which uid 10001 runs `python -m gateway` from this checkout."""
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]]), "PYTHONUNBUFFERED": "1"}
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (sys.executable, shutil.which(version), f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if not candidate or not os.path.exists(candidate):
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import aiohttp, cryptography, pydantic, gateway.cli"],
                env={**os.environ, **env},
                cwd="/",
                user=SERVICE_UID,
                group=SERVICE_GID,
                extra_groups=[],
                capture_output=True,
                timeout=60,
            )
        except OSError:  # that user may not even reach the interpreter
            continue
        if probe.returncode == 0:
            return candidate, env
    pytest.skip(f"no {version} that uid {SERVICE_UID} can run with this checkout (is it under a private folder?)")


def gateway_command(*args: str) -> list[str]:
    return [python_for_others()[0], "-m", "gateway", *args]


def run_as(
    uid: int, *args: str, groups: Sequence[int] = (), timeout: float = 60, umask: int = 0o022
) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS` as `uid` (primary group = uid, plus `groups`); waits for it."""
    python, extra = python_for_others()
    return subprocess.run(
        [python, "-m", "gateway", *args],
        env={**os.environ, **extra},
        cwd="/",
        user=uid,
        group=uid,
        extra_groups=list(groups),
        umask=umask,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def can_read(uid: int, path: Path, groups: Sequence[int] = ()) -> bool:
    """Whether `uid` (with `groups`) can read `path`, tried with cat(1) as that user."""
    done = subprocess.run(
        ["cat", str(path)],
        user=uid,
        group=uid,
        extra_groups=list(groups),
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0 and len(done.stdout) > 0


@contextlib.contextmanager
def open_dir() -> Iterator[Path]:
    """A temporary folder (mode 0755) that every user can reach; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ota-gw-test-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def serve_as(uid: int, config_path: Path, *args: str, timeout: float = 30) -> Iterator[GatewayProcess]:
    """`serve --config config_path` as `uid`, waiting until it listens (as `support.run_gateway` does)."""
    python, extra = python_for_others()
    config = yaml.safe_load(config_path.read_text())
    workers = [] if any(a.startswith("--workers") for a in args) else ["--workers", "1"]
    proc = subprocess.Popen(
        [python, "-m", "gateway", "serve", "--config", str(config_path), *workers, *args],
        env={**os.environ, **extra},
        cwd="/",
        user=uid,
        group=uid,
        extra_groups=[],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    with watch_gateway(config_path, config, proc, timeout) as gw:
        yield gw
