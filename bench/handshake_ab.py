"""A/B of the CPU per mTLS handshake: several gateway sources (and nginx) in one run, interleaved.

Each `--src LABEL=DIR` is a folder holding a `gateway/` package (e.g. `git archive <commit> gateway | tar -x -C
DIR`); `--src LABEL=.` is this tree. Every gateway and the nginx mTLS proxy of `run.py` run at once, pinned to
core 0 (the client on core 1); rounds go over all of them in turn, in a different order each round, and each round
does `--n` new connections per server, each a 1 KiB GET with `Connection: close` (as `run.py` section 2) in the
modes asked for: `full` (no session offered), `resumed-1.2` / `resumed-1.3` (the client offers the session of the
connection before; the column "resumed" says how many the server actually resumed). CPU is utime+stime of the
server's process tree per connection; medians over the rounds.

    .venv/bin/python bench/handshake_ab.py --src base=/tmp/base --src new=. --rounds 7 --n 200
    .venv/bin/python bench/handshake_ab.py --src new=. --hold 60    # servers stay up 60 s for py-spy / perf
    .venv/bin/python bench/handshake_ab.py --src base=/tmp/base --src new=. --rounds 0 --instructions 50

`--instructions N` starts every server once more under valgrind's callgrind (nginx with `master_process off`) and
counts the instructions it executes for N new connections after a warm-up: a count that load from other
processes does not change (two runs of the same source agree to the instruction), so it resolves changes of 1 %
that CPU time on this shared machine cannot; it says nothing about cache misses, so confirm with CPU time. Needs
valgrind (`apt-get install valgrind`); about a minute per server.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import random
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run
import yaml

MODES = ("full", "full-1.2", "resumed-1.2", "resumed-1.3")


def connections(port: int, path: str, ws: run.Workspace, n: int, mode: str, status: int = 200) -> int:
    """`n` connections, each one GET with Connection: close (answered with `status`); returns how many were
    resumed."""
    ctx = ws.client_context()
    if mode.endswith("-1.2"):
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    session: ssl.SSLSession | None = None
    reused = 0
    for _ in range(n):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            data = bytearray()
            while chunk := tls.recv(65536):
                data += chunk
            if not data.startswith(f"HTTP/1.1 {status}".encode()):
                raise run.BenchError(f"{port}: {bytes(data[:100])!r}")
            reused += tls.session_reused
            if mode.startswith("resumed"):
                session = tls.session  # TLS 1.3: the ticket arrived with the response (or never)
    return reused


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", action="append", default=[], help="LABEL=DIR, a folder holding gateway/ ('.' = this tree)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--n", type=int, default=200, help="connections per server, mode and round")
    p.add_argument("--modes", default="full", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--no-nginx", action="store_true")
    p.add_argument("--nginx-resume", action="store_true", help="nginx with ssl_session_cache and tickets on")
    p.add_argument("--hold", type=float, default=0, help="keep the servers up this many seconds, then exit")
    p.add_argument("--perf", action="store_true", help="after the rounds: CPU ms per connection by library (perf)")
    p.add_argument("--instructions", type=int, default=0, metavar="N", help="instructions per connection (callgrind)")
    args = p.parse_args(argv)
    if args.instructions:
        run.require_valgrind()
    modes = args.modes.split(",")
    os.sched_setaffinity(0, {run.CLIENT_CORE})
    base = Path(tempfile.mkdtemp(prefix="ota-hs-ab-"))
    ws = run.make_workspace(base, 4096, 1024)
    small = f"/bundles/{run.APP_DIR}/{run.SMALL_VERSION}.zip"
    servers: list[tuple[str, run.Server, str]] = []
    starts: list[tuple[str, list[str], dict[str, str], Path, int, str]] = []  # how to start each one under valgrind
    with run.origin_server(ws) as origin, contextlib.ExitStack() as stack:
        if not args.no_nginx:
            nginx = stack.enter_context(
                run.run_nginx_proxy("nginx-proxy", base, ws, origin.port, resume=args.nginx_resume)
            )
            servers.append(("nginx (files from disk)", nginx, f"/files/{run.APP_DIR}/{run.SMALL_VERSION}.zip"))
        for spec in args.src:
            label, _, src = spec.partition("=")
            if src == ".":
                run.GATEWAY_CMD[:] = [str(run.GATEWAY_BIN)]
                run.GATEWAY_ENV.pop("PYTHONPATH", None)
            else:
                run.use_gateway_source(Path(src))
            cfg = run.gateway_config(ws, base / f"gw-{label}", origin.port)
            servers.append((label, stack.enter_context(run.run_gateway(label, cfg, run.PROXY_CORE)), small))
            port = yaml.safe_load(cfg.read_text())["listeners"][0]["port"]
            argv = [*run.GATEWAY_CMD, "serve", "--config", str(cfg), "--workers", "1"]
            starts.append((label, argv, dict(run.GATEWAY_ENV), cfg.parent, port, small))
        if not args.no_nginx:
            argv, port = nginx_single_process(base / "nginx-valgrind", ws, origin.port)
            starts.insert(0, (servers[0][0], argv, {}, base / "nginx-valgrind", port, servers[0][2]))
        for label, server, path in servers:
            connections(server.port, path, ws, 5, "full")  # warm-up
            print(f"{label}: pid {server.pid} port {server.port}", file=sys.stderr)
        if args.hold:
            time.sleep(args.hold)
            return 0
        cpu: dict[tuple[str, str], list[float]] = {}
        reused: dict[tuple[str, str], int] = {}
        load = [os.getloadavg()[0]]
        for rnd in range(args.rounds):
            order = servers[:]
            random.Random(rnd).shuffle(order)
            for mode in modes:
                for label, server, path in order:
                    c0 = run.cpu_seconds(server.pid)
                    r = connections(server.port, path, ws, args.n, mode)
                    time.sleep(0.02)
                    cpu.setdefault((label, mode), []).append((run.cpu_seconds(server.pid) - c0) / args.n * 1000)
                    reused[(label, mode)] = reused.get((label, mode), 0) + r
            load.append(os.getloadavg()[0])
            print(f"round {rnd + 1} done, load {load[-1]:.2f}", file=sys.stderr)
        if args.perf:
            by_dso = {label: perf_split(server, path, ws, args.n, modes[0]) for label, server, path in servers}
    counted: dict[str, dict[str, float]] = {}
    if args.instructions:  # after the others stopped: valgrind is slow and would weigh on their rounds
        for label, cmd, env, cwd, port, path in starts:
            counted[label] = instructions(label, cmd, env, cwd, port, path, ws, args.instructions, base)
            print(f"{label}: {sum(counted[label].values()) / 1e6:.3f} M instructions per connection", file=sys.stderr)
    print(
        f"\nload average (1 min) during the run: {min(load):.1f} to {max(load):.1f}; {args.rounds} rounds x {args.n}\n"
    )
    print("| server | mode | CPU ms per connection (median) | rounds | resumed |")
    print("|---|---|---:|---|---:|")
    for (label, mode), samples in cpu.items():
        rounds = " ".join(f"{s:.2f}" for s in samples)
        total = args.n * args.rounds
        print(f"| {label} | {mode} | {statistics.median(samples):.2f} | {rounds} | {reused[(label, mode)]}/{total} |")
    if args.perf:
        print(f"\nperf, {modes[0]}, CPU ms per connection by shared object (cpu-clock samples):\n")
        print_split(by_dso, 14, lambda v: f"{v:.3f}")
    if counted:
        print(f"\ncallgrind, {modes[0]}: thousand instructions per connection ({args.instructions} connections)\n")
        print_split(counted, 10, lambda v: f"{v / 1e3:,.0f}")
    return 0


def print_split(splits: dict[str, dict[str, float]], top: int, cell: Callable[[float], str]) -> None:
    """A Markdown table of per-server splits by shared object: the `top` objects (largest first), then the total."""
    objs = sorted({o for c in splits.values() for o in c}, key=lambda o: -max(c.get(o, 0) for c in splits.values()))
    print("| shared object | " + " | ".join(splits) + " |")
    print("|---|" + "---:|" * len(splits))
    for o in objs[:top]:
        print(f"| {o} | " + " | ".join(cell(c.get(o, 0)) for c in splits.values()) + " |")
    print("| total | " + " | ".join(cell(sum(c.values())) for c in splits.values()) + " |")


def nginx_single_process(directory: Path, ws: run.Workspace, origin_port: int) -> tuple[list[str], int]:
    """The command of `run.py`'s nginx mTLS proxy as one process (`master_process off`: the one callgrind counts),
    and its port."""
    port = run.free_port()
    body = run.PROXY_BODY.format(
        dir=directory, port=port, origin_port=origin_port, certs=ws.certs, origin=ws.origin, ciphers=run.CIPHERS
    )
    conf = run.write_nginx(directory, body)
    argv = ["nginx", "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    return [*argv, "-g", "daemon off; master_process off;"], port


def instructions(
    label: str,
    argv: list[str],
    env: dict[str, str],
    cwd: Path,
    port: int,
    path: str,
    ws: run.Workspace,
    n: int,
    base: Path,
    status: int = 200,
) -> dict[str, float]:
    """Instructions per connection by shared object of one server run under callgrind: counted from after a
    warm-up (instrumentation switched on with callgrind_control) to after `n` full-handshake connections, each
    answered with `status`."""
    out = base / f"callgrind-{re.sub(r'[^A-Za-z0-9_.-]', '_', label)}"
    out.mkdir(exist_ok=True)
    vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/cg.%p"]
    proc = subprocess.Popen(
        [*run.pin_prefix(run.PROXY_CORE), *vg, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=cwd,
        env={**os.environ, **env},
    )
    try:
        run.wait_port(port, proc, f"{label} under valgrind", timeout=300)
        run.callgrind_window(
            proc.pid,
            lambda: connections(port, path, ws, 20, "full", status),
            lambda: connections(port, path, ws, n, "full", status),
        )
    finally:
        run.stop_process(proc, timeout=60)
    dump = max(out.glob(f"cg.{proc.pid}.*"), key=lambda f: f.stat().st_mtime)
    annotated = subprocess.run(["callgrind_annotate", "--threshold=100", str(dump)], capture_output=True, text=True)
    by_object: collections.Counter[str] = collections.Counter()
    total = 0.0
    for line in annotated.stdout.splitlines():  # "  1,234 (0.5%)  ???:function [/path/to/object]"
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.*?)\s*$", line)
        if not m:
            continue
        count, what = int(m.group(1).replace(",", "")) / n, m.group(2)
        if what == "PROGRAM TOTALS":
            total = count
        elif (obj := re.search(r"\[(.*)\]$", what)) is not None:
            by_object[obj.group(1).rsplit("/", 1)[-1]] += count
    by_object["other (functions shown by source file, mostly libc)"] = total - sum(by_object.values())
    return dict(by_object)


def perf_split(server: run.Server, path: str, ws: run.Workspace, n: int, mode: str) -> dict[str, float]:
    """CPU ms per connection of `server`'s process tree by shared object, from `perf record -e cpu-clock`."""
    data = Path(tempfile.mkdtemp(prefix="ota-hs-perf-")) / "perf.data"
    pids = ",".join(str(p) for p in run.process_tree(server.pid))
    freq = 4000
    rec = subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(freq), "-p", pids, "-o", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    connections(server.port, path, ws, n, mode)
    time.sleep(0.05)
    rec.send_signal(signal.SIGINT)
    rec.wait(30)
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "-F", "sample,dso", "--stdio", "-q"],
        capture_output=True,
        text=True,
    ).stdout
    split: dict[str, float] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            split[parts[1]] = int(parts[0]) / freq * 1000 / n
    return split


if __name__ == "__main__":
    sys.exit(main())
