"""The state store: channel high-water marks, rate-limit counters and release health, behind one small interface.

Owns the little the gateway must remember between requests (and, with several workers or instances, share):
the highest version it has offered per app and channel (the third downgrade floor), and fixed-window request
counters per client identity, and for staged rollouts the distinct devices that tried and that failed each
release (within a window) and the halted releases (core/rollout.py decides; this only counts). `SqliteState` is
the default: one file (`state.path`), WAL mode so several worker
processes share it, every statement run on one dedicated thread so the event loop never waits on the disk.
`MemoryState` keeps the same contract in a dict (tests, or a single process that may forget on restart).
`RedisState` shares it between several hosts (`state.redis_url`). Version order is `core/versions.py`'s.
A request makes one trip to the store (`check`: its rate-limit count and the channel's high-water mark read
together, one script on Redis); what the trip reads and when an offer must still be recorded is
`core/statecheck.py`'s decision, which the stores only execute.

`GuardedState` wraps whichever store runs and makes its failures visible, for every operation of the
`StateStore` interface (including ones added later): a failed operation (Redis stopped, SQLite on a full disk or
locked) is counted by operation, logged at most once a minute, reported by /readyz until an operation succeeds,
and raised as `StateError`, a refusal (`state_error`) that the routes answer in their own shape, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from gateway.core.faults import Fault
from gateway.core.reasons import Reason, Refusal
from gateway.core.statecheck import Trip, TripResult, raised, retry_after, window_start

T = TypeVar("T")
_PRUNE_EVERY = 512
# how long a statement waits for another process's write lock (the workers' writes take milliseconds; a long
# wait means a foreign lock). An update check may wait twice (its count, its offer's mark), and must answer
# `kind: failed` well within the plugin's 10 s
BUSY_TIMEOUT = 2.0
log = logging.getLogger("ota_gateway.state")


class StateStore(Protocol):
    async def high_water(self, app_id: str, channel: str) -> str | None:
        """The highest version offered on this app and channel, or None."""
        ...

    async def record_offer(self, app_id: str, channel: str, version: str, *, lower: bool = False) -> None:
        """Raise the mark to `version` if it is higher; with `lower` (a rollback the policy allows) set it."""
        ...

    async def hit(self, key: str, limit: int, window: float, now: float) -> float | None:
        """Count one request for `key`; None if within `limit` per `window` seconds, else seconds to wait."""
        ...

    async def check(self, trip: Trip) -> TripResult:
        """One request's trip (`core/statecheck.py`): count it against its rate limit and read the high-water mark
        it will need, each part's failure (one of the store's `errors`) returned, not raised."""
        ...

    async def probe(self) -> None:
        """A cheap write, run periodically: it fails when the store cannot be written (and succeeds once it can)."""

    async def release_event(
        self, app_id: str, version: str, device: str, failed: bool, now: float, window: float
    ) -> tuple[int, int]:
        """Note that `device` tried (and, with `failed`, failed) `version`; (tried, failed) distinct devices in
        the last `window` seconds. A device counts once, however many events it sends."""
        ...

    async def release_counts(self, app_id: str, version: str, now: float, window: float) -> tuple[int, int]: ...

    async def halts(self, app_id: str) -> dict[str, str]:
        """The app's halted versions, each with how it was halted."""
        ...

    async def halt(self, app_id: str, version: str, detail: str) -> bool:
        """Halt `version`; False if it already was (so that only one worker or host reports an automatic halt)."""
        ...

    async def resume(self, app_id: str, version: str) -> bool:
        """Clear the halt and the device counts of `version`; whether it was halted."""
        ...

    async def close(self) -> None: ...


# the operations `GuardedState` guards by name and the `op` label values of ota_gateway_state_errors_total; a
# `check` counts its parts as `hit` and `high_water`
STATE_OPS: tuple[str, ...] = tuple(
    name
    for name, value in vars(StateStore).items()
    if callable(value) and not name.startswith("_") and name not in ("close", "check")
)


def _trip(
    trip: Trip,
    count: Callable[[Trip], tuple[float | None, str | None]],
    read: Callable[[str, str], str | None],
    errors: tuple[type[BaseException], ...],
) -> TripResult:
    """Carry out `trip` with a store's own blocking steps; its `errors` are returned, not raised.

    `count(trip)` counts the request and, in the same step, reads the mark `trip.mark` names (None without one):
    (seconds to wait or None, the mark or None). When the count fails, `read` reads the mark alone, if the trip
    still needs it: a store that refuses writes (full, locked) can usually still be read.
    """
    try:
        retry, mark = count(trip)
    except errors as exc:
        if trip.mark is None or not trip.reads_mark(counted=False, retry=None):
            return TripResult(count_error=exc)
        try:
            return TripResult(None, exc, read(*trip.mark), mark_read=True)
        except errors as read_exc:
            return TripResult(None, exc, mark_read=True, mark_error=read_exc)
    if trip.mark is None or not trip.reads_mark(counted=True, retry=retry):
        return TripResult(retry)
    return TripResult(retry, None, mark, mark_read=True)


class MemoryState:
    """The state store in a dict: forgets on restart and is not shared between processes."""

    errors: tuple[type[BaseException], ...] = ()

    def __init__(self) -> None:
        self._marks: dict[tuple[str, str], str] = {}
        self._counts: dict[tuple[str, float], int] = {}
        self._hits = 0
        self._devices: dict[tuple[str, str], dict[str, tuple[float, float | None]]] = {}
        self._halts: dict[str, dict[str, str]] = {}

    async def high_water(self, app_id: str, channel: str) -> str | None:
        return self._marks.get((app_id, channel))

    async def check(self, trip: Trip) -> TripResult:
        return _trip(trip, self._count, lambda app_id, channel: self._marks.get((app_id, channel)), self.errors)

    def _count(self, trip: Trip) -> tuple[float | None, str | None]:
        retry = self._hit(trip.key, trip.limit, trip.window, trip.now)
        return retry, None if trip.mark is None else self._marks.get(trip.mark)

    async def release_event(
        self, app_id: str, version: str, device: str, failed: bool, now: float, window: float
    ) -> tuple[int, int]:
        seen = self._devices.setdefault((app_id, version), {})
        seen[device] = (now, now if failed else seen.get(device, (0.0, None))[1])
        return await self.release_counts(app_id, version, now, window)

    async def release_counts(self, app_id: str, version: str, now: float, window: float) -> tuple[int, int]:
        cutoff = now - window
        seen = self._devices.get((app_id, version), {})
        for device in [d for d, (tried, _) in seen.items() if tried < cutoff]:
            del seen[device]
        return len(seen), sum(1 for _, failed in seen.values() if failed is not None and failed >= cutoff)

    async def halts(self, app_id: str) -> dict[str, str]:
        return dict(self._halts.get(app_id, {}))

    async def halt(self, app_id: str, version: str, detail: str) -> bool:
        halted = self._halts.setdefault(app_id, {})
        if version in halted:
            return False
        halted[version] = detail
        return True

    async def resume(self, app_id: str, version: str) -> bool:
        self._devices.pop((app_id, version), None)
        return self._halts.get(app_id, {}).pop(version, None) is not None

    async def record_offer(self, app_id: str, channel: str, version: str, *, lower: bool = False) -> None:
        new = raised(self._marks.get((app_id, channel)), version, lower)
        if new is not None:
            self._marks[(app_id, channel)] = new

    async def hit(self, key: str, limit: int, window: float, now: float) -> float | None:
        return self._hit(key, limit, window, now)

    def _hit(self, key: str, limit: int, window: float, now: float) -> float | None:
        start = window_start(now, window)
        self._hits += 1
        if self._hits % _PRUNE_EVERY == 0:
            self._counts = {k: v for k, v in self._counts.items() if k[1] >= start}
        count = self._counts.get((key, start), 0) + 1
        self._counts[(key, start)] = count
        return retry_after(count, limit, start, window, now)

    async def probe(self) -> None:
        return None

    async def close(self) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS high_water (
    app_id TEXT NOT NULL, channel TEXT NOT NULL, version TEXT NOT NULL, PRIMARY KEY (app_id, channel)
);
CREATE TABLE IF NOT EXISTS rate (
    key TEXT NOT NULL, window REAL NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (key, window)
);
CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS release_devices (
    app_id TEXT NOT NULL, version TEXT NOT NULL, device TEXT NOT NULL, tried REAL NOT NULL, failed REAL,
    PRIMARY KEY (app_id, version, device)
);
CREATE TABLE IF NOT EXISTS release_halts (
    app_id TEXT NOT NULL, version TEXT NOT NULL, detail TEXT NOT NULL, PRIMARY KEY (app_id, version)
);
"""


_COUNT = (
    "INSERT INTO rate (key, window, count) VALUES (?, ?, 1) ON CONFLICT (key, window) DO UPDATE SET count = count + 1"
)
_AND_MARK = " RETURNING count, (SELECT version FROM high_water WHERE app_id = ? AND channel = ?)"


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None if there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


# the waits between tries of a statement that met another process's write lock: short first, since the other
# worker's write transactions take tens of microseconds (bench/README.md, "Scaling, session 5")
_FIRST_WAIT = 50e-6
_LONGEST_WAIT = 1e-3


def _while_locked(timeout: float, fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)`, tried again while SQLite answers "database is locked", for up to `timeout` seconds.

    The gateway waits for another process's write lock here instead of in SQLite's busy handler (connections are
    opened with a busy timeout of 0): that handler sleeps 1, 2, 5, 10 ... ms, so with two workers a check that met
    the other's write of a few tens of microseconds waited milliseconds, and every request of that worker waited
    behind it on the store thread. This waits 50 us, doubling up to 1 ms. A retry is safe: each store call is
    statements that repeat without effect (upserts, reads) or one transaction rolled back on error. It also covers
    the switch of a new file to WAL, which SQLite refuses at once, without any busy handler, while another worker
    writes to the file still in rollback mode (it would deadlock waiting).
    """
    wait, deadline = _FIRST_WAIT, 0.0
    while True:
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            # one the gateway raises itself (the probe's "removed while open") carries no SQLite code
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                raise
            now = time.monotonic()
            deadline = deadline or now + timeout  # counted from the first refusal: the fast path reads no clock
            if now >= deadline:
                raise
        time.sleep(wait)
        wait = min(wait * 2, _LONGEST_WAIT)


def _settle(future: asyncio.Future[Any], result: object, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class StoreThread:
    """One long-lived thread that runs blocking calls in order, each awaited from an event loop.

    A trip is a put on a `SimpleQueue` and one `call_soon_threadsafe` back with the result: about half the CPU of
    `run_in_executor`'s chain of futures (bench/README.md, "Update checks: one trip to the store, session 3"). A
    call whose awaiting task was cancelled before the thread took it is skipped, as an executor's would be.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[object, ...], asyncio.Future[Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, future = job
            if future.cancelled():
                continue
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the caller, whatever it is
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits for the answer
                future.get_loop().call_soon_threadsafe(_settle, future, result, error)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self._stopped:
            raise RuntimeError("state store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((fn, args, future))
        return await future

    def stop(self) -> None:
        """The thread ends after the calls already queued; later calls raise RuntimeError."""
        self._stopped = True
        self._jobs.put(None)


class SqliteState:
    """The state store in one SQLite file; statements run on a dedicated thread, one connection."""

    errors: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)

    def __init__(self, path: Path, busy_timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        self._busy_timeout = busy_timeout  # how long a call waits for another process's lock (_while_locked)
        self._thread = StoreThread("ota-state")
        self._conn: sqlite3.Connection | None = None
        self._file: tuple[int, int] | None = None  # (device, inode) of the file opened
        self._hits = 0

    @classmethod
    async def open(cls, path: Path, busy_timeout: float = BUSY_TIMEOUT) -> SqliteState:
        store = cls(path, busy_timeout)
        try:
            await store._run(store._connect)
        except BaseException:
            store._thread.stop()
            raise
        return store

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await self._thread.run(_while_locked, self._busy_timeout, fn, *args)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=0)  # _while_locked waits, in short steps
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._file = _file_id(self.path)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("state store is closed")
        return self._conn

    def _high_water(self, app_id: str, channel: str) -> str | None:
        row = (
            self._db()
            .execute("SELECT version FROM high_water WHERE app_id = ? AND channel = ?", (app_id, channel))
            .fetchone()
        )
        return None if row is None else str(row[0])

    def _record(self, app_id: str, channel: str, version: str, lower: bool) -> None:
        db = self._db()
        if not lower and raised(self._high_water(app_id, channel), version, lower) is None:
            # the usual case (the channel's newest release offered again): a read, no write lock. Marks only rise
            # (but for `lower`), so a mark at or above `version` now stays so; the offer takes effect at this read
            return
        db.execute("BEGIN IMMEDIATE")  # read-compare-write under the write lock: workers share the file
        try:
            new = raised(self._high_water(app_id, channel), version, lower)
            if new is not None:
                db.execute(
                    "INSERT INTO high_water (app_id, channel, version) VALUES (?, ?, ?) "
                    "ON CONFLICT (app_id, channel) DO UPDATE SET version = excluded.version",
                    (app_id, channel, new),
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite rolls back by itself on some errors (a full disk): keep the first error
                db.execute("ROLLBACK")
            raise

    def _hit(self, key: str, limit: int, window: float, now: float) -> float | None:
        return self._count(Trip(key, limit, window, now))[0]

    def _count(self, trip: Trip) -> tuple[float | None, str | None]:
        """The count, and the mark `trip` names read by the same statement (one call into SQLite instead of two)."""
        db = self._db()
        start = window_start(trip.now, trip.window)
        self._hits += 1
        if self._hits % _PRUNE_EVERY == 0:
            db.execute("DELETE FROM rate WHERE window < ?", (start - 3600,))
        if trip.mark is None:
            row = db.execute(_COUNT + " RETURNING count, NULL", (trip.key, start)).fetchone()
        else:
            row = db.execute(_COUNT + _AND_MARK, (trip.key, start, *trip.mark)).fetchone()
        retry = retry_after(int(row[0]), trip.limit, start, trip.window, trip.now)
        return retry, None if row[1] is None else str(row[1])

    def _check(self, trip: Trip) -> TripResult:
        return _trip(trip, self._count, self._high_water, self.errors)

    def _probe(self) -> None:
        if _file_id(self.path) != self._file:
            # still writable (the open file lives on), but no other process sees it: `ota-gateway release`, a
            # worker started later, the next start. Reported until a restart opens the file at the path again
            gone = "removed" if not self.path.exists() else "replaced by another file"
            raise sqlite3.OperationalError(
                f"{self.path} was {gone} while open: what this process writes is lost at its exit and not shared; "
                "restart the gateway"
            )
        self._db().execute(
            "INSERT INTO probe (id, at) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET at = excluded.at", (time.time(),)
        )

    def _release_event(
        self, app_id: str, version: str, device: str, failed: bool, now: float, window: float
    ) -> tuple[int, int]:
        self._db().execute(
            "INSERT INTO release_devices (app_id, version, device, tried, failed) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (app_id, version, device) DO UPDATE SET tried = excluded.tried, "
            "failed = COALESCE(excluded.failed, failed)",
            (app_id, version, device, now, now if failed else None),
        )
        return self._release_counts(app_id, version, now, window)

    def _release_counts(self, app_id: str, version: str, now: float, window: float) -> tuple[int, int]:
        db, cutoff = self._db(), now - window
        db.execute(
            "DELETE FROM release_devices WHERE app_id = ? AND version = ? AND tried < ?", (app_id, version, cutoff)
        )
        row = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(failed >= ?), 0) FROM release_devices WHERE app_id = ? AND version = ?",
            (cutoff, app_id, version),
        ).fetchone()
        return int(row[0]), int(row[1])

    def _halts(self, app_id: str) -> dict[str, str]:
        rows = self._db().execute("SELECT version, detail FROM release_halts WHERE app_id = ?", (app_id,))
        return {str(v): str(d) for v, d in rows.fetchall()}

    def _halt(self, app_id: str, version: str, detail: str) -> bool:
        cur = self._db().execute(
            "INSERT INTO release_halts (app_id, version, detail) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (app_id, version, detail),
        )
        return cur.rowcount == 1

    def _resume(self, app_id: str, version: str) -> bool:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM release_devices WHERE app_id = ? AND version = ?", (app_id, version))
            cur = db.execute("DELETE FROM release_halts WHERE app_id = ? AND version = ?", (app_id, version))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # as in _record: keep the first error
                db.execute("ROLLBACK")
            raise
        return cur.rowcount == 1

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def high_water(self, app_id: str, channel: str) -> str | None:
        return await self._run(self._high_water, app_id, channel)

    async def record_offer(self, app_id: str, channel: str, version: str, *, lower: bool = False) -> None:
        await self._run(self._record, app_id, channel, version, lower)

    async def hit(self, key: str, limit: int, window: float, now: float) -> float | None:
        return await self._run(self._hit, key, limit, window, now)

    async def check(self, trip: Trip) -> TripResult:
        return await self._run(self._check, trip)

    async def probe(self) -> None:
        await self._run(self._probe)

    async def release_event(
        self, app_id: str, version: str, device: str, failed: bool, now: float, window: float
    ) -> tuple[int, int]:
        return await self._run(self._release_event, app_id, version, device, failed, now, window)

    async def release_counts(self, app_id: str, version: str, now: float, window: float) -> tuple[int, int]:
        return await self._run(self._release_counts, app_id, version, now, window)

    async def halts(self, app_id: str) -> dict[str, str]:
        return await self._run(self._halts, app_id)

    async def halt(self, app_id: str, version: str, detail: str) -> bool:
        return await self._run(self._halt, app_id, version, detail)

    async def resume(self, app_id: str, version: str) -> bool:
        return await self._run(self._resume, app_id, version)

    async def close(self) -> None:
        try:
            await self._run(self._close)
        finally:
            self._thread.stop()


# RedisState.check: KEYS[1] the rate counter, KEYS[2] (optional) the high-water mark; ARGV[1] the counter's TTL.
# Returns {1, count, mark} or, when Redis refuses the count (e.g. out of memory), {0, error, mark}.
_CHECK_LUA = """
local n = redis.pcall('INCR', KEYS[1])
local ok = 1
if type(n) == 'table' then
  ok, n = 0, n['err']
else
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
local mark = false
if KEYS[2] then
  mark = redis.call('GET', KEYS[2])
end
return {ok, n, mark}
"""


class RedisState:
    """The state store in Redis, for several gateway hosts behind one load balancer (`state.redis_url`).

    High-water marks are raised with an optimistic transaction (WATCH, compare versions here, MULTI/SET), so two
    hosts offering at once keep the higher one; rate-limit windows are INCR counters that expire on their own.
    """

    def __init__(self, client: Any, prefix: str = "ota-gateway:") -> None:
        from redis.exceptions import RedisError, ResponseError

        self._refused = ResponseError  # a count the script caught (redis.pcall), raised as the error it was
        self._client = client
        self._prefix = prefix
        self.errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        self._check_script = client.register_script(_CHECK_LUA)

    @classmethod
    async def open(cls, url: str, prefix: str = "ota-gateway:", *, ping: bool = True) -> RedisState:
        """A client for `url` (a url that cannot be parsed raises `ValueError`); with `ping`, Redis must answer now.
        Without it (`serve`), a Redis not up yet is a store failure like any other, which the probe ends."""
        import redis.asyncio as aioredis

        client: Any = aioredis.from_url(url, socket_connect_timeout=5, socket_timeout=5, health_check_interval=30)
        try:
            if ping:
                await client.ping()
        except BaseException:
            await client.aclose()
            raise
        return cls(client, prefix)

    def _mark_key(self, app_id: str, channel: str) -> str:
        return f"{self._prefix}high_water:{app_id}:{channel}"

    async def high_water(self, app_id: str, channel: str) -> str | None:
        value = await self._client.get(self._mark_key(app_id, channel))
        return None if value is None else value.decode() if isinstance(value, bytes) else str(value)

    async def record_offer(self, app_id: str, channel: str, version: str, *, lower: bool = False) -> None:
        from redis.exceptions import WatchError

        key = self._mark_key(app_id, channel)
        async with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    current = await pipe.get(key)
                    new = raised(current.decode() if isinstance(current, bytes) else current, version, lower)
                    if new is None:
                        await pipe.unwatch()
                        return
                    pipe.multi()
                    pipe.set(key, new)
                    await pipe.execute()
                    return
                except WatchError:
                    continue  # another host changed the mark meanwhile: compare again

    def _counter(self, key: str, start: float) -> str:
        return f"{self._prefix}rate:{key}:{start:.0f}"

    async def hit(self, key: str, limit: int, window: float, now: float) -> float | None:
        counted = await self.check(Trip(key, limit, window, now))  # the one counting script
        if counted.count_error is not None:
            raise counted.count_error
        return counted.retry

    async def check(self, trip: Trip) -> TripResult:
        """One round trip: a script counts the request (INCR and EXPIRE, atomic as the script is) and reads the mark
        (GET). A count Redis refuses (out of memory) is returned by the script, so the read still counts; the read
        is dropped when `trip` says the request would not have made it."""
        start = window_start(trip.now, trip.window)
        keys = [self._counter(trip.key, start)]
        if trip.mark is not None:
            keys.append(self._mark_key(*trip.mark))
        counted, count, mark = await self._check_script(keys=keys, args=[math.ceil(trip.window) + 60])
        if counted:
            retry, count_error = retry_after(int(count), trip.limit, start, trip.window, trip.now), None
        else:
            retry, count_error = None, self._refused(_text(count))
        if trip.mark is None or not trip.reads_mark(counted=count_error is None, retry=retry):
            return TripResult(retry, count_error)
        return TripResult(retry, count_error, None if mark is None else _text(mark), mark_read=True)

    async def probe(self) -> None:
        await self._client.set(f"{self._prefix}probe", str(time.time()), ex=60)

    def _release_keys(self, app_id: str, version: str) -> tuple[str, str]:
        base = f"{self._prefix}release:{app_id}:{version}"
        return f"{base}:tried", f"{base}:failed"  # sorted sets: device -> time of its last event

    async def release_event(
        self, app_id: str, version: str, device: str, failed: bool, now: float, window: float
    ) -> tuple[int, int]:
        tried_key, failed_key = self._release_keys(app_id, version)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zadd(tried_key, {device: now})
            if failed:
                pipe.zadd(failed_key, {device: now})
            for key in (tried_key, failed_key):
                pipe.zremrangebyscore(key, "-inf", f"({now - window}")
                pipe.expire(key, math.ceil(window) + 60)
            pipe.zcard(tried_key)
            pipe.zcard(failed_key)
            *_, tried, failing = await pipe.execute()
        return int(tried), int(failing)

    async def release_counts(self, app_id: str, version: str, now: float, window: float) -> tuple[int, int]:
        tried_key, failed_key = self._release_keys(app_id, version)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zcount(tried_key, now - window, "+inf")
            pipe.zcount(failed_key, now - window, "+inf")
            tried, failing = await pipe.execute()
        return int(tried), int(failing)

    async def halts(self, app_id: str) -> dict[str, str]:
        raw = await self._client.hgetall(f"{self._prefix}halts:{app_id}")
        return {_text(k): _text(v) for k, v in raw.items()}

    async def halt(self, app_id: str, version: str, detail: str) -> bool:
        return bool(await self._client.hsetnx(f"{self._prefix}halts:{app_id}", version, detail))

    async def resume(self, app_id: str, version: str) -> bool:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hdel(f"{self._prefix}halts:{app_id}", version)
            pipe.delete(*self._release_keys(app_id, version))
            removed, _ = await pipe.execute()
        return bool(removed)

    async def close(self) -> None:
        await self._client.aclose()


class StateError(Refusal):
    """The state store failed: the gateway cannot decide safely (`state_error`, a `kind: failed` answer)."""

    def __init__(self, op: str) -> None:
        super().__init__(Reason.STATE_ERROR, f"the gateway's state store failed ({op}); try again later")
        self.op = op


class GuardedState:
    """Any `StateStore`, its failures made visible; every operation of the interface is guarded, by name.

    A failure the store declares as its own (`errors`: sqlite3 and OS errors, Redis errors) is counted with
    `count(op)`, logged at most once a minute, recorded in `fault` (which /readyz reads) and raised as
    `StateError`. The failure lasts until every operation that failed has succeeded again, or the probe (a
    write) has: on a full disk reads still work, and must not make the store look healthy. Anything else is a bug
    and propagates.
    """

    def __init__(self, inner: StateStore, fault: Fault, count: Callable[[str], None]) -> None:
        self._inner = inner
        self._errors: tuple[type[BaseException], ...] = getattr(inner, "errors", (OSError,))
        self._fault = fault
        self._count = count
        self._failed_ops: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if name not in STATE_OPS:
            return method

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                result = await method(*args, **kwargs)
            except self._errors as exc:
                self._failed(name, exc)
                raise StateError(name) from exc
            if self._failed_ops:
                self._succeeded(name)
            return result

        setattr(self, name, guarded)  # found directly from now on, without __getattr__
        return guarded

    async def check(self, trip: Trip) -> TripResult:
        """The store's `check`, its parts guarded as `hit` and `high_water`: a part that failed is counted, logged
        and reported like a failed operation of that name; the caller raises `StateError` when it needs the part."""
        try:
            result = await self._inner.check(trip)
        except self._errors as exc:  # the whole trip failed (Redis away): the count, and the read it would have made
            reads = trip.reads_mark(counted=False, retry=None)
            result = TripResult(count_error=exc, mark_read=reads, mark_error=exc if reads else None)
        self._settled("hit", result.count_error)
        if result.mark_read:
            self._settled("high_water", result.mark_error)
        return result

    def _settled(self, op: str, error: BaseException | None) -> None:
        if error is not None:
            self._failed(op, error)
        elif self._failed_ops:
            self._succeeded(op)

    def _succeeded(self, op: str) -> None:
        if op == "probe":
            self._failed_ops.clear()
        else:
            self._failed_ops.discard(op)
        line = None if self._failed_ops else self._fault.succeeded(time.monotonic())
        if line:
            log.warning("%s", line)

    def _failed(self, op: str, exc: BaseException) -> None:
        self._failed_ops.add(op)
        self._count(op)
        line = self._fault.failed(time.monotonic(), f"{op}: {type(exc).__name__}: {exc}")
        if line:
            log.error("%s", line)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
