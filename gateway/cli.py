"""The `ota-gateway` command: serve, check, health, certs, release, device.

Owns argument parsing and how errors reach the user: a user error is one line per problem on stderr and exit
code 2 (config errors name file, line and key path); `check` validates everything `serve` would load, like
`nginx -t`. `main(argv)` returns the exit code so tests can call it in-process or as a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import signal
from collections.abc import Callable
from pathlib import Path

from gateway import __version__, logs
from gateway.config import DEFAULT_CONFIG
from gateway.core.rollout import FAILURE_ACTIONS
from gateway.errors import ConfigError
from gateway.logs import FORMATS, LEVELS, problem

EXIT_USAGE = 2
GROUP_HELP = "keys 0640 and owned by this group (name or gid), folder enterable by it; default: keys 0600"


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 seconds, got {text}")
    return value


def _fail(message: str) -> int:
    problem(message)
    return EXIT_USAGE


def _cmd_check(args: argparse.Namespace) -> int:
    from gateway.preflight import certificate_issues, runtime_issues
    from gateway.reload import load_all

    loaded = load_all(args.config)
    issues = runtime_issues(str(args.config), loaded.config, live=args.live)
    expired, ending = certificate_issues(str(args.config), loaded.config, dt.datetime.now(dt.UTC))
    for warning in ending:
        problem(f"warning: {warning}")
    if issues or expired:
        raise ConfigError(issues + expired)
    print(
        f"ota-gateway: {args.config}: OK ({len(loaded.config.listeners)} listener(s), "
        f"{len(loaded.config.origins)} origin(s), {len(loaded.policies.apps)} app(s))"
    )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    # a reload (SIGHUP, `systemctl reload`) that comes before its handler is installed must not end the process
    # (the default action): it is ignored until then, and the file watcher still sees a changed file
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from gateway import workers
    from gateway.core.startup import RestartPolicy

    logs.setup(args.log_level, args.log_format)
    count = args.workers or workers.default_workers()
    if count > 1 and not workers.is_worker():
        extra = ["--log-level", args.log_level, "--log-format", args.log_format]
        extra += [] if args.uvloop else ["--no-uvloop"]
        try:
            policy = RestartPolicy(max_crashes=args.crash_limit, window=args.crash_window)
        except ValueError as exc:
            return _fail(str(exc))
        return workers.supervise(args.config, count, extra, policy)
    from gateway.runner import serve

    try:
        import uvloop  # optional: measurably faster on small requests

        runner = uvloop.run if args.uvloop else asyncio.run
    except ImportError:
        runner = asyncio.run
    try:
        return runner(
            serve(
                args.config,
                reuse_port=workers.is_worker(),
                on_ready=workers.report_ready if workers.is_worker() else None,
                restarted=workers.is_restart(),
            )
        )
    except (ConfigError, OSError) as exc:  # start-up failed: a supervisor prints it, or main() does
        message = str(exc) if isinstance(exc, ConfigError) else _os_message(exc)
        if workers.report_failure(message):
            return EXIT_USAGE
        return _fail(message)


def _os_message(exc: OSError) -> str:
    """One line for an `OSError` nothing more specific caught."""
    from gateway.preflight import os_problem

    return os_problem("cannot use", exc.filename, exc) if exc.filename else str(exc)


def _cmd_health(args: argparse.Namespace) -> int:
    from gateway.health import probe

    verdict = probe(args.config, ready=args.ready, timeout=args.timeout)
    print(f"ota-gateway: {verdict.line}", flush=True)
    return verdict.code


def _cmd_certs_init(args: argparse.Namespace) -> int:
    from gateway import certs

    try:
        issued_all = certs.init(args.dir, force=args.force, group=args.group)
    except (FileExistsError, ValueError) as exc:
        return _fail(str(exc))
    for issued in issued_all:
        print(issued.describe())
    return 0


def _cmd_certs_issue(args: argparse.Namespace) -> int:
    from gateway import certs

    try:
        issued = certs.issue_client(args.dir, args.name, days=args.days, group=args.group)
    except (ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    print(issued.describe())
    return 0


def _cmd_release_add(args: argparse.Namespace) -> int:
    from gateway.publish import PublishError, add_release

    try:
        rel = add_release(
            args.origin,
            args.app,
            args.version,
            args.channel,
            args.file,
            capgo_key=args.capgo_key,
            replace=args.replace,
        )
    except PublishError as exc:
        return _fail(str(exc))
    print(f"published {args.app} {rel.version} ({rel.channel}): {rel.file} {rel.size} bytes sha256 {rel.sha256}")
    if rel.capgo is not None:
        print(f"  capgo checksum    {rel.capgo.checksum}")
        print(f"  capgo session_key {rel.capgo.session_key}")
    return 0


def _cmd_release_state(args: argparse.Namespace) -> int:
    from gateway.release_ops import ReleaseOpError, release_command

    try:
        lines = asyncio.run(release_command(args.release_command, args.config, args.app, args.version))
    except ReleaseOpError as exc:
        return _fail(str(exc))
    print("\n".join(lines))
    return 0


def _cmd_device(args: argparse.Namespace) -> int:
    from gateway.device import Device, DeviceOptions

    opts = DeviceOptions(
        gateway=args.gateway,
        cert=args.cert,
        key=args.key,
        app_id=args.app,
        version=args.version,
        ca=args.ca,
        public_key=args.public_key,
        channel=args.channel,
        device_id=args.device_id,
        platform=args.platform,
        out=args.out,
        fail_with=args.fail_with,
    )
    try:
        device = Device(opts)
    except (OSError, ValueError) as exc:
        return _fail(str(exc))
    return device.run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ota-gateway", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"ota-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument(
        "--log-level",
        default="info",
        choices=LEVELS,
        help="info: lifecycle (default); warning: failures only; debug: also per-connection trouble",
    )
    p.add_argument(
        "--log-format",
        default="text",
        choices=FORMATS,
        help="text: 'ota-gateway: ...' lines (default); json: one object a line, for container log collectors",
    )
    p.add_argument("--no-uvloop", dest="uvloop", action="store_false", help="use the stdlib event loop")
    p.add_argument(
        "--workers", type=_at_least(1), default=None, help="worker processes sharing the ports (default: one per core)"
    )
    p.add_argument(
        "--crash-limit",
        type=_at_least(1),
        default=5,
        help="with --workers: this many worker deaths within --crash-window seconds stop the server (default 5)",
    )
    p.add_argument("--crash-window", type=_seconds, default=60.0, help="seconds, see --crash-limit (default 60)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("check", help="validate the config and policies, like nginx -t (exit 0 or 2)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument(
        "--live",
        action="store_true",
        help="also bind every listen address once and ping Redis (before a start, not while the gateway runs)",
    )
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "health", help="ask the running gateway's admin listener for /healthz (or /readyz): exit 0, 1, or 2"
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--ready", action="store_true", help="ask /readyz (ready for traffic) instead of /healthz")
    p.add_argument("--timeout", type=_seconds, default=2.0, help="seconds to wait for the answer (default 2)")
    p.set_defaults(func=_cmd_health)

    certs = sub.add_parser("certs", help="development PKI").add_subparsers(dest="certs_command", required=True)
    p = certs.add_parser("init", help="CA, server, client, and a rogue CA + client for negative tests")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="replace existing material")
    p.add_argument("--group", help=GROUP_HELP)
    p.set_defaults(func=_cmd_certs_init)
    p = certs.add_parser("issue-client", help="a new client certificate from the CA in --dir")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--days", type=_at_least(1), default=825)
    p.add_argument("--group", help=GROUP_HELP)
    p.add_argument("name")
    p.set_defaults(func=_cmd_certs_issue)

    release = sub.add_parser("release", help="publish, halt and resume releases").add_subparsers(
        dest="release_command", required=True
    )
    p = release.add_parser("add", help="publish a zip into a directory origin")
    p.add_argument("--origin", type=Path, required=True, help="the directory origin's root folder")
    p.add_argument("--app", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--channel", default="production")
    p.add_argument("--capgo-key", type=Path, help="Capgo v2 private key: encrypt and sign as the Capgo CLI does")
    p.add_argument("--replace", action="store_true", help="overwrite an existing version")
    p.add_argument("file", type=Path)
    p.set_defaults(func=_cmd_release_add)
    for name, text in (
        ("status", "a release's rollout, halt state and device counts, from the gateway's state store"),
        ("halt", "stop offering a release (every worker and host within a second); audited"),
        ("resume", "offer a halted release again and clear its device counts; audited"),
    ):
        p = release.add_parser(name, help=text)
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
        p.add_argument("--app", required=True)
        p.add_argument("--version", required=True)
        p.set_defaults(func=_cmd_release_state)

    p = sub.add_parser("device", help="act as a Capgo device: update check, download, checksum, stats (exit 0 or 1)")
    p.add_argument("--gateway", required=True, help="https://host:port of the gateway")
    p.add_argument("--cert", type=Path, required=True, help="client certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    p.add_argument("--ca", type=Path, help="CA that signs the gateway's certificate (default: the system store)")
    p.add_argument("--app", required=True, help="app id, e.g. com.example.app")
    p.add_argument("--version", required=True, help="the bundle the device runs now, or builtin")
    p.add_argument("--public-key", type=Path, help="the app's Capgo public key: decrypt and check as the plugin does")
    p.add_argument("--channel", help="defaultChannel to send")
    p.add_argument("--device-id", help="device UUID (default: a new random one)")
    p.add_argument("--platform", default="android", choices=["android", "ios", "electron"])
    p.add_argument("--out", type=Path, help="write the verified (decrypted) zip here")
    p.add_argument(
        "--fail-with",
        choices=sorted(FAILURE_ACTIONS),
        metavar="ACTION",
        help="after a verified download, report this failure (update_fail, set_fail, ...) instead of success",
    )
    p.set_defaults(func=_cmd_device)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        return _fail(str(exc))
    except OSError as exc:  # a file or folder the user cannot use, found late: still one line, no traceback
        return _fail(_os_message(exc))
    except KeyboardInterrupt:
        return 130
