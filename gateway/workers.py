"""Several worker processes on one port: `ota-gateway serve --workers N`.

Owns the supervisor. It checks the config once (so that a bad config exits 2 before anything starts), then runs N
`serve` processes that all bind the same ports with SO_REUSEPORT (the kernel spreads connections over them) and
share a Prometheus multiprocess directory, so one scrape of the admin port, whichever worker answers it, sums all
workers. SIGTERM/SIGINT/SIGHUP are passed on to every worker. A worker that dies on its own is started again
(at most once per second). The exit code is the worst of the workers': 3 if any had to abort requests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from gateway.reload import load_all

WORKER_ENV = "OTA_GATEWAY_WORKER"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def supervise(config_path: Path, workers: int, extra_args: list[str]) -> int:
    load_all(config_path)  # raises ConfigError: reported by the CLI, exit 2
    own_dir = MULTIPROC_ENV not in os.environ
    metrics_dir = Path(os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="ota-gateway-metrics-"))
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()
    env = {**os.environ, WORKER_ENV: "1", MULTIPROC_ENV: str(metrics_dir)}
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--workers", "1", *extra_args]

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, env=env)

    procs = [start() for _ in range(workers)]
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    codes: list[int] = []
    try:
        while procs:
            time.sleep(0.1)
            for i, proc in enumerate(list(procs)):
                code = proc.poll()
                if code is None:
                    continue
                _mark_dead(proc.pid, metrics_dir)
                if stopping:
                    codes.append(code)
                    procs.remove(proc)
                else:
                    print(f"ota-gateway: worker {proc.pid} exited with {code}; starting a new one", file=sys.stderr)
                    time.sleep(1.0)
                    procs[i] = start()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if any(c == 3 for c in codes):
        return 3
    return max((c for c in codes if c > 0), default=0)


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]
