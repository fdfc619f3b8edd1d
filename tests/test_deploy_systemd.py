"""deploy/systemd/ota-gateway.service: parsed and checked key by key, and verified by `systemd-analyze verify`
(Debian package systemd, installed by `make test`) with no warning at all. Negative twin: a misspelt hardening
key makes `verify` warn, so the no-warning check can fail."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import build_parser
from gateway.config import Limits
from tests.support import ROOT

UNIT = ROOT / "deploy" / "systemd" / "ota-gateway.service"
INSTALLED_BIN = "/opt/ota-gateway/bin/ota-gateway"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (a key may repeat); comments and blank lines dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, str]:
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    return {key: values[-1] for key, values in unit["Service"].items()}


def test_runs_as_its_own_user_with_state_and_config_folders(service: dict[str, str]) -> None:
    assert service["User"] == service["Group"] == "ota-gateway"
    assert service["StateDirectory"] == "ota-gateway" and service["StateDirectoryMode"] == "0750"
    assert service["ConfigurationDirectory"] == "ota-gateway"
    assert service["ReadWritePaths"] == "/var/lib/ota-gateway" == service["WorkingDirectory"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0] == INSTALLED_BIN
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve" and str(args.config) == "/etc/ota-gateway/gateway.yaml"


def test_hardening(service: dict[str, str]) -> None:
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictSUIDSGID": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "SystemCallFilter": "@system-service",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert int(service["LimitNOFILE"]) >= 65536


def test_reload_restart_and_stop(service: dict[str, str]) -> None:
    assert shlex.split(service["ExecReload"]) == ["/bin/kill", "-HUP", "$MAINPID"]
    assert service["Restart"] == "on-failure"
    assert "2" in service["RestartPreventExitStatus"].split(), "a config error (exit 2) must not restart in a loop"
    assert service["KillMode"] == "mixed", "SIGTERM to the supervisor only: a second one would cut the drain short"
    assert float(service["TimeoutStopSec"]) > Limits().shutdown_grace


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("systemd-analyze")
    assert binary, "systemd-analyze is installed by `make test` (Debian package systemd)"
    # the one change: ExecStart names an ota-gateway that exists here (verify checks that it is executable)
    here = str(Path(sys.executable).parent / "ota-gateway")
    unit = tmp_path / "ota-gateway.service"
    unit.write_text(unit_text.replace(INSTALLED_BIN, here))
    return subprocess.run([binary, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_has_nothing_to_say(tmp_path: Path) -> None:
    proc = verify(UNIT.read_text(), tmp_path)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def test_verify_catches_a_misspelt_key(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert "\nNoNewPrivileges=yes\n" in text
    proc = verify(text.replace("\nNoNewPrivileges=yes\n", "\nNoNewPrivilege=yes\n"), tmp_path)
    assert "Unknown key 'NoNewPrivilege'" in proc.stderr
