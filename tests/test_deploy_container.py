"""The container: the Dockerfile read as instructions, and a run that does what the image does.

No container daemon here, so the run installs the wheel (built from exactly the files the Dockerfile copies) into a
fresh venv outside the repository, lays out the image's folders in a temporary root (config and certificates owned
by root and read-only for the service, a state folder owned by uid 10001), and starts `serve` as uid 10001 with
deploy/container/gateway.yaml, only the origin and state paths changed. It runs in a network namespace of its own
(as a container does), so the image's 0.0.0.0 listeners reach nothing but that namespace's loopback. `health`
answers, and curl downloads a verified bundle over mTLS. Negative twins: a key the service cannot read is a
`check` error (exit 2); no client certificate, no bundle; a stopped gateway is unhealthy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import build_parser
from tests.deploy_support import (
    SERVICE_UID,
    as_user,
    install_wheel,
    parse_dockerfile,
    private_network,
    world_readable_tmpdir,
)
from tests.support import APP_ID, ROOT, Pki, is_ready_line

CONTAINER_CONFIG = ROOT / "deploy" / "container" / "gateway.yaml"
IMAGE_CONFIG = "/etc/ota-gateway/gateway.yaml"
STATE = "/var/lib/ota-gateway"


# ---- the Dockerfile, parsed ----


@pytest.fixture(scope="module")
def final_stage() -> list[Any]:
    stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    assert len(stages) == 2, "a build stage that makes the wheel, and the runtime stage"
    return stages[-1]


def one(stage: list[Any], keyword: str) -> Any:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, got {found}"
    return found[0]


def test_build_stage_makes_a_wheel_of_the_package_only() -> None:
    build = parse_dockerfile((ROOT / "Dockerfile").read_text())[0]
    copied = [w for i in build if i.keyword == "COPY" for w in i.words()[:-1]]
    assert sorted(copied) == ["README.md", "gateway", "pyproject.toml"]
    runs = [i.args for i in build if i.keyword == "RUN"]
    assert any(r.startswith("pip wheel") and "--no-deps" in r for r in runs), runs


def test_runtime_stage_installs_the_wheel_and_no_certificates(final_stage: list[Any]) -> None:
    run = " ".join(i.args for i in final_stage if i.keyword == "RUN")
    assert "pip install --no-compile /wheels/*.whl" in run
    for copy in (i for i in final_stage if i.keyword == "COPY"):
        sources = copy.words()[:-1]
        assert copy.flags().get("from") == "build" or sources == ["deploy/container/gateway.yaml"], copy
        for source in sources:
            assert not source.startswith("certs") and not source.endswith((".key", ".pem")), copy
    # the build context is an allow-list: nothing of certs/ (dev private keys) can reach the image
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert ignore[ignore.index("*") :][0] == "*" and not any(line.startswith("!certs") for line in ignore)


def test_config_copied_is_the_one_serve_and_healthcheck_read(final_stage: list[Any]) -> None:
    copy = next(i for i in final_stage if i.keyword == "COPY" and "deploy/container/gateway.yaml" in i.words())
    source, dest = copy.words()
    assert (ROOT / source).is_file() and dest == IMAGE_CONFIG
    assert copy.flags() == {"chown": "root:root", "chmod": "0644"}
    entry, cmd = one(final_stage, "ENTRYPOINT").exec_form(), one(final_stage, "CMD").exec_form()
    assert entry == ["ota-gateway"]
    serve = build_parser().parse_args(cmd)
    assert serve.command == "serve" and str(serve.config) == IMAGE_CONFIG
    health = one(final_stage, "HEALTHCHECK")
    argv = health.exec_form()
    assert argv is not None and argv[0] == "ota-gateway", "exec form, the installed command"
    probe = build_parser().parse_args(argv[1:])  # a real subcommand with real options
    assert probe.command == "health" and str(probe.config) == IMAGE_CONFIG
    assert {"interval", "timeout", "start-period", "retries"} <= set(health.flags())


def test_runs_as_10001_with_a_state_volume_it_owns(final_stage: list[Any]) -> None:
    assert one(final_stage, "USER").args == f"{SERVICE_UID}:{SERVICE_UID}"  # numeric: runAsNonRoot can check it
    volume = one(final_stage, "VOLUME").exec_form()
    assert volume == [STATE]
    run = " && ".join(i.args for i in final_stage if i.keyword == "RUN")
    made = [c.split() for c in run.split("&&") if c.split()[:2] == ["install", "-d"] and STATE in c.split()]
    assert made, "the state folder is created"
    words = made[0]
    assert words[words.index("-o") + 1] == str(SERVICE_UID) and words[words.index("-g") + 1] == str(SERVICE_UID)
    assert "--uid 10001" in run and "--gid 10001" in run
    loaded = yaml.safe_load(CONTAINER_CONFIG.read_text())
    assert os.path.dirname(loaded["state"]["path"]) == STATE
    assert loaded["listeners"][0]["address"] == "0.0.0.0" and loaded["admin"]["address"] == "0.0.0.0"
    assert loaded["audit"]["path"] == "-"


def test_the_readme_docker_run_lets_the_drain_finish() -> None:
    """`docker stop` sends SIGTERM and, after the container's stop timeout (Docker's default: 10 s), SIGKILL. The
    README's `docker run` must give the gateway longer than the image config's `limits.shutdown_grace`, or
    downloads still within their grace are killed with the process (and it never exits 0 or 3)."""
    readme = (ROOT / "README.md").read_text()
    runs = [block for block in readme.split("```") if "docker run -d" in block]
    assert len(runs) == 1
    command = runs[0].split("docker run -d", 1)[1].split("\n\n")[0]
    words = command.replace("\\\n", " ").split()
    assert "--stop-timeout" in words, "docker run without --stop-timeout: Docker kills the gateway after 10 s"
    timeout = int(words[words.index("--stop-timeout") + 1])
    grace = yaml.safe_load(CONTAINER_CONFIG.read_text())["limits"]["shutdown_grace"]
    assert timeout > grace


def test_no_undocumented_environment() -> None:
    for path in [ROOT / "Dockerfile", ROOT / "README.md", *sorted((ROOT / "gateway").rglob("*.py"))]:
        assert "OTA_ADMIN_PORT" not in path.read_text(), path


# ---- what the container does ----


@pytest.fixture(scope="module")
def image_root() -> Iterator[Path]:
    root = world_readable_tmpdir("ota-image-")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def venv_bin(image_root: Path) -> Path:
    opt = image_root / "opt"
    opt.mkdir(mode=0o755)
    return install_wheel(opt)


@pytest.fixture(scope="module")
def netns() -> Iterator[list[str]]:
    with private_network() as prefix:
        yield prefix


def as_service(netns: list[str], argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` as uid 10001 inside the private network."""
    return subprocess.run([*netns, *as_user(SERVICE_UID), *argv], capture_output=True, text=True, timeout=60, cwd="/")


def lay_out_image(root: Path, pki: Pki, venv_bin: Path) -> tuple[Path, dict[str, Any]]:
    """The image's folders under `root`, as the README's `docker run` mounts them; returns the config path."""
    etc = root / "etc" / "ota-gateway"
    (etc / "certs").mkdir(parents=True)
    shutil.copytree(ROOT / "policies", etc / "policies", ignore=shutil.ignore_patterns("*.md"))
    for source, name in [(pki.ca_pem, "ca.pem"), (pki.server.cert, "server.pem"), (pki.server.key, "server.key")]:
        shutil.copy(source, etc / "certs" / name)
    origin = root / "srv" / "ota-gateway" / "origin"
    origin.parent.mkdir(parents=True)
    subprocess.run(
        [str(ROOT / "examples" / "build-origin.sh"), str(venv_bin / "ota-gateway"), str(origin)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    state = root / "var" / "lib" / "ota-gateway"
    state.mkdir(parents=True)
    config = yaml.safe_load(CONTAINER_CONFIG.read_text())
    config["origins"]["local"]["path"] = str(origin)
    config["state"]["path"] = str(state / "gateway.sqlite")
    (etc / "gateway.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # ownership and modes as in the image: root owns config, certificates, policies and the origin; the service
    # reads them (the key through its group) and writes only its state folder
    for path in [etc, *etc.rglob("*"), origin, *origin.rglob("*")]:
        os.chown(path, 0, 0)
        path.chmod(0o755 if path.is_dir() else 0o644)
    os.chown(state, SERVICE_UID, SERVICE_UID)
    state.chmod(0o750)
    return etc / "gateway.yaml", config


def changed_keys(a: Any, b: Any, path: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k for key in a.keys() | b.keys() for k in changed_keys(a.get(key), b.get(key), f"{path}.{key}")}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return {k for i, (x, y) in enumerate(zip(a, b, strict=True)) for k in changed_keys(x, y, f"{path}[{i}]")}
    return set() if a == b else {path}


@contextlib.contextmanager
def serve_as_service(
    netns: list[str], venv_bin: Path, config: Path
) -> Iterator[tuple[subprocess.Popen[str], list[str], list[str]]]:
    """`serve` as uid 10001 in the private network (nsenter and setpriv exec it: the pid is the gateway's)."""
    env = {"PATH": f"{venv_bin}:/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [*netns, *as_user(SERVICE_UID), str(venv_bin / "ota-gateway"), "serve", "--config", str(config)],
        umask=0o027,
        cwd=config.parent.parent.parent / "var" / "lib" / "ota-gateway",
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    err: list[str] = []
    listening = threading.Event()

    def pump(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))
            if is_ready_line(line):
                listening.set()

    threads = [
        threading.Thread(target=pump, args=(s, lst), daemon=True) for s, lst in ((proc.stdout, out), (proc.stderr, err))
    ]
    for t in threads:
        t.start()
    try:
        assert listening.wait(30) and proc.poll() is None, "serve did not start:\n" + "\n".join(err)
        yield proc, out, err
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in threads:
            t.join(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def curl(netns: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*netns, "curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=60
    )


def test_serve_as_uid_10001_from_the_wheel(image_root: Path, venv_bin: Path, pki: Pki, netns: list[str]) -> None:
    assert not str(venv_bin).startswith(str(ROOT))
    config, adapted = lay_out_image(image_root, pki, venv_bin)
    changed = changed_keys(yaml.safe_load(CONTAINER_CONFIG.read_text()), adapted)
    assert changed == {".origins.local.path", ".state.path"}  # addresses and ports as in the image
    certs = config.parent / "certs"
    ota = str(venv_bin / "ota-gateway")
    assert as_service(netns, ["test", "-w", str(config.parent)]).returncode == 1, (
        "the config folder is read-only for 10001"
    )

    # a key only root may read: `check`, as the service, names it (exit 2)
    (certs / "server.key").chmod(0o600)
    refused = as_service(netns, [ota, "check", "--config", str(config)])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    named = [line for line in refused.stderr.splitlines() if "listeners[0].key" in line]
    assert named and str(certs / "server.key") in named[0], refused.stderr
    assert "Traceback" not in refused.stderr
    # the key group-readable by the service's group, as the README says
    os.chown(certs / "server.key", 0, SERVICE_UID)
    (certs / "server.key").chmod(0o640)
    checked = as_service(netns, [ota, "check", "--config", str(config)])
    assert checked.returncode == 0, checked.stderr

    with serve_as_service(netns, venv_bin, config) as (proc, audit_lines, _err):
        healthy = as_service(netns, [ota, "health", "--config", str(config)])
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert healthy.stdout.strip().endswith("/healthz: 200 alive")
        ready = as_service(netns, [ota, "health", "--config", str(config), "--ready"])
        assert ready.returncode == 0 and ready.stdout.strip().endswith("/readyz: 200 ready"), ready.stdout

        port = adapted["listeners"][0]["port"]
        url = f"https://127.0.0.1:{port}/bundles/{APP_ID}/1.1.0.zip"
        got = image_root / "b.zip"
        ok = curl(
            netns,
            "--fail",
            "--cacert",
            str(pki.ca_pem),
            "--cert",
            str(pki.client.cert),
            "--key",
            str(pki.client.key),
            url,
            "-o",
            str(got),
        )
        assert ok.returncode == 0, ok.stderr
        index = yaml.safe_load((Path(adapted["origins"]["local"]["path"]) / APP_ID / "releases.yaml").read_text())
        entry = next(r for r in index["releases"] if r["version"] == "1.1.0")
        assert hashlib.sha256(got.read_bytes()).hexdigest() == entry["sha256"]
        no_cert = curl(netns, "--cacert", str(pki.ca_pem), url, "-o", str(image_root / "refused.zip"))
        assert no_cert.returncode != 0
        assert not (image_root / "refused.zip").exists() or b"PK" not in (image_root / "refused.zip").read_bytes()

        state = Path(adapted["state"]["path"]).parent
        owners = {p.name: (p.stat().st_uid, p.stat().st_mode & 0o777) for p in state.iterdir()}
        assert owners["gateway.sqlite"][0] == SERVICE_UID and owners["ticket.key"] == (SERVICE_UID, 0o600), owners
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert any('"route": "bundle"' in line or '"route":"bundle"' in line for line in audit_lines), audit_lines[-5:]
    gone = as_service(netns, [ota, "health", "--config", str(config)])
    assert gone.returncode == 1 and "cannot connect" in gone.stdout
