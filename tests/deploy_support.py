"""Helpers for the deploy tests: a Dockerfile parser, a service user, and the wheel installed outside the repo.

The machine has no container daemon, so the container test does what the image does: build the wheel from the
files the Dockerfile copies, install it into a fresh venv in a temporary folder, and run it as uid 10001.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support import ROOT

SERVICE_UID = 10001
PACKAGE_FILES = ["pyproject.toml", "README.md", "gateway"]  # what the Dockerfile's build stage copies


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the line, continuations joined
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array form (`["a", "b"]`) of the arguments, or None for the shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text.split("CMD", 1)[1] if "CMD" in text else ""
        try:
            value = json.loads(text.strip())
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None

    def flags(self) -> dict[str, str]:
        """`--name=value` options before the arguments (COPY --chown, HEALTHCHECK --interval, ...)."""
        out = {}
        for word in shlex.split(self.args.split("CMD", 1)[0] if self.keyword == "HEALTHCHECK" else self.args):
            if word.startswith("--") and "=" in word:
                name, value = word[2:].split("=", 1)
                out[name] = value
        return out

    def words(self) -> list[str]:
        return [w for w in shlex.split(self.args) if not w.startswith("--")]


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions per build stage (a stage starts at FROM); comments dropped, `\\` continuations joined."""
    stages: list[list[Instruction]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        keyword, _, args = whole.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), start)
        if instruction.keyword == "FROM":
            stages.append([])
        assert stages, f"Dockerfile:{start}: {keyword} before FROM"
        stages[-1].append(instruction)
    return stages


def service_python() -> str:
    """A Python 3.11+ interpreter the service user may run (pyenv's under /root is not; Debian's is)."""
    candidates = [os.path.realpath(sys.executable), f"/usr/bin/python3.{sys.version_info.minor}", "/usr/bin/python3"]
    for candidate in candidates:
        if not os.path.exists(candidate):
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys, venv, ensurepip, ssl; assert sys.version_info >= (3, 11)"],
                user=SERVICE_UID,
                group=SERVICE_UID,
                extra_groups=[],
                capture_output=True,
                cwd="/",
                timeout=30,
            )
        except PermissionError:
            continue
        if probe.returncode == 0:
            return candidate
    raise AssertionError(f"no Python 3.11+ with venv that uid {SERVICE_UID} can run among {candidates}")


def world_readable_tmpdir(prefix: str) -> Path:
    """A temporary folder the service user can enter (pytest's tmp_path is 0700 and root's)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def install_wheel(into: Path) -> Path:
    """Build the wheel from the files the Dockerfile copies and install it into a fresh venv; returns bin/."""
    src = into / "src"
    src.mkdir()
    for name in PACKAGE_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    wheels = into / "wheels"
    run = dict(capture_output=True, text=True, timeout=540)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(src)]
    built = subprocess.run(pip_wheel, **run)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("ota_gateway-*.whl")
    venv = into / "venv"
    made = subprocess.run([service_python(), "-m", "venv", str(venv)], **run)
    assert made.returncode == 0, made.stderr
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], **run)
    assert installed.returncode == 0, installed.stderr
    shutil.rmtree(src)
    return venv / "bin"


@contextlib.contextmanager
def private_network() -> Iterator[list[str]]:
    """A network namespace of its own with only loopback up; yields the command prefix that runs inside it.

    A server there may bind 0.0.0.0 as the image's config says and still be reachable from loopback only.
    """
    unshare, nsenter, ip = shutil.which("unshare"), shutil.which("nsenter"), shutil.which("ip")
    assert unshare and nsenter and ip, "unshare/nsenter (util-linux) and ip (iproute2) are installed by `make test`"
    holder = subprocess.Popen([unshare, "--net", "sleep", "600"])
    namespace = f"/proc/{holder.pid}/ns/net"
    try:
        own = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while os.readlink(namespace) == own:  # until unshare has entered the new namespace
            assert holder.poll() is None and time.monotonic() < deadline, "unshare --net failed"
            time.sleep(0.02)
        prefix = [nsenter, f"--net={namespace}", "--"]
        subprocess.run([*prefix, ip, "link", "set", "lo", "up"], check=True, timeout=30)
        yield prefix
    finally:
        holder.kill()
        holder.wait()


def as_user(uid: int) -> list[str]:
    """Command prefix: run as uid:gid with no supplementary groups and no way to gain privileges."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--"]
