"""Several worker processes on one port: `ota-gateway serve --workers N`.

Owns the supervisor. It checks the config once (so that a bad config exits 2 before anything starts), imports
everything a worker runs (`preload`), then forks N workers that each run `serve` (the config is read again in each
worker, so a worker restarted later sees the file as it is then). Forking after the imports shares the interpreter's
modules, code and the libraries' pages between all workers copy-on-write (`gc.freeze` keeps the collector from
touching them): a worker's own memory (USS) is what it allocates while serving, and a (re)started worker is ready
without importing anything. The workers all bind the same ports with SO_REUSEPORT (the kernel spreads connections
over them) and share a Prometheus multiprocess directory, so one scrape of the admin port, whichever worker answers
it, sums all workers. SIGTERM/SIGINT/SIGHUP are passed on to every worker.

Each worker gets the write end of a pipe (`OTA_GATEWAY_READY_FD`). It writes `ready` there once every listener is
bound; if its start-up fails it writes its one-line error there instead (and not on stderr) and exits 2. A worker
that ends without `ready` failed during start-up: at the first start the supervisor stops every worker, prints that
error once and exits 2. A replacement that fails so (a config on disk that no longer loads, which the running
workers refused to reload) is tried again after a backoff while another worker still serves the last good config,
with a warning naming the error (`after_failed_start`); with none left serving, the server stops with exit 2. A
worker that dies after `ready` is started again after a backoff (0.5 s, doubled for every other death within the
window, at most 30 s), with one line on stderr, and counted in `ota_gateway_worker_restarts_total`; the
`max_crashes`-th death within `window` seconds (default 5 in 60 s, see `gateway/core/startup.py`) stops the server
with that worker's last error and exit code 1. After a stop signal the exit code is the worst of the workers': 3 if
any had to abort requests; a worker that a stop signal ended before it was ready (killed by it during its start-up)
counts as a clean stop. A supervisor that dies (even by SIGKILL) takes its workers with it: each gets SIGTERM from
the kernel and drains as on a stop. The metrics folder such a supervisor leaves behind is removed by the next
supervisor of the same user that starts (`remove_stale_metrics_dirs`: its recorded pid is dead).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import selectors
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from gateway.config import Config
from gateway.core.startup import RestartPolicy, after_crash, after_failed_start
from gateway.logs import announce_ready, problem

log = logging.getLogger("ota_gateway.workers")

WORKER_ENV = "OTA_GATEWAY_WORKER"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
READY_FD_ENV = "OTA_GATEWAY_READY_FD"
RESTARTED_ENV = "OTA_GATEWAY_RESTARTED"
SLOT_ENV = "OTA_GATEWAY_WORKER_SLOT"
READY = b"ready\n"
EXIT_STARTUP = 2
EXIT_CRASH_LOOP = 1
STOP_TIMEOUT = 60.0  # after the workers' own shutdown grace has had its chance, a stuck worker is killed
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def is_restart() -> bool:
    return os.environ.get(RESTARTED_ENV) == "1"


def reports() -> bool:
    """Whether this process logs what every worker does alike (a reload, its failure): a single process, or the
    worker in slot 0, so that one SIGHUP or file change gives one line, not one per worker."""
    return not is_worker() or os.environ.get(SLOT_ENV, "0") == "0"


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


class WorkerProcess:
    """A forked worker, seen from the supervisor: its pid and, once reaped, its exit code (-N: killed by signal N)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: the code is lost
                self.returncode = 1
            else:
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if the worker still runs after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass
class _Worker:
    proc: WorkerProcess
    pipe: int  # read end of the ready pipe
    started: float
    restarted: bool
    slot: int  # 0 .. N-1, kept by a replacement: slot 0 reports what every worker does alike (`reports`)
    said: bytearray = field(default_factory=bytearray)
    ready: bool = False


class _Supervisor:
    def __init__(
        self, run_worker: Callable[[], int], metrics_dir: Path, policy: RestartPolicy, config: Config, count: int
    ) -> None:
        self.run_worker, self.metrics_dir, self.policy = run_worker, metrics_dir, policy
        self.config, self.count = config, count
        self.announced = False  # the readiness line is logged once, when the first `count` workers are ready
        self.selector = selectors.DefaultSelector()
        self.workers: list[_Worker] = []
        self.pending: list[tuple[float, int]] = []  # (monotonic time, slot) at which to start a replacement
        self.history: tuple[float, ...] = ()
        self.failed_starts = 0  # replacements that failed their start-up in a row
        self.stopping = False

    def start(self, restarted: bool, slot: int) -> None:
        parent = os.getpid()
        read, write = os.pipe()
        # no forwarded signal may reach the child before it has put the default handlers back (the supervisor's
        # handler, run in a worker, would signal the other workers)
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            pid = os.fork()
            if pid == 0:
                self._in_child(parent, read, write, restarted, slot)  # never returns
        except BaseException:
            os.close(read)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
            os.close(write)
        os.set_blocking(read, False)
        worker = _Worker(WorkerProcess(pid), read, time.monotonic(), restarted, slot)
        self.selector.register(read, selectors.EVENT_READ, worker)
        self.workers.append(worker)

    def _in_child(self, parent: int, read: int, write: int, restarted: bool, slot: int) -> None:
        """In a new worker: drop the supervisor's state, run `serve`, exit with its code (never returns)."""
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's reload handler is installed
            _stop_with(parent)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
            os.close(read)
            for other in self.workers:
                if other.pipe >= 0:
                    os.close(other.pipe)
            self.selector.close()
            os.environ.update(
                {
                    WORKER_ENV: "1",
                    READY_FD_ENV: str(write),
                    RESTARTED_ENV: "1" if restarted else "0",
                    SLOT_ENV: str(slot),
                }
            )
            code = self.run_worker()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

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
        self.failed_starts = 0
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
            code = worker.proc.wait(max(0.1, deadline - time.monotonic()))
            if code is None:
                worker.proc.kill()
                code = worker.proc.wait(STOP_TIMEOUT)
            codes.append(code if code is not None else -signal.SIGKILL)
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
    policy = policy or RestartPolicy()
    own_dir = MULTIPROC_ENV not in os.environ
    if own_dir:
        remove_stale_metrics_dirs(Path(tempfile.gettempdir()))
        metrics_dir = Path(tempfile.mkdtemp(prefix=METRICS_PREFIX))
        (metrics_dir / OWNER_FILE).write_text(f"{os.getpid()}\n")
    else:
        metrics_dir = Path(os.environ[MULTIPROC_ENV])
    # before prometheus_client is imported: it picks its multiprocess value class at import time
    os.environ[MULTIPROC_ENV] = str(metrics_dir)
    try:
        config = preload(config_path)  # raises ConfigError: reported by the CLI, exit 2
        for stale in metrics_dir.glob("*.db"):
            stale.unlink()
        argv = ["serve", "--config", str(config_path), "--workers", "1", *extra_args]
        return _supervise(argv, metrics_dir, workers, policy, config)
    finally:
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


METRICS_PREFIX = "ota-gateway-metrics-"
OWNER_FILE = "supervisor.pid"  # the pid of the supervisor that made the folder (not a *.db: prometheus skips it)


def remove_stale_metrics_dirs(tmp: Path) -> list[Path]:
    """Remove the multiprocess metrics folders that supervisors killed with `kill -9` left in `tmp`: only folders
    of this user (owner uid) whose recorded supervisor pid is no longer alive; a folder without a readable pid, or
    whose pid runs, is kept. Returns what was removed."""
    removed = []
    for folder in tmp.glob(f"{METRICS_PREFIX}*"):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.lstat().st_uid != os.getuid():
                continue
            pid = int((folder / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid <= 0 or _alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        log.info("removed %d metrics folder(s) of supervisors that are gone: %s", len(removed), removed[0])
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def preload(config_path: Path) -> Config:
    """Check the config, then import what a worker runs, so that forked workers share it (copy-on-write)."""
    from gateway.reload import load_all

    config = load_all(config_path).config
    import uvloop  # noqa: F401  (a dependency; `--no-uvloop` only leaves it unused)

    import gateway.runner  # noqa: F401  (the whole serve path: aiohttp, handlers, origins, state, metrics)

    gc.collect()
    gc.freeze()  # the collector would write to every object it tracks, unsharing the pages they are on
    return config


def _supervise(argv: list[str], metrics_dir: Path, workers: int, policy: RestartPolicy, config: Config) -> int:
    def run_worker() -> int:
        from gateway.cli import main

        return main(argv)

    sup = _Supervisor(run_worker, metrics_dir, policy, config, workers)

    def forward(signum: int, frame: FrameType | None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            sup.stopping = True
            sup.pending.clear()
        sup.signal_all(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    try:
        for slot in range(workers):
            sup.start(restarted=False, slot=slot)
        return _run(sup)
    finally:
        for worker in sup.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait(STOP_TIMEOUT)


def _run(sup: _Supervisor) -> int:
    codes: list[int] = []
    while sup.workers or (sup.pending and not sup.stopping):
        sup.wait(0.1)
        now = time.monotonic()
        while sup.pending and sup.pending[0][0] <= now and not sup.stopping:
            _, slot = sup.pending.pop(0)
            sup.start(restarted=True, slot=slot)
        dead = sup.reap()
        if dead is None:
            continue
        worker, code = dead
        if sup.stopping:
            codes.append(code)
            continue
        error = bytes(worker.said).decode("utf-8", "replace").strip()
        error = error or f"worker {worker.proc.pid} {describe_exit(code)} during start-up"
        if not worker.ready:
            serving = sum(w.ready and w.proc.poll() is None for w in sup.workers)
            sup.failed_starts += 1
            retry = after_failed_start(sup.policy, sup.failed_starts, serving) if worker.restarted else None
            if retry is None:
                sup.stop_all()
                problem(error)
                return EXIT_STARTUP
            log.warning(
                "a new worker could not start: %s; %d worker(s) keep serving the last good config; next try in %g s",
                "; ".join(error.splitlines()),
                serving,
                retry,
            )
            sup.pending.append((now + retry, worker.slot))
            sup.pending.sort()
            continue
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
        sup.pending.append((now + verdict.delay, worker.slot))
        sup.pending.sort()
    sup.close()
    if any(c == 3 for c in codes):
        return 3
    return max((c for c in codes if c > 0), default=0)


def _stop_with(parent: int) -> None:
    """In a new worker: get SIGTERM when the supervisor dies (Linux `PR_SET_PDEATHSIG`), also when it is killed
    with SIGKILL and cannot pass a signal on. Without it the workers would keep serving the old config as orphans,
    holding the ports, and a gateway started again would share those ports with them (SO_REUSEPORT). The signal
    is blocked here (see `start`), so a supervisor that died already is seen by `getppid` and the same SIGTERM."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's death goes unnoticed, as before
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # delivered once unblocked


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
