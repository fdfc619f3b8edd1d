"""Start-up failures are one line and exit 2; `check` finds them first; the `--workers` supervisor stops on them.

Real `serve` and `check` subprocesses: a port taken by a bound socket, a state folder, audit log and certificate
folder that uid 10001 (the service account) cannot use, a Redis that is not there; each with the twin that works.
Then the supervisor: a worker killed after start is restarted and counted while the other serves; a crash loop
stops the server.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.as_user import SERVICE_UID, needs_root, open_dir, run_as, serve_as
from tests.support import GatewayProcess, free_port, make_pki, redis_server, run_gateway, wait_until, write_config


def gateway(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


INFO = ("ota-gateway: open-files limit ", "ota-gateway: listening on ", "ota-gateway: plain HTTP on ")
WORKER_READY = re.compile(r"ota-gateway: worker \d+ ready")  # the supervisor heard a worker's ready pipe


def one_line(stderr: str) -> str:
    """The single error line a start-up failure prints (besides start-up notes; no traceback, no restart)."""
    lines = [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith(INFO) and not WORKER_READY.fullmatch(line)
    ]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "starting a new one" not in stderr
    assert lines[0].startswith("ota-gateway: "), stderr
    return lines[0]


@pytest.fixture
def site() -> Iterator[Path]:
    """gateway.yaml, certificates, policies and a directory origin in a folder every user can reach."""
    with open_dir() as folder:
        pki = make_pki(folder / "certs")
        (folder / "origin").mkdir()
        write_config(folder, pki, origins={"local": {"type": "directory", "path": "origin"}})
        yield folder / "gateway.yaml"


def edit(config: Path, **changes: object) -> None:
    import yaml

    data = yaml.safe_load(config.read_text())
    data.update(changes)
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def listen_port(config: Path) -> int:
    import yaml

    return int(yaml.safe_load(config.read_text())["listeners"][0]["port"])


# --- a port in use -----------------------------------------------------------------------------------------------


def test_port_in_use_is_one_line_from_check_and_serve(site: Path) -> None:
    port = listen_port(site)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        assert gateway("check", "--config", site).returncode == 0  # without --live, check binds nothing
        checked = gateway("check", "--live", "--config", site)
        assert checked.returncode == 2
        line = one_line(checked.stderr)
        assert f"listeners[0].port: 127.0.0.1:{port} is already in use" in line and "another port" in line
        for workers in ("1", "2"):
            served = gateway("serve", "--workers", workers, "--config", site)
            assert served.returncode == 2, served.stderr
            assert f"127.0.0.1:{port} is already in use" in one_line(served.stderr)
    # the twin: the port is free again
    assert gateway("check", "--live", "--config", site).returncode == 0
    with run_gateway(site) as gw:
        assert urllib.request.urlopen(f"{gw.admin_url}/healthz", timeout=5).status == 200


def test_two_listeners_on_one_port_never_start_even_with_reuse_port(site: Path) -> None:
    """With `--workers 2` every socket has SO_REUSEPORT, so the kernel would let a second listener of the same
    config bind the first one's port and spread connections between two sets of rules (another CA, no pins, TLS
    1.2 beside a 1.3-only listener). `check` and `serve` refuse such a config before binding anything."""
    import yaml

    data = yaml.safe_load(site.read_text())
    port = data["listeners"][0]["port"]
    second = {**data["listeners"][0], "name": "wide", "address": "0.0.0.0", "min_tls": "1.3"}
    edit(site, listeners=[data["listeners"][0], second])
    checked = gateway("check", "--config", site)
    assert checked.returncode == 2
    expected = f"listeners[1].port: 0.0.0.0:{port} is also used by a TLS listener (listeners[0], main)"
    assert expected in one_line(checked.stderr)
    for workers in ("1", "2"):
        served = gateway("serve", "--workers", workers, "--config", site, timeout=30)
        assert served.returncode == 2, served.stderr
        assert expected in one_line(served.stderr)
    # the twin: the second listener on a port of its own starts beside the first
    edit(site, listeners=[data["listeners"][0], {**second, "address": "127.0.0.1", "port": free_port()}])
    with run_gateway(site, "--workers", "2") as gw:
        assert urllib.request.urlopen(f"{gw.admin_url}/healthz", timeout=5).status == 200


def test_admin_port_in_use_names_the_admin_key(site: Path) -> None:
    import yaml

    admin = yaml.safe_load(site.read_text())["admin"]["port"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", admin))
        holder.listen()
        served = gateway("serve", "--workers", "2", "--config", site)
    assert served.returncode == 2
    assert f"admin.port: 127.0.0.1:{admin} is already in use" in served.stderr
    assert "Traceback" not in served.stderr and "starting a new one" not in served.stderr
    assert served.stderr.count("already in use") == 1


# --- as the service account (uid 10001) --------------------------------------------------------------------------


def test_unwritable_state_folder_as_uid_10001(site: Path) -> None:
    needs_root()
    state = site.parent / "state"
    state.mkdir()  # root's, 0755: uid 10001 cannot write into it
    edit(site, audit={"path": "-"})
    checked = run_as(SERVICE_UID, "check", "--config", str(site))
    assert checked.returncode == 2
    line = one_line(checked.stderr)
    assert "state.path: cannot write into" in line and str(state) in line and "uid 10001" in line
    for workers in ("1", "2"):
        served = run_as(SERVICE_UID, "serve", "--workers", workers, "--config", str(site))
        assert served.returncode == 2, served.stderr
        line = one_line(served.stderr)
        assert "uid 10001" in line and str(state) in line
    # the twin: the state folder belongs to the service account
    os.chown(state, SERVICE_UID, SERVICE_UID)
    assert run_as(SERVICE_UID, "check", "--config", str(site)).returncode == 0
    with serve_as(SERVICE_UID, site) as gw:
        assert urllib.request.urlopen(f"{gw.admin_url}/readyz", timeout=5).status == 200
    assert (state / "gateway.sqlite").stat().st_uid == SERVICE_UID


def test_state_file_owned_by_someone_else_as_uid_10001(site: Path) -> None:
    needs_root()
    state = site.parent / "state"
    state.mkdir()
    os.chown(state, SERVICE_UID, SERVICE_UID)
    (state / "gateway.sqlite").write_bytes(b"")  # root's, 0644
    edit(site, audit={"path": "-"})
    checked = run_as(SERVICE_UID, "check", "--config", str(site))
    assert checked.returncode == 2
    assert f"state.path: cannot write {state / 'gateway.sqlite'}: permission denied" in one_line(checked.stderr)
    served = run_as(SERVICE_UID, "serve", "--workers", "1", "--config", str(site))
    assert served.returncode == 2
    assert "state.path" in one_line(served.stderr)


@pytest.mark.parametrize("content", [os.urandom(8192), b"SQLite format 3\x00garbage"], ids=["random", "cut short"])
def test_a_damaged_state_file_is_named_by_check_and_serve(site: Path, content: bytes) -> None:
    """A state file that is no SQLite database (overwritten, cut short): `check` names it (it used to pass) and
    `serve` says what to do with it, not that its user needs write access. The twin: the gateway's own store,
    written by a run and stopped, passes `check` and `serve` starts on it, and `check` leaves no file behind."""
    state = site.parent / "state"
    db = state / "gateway.sqlite"
    with run_gateway(site) as gw:  # a real store, written (WAL) and closed by a clean stop
        assert healthy(gw.admin_url)
    files = sorted(p.name for p in state.iterdir())
    checked = gateway("check", "--config", site)
    assert checked.returncode == 0, checked.stderr
    assert sorted(p.name for p in state.iterdir()) == files
    db.write_bytes(content)
    for command in ("check", "serve"):
        done = gateway(command, "--config", site, timeout=30)
        assert done.returncode == 2, done.stderr
        line = one_line(done.stderr)
        assert f"state.path: cannot open the state store {db}: " in line, line
        assert "move it away with its -wal and -shm files" in line and "must be able to write" not in line, line


def test_unwritable_audit_log_as_uid_10001(site: Path) -> None:
    needs_root()
    state = site.parent / "state"
    state.mkdir()
    os.chown(state, SERVICE_UID, SERVICE_UID)
    edit(site, audit={"path": "logs/audit.log"})  # logs/ would be made in the root-owned config folder
    checked = run_as(SERVICE_UID, "check", "--config", str(site))
    assert checked.returncode == 2
    assert f"audit.path: cannot write the audit log {site.parent / 'logs' / 'audit.log'}" in one_line(checked.stderr)
    served = run_as(SERVICE_UID, "serve", "--workers", "1", "--config", str(site))
    assert served.returncode == 2
    assert "audit.path" in one_line(served.stderr)
    # the twin: the log folder is the service account's
    (site.parent / "logs").mkdir()
    os.chown(site.parent / "logs", SERVICE_UID, SERVICE_UID)
    assert run_as(SERVICE_UID, "check", "--config", str(site)).returncode == 0


def test_certificate_folder_that_cannot_be_entered_as_uid_10001(site: Path) -> None:
    needs_root()
    certs = site.parent / "certs"
    certs.chmod(0o700)  # as `certs init` used to leave it
    checked = run_as(SERVICE_UID, "check", "--config", str(site))
    assert checked.returncode == 2
    assert "Traceback" not in checked.stderr and "PermissionError" not in checked.stderr
    lines = checked.stderr.splitlines()
    assert any(
        "listeners[0].cert:" in line and f"cannot enter the folder {certs}" in line and "uid 10001" in line
        for line in lines
    ), checked.stderr
    served = run_as(SERVICE_UID, "serve", "--workers", "2", "--config", str(site))
    assert served.returncode == 2 and "Traceback" not in served.stderr
    assert f"cannot enter the folder {certs}" in served.stderr
    # the twin: a group the service account is in may enter the folder and read the files
    os.chown(certs, 0, 10002)
    certs.chmod(0o750)
    state = site.parent / "state"
    state.mkdir()
    os.chown(state, SERVICE_UID, SERVICE_UID)
    edit(site, audit={"path": "-"})
    assert run_as(SERVICE_UID, "check", "--config", str(site), groups=[10002]).returncode == 0
    assert run_as(SERVICE_UID, "check", "--config", str(site)).returncode == 2  # not in the group: still refused


def test_origin_folder_that_cannot_be_read_as_uid_10001(site: Path) -> None:
    needs_root()
    origin = site.parent / "origin"
    origin.chmod(0o700)
    checked = run_as(SERVICE_UID, "check", "--config", str(site))
    assert checked.returncode == 2
    assert f"origins.local.path: cannot read the folder {origin}: permission denied for uid 10001" in one_line(
        checked.stderr
    )
    origin.chmod(0o755)
    state = site.parent / "state"
    state.mkdir()
    os.chown(state, SERVICE_UID, SERVICE_UID)
    edit(site, audit={"path": "-"})
    assert run_as(SERVICE_UID, "check", "--config", str(site)).returncode == 0


# --- Redis -------------------------------------------------------------------------------------------------------


def test_unreachable_redis_is_one_line_in_check_live(site: Path) -> None:
    """`check --live` names a Redis it cannot reach; `serve` starts anyway and waits for it
    (tests/test_shared_state.py: a gateway up before Redis)."""
    closed = free_port()
    edit(site, state={"path": "state/gateway.sqlite", "redis_url": f"redis://127.0.0.1:{closed}/0"})
    assert gateway("check", "--config", site).returncode == 0  # without --live, check contacts nothing
    checked = gateway("check", "--live", "--config", site)
    assert checked.returncode == 2
    assert "state.redis_url: cannot reach the Redis state store" in one_line(checked.stderr)
    # the twin: a real redis-server
    with redis_server() as url:
        edit(site, state={"path": "state/gateway.sqlite", "redis_url": url})
        assert gateway("check", "--live", "--config", site).returncode == 0


# --- the supervisor after start-up -------------------------------------------------------------------------------


def children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def healthy(url: str) -> bool:
    try:
        return bool(urllib.request.urlopen(f"{url}/healthz", timeout=5).status == 200)
    except OSError:
        return False


def ready_workers(gw: GatewayProcess) -> int:
    """How many workers the supervisor has heard say ready so far (the first ones and every replacement)."""
    return sum(bool(WORKER_READY.fullmatch(line)) for line in gw.stderr_lines)


def test_a_worker_killed_after_start_is_restarted_and_counted(site: Path) -> None:
    with run_gateway(site, "--workers", "2") as gw:
        assert wait_until(lambda: len(children(gw.proc.pid)) == 2, timeout=20)
        assert wait_until(lambda: ready_workers(gw) == 2, timeout=20)
        before = children(gw.proc.pid)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        # a connection the kernel queued on the dying worker's SO_REUSEPORT socket in the instant before it closed
        # is reset; once the supervisor has reaped it, every connection goes to the worker that keeps serving
        assert wait_until(lambda: victim not in children(gw.proc.pid), timeout=10)
        assert all(healthy(gw.admin_url) for _ in range(5))
        assert wait_until(lambda: len(children(gw.proc.pid) - before) == 1 and victim not in children(gw.proc.pid), 20)
        assert wait_until(lambda: ready_workers(gw) == 3, timeout=20)
        assert any(f"worker {victim} was killed by SIGKILL; starting a new one" in line for line in gw.stderr_lines)
        assert wait_until(lambda: gw.metric("ota_gateway_worker_restarts_total") == 1.0, timeout=10)
        assert gw.proc.poll() is None
        assert gw.stop() == 0


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as probe:  # no SO_REUSEPORT: any listener still on the port makes this bind fail
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_workers_stop_when_the_supervisor_is_killed(site: Path) -> None:
    """`kill -9` of the supervisor cannot be passed on to the workers; the kernel tells them (SIGTERM on the
    parent's death) and they drain and exit, freeing the ports. Orphaned workers would keep serving the old config,
    and a gateway started again would share the ports with them (SO_REUSEPORT)."""
    with run_gateway(site, "--workers", "2") as gw:
        assert wait_until(lambda: ready_workers(gw) == 2, timeout=20)
        workers = children(gw.proc.pid)
        assert len(workers) == 2 and not port_free(gw.port)
        try:
            left = metrics_dir_of(gw.proc.pid)
            gw.proc.kill()
            gw.proc.wait(10)
            assert wait_until(lambda: not any(alive(pid) for pid in workers), timeout=15)
            assert wait_until(lambda: port_free(gw.port) and port_free(gw.admin_port), timeout=5)
            assert left is not None and left.is_dir()  # kill -9: nothing could remove it
        finally:
            for pid in workers:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
    # folders the next start must keep: one of a supervisor still alive (this test), one of another user
    tmp = Path(tempfile.gettempdir())
    living = Path(tempfile.mkdtemp(prefix="ota-gateway-metrics-", dir=tmp))
    (living / "supervisor.pid").write_text(f"{os.getpid()}\n")
    foreign = Path(tempfile.mkdtemp(prefix="ota-gateway-metrics-", dir=tmp))
    (foreign / "supervisor.pid").write_text("999999999\n")  # no such pid
    os.chown(foreign, SERVICE_UID, SERVICE_UID)
    try:
        # the twin: the supervisor's ordinary stop ends the workers as before, and it removed the stale folder
        with run_gateway(site, "--workers", "2") as gw:
            assert wait_until(lambda: ready_workers(gw) == 2, timeout=20)
            assert not left.exists(), "the folder of the killed supervisor is still there"
            assert living.is_dir() and foreign.is_dir()
            workers = children(gw.proc.pid)
            mine = metrics_dir_of(gw.proc.pid)
            assert gw.stop() == 0
            assert not any(alive(pid) for pid in workers) and port_free(gw.port)
            assert mine is not None and not mine.exists()  # an ordinary stop removes its own
    finally:
        shutil.rmtree(living, ignore_errors=True)
        shutil.rmtree(foreign, ignore_errors=True)


def metrics_dir_of(pid: int) -> Path | None:
    """The multiprocess metrics folder the supervisor `pid` made (it records its pid in it)."""
    for folder in Path(tempfile.gettempdir()).glob("ota-gateway-metrics-*"):
        with contextlib.suppress(OSError):
            if (folder / "supervisor.pid").read_text().strip() == str(pid):
                return folder
    return None


def test_a_signal_to_one_worker_ends_only_that_worker(site: Path) -> None:
    """Workers are forked from the supervisor: each has the default signal handlers, not the supervisor's (which
    would pass a SIGTERM on to every worker). A SIGTERM sent to one worker drains that one; it is started again and
    the other worker keeps serving under the same pid; the server still stops cleanly."""
    with run_gateway(site, "--workers", "2") as gw:
        assert wait_until(lambda: ready_workers(gw) == 2, timeout=20)
        before = children(gw.proc.pid)
        assert len(before) == 2
        victim, other = sorted(before)
        os.kill(victim, signal.SIGTERM)
        assert wait_until(lambda: ready_workers(gw) == 3, timeout=20)
        assert any(f"worker {victim} exited with code 0; starting a new one" in line for line in gw.stderr_lines)
        after = children(gw.proc.pid)
        assert other in after and victim not in after and len(after) == 2
        assert sum("stopped cleanly" in line for line in gw.stderr_lines) == 1
        assert healthy(gw.admin_url)
        assert gw.stop() == 0


def test_a_replacement_worker_that_cannot_load_the_config_leaves_the_others_serving(site: Path) -> None:
    """A config edit that no longer loads is refused by the running workers (a failed reload keeps the last good
    state). When a worker dies later, its replacement cannot start on that file: the server keeps serving on the
    workers it has, says why, and tries again until the file is fixed. It used to stop the whole server with exit
    2, which a service manager does not restart. The twin: with no worker left serving, it stops with exit 2."""
    good = site.read_text()
    with run_gateway(site, "--workers", "2") as gw:
        assert wait_until(lambda: ready_workers(gw) == 2, timeout=20)
        site.write_text(good + "listeners: [\n")
        victim = min(children(gw.proc.pid))
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: any("a new worker could not start" in line for line in gw.stderr_lines), 20)
        line = next(line for line in gw.stderr_lines if "a new worker could not start" in line)
        assert f"{site}:" in line and "invalid YAML" in line and "1 worker(s) keep serving" in line, line
        assert gw.proc.poll() is None and all(healthy(gw.admin_url) for _ in range(5))
        site.write_text(good)
        assert wait_until(lambda: ready_workers(gw) == 3, timeout=30)
        assert len(children(gw.proc.pid)) == 2
        # the twin: the file broken again and every worker gone, nothing serves any more: exit 2, one line
        site.write_text(good + "listeners: [\n")
        for pid in children(gw.proc.pid):
            os.kill(pid, signal.SIGKILL)
        assert gw.proc.wait(30) == 2
        time.sleep(0.2)
        assert sum(line.startswith(f"ota-gateway: {site}:") for line in gw.stderr_lines) == 1, gw.stderr_lines


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_sighup_during_start_up_does_not_kill_the_gateway(site: Path, workers: str) -> None:
    """`systemctl reload` (SIGHUP) right after a start, before the reload handler is installed: SIGHUP's default
        action ended the process (exit 129, no word said; systemd counts SIGHUP as a clean exit and does not restart
        it). SIGHUP is ignored from the first instruction of `serve` until the handler is installed (the interpreter's
    own start-up, before that, cannot be covered: signals are sent from then on)."""
    import threading

    import yaml

    from tests.support import watch_gateway

    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(site), "--workers", workers],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=site.parent,
    )
    done = threading.Event()

    def ignoring_sighup() -> bool:  # the interpreter's own start (before any code of ours runs) cannot be covered
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            return False
        return any(line.startswith("SigIgn:") and int(line.split()[1], 16) & 1 for line in status.splitlines())

    seen: list[bool] = []

    def hup() -> None:  # from the first instruction of `serve` until the gateway is ready
        seen.append(wait_until(lambda: ignoring_sighup() or done.is_set(), timeout=30, interval=0.005))
        seen.append(not done.is_set())  # ignored while still starting (not only once ready)
        while not done.is_set() and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGHUP)
            time.sleep(0.01)

    sender = threading.Thread(target=hup)
    sender.start()
    try:
        with watch_gateway(site, yaml.safe_load(site.read_text()), proc, 40) as gw:
            done.set()
            sender.join(5)
            assert seen == [True, True], "SIGHUP was not ignored during start-up"
            assert healthy(gw.admin_url)
            assert gw.stop() == 0
    finally:
        done.set()
        sender.join(5)


def test_a_crash_loop_stops_the_server(site: Path) -> None:
    with run_gateway(site, "--workers", "2", "--crash-limit", "2", "--crash-window", "60") as gw:
        assert wait_until(lambda: ready_workers(gw) == 2, timeout=20)
        first = children(gw.proc.pid)
        os.kill(min(first), signal.SIGKILL)
        assert wait_until(lambda: ready_workers(gw) == 3, timeout=20)
        os.kill(max(children(gw.proc.pid) - first), signal.SIGKILL)
        gw.proc.wait(30)
        assert gw.proc.returncode == 1
        time.sleep(0.2)
        assert any("2 worker deaths within 60 s: stopping the server" in line for line in gw.stderr_lines)
        assert sum("starting a new one" in line for line in gw.stderr_lines) == 1
        assert wait_until(lambda: not children(gw.proc.pid), timeout=5)


# --- the server certificate's dates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "start_days", "end_days", "what"),
    [("expired", -30, -1, "the certificate expired"), ("future", 2, 400, "the certificate is not valid yet")],
)
def test_check_fails_on_a_server_certificate_clients_refuse_now(
    site: Path, name: str, start_days: int, end_days: int, what: str
) -> None:
    """`check` accepted an expired server certificate, and `serve` then only reported not-ready: `check` fails with
    one line naming the key, the file and the dates; `serve` starts (a renewed file is reloaded) and says the same
    at once. The twin: a certificate ending in 5 days is a warning (exit 0), one ending in a year nothing."""
    import datetime as dt

    import trustme
    import yaml

    from tests.support import _write_leaf

    data = yaml.safe_load(site.read_text())
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)  # check and serve judge the dates, not who issued it
    now = dt.datetime.now(dt.UTC)

    def server(label: str, start: int, end: int) -> Path:
        files = _write_leaf(
            site.parent / "certs",
            label,
            ca.issue_cert(
                "localhost",
                "127.0.0.1",
                not_before=now + dt.timedelta(days=start),
                not_after=now + dt.timedelta(days=end),
            ),
        )
        data["listeners"][0]["cert"], data["listeners"][0]["key"] = str(files.cert), str(files.key)
        site.write_text(yaml.safe_dump(data, sort_keys=False))
        return files.cert

    cert = server(name, start_days, end_days)
    checked = gateway("check", "--config", site)
    assert checked.returncode == 2
    line = one_line(checked.stderr)
    assert f"{site}: listeners[0].cert: {cert}: {what} (valid from " in line and " to " in line, line
    with run_gateway(site) as gw:
        said = [x for x in gw.stderr_lines if what in x]
        assert len(said) == 1 and said[0].startswith("ota-gateway: error: ") and str(cert) in said[0], gw.stderr_lines
        assert gw.readyz()[0] == 503
    soon = server("soon", -1, 5)
    warned = gateway("check", "--config", site)
    assert warned.returncode == 0, warned.stderr
    assert f"ota-gateway: warning: {site}: listeners[0].cert: {soon}: the certificate expires in " in warned.stderr
    server("year", -1, 365)
    fine = gateway("check", "--config", site)
    assert fine.returncode == 0 and "warning" not in fine.stderr, fine.stderr
