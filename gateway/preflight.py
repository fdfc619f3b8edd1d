"""What the user that runs the gateway can open: the checks behind `check` and the words for start-up failures.

Owns testing files, folders, ports and Redis the way `serve` will use them, as the current user: files are opened
for reading, state and audit folders are written into (a temporary file, removed at once), and with `live` a port
is bound and released and Redis is pinged (those depend on the moment and the network, and a config checked in CI
may name hosts only the cluster knows). `check` runs `runtime_issues` after the config has loaded; `serve` turns
the same operating-system errors into one line through `os_issue` and `bind_issue` (texts from
`gateway/core/startup.py`). What `check` cannot see: a port taken after it ran, a Redis that goes away later, a
disk that fills up.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import socket
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.core.startup import bind_problem, file_problem, sqlite_header_problem, validity_problem
from gateway.errors import ConfigIssue

if TYPE_CHECKING:
    from gateway.config import Config

REDIS_CHECK_TIMEOUT = 3.0


def damaged_store(path: Path, problem: str) -> str:
    """The line for a SQLite state file that cannot be opened as a database."""
    return (
        f"cannot open the state store {path}: {problem}; move it away with its -wal and -shm files (the gateway "
        "then starts an empty store: channel marks, rate-limit counts and halts start over), or put back a good copy"
    )


def current_user() -> str:
    """`name (uid N)` of the effective user, or `uid N` when it has no name."""
    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def blocked_folder(path: Path) -> str | None:
    """The first folder above `path` that the current user may not enter, if any."""
    for parent in reversed(Path(os.path.abspath(path)).parents):
        if parent.is_dir() and not os.access(parent, os.X_OK):
            return str(parent)
    return None


def os_problem(action: str, path: Path | str, exc: OSError) -> str:
    """One line for an `OSError` met while doing `action` on `path`."""
    return file_problem(
        action, str(path), exc.errno or 0, exc.strerror or str(exc), current_user(), blocked_folder(Path(path))
    )


def os_issue(source: str, key_path: str, action: str, path: Path | str, exc: OSError) -> ConfigIssue:
    return ConfigIssue(source, key_path, None, os_problem(action, path, exc))


def bind_issue(source: str, key_path: str, address: str, port: int, exc: OSError) -> ConfigIssue:
    return ConfigIssue(
        source, key_path, None, bind_problem(address, port, exc.errno or 0, exc.strerror or str(exc), current_user())
    )


def readable_file(path: Path) -> None:
    """Raise `ValueError` (one line) unless `path` is a regular file the current user can open for reading."""
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"not a file: {path}")
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise ValueError(f"file not found: {path}") from None
    except OSError as exc:
        raise ValueError(os_problem("cannot read", path, exc)) from None


def readable_folder(path: Path) -> None:
    """Raise `ValueError` (one line) unless `path` is a folder the current user can list and enter."""
    try:
        if not path.is_dir():
            raise ValueError(f"directory not found: {path}")
        os.listdir(path)
        if not os.access(path, os.X_OK):
            raise PermissionError(13, "Permission denied", str(path))
    except OSError as exc:
        raise ValueError(os_problem("cannot read the folder", path, exc)) from None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def writable_folder(folder: Path) -> None:
    """Raise `OSError` unless the current user can create files in `folder` (or create `folder` where it is
    missing): a temporary file is made in the nearest existing folder and removed at once."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(existing))
    with tempfile.TemporaryFile(dir=existing, prefix=".ota-gateway-check-"):
        pass


def _state_issues(source: str, config: Config, live: bool) -> list[ConfigIssue]:
    from gateway.ticket_keys import AUTO_KEY_FILE

    issues = []
    folder = config.state.path.parent
    needs_folder = config.state.redis_url is None or not config.tickets.keys  # the SQLite file, or ticket.key
    if needs_folder:
        key = "state.path" if config.state.redis_url is None else "tickets"
        try:
            writable_folder(folder)
        except OSError as exc:
            issues.append(os_issue(source, key, "cannot write into", folder, exc))
            return issues
    ticket_key = folder / AUTO_KEY_FILE
    if not config.tickets.keys and ticket_key.exists():
        try:
            with open(ticket_key, "rb"):
                pass
        except OSError as exc:
            issues.append(os_issue(source, "tickets", "cannot read the generated ticket key", ticket_key, exc))
    if config.state.redis_url is None:
        for path in (config.state.path, Path(f"{config.state.path}-wal"), Path(f"{config.state.path}-shm")):
            if path.exists():
                try:
                    with open(path, "r+b") as file:
                        head = file.read(100) if path == config.state.path else b""
                        size = os.fstat(file.fileno()).st_size
                except OSError as exc:
                    issues.append(os_issue(source, "state.path", "cannot write", path, exc))
                    continue
                problem = sqlite_header_problem(head, size) if path == config.state.path else None
                if problem is not None:
                    issues.append(ConfigIssue(source, "state.path", None, damaged_store(path, problem)))
    elif live:
        issues += _redis_issues(source, config.state.redis_url)
    return issues


def _redis_issues(source: str, url: str) -> list[ConfigIssue]:
    import redis
    from redis.exceptions import RedisError

    client = redis.Redis.from_url(url, socket_connect_timeout=REDIS_CHECK_TIMEOUT, socket_timeout=REDIS_CHECK_TIMEOUT)
    try:
        client.ping()
    except (OSError, RedisError) as exc:
        return [ConfigIssue(source, "state.redis_url", None, f"cannot reach the Redis state store: {exc}")]
    finally:
        client.close()
    return []


def _audit_issues(source: str, config: Config) -> list[ConfigIssue]:
    if config.audit.path == "-":
        return []
    path = Path(config.audit.path)
    try:
        if path.exists():
            with open(path, "a", encoding="utf-8"):
                pass
        else:
            writable_folder(path.parent)
    except OSError as exc:
        return [os_issue(source, "audit.path", "cannot write the audit log", path, exc)]
    return []


def listen_addresses(config: Config) -> list[tuple[str, str, int]]:
    """(key path, address, port) of every socket `serve` binds."""
    out = [(f"listeners[{i}].port", lst.address, lst.port) for i, lst in enumerate(config.listeners)]
    if config.plain_http.enabled:
        out.append(("plain_http.port", config.plain_http.address, config.plain_http.port))
    if config.admin.enabled:
        out.append(("admin.port", config.admin.address, config.admin.port))
    return out


def port_issues(source: str, config: Config) -> list[ConfigIssue]:
    """Bind every listen address as `serve` would (SO_REUSEADDR, as aiohttp does) and release it at once."""
    issues = []
    for key, address, port in listen_addresses(config):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError as exc:
                issues.append(bind_issue(source, key, address, port, exc))
    return issues


def runtime_issues(source: str, config: Config, *, live: bool = False) -> list[ConfigIssue]:
    """What `serve` would trip over after the config loaded: state folder and files, ticket key, audit log, and
    (`live`) listen addresses already taken and an unreachable Redis. Files and folders the config names were
    already opened while loading it."""
    issues = _state_issues(source, config, live) + _audit_issues(source, config)
    if live:
        issues += port_issues(source, config)
    return issues


def certificate_issues(source: str, config: Config, now: dt.datetime) -> tuple[list[ConfigIssue], list[ConfigIssue]]:
    """(errors, warnings) about the validity of each listener's server certificate (`core/startup.validity_problem`):
    expired or not yet valid is an error of `check`, ending within `EXPIRY_WARNING_DAYS` days a warning."""
    from gateway.tls import TlsMaterialError, load_certificates

    errors: list[ConfigIssue] = []
    warnings: list[ConfigIssue] = []
    for i, listener in enumerate(config.listeners):
        try:
            leaf = load_certificates(listener.cert, "cert")[0]
        except TlsMaterialError:
            continue  # already an issue of loading the config
        found = validity_problem(str(listener.cert), leaf.not_valid_before_utc, leaf.not_valid_after_utc, now)
        if found is not None:
            (errors if found[0] else warnings).append(ConfigIssue(source, f"listeners[{i}].cert", None, found[1]))
    return errors, warnings
