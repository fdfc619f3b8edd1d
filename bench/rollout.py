"""What staged rollouts cost an update check: CPU per `POST /updates`, with and without a rollout in the policy.

One `ota-gateway serve` (one worker, pinned to core 0; the client on core 1) in front of a directory origin; the
client sends `--checks` update checks with distinct device ids over one keep-alive mTLS connection and reads the
gateway's CPU (utime+stime from /proc) before and after. Each variant has its own gateway, all running at once and
driven in turn for `--runs` rounds (median reported), so that load from elsewhere hits every variant alike:

- `none`: the app has no rollout or halt block (the halted-release check still runs: an operator's halt holds for
  every app);
- `100%`: `identity: device`, the offered release listed at 100 %: the full decision (device key, the draw, the
  halt lookup), the same answer as `none`;
- `50%`: half of the devices are held back and get the release before it (index lookup and a second review).

    .venv/bin/python bench/rollout.py                 # part of `make bench`
    .venv/bin/python bench/rollout.py --gateway-src DIR --variants none   # the same checks on another source copy
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # bench/run.py: workspace, pinned gateway, CPU accounting

VARIANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "100%": {"identity": "device", "releases": {harness.BIG_VERSION: {"percent": 100}}},
    "50%": {"identity": "device", "releases": {harness.BIG_VERSION: {"percent": 50}}},
}


def policy(ws: harness.Workspace, config: Path, rollout: dict[str, Any] | None) -> None:
    app: dict[str, Any] = {
        "app_id": harness.APP_DIR,
        "origin": "local",
        "channels": {"default": "production", "allowed": ["production"]},
        "clients": [{"name": "bench", "issuer": [ws.ca.stem]}],
        "rate_limits": {"updates_per_minute": 100000},
    }
    if rollout is not None:
        app["rollout"] = rollout
    (config.parent / "policies" / "bench.yaml").write_text(yaml.safe_dump({"apps": [app]}, sort_keys=False))


def checks(conn: http.client.HTTPSConnection, devices: list[str]) -> dict[str, int]:
    answers: dict[str, int] = {}
    for device in devices:
        body = {
            "platform": "android",
            "device_id": device,
            "app_id": harness.APP_DIR,
            "version_build": "0.1.0",
            "version_name": "0.9.0",
            "plugin_version": "8.51.14",
            "is_emulator": False,
            "is_prod": True,
        }
        conn.request("POST", "/updates", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read())
        if resp.status != 200 or "version" not in answer:
            raise harness.BenchError(f"update check answered {resp.status}: {answer}")
        answers[answer["version"]] = answers.get(answer["version"], 0) + 1
    return answers


def decision_us(n: int = 20000) -> float:
    """The pure decision alone, in this process: device key, the draw and the halt lookup (core/rollout.py)."""
    from gateway.core.rollout import Rollout, device_key, held_back

    rollout = Rollout({harness.BIG_VERSION: 50.0}, "device")
    devices, cert = [str(uuid.uuid4()) for _ in range(n)], "ab" * 32
    t0 = time.process_time()
    for device in devices:
        held_back(rollout, harness.APP_DIR, harness.BIG_VERSION, device_key(cert, device, "device"), {})
    return (time.process_time() - t0) / n * 1e6


def measure(ws: harness.Workspace, names: list[str], n: int, runs: int) -> list[dict[str, Any]]:
    """All variants' gateways at once, driven in turn, batch after batch: drift in the machine's load (other
    processes on the same cores) hits every variant alike."""
    with contextlib.ExitStack() as stack:
        conns = {}
        for name in names:
            config = harness.write_gateway_config(ws, ws.dir / f"gw-{name.rstrip('%')}", 0)
            policy(ws, config, VARIANTS[name])
            server = stack.enter_context(
                harness.run_gateway(f"gateway-{name}", config, harness.PROXY_CORE, "--workers", "1")
            )
            conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=ws.client_context(), timeout=30)
            stack.callback(conn.close)
            checks(conn, [str(uuid.uuid4()) for _ in range(200)])  # warm-up: connection, caches, SQLite pages
            conns[name] = (server, conn)
        samples: dict[str, list[float]] = {name: [] for name in names}
        answers: dict[str, dict[str, int]] = {}
        for _ in range(runs):
            for name, (server, conn) in conns.items():
                devices = [str(uuid.uuid4()) for _ in range(n)]
                c0 = harness.cpu_seconds(server.proc.pid)
                answers[name] = checks(conn, devices)
                time.sleep(0.02)
                samples[name].append((harness.cpu_seconds(server.proc.pid) - c0) / n * 1e6)
    return [{"variant": k, "us": statistics.median(v), "samples": v, "answers": answers[k]} for k, v in samples.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--checks", type=int, default=2000, help="update checks per run")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: none, 100%%, 50%%")
    p.add_argument("--gateway-src", type=Path, help="run `python -m gateway` from this source folder instead")
    args = p.parse_args(argv)
    harness.use_gateway_source(args.gateway_src)
    os.sched_setaffinity(0, {harness.CLIENT_CORE})
    with tempfile.TemporaryDirectory(prefix="ota-bench-rollout-") as tmp:
        ws = harness.make_workspace(Path(tmp), 4096, 1024)
        results = measure(ws, args.variants.split(","), args.checks, args.runs)
    base = next((r["us"] for r in results if r["variant"] == "none"), None)
    print(f"gateway: {harness.gateway_revision()}; {args.checks} checks x {args.runs} runs; CPU us per update check")
    print("| variant | CPU us / check (median) | runs | vs none | answers (last run) |")
    print("|---|---|---|---|---|")
    for r in results:
        ratio = f"{(r['us'] / base - 1) * 100:+.1f} %" if base else "-"
        runs = " ".join(f"{s:.0f}" for s in r["samples"])
        print(f"| {r['variant']} | {r['us']:.0f} | {runs} | {ratio} | {r['answers']} |")
    print(f"the decision alone (device key, draw, halt lookup), in-process: {decision_us():.1f} us per check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
