"""Profile one gateway over 200 MiB verified downloads: `perf record` or `py-spy record --native` on its process.

The same set-up as `stream_ab.py` (one HTTPS origin, the gateway pinned to core 0, client and origin on core 1): one
warm-up download, then the profiler attaches and `--downloads` (3) downloads run; prints MB per CPU-second of those
and the load average. Read the result with `perf report -i OUT --no-children --sort dso,sym --stdio -g none`, or
`bench/spy_summary.py OUT`.

    .venv/bin/python bench/stream_profile.py com.example.cdn perf /tmp/cdn.perf [SRC]
    .venv/bin/python bench/stream_profile.py com.example.dir spy /tmp/dir.spy [SRC]
    .venv/bin/python bench/stream_profile.py com.example.cdn perf /tmp/cdn.perf --dwarf --downloads 1
    .venv/bin/python bench/stream_profile.py com.example.cdn spy /tmp/cdn.spy --gil

Needs `perf` (Debian's linux-perf) or py-spy (`.venv/bin/pip install py-spy`), and ptrace/perf access.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # the harness: workspace, origin, gateway processes, CPU


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("app", choices=[harness.APP_CDN, harness.APP_DIR], help="HTTPS origin or directory origin")
    p.add_argument("tool", choices=["perf", "spy"])
    p.add_argument("out", type=Path)
    p.add_argument("src", nargs="?", type=Path, help="a source folder holding gateway/ (default: this work tree)")
    p.add_argument("--downloads", type=int, default=3)
    p.add_argument("--size-mib", type=int, default=200)
    p.add_argument("--dwarf", action="store_true", help="perf: DWARF call graphs (who calls memmove)")
    p.add_argument("--gil", action="store_true", help="py-spy: only the thread holding the GIL, no native frames")
    args = p.parse_args(argv)
    harness.check_prerequisites()
    os.sched_setaffinity(0, {harness.CLIENT_CORE})
    base = Path(tempfile.mkdtemp(prefix="ota-stream-profile-"))
    try:
        big = f"/bundles/{args.app}/{harness.BIG_VERSION}.zip"
        ws = harness.make_workspace(base, args.size_mib * harness.MIB, 1024)
        with harness.origin_server(ws) as origin, contextlib.ExitStack() as stack:
            cfg = harness.gateway_config(ws, base / "gw", origin.port, src=args.src)
            gw = stack.enter_context(harness.run_gateway("gw", cfg, harness.PROXY_CORE, src=args.src))
            ctx = ws.client_context()
            harness.download(gw.port, big, ctx, ws.big_sha, ws.big_size)  # warm-up: the index, the origin connection
            if args.tool == "perf":
                # frame pointers (libc and libcrypto have none: their callers stay unknown), or DWARF unwinding
                # (callers of memmove and memset; large files, so a lower rate)
                graph = ["-F", "400", "--call-graph", "dwarf,32768"] if args.dwarf else ["-F", "2000", "-g"]
                cmd = ["perf", "record", "-e", "cpu-clock", *graph, "-o", str(args.out), "-p", str(gw.pid)]
            else:
                # --native samples every thread, idle ones too; --gil only the thread holding the GIL (Python's share)
                how = ["--gil", "-r", "500"] if args.gil else ["--native", "-r", "250"]
                spy = str(harness.VENV_BIN / "py-spy")
                cmd = [spy, "record", *how, "-f", "raw", "-o", str(args.out), "-p", str(gw.pid)]
            profiler = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(1.0)  # let it attach

                def work() -> None:
                    for _ in range(args.downloads):
                        harness.download(gw.port, big, ctx, ws.big_sha, ws.big_size)

                sample = harness.measure(gw.pid, work)
            finally:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(60)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    mb = args.downloads * ws.big_size / harness.MB
    print(f"{args.app}: {mb / sample.cpu:.0f} MB per CPU-second under {args.tool}, load average {os.getloadavg()}")
    print(f"profile: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
