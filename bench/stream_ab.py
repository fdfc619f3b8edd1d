"""A/B of the 200 MiB verified stream alone: gateways from several source copies, one origin kind, interleaved.

The lighter sibling of `run.py --streams-only --compare-src DIR` (no nginx rows): one HTTPS origin (nginx), one
gateway per source (pinned like `run.py`: gateways on core 0, client and origin on core 1), then `ROUNDS` rounds of
one download through each, the order reversed every other round so that drift hits every variant alike. Prints the
median MB per CPU-second (and each sample) and the wall MB/s per variant, each variant against the first one paired
by round (the median of the per-round ratios, and in how many rounds it was ahead), with the load average before
and after.

    git archive <commit> gateway | tar -x -C /tmp/old
    .venv/bin/python bench/stream_ab.py com.example.cdn 8 /tmp/old -     # "-" is this work tree
    .venv/bin/python bench/stream_ab.py com.example.dir 8 /tmp/old -     # the directory origin
    .venv/bin/python bench/stream_ab.py com.example.cdn 12 /tmp/old - --restart-every 3   # 4 sets of processes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # the harness: workspace, origin, gateway processes, CPU


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("app", choices=[harness.APP_CDN, harness.APP_DIR], help="HTTPS origin or directory origin")
    p.add_argument("rounds", type=int)
    p.add_argument("sources", nargs="+", help="source folders holding gateway/, or - for this work tree")
    p.add_argument("--size-mib", type=int, default=200)
    p.add_argument(
        "--restart-every",
        type=int,
        default=0,
        help="start fresh gateway processes every N rounds (a process's pooled origin connection keeps its own "
        "pace: HTTPS-origin figures moved +-15 %% between processes of the same code)",
    )
    args = p.parse_args(argv)
    harness.check_prerequisites()
    os.sched_setaffinity(0, {harness.CLIENT_CORE})
    base = Path(tempfile.mkdtemp(prefix="ota-stream-ab-"))
    big = f"/bundles/{args.app}/{harness.BIG_VERSION}.zip"
    try:
        ws = harness.make_workspace(base, args.size_mib * harness.MIB, 1024)
        print(f"load average before: {os.getloadavg()}")
        names = list(args.sources)
        samples: dict[str, list[harness.Sample]] = {name: [] for name in names}
        every = args.restart_every or args.rounds
        ctx = ws.client_context()
        with harness.origin_server(ws) as origin:
            for start in range(0, args.rounds, every):  # fresh gateway processes for each block of rounds
                with contextlib.ExitStack() as stack:
                    gateways = []
                    for i, name in enumerate(names):
                        src = None if name == "-" else Path(name)
                        cfg = harness.gateway_config(ws, base / f"gw{i}-{start}", origin.port, src=src)
                        gateways.append((name, stack.enter_context(harness.run_gateway(name, cfg, 0, src=src))))
                    for _, gw in gateways:  # warm-up: the index, the origin connection
                        harness.download(gw.port, big, ctx, ws.big_sha, ws.big_size)
                    for rnd in range(start, min(start + every, args.rounds)):
                        for name, gw in gateways if rnd % 2 == 0 else gateways[::-1]:

                            def work(port: int = gw.port) -> None:
                                harness.download(port, big, ctx, ws.big_sha, ws.big_size)

                            samples[name].append(harness.measure(gw.pid, work))
        mb = ws.big_size / harness.MB
        for name, got in samples.items():
            per_cpu = [mb / s.cpu for s in got]
            wall = statistics.median(mb / s.wall for s in got)
            print(
                f"{name}: MB per CPU-second median {statistics.median(per_cpu):.0f} "
                f"({', '.join(f'{x:.0f}' for x in per_cpu)}), wall {wall:.0f} MB/s"
            )
        first, *others = samples
        for name in others:  # paired per round: drift between rounds cancels out
            cpu = [a.cpu / b.cpu for a, b in zip(samples[first], samples[name], strict=True)]
            wall = [a.wall / b.wall for a, b in zip(samples[first], samples[name], strict=True)]
            print(
                f"{name} / {first}, paired by round: MB per CPU-second x{statistics.median(cpu):.3f} "
                f"(ahead in {sum(r > 1 for r in cpu)} of {len(cpu)}), wall MB/s x{statistics.median(wall):.3f} "
                f"(ahead in {sum(r > 1 for r in wall)} of {len(wall)})"
            )
        print(f"load average after: {os.getloadavg()}")
        return 0
    except harness.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
