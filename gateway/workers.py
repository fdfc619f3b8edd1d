"""Several worker processes on one port: `ota-gateway serve --workers N`.

Owns the supervisor. It checks the config once (so that a bad config exits 2 before anything starts), then runs N
`serve` processes that all bind the same ports with SO_REUSEPORT (the kernel spreads connections over them) and
share a Prometheus multiprocess directory, so one scrape of the admin port, whichever worker answers it, sums all
workers. SIGTERM/SIGINT/SIGHUP are passed on to every worker.

Each worker gets the write end of a pipe (`OTA_GATEWAY_READY_FD`). It writes `ready` there once every listener is
bound; if its start-up fails it writes its one-line error there instead (and not on stderr) and exits 2. A worker
that ends without `ready` failed during start-up: the supervisor stops every worker, prints that error once and
exits 2; this holds for a restarted worker too. A worker that dies after `ready` is started again after a backoff
(0.5 s, doubled for every other death within the window, at most 30 s), with one line on stderr, and counted in
`ota_gateway_worker_restarts_total`; the `max_crashes`-th death within `window` seconds (default 5 in 60 s, see
`gateway/core/startup.py`) stops the server with that worker's last error and exit code 1. After a stop signal
the exit code is the worst of the workers': 3 if any had to abort requests.
"""

from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from gateway.config import Config
from gateway.core.startup import RestartPolicy, after_crash
from gateway.logs import announce_ready, problem
from gateway.reload import load_all

log = logging.getLogger("ota_gateway.workers")

WORKER_ENV = "OTA_GATEWAY_WORKER"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
READY_FD_ENV = "OTA_GATEWAY_READY_FD"
RESTARTED_ENV = "OTA_GATEWAY_RESTARTED"
READY = b"ready\n"
EXIT_STARTUP = 2
EXIT_CRASH_LOOP = 1
STOP_TIMEOUT = 60.0  # after the workers' own shutdown grace has had its chance, a stuck worker is killed


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def is_restart() -> bool:
    return os.environ.get(RESTARTED_ENV) == "1"


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _ready_fd() -> int | None:
    value = os.environ.get(READY_FD_ENV)
    return int(value) if value and value.isdigit() else None


def report_ready() -> None:
    """In a worker: tell the supervisor that start-up is over (every listener bound)."""
    fd = _ready_fd()
    if fd is not None:
        try:
            os.write(fd, READY)
            os.close(fd)
        except OSError:
            pass  # the supervisor is gone; SIGTERM or the parent's death will stop this worker
        os.environ.pop(READY_FD_ENV, None)


def report_failure(message: str) -> bool:
    """In a worker, before `report_ready`: hand the start-up error to the supervisor, which prints it once.
    False when there is no supervisor to tell (the caller prints the message itself)."""
    fd = _ready_fd()
    if fd is None:
        return False
    try:
        os.write(fd, message.encode("utf-8", "replace")[:4000])
        os.close(fd)
    except OSError:
        return False
    os.environ.pop(READY_FD_ENV, None)
    return True


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    pipe: int  # read end of the ready pipe
    started: float
    said: bytearray = field(default_factory=bytearray)
    ready: bool = False


class _Supervisor:
    def __init__(
        self, cmd: list[str], env: dict[str, str], metrics_dir: Path, policy: RestartPolicy, config: Config, count: int
    ) -> None:
        self.cmd, self.env, self.metrics_dir, self.policy = cmd, env, metrics_dir, policy
        self.config, self.count = config, count
        self.announced = False  # the readiness line is logged once, when the first `count` workers are ready
        self.selector = selectors.DefaultSelector()
        self.workers: list[_Worker] = []
        self.pending: list[float] = []  # monotonic times at which to start a replacement
        self.history: tuple[float, ...] = ()
        self.stopping = False

    def start(self, restarted: bool) -> None:
        read, write = os.pipe()
        env = {**self.env, READY_FD_ENV: str(write), RESTARTED_ENV: "1" if restarted else "0"}
        try:
            proc = subprocess.Popen(self.cmd, env=env, pass_fds=(write,))
        finally:
            os.close(write)
        os.set_blocking(read, False)
        worker = _Worker(proc, read, time.monotonic())
        self.selector.register(read, selectors.EVENT_READ, worker)
        self.workers.append(worker)

    def _drain_pipe(self, worker: _Worker) -> None:
        while True:
            try:
                data = os.read(worker.pipe, 4096)
            except BlockingIOError:
                return
            if not data:
                self.selector.unregister(worker.pipe)
                os.close(worker.pipe)
                worker.pipe = -1
                return
            worker.said += data
            if bytes(worker.said) == READY and not worker.ready:
                worker.ready = True
                self._on_ready(worker)

    def _on_ready(self, worker: _Worker) -> None:
        log.info("worker %d ready", worker.proc.pid)
        if not self.announced and sum(w.ready for w in self.workers) == self.count:
            self.announced = True
            announce_ready(self.config, self.count)

    def wait(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            self._drain_pipe(key.data)

    def reap(self) -> tuple[_Worker, int] | None:
        """One worker that has exited, with its code (its pipe read to the end first)."""
        for worker in self.workers:
            code = worker.proc.poll()
            if code is None:
                continue
            for _ in range(100):  # the write end closed with the process: read what it said, up to EOF
                if worker.pipe < 0:
                    break
                self._drain_pipe(worker)
                time.sleep(0.01 if worker.pipe >= 0 else 0)
            self.workers.remove(worker)
            _mark_dead(worker.proc.pid, self.metrics_dir)
            return worker, code
        return None

    def signal_all(self, signum: int) -> None:
        for worker in self.workers:
            # SIGHUP (reload) only to workers past start-up: before its handler is set, SIGHUP would kill one
            if worker.proc.poll() is None and (worker.ready or signum != signal.SIGHUP):
                worker.proc.send_signal(signum)

    def stop_all(self) -> list[int]:
        """SIGTERM every worker, wait for them (killing any still there after `STOP_TIMEOUT`), return the codes."""
        self.pending.clear()
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        codes = []
        for worker in list(self.workers):
            try:
                codes.append(worker.proc.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                codes.append(worker.proc.wait())
            _mark_dead(worker.proc.pid, self.metrics_dir)
        self.close()
        return codes

    def close(self) -> None:
        for worker in self.workers:
            if worker.pipe >= 0:
                self.selector.unregister(worker.pipe)
                os.close(worker.pipe)
                worker.pipe = -1
        self.workers.clear()
        self.selector.close()


def supervise(config_path: Path, workers: int, extra_args: list[str], policy: RestartPolicy | None = None) -> int:
    config = load_all(config_path).config  # raises ConfigError: reported by the CLI, exit 2
    policy = policy or RestartPolicy()
    own_dir = MULTIPROC_ENV not in os.environ
    metrics_dir = Path(os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="ota-gateway-metrics-"))
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()
    env = {**os.environ, WORKER_ENV: "1", MULTIPROC_ENV: str(metrics_dir)}
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--workers", "1", *extra_args]
    sup = _Supervisor(cmd, env, metrics_dir, policy, config, workers)

    def forward(signum: int, frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            sup.stopping = True
            sup.pending.clear()
        sup.signal_all(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        for _ in range(workers):
            sup.start(restarted=False)
        return _run(sup)
    finally:
        for worker in sup.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _run(sup: _Supervisor) -> int:
    codes: list[int] = []
    while sup.workers or (sup.pending and not sup.stopping):
        sup.wait(0.1)
        now = time.monotonic()
        while sup.pending and sup.pending[0] <= now and not sup.stopping:
            sup.pending.pop(0)
            sup.start(restarted=True)
        dead = sup.reap()
        if dead is None:
            continue
        worker, code = dead
        if sup.stopping:
            codes.append(code)
            continue
        error = bytes(worker.said).decode("utf-8", "replace").strip()
        if not worker.ready:
            sup.stop_all()
            problem(error or f"worker {worker.proc.pid} {describe_exit(code)} during start-up")
            return EXIT_STARTUP
        verdict = after_crash(sup.policy, sup.history, now)
        sup.history = verdict.history
        what = f"worker {worker.proc.pid} {describe_exit(code)}"
        if not verdict.restart:
            sup.stop_all()
            log.error("%s; %d worker deaths within %g s: stopping the server", what, verdict.crashes, sup.policy.window)
            return EXIT_CRASH_LOOP
        log.warning(
            "%s; starting a new one in %g s (%d within %g s)", what, verdict.delay, verdict.crashes, sup.policy.window
        )
        sup.pending.append(now + verdict.delay)
        sup.pending.sort()
    sup.close()
    if any(c == 3 for c in codes):
        return 3
    return max((c for c in codes if c > 0), default=0)


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
