"""A/B runs of the gateway's verified streaming path, with bench-only monkeypatches (bench/launcher.py).

Same set-up as bench/run.py (nginx HTTPS origin and client on core 1, gateway on core 0, a client that hashes), but
only the gateway, in several variants, measured in rounds that alternate the variants so that drift on a noisy
machine hits all of them alike. Reports medians and the change against the first variant.

    .venv/bin/python bench/ab.py                                   # the default set of variants
    .venv/bin/python bench/ab.py --variants base,thread-hash --origins dir --rounds 3
    .venv/bin/python bench/ab.py --variants base --spy /tmp/prof   # py-spy --native profile of each origin's path
    .venv/bin/python bench/ab.py --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import run  # bench/run.py

LAUNCHER = [sys.executable, str(Path(__file__).resolve().parent / "launcher.py")]


@dataclass(frozen=True)
class Variant:
    doc: str
    patches: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # ota-gateway serve arguments
    chunk: int = 262144  # limits.chunk_size (the directory origin's read size)
    core: int | None = run.PROXY_CORE  # None: not pinned (may use the client's core too)


VARIANTS: dict[str, Variant] = {
    "base": Variant("ota-gateway serve as configured (uvloop, chunk_size 256 KiB), pinned to one core"),
    "control": Variant("identical to base: shows the noise between two runs of the same thing"),
    "asyncio": Variant("--no-uvloop", extra=("--no-uvloop",)),
    "same-pump": Variant("the launcher's replacement _pump with all options off (control)", ("same-pump",)),
    "chunk-64k": Variant("limits.chunk_size 64 KiB", chunk=65536),
    "chunk-1m": Variant("limits.chunk_size 1 MiB", chunk=1 << 20),
    "chunk-4m": Variant("limits.chunk_size 4 MiB", chunk=4 << 20),
    "thread-hash": Variant("SHA-256 of each chunk >= 64 KiB in a worker thread", ("thread-hash",)),
    "no-write-timeout": Variant("no asyncio.timeout() around each write", ("no-write-timeout",)),
    "write-high-1m": Variant("client transport write high-water 1 MiB", ("write-high=1m",)),
    "read-bufsize-1m": Variant("aiohttp client read_bufsize 1 MiB (HTTPS origin)", ("read-bufsize=1m",)),
    "coalesce-256k": Variant("join origin chunks to >= 256 KiB before verify+send", ("coalesce=256k",)),
    "upstream-1m": Variant(
        "read_bufsize 1 MiB + coalesce 256 KiB + write high-water 1 MiB",
        ("read-bufsize=1m", "coalesce=256k", "write-high=1m"),
    ),
    "dir-1m-thread-hash": Variant("chunk_size 1 MiB + thread hashing", ("thread-hash",), chunk=1 << 20),
    "base-unpinned": Variant("not pinned: the gateway may use both cores", core=None),
    "thread-hash-unpinned": Variant("thread hashing, not pinned", ("thread-hash",), core=None),
    "dir-1m-thread-hash-unpinned": Variant(
        "chunk_size 1 MiB + thread hashing, not pinned", ("thread-hash",), chunk=1 << 20, core=None
    ),
    "dir-fast": Variant("directory origin: open+stat(+small read) in one thread hop", ("dir-fast",)),
    "dir-read-hash": Variant("directory origin: read+hash in one worker call, one chunk ahead", ("dir-read-hash",)),
    "dir-read-hash-1m": Variant("dir-read-hash with chunk_size 1 MiB", ("dir-read-hash",), chunk=1 << 20),
    "dir-read-hash-unpinned": Variant("dir-read-hash, not pinned", ("dir-read-hash",), core=None),
    "dir-read-hash-1m-unpinned": Variant(
        "dir-read-hash with chunk_size 1 MiB, not pinned", ("dir-read-hash",), chunk=1 << 20, core=None
    ),
    "audit-fast": Variant("audit line without dataclasses.asdict", ("audit-fast",)),
    "small-fast": Variant("audit-fast + dir-fast", ("audit-fast", "dir-fast")),
    "chunk-stats": Variant("base, and print the origin chunk-size histogram", ("chunk-stats",)),
}

DEFAULT = ",".join(
    ["base", "asyncio", "chunk-64k", "chunk-1m", "dir-read-hash", "thread-hash", "write-high-1m", "no-write-timeout"]
)

ORIGINS = {"dir": run.APP_DIR, "cdn": run.APP_CDN}


@dataclass
class Cell:
    samples: list[run.Sample] = field(default_factory=list)
    rss_kib: int = 0
    threads: dict[str, float] = field(default_factory=dict)  # "main" / "other": CPU seconds (all samples)


def thread_cpu(pid: int) -> dict[str, float]:
    out = {"main": 0.0, "other": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            f = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out["main" if task.name == str(pid) else "other"] += (int(f[11]) + int(f[12])) / run.CLK_TCK
    return out


def spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[Any]:
    spy_bin = Path(sys.executable).parent / "py-spy"
    cmd = [*run.pin_prefix(run.CLIENT_CORE), str(spy_bin), "record", "--native", "-r", "250", "-p", str(pid)]
    cmd += ["-f", "raw", "-o", str(out), "-d", str(int(seconds))]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf(pid: int, out: Path, seconds: float) -> subprocess.Popen[Any]:
    cmd = [*run.pin_prefix(run.CLIENT_CORE), "perf", "record", "-e", "cpu-clock", "-F", "1999", "-g", "-p", str(pid)]
    cmd += ["-o", str(out), "--", "sleep", str(seconds)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure_variant(
    name: str,
    variant: Variant,
    ws: run.Workspace,
    base: Path,
    origin_port: int,
    origins: list[str],
    runs: int,
    cells: dict[tuple[str, str], Cell],
    small: int,
    spy_dir: Path | None,
    perf_dir: Path | None = None,
) -> None:
    cfg = run.gateway_config(ws, base / f"gw-{variant.chunk}", origin_port, variant.chunk)
    launcher = [*LAUNCHER, *(a for p in variant.patches for a in ("--patch", p)), "--"]
    ctx = ws.client_context()
    with run.run_gateway(name, cfg, variant.core, *variant.extra, launcher=launcher) as gw:
        for key in origins:
            app = ORIGINS[key]
            run.download(gw.port, f"/bundles/{app}/{run.SMALL_VERSION}.zip", ctx, ws.small_sha, ws.small_size)
            cell = cells.setdefault((name, key), Cell())
            path = f"/bundles/{app}/{run.BIG_VERSION}.zip"
            profiler = spy(gw.pid, spy_dir / f"{name}-{key}.txt", 8) if spy_dir else None
            if perf_dir:
                profiler = perf(gw.pid, perf_dir / f"{name}-{key}.data", 8)
            if profiler:
                time.sleep(1.0)
            t0 = thread_cpu(gw.pid)
            for _ in range(runs):
                cell.samples.append(
                    run.measure(gw.pid, lambda p=path: run.download(gw.port, p, ctx, ws.big_sha, ws.big_size))
                )
            t1 = thread_cpu(gw.pid)
            for k in t1:
                cell.threads[k] = cell.threads.get(k, 0.0) + t1[k] - t0[k]
            if profiler:
                profiler.wait(30)
            if small:
                res = run.bench_keepalive(name, gw, f"/bundles/{app}/{run.SMALL_VERSION}.zip", ws, small, 1)
                cells.setdefault((name, f"{key}-1KiB"), Cell()).samples.extend(res.samples)
            cell.rss_kib = max(cell.rss_kib, run.rss_kib(gw.pid))
        if variant.patches and "chunk-stats" in variant.patches:
            gw.proc.send_signal(signal.SIGTERM)
            gw.proc.wait(15)
            time.sleep(0.3)
            print("\n".join(line for line in gw.log if line.startswith("bench:")), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--variants", default=DEFAULT)
    p.add_argument("--origins", default="dir,cdn")
    p.add_argument("--runs", type=int, default=2, help="downloads per variant per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all variants (order reversed every round)")
    p.add_argument("--size-mib", type=int, default=200)
    p.add_argument("--small", type=int, default=0, help="also N keep-alive 1 KiB requests per variant and round")
    p.add_argument("--spy", type=Path, help="write py-spy --native raw profiles here (first round only)")
    p.add_argument("--perf", type=Path, help="write `perf record -g` data here (first round only)")
    p.add_argument("--gateway-src", type=Path)
    p.add_argument("--list", action="store_true")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.list:
        for name, v in VARIANTS.items():
            print(f"{name:28} {v.doc}")
        return 0
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; see --list")
    origins = [o for o in args.origins.split(",") if o]
    run.use_gateway_source(args.gateway_src)
    run.check_prerequisites()
    os.sched_setaffinity(0, {run.CLIENT_CORE})
    base = Path(tempfile.mkdtemp(prefix="ota-ab-"))
    os.chmod(base, 0o700)
    cells: dict[tuple[str, str], Cell] = {}
    started = time.monotonic()
    try:
        ws = run.make_workspace(base, args.size_mib * run.MIB, 1024)
        for folder in (args.spy, args.perf):
            if folder:
                folder.mkdir(parents=True, exist_ok=True)
        with run.origin_server(ws) as origin:
            for rnd in range(args.rounds):
                order = names if rnd % 2 == 0 else list(reversed(names))
                for name in order:
                    measure_variant(
                        name,
                        VARIANTS[name],
                        ws,
                        base,
                        origin.port,
                        origins,
                        args.runs,
                        cells,
                        args.small,
                        args.spy if rnd == 0 else None,
                        args.perf if rnd == 0 else None,
                    )
                    print(f"ab: round {rnd + 1} {name} done ({time.monotonic() - started:.0f}s)", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    size = args.size_mib * run.MIB
    lines = [
        f"# A/B: verified streaming, {args.size_mib} MiB, {args.rounds} rounds x {args.runs} downloads per variant",
        "",
        "| variant | origin | wall MB/s | MB per CPU-s (min-max) | vs first | main / other threads CPU s "
        "| peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    first: dict[str, float] = {}
    for name in names:
        for key in origins:
            cell = cells.get((name, key))
            if not cell or not cell.samples:
                continue
            wall = statistics.median(size / run.MB / s.wall for s in cell.samples)
            effs = [size / run.MB / s.cpu for s in cell.samples if s.cpu > 0]
            eff = statistics.median(effs)
            first.setdefault(key, eff)
            share = f"{cell.threads.get('main', 0):.2f} / {cell.threads.get('other', 0):.2f}"
            lines.append(
                f"| {name} | {key} | {wall:.0f} | {eff:.0f} ({min(effs):.0f}-{max(effs):.0f}) | "
                f"{eff / first[key] - 1:+.0%} | {share} | "
                f"{cell.rss_kib / 1024:.1f} |"
            )
    if args.small:
        lines += ["", "| variant | origin | CPU us per 1 KiB request | vs first |", "|---|---|---:|---:|"]
        firsts: dict[str, float] = {}
        for name in names:
            for key in origins:
                cell = cells.get((name, f"{key}-1KiB"))
                if not cell:
                    continue
                us = statistics.median(s.cpu / args.small * 1e6 for s in cell.samples)
                firsts.setdefault(key, us)
                lines.append(f"| {name} | {key} | {us:.0f} | {us / firsts[key] - 1:+.0%} |")
    lines += ["", "Variants:", ""]
    lines += [f"- `{n}`: {VARIANTS[n].doc}" for n in names]
    report = "\n".join(lines) + f"\n\nTime: {time.monotonic() - started:.0f} s; `{' '.join(sys.argv)}`\n"
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
