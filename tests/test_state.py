"""The state store (gateway/state.py): high-water marks only rise (unless a rollback sets them), rate-limit
windows count per key, the SQLite store persists and is shared by several connections (workers)."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.core.faults import Fault
from gateway.core.reasons import Reason
from gateway.core.statecheck import Trip
from gateway.state import GuardedState, MemoryState, RedisState, SqliteState, StateError, StateStore
from tests.support import RedisServer, fill_up, free_port, redis_server, small_filesystem


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    state: StateStore
    if request.param == "memory":
        state = MemoryState()
    elif request.param == "sqlite":
        state = await SqliteState.open(tmp_path / "s.sqlite")
    else:  # a fresh key prefix per test on the module's server
        state = await RedisState.open(request.getfixturevalue("redis_url"), prefix=f"test-{uuid.uuid4().hex}:")
    yield state
    await state.close()


async def test_high_water_mark_only_rises(store: StateStore) -> None:
    assert await store.high_water("com.example.app", "production") is None
    await store.record_offer("com.example.app", "production", "1.1.0")
    await store.record_offer("com.example.app", "production", "1.0.0")
    await store.record_offer("com.example.app", "production", "1.10.0")
    await store.record_offer("com.example.app", "production", "1.9.0")
    assert await store.high_water("com.example.app", "production") == "1.10.0"
    assert await store.high_water("com.example.app", "beta") is None
    await store.record_offer("com.example.app", "production", "1.2.0", lower=True)  # a rollback the policy allows
    assert await store.high_water("com.example.app", "production") == "1.2.0"


async def test_rate_limit_window(store: StateStore) -> None:
    now = 1_800_000_010.0
    assert [await store.hit("a", 2, 60, now) for _ in range(2)] == [None, None]
    retry = await store.hit("a", 2, 60, now)
    assert retry == 50  # until the end of the minute window
    assert await store.hit("b", 2, 60, now) is None  # another identity
    assert await store.hit("a", 2, 60, now + 50) is None  # next window


async def test_check_counts_and_reads_the_mark_in_one_trip(store: StateStore) -> None:
    """`check` counts like `hit` (one budget with it) and reads the mark `high_water` reads, but not for a request
    over its limit."""
    app, now = "com.example.app", 1_800_000_010.0
    await store.record_offer(app, "production", "1.1.0")
    trip = Trip("a", 2, 60, now, (app, "production"))
    first = await store.check(trip)
    assert (first.retry, first.count_error, first.mark, first.mark_read, first.mark_error) == (
        None,
        None,
        "1.1.0",
        True,
        None,
    )
    assert (await store.check(trip)).mark == "1.1.0"
    over = await store.check(trip)
    assert over.retry == 50 and not over.mark_read and over.mark is None  # answered 429: nothing to review
    assert await store.hit("a", 2, 60, now) == 50  # the same counter as `hit`
    assert await store.check(Trip("a", 2, 60, now + 50, (app, "production"))) == first  # the next window
    fresh = await store.check(Trip("b", 2, 60, now, (app, "beta")))
    assert fresh.mark_read and fresh.mark is None  # no mark on this channel yet
    bare = await store.check(Trip("c", 2, 60, now))
    assert bare.retry is None and not bare.mark_read


async def test_sqlite_persists_and_is_shared(tmp_path: Path) -> None:
    path = tmp_path / "state" / "gateway.sqlite"
    one, two = await SqliteState.open(path), await SqliteState.open(path)
    try:
        await one.record_offer("com.example.app", "production", "2.0.0")
        await two.record_offer("com.example.app", "production", "1.5.0")
        assert await two.high_water("com.example.app", "production") == "2.0.0"
        await one.hit("k", 1, 60, 1000.0)
        assert await two.hit("k", 1, 60, 1000.0) is not None  # one budget across workers
    finally:
        await one.close()
        await two.close()
    again = await SqliteState.open(path)
    try:
        assert await again.high_water("com.example.app", "production") == "2.0.0"
    finally:
        await again.close()


async def test_two_workers_checks_share_the_budget_and_the_marks(tmp_path: Path) -> None:
    """Two connections to one file (two workers): one rate-limit budget per key across both, and a mark one of
    them records is what the other's next trip reads."""
    path, mark = tmp_path / "s.sqlite", ("com.example.app", "production")
    one, two = await SqliteState.open(path), await SqliteState.open(path)
    try:
        trip = Trip("k", 1, 60, 1000.0, mark)
        first = await one.check(trip)
        assert first.retry is None and first.mark_read and first.mark is None
        over = await two.check(trip)
        assert over.retry is not None and not over.mark_read  # the budget was spent on the other worker
        await one.record_offer(*mark, "2.0.0")
        assert (await two.check(Trip("other", 1, 60, 1000.0, mark))).mark == "2.0.0"
    finally:
        await one.close()
        await two.close()


async def test_sqlite_opens_a_new_file_while_another_process_writes_to_it(tmp_path: Path) -> None:
    """Two workers starting together: one is converting the new file (rollback mode, its write lock held) while the
    other opens it. SQLite refuses the other's switch to WAL at once, without its busy timeout; the store waits
    for the writer instead (this failed 1 start in about 100 of `serve --workers 2`: exit 2)."""
    path = tmp_path / "s.sqlite"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # a new file, still in rollback mode, its write lock held
    asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
    try:
        state = await SqliteState.open(path, busy_timeout=10)
        try:
            assert await state.hit("k", 1, 60, 1000.0) is None
            assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        finally:
            await state.close()
    finally:
        other.close()


async def test_sqlite_open_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    """The twin: a writer that keeps the lock past the busy timeout makes the open fail (a start-up error)."""
    path = tmp_path / "s.sqlite"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await SqliteState.open(path, busy_timeout=0.3)
    finally:
        other.execute("ROLLBACK")
        other.close()


def _holder_and_waiter(tmp_path: Path) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    """Two connections to one WAL file with a table `t`: one to hold the write lock, one (busy timeout 0, as the
    store's) whose statements meet it."""
    path = tmp_path / "s.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")
    holder.execute("CREATE TABLE t (x)")
    return holder, sqlite3.connect(path, isolation_level=None, timeout=0)


def test_a_statement_behind_another_write_lock_is_tried_again_in_short_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's write lock: the statement is tried again after 50 us, then waits doubling up to 1 ms (not
    SQLite's busy handler, which sleeps 1, 2, 5, 10 ... ms: two workers queued behind each other's short writes),
    and runs once the lock is gone."""
    from gateway import state as state_module

    holder, conn = _holder_and_waiter(tmp_path)
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 8:
            holder.execute("COMMIT")

    holder.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(state_module.time, "sleep", sleep)
    try:
        state_module._while_locked(10, conn.execute, "INSERT INTO t VALUES (1)")
        assert waits == [50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1e-3, 1e-3, 1e-3]
        assert holder.execute("SELECT COUNT(*) FROM t").fetchone() == (1,)
    finally:
        conn.close()
        holder.close()


def test_a_lock_held_past_the_timeout_or_another_error_is_raised(tmp_path: Path) -> None:
    """The twins: a lock kept past the timeout ends the tries with SQLite's "locked"; any other error (a missing
    table, or one the gateway raises itself, without a SQLite code) is raised at the first try, never waited on."""
    from gateway.state import _while_locked

    holder, conn = _holder_and_waiter(tmp_path)
    calls: list[str] = []

    def insert(table: str) -> object:
        calls.append(table)
        return conn.execute(f"INSERT INTO {table} VALUES (1)")

    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            _while_locked(0.05, insert, "t")
        assert len(calls) > 5
        calls.clear()
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            _while_locked(10, insert, "missing")
        assert calls == ["missing"]
        calls.clear()

        def own_error() -> None:  # the probe's "removed while open": an error with no SQLite code
            calls.append("own")
            raise sqlite3.OperationalError("removed while open")

        with pytest.raises(sqlite3.OperationalError, match="removed while open"):
            _while_locked(10, own_error)
        assert calls == ["own"]
    finally:
        holder.execute("ROLLBACK")
        conn.close()
        holder.close()


async def test_sqlite_count_waits_for_another_workers_write_lock(tmp_path: Path) -> None:
    """An open store whose file another process holds the write lock of (for 0.3 s): the rate-limit count waits
    for it, within the busy timeout, and counts."""
    path = tmp_path / "s.sqlite"
    state = await SqliteState.open(path, busy_timeout=10)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
        assert await state.hit("k", 1, 60, 1000.0) is None
        assert other.execute("SELECT count FROM rate WHERE key = 'k'").fetchone() == (1,)
    finally:
        other.close()
        await state.close()


async def test_sqlite_offer_at_or_below_the_mark_takes_no_write_lock(tmp_path: Path) -> None:
    """An update check offers the channel's newest release again and again: that needs no write transaction, so
    another worker holding the write lock does not hold it up. The twin: raising the mark does wait for the lock."""
    path = tmp_path / "s.sqlite"
    state = await SqliteState.open(path, busy_timeout=0.2)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await state.record_offer("com.example.app", "production", "2.0.0")
        other.execute("BEGIN IMMEDIATE")  # another worker writing
        await state.record_offer("com.example.app", "production", "2.0.0")
        await state.record_offer("com.example.app", "production", "1.0.0")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await state.record_offer("com.example.app", "production", "3.0.0")
        other.execute("ROLLBACK")
        await state.record_offer("com.example.app", "production", "3.0.0")
        assert await state.high_water("com.example.app", "production") == "3.0.0"
    finally:
        other.close()
        await state.close()


async def test_closed_store_refuses(tmp_path: Path) -> None:
    state = await SqliteState.open(tmp_path / "s.sqlite")
    await state.close()
    with pytest.raises(RuntimeError):
        await state.high_water("a", "b")


async def test_redis_is_shared_between_hosts_and_keeps_the_highest_mark(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex}:"
    one, two = await RedisState.open(redis_url, prefix), await RedisState.open(redis_url, prefix)
    try:
        versions = [f"1.{minor}.0" for minor in range(30)]
        # thirty concurrent offers from two "hosts": optimistic transactions must keep the highest
        pairs = zip([one, two] * 15, versions, strict=True)
        await asyncio.gather(*(host.record_offer("com.example.app", "production", v) for host, v in pairs))
        assert await two.high_water("com.example.app", "production") == "1.29.0"
        await one.hit("k", 1, 60, 1000.0)
        assert await two.hit("k", 1, 60, 1000.0) is not None  # one budget across hosts
    finally:
        await one.close()
        await two.close()


async def test_unreachable_redis_is_an_error_at_open() -> None:
    from redis.exceptions import RedisError

    with pytest.raises((OSError, RedisError)):
        await RedisState.open(f"redis://127.0.0.1:{free_port()}/0")


async def test_probe_writes_on_every_store(store: StateStore) -> None:
    await store.probe()
    await store.probe()


async def test_guarded_sqlite_on_a_full_disk_fails_visibly_and_recovers(tmp_path: Path) -> None:
    """A real SQLite file on a tmpfs filled to its last page: writes fail as `StateError` (counted per operation,
    reported in the fault), reads keep working, and the first write after space is freed ends the failure."""
    with small_filesystem(tmp_path / "disk", "512k") as disk:
        inner = await SqliteState.open(disk / "gateway.sqlite")
        fault, counted = Fault("state store"), []
        state = GuardedState(inner, fault, counted.append)
        try:
            await state.record_offer("com.example.app", "production", "1.0.0")
            assert not fault.failing and counted == []
            filler = fill_up(disk)
            with pytest.raises(StateError) as failed:
                await state.record_offer("com.example.app", "production", "1.1.0")
            assert failed.value.reason is Reason.STATE_ERROR and failed.value.op == "record_offer"
            with pytest.raises(StateError):
                await state.hit("k", 10, 60, 1_800_000_000.0)
            with pytest.raises(StateError):
                await state.probe()
            assert counted == ["record_offer", "hit", "probe"]
            assert fault.failing and "full" in fault.detail
            assert await state.high_water("com.example.app", "production") == "1.0.0"  # a read needs no space
            assert fault.failing  # a read does not prove the store can be written again
            filler.unlink()
            await state.probe()
            assert not fault.failing
            await state.record_offer("com.example.app", "production", "1.1.0")
            assert await state.high_water("com.example.app", "production") == "1.1.0"
        finally:
            await state.close()


async def test_guarded_state_lets_bugs_through(tmp_path: Path) -> None:
    """Only the store's own failures become `state_error`; a programming error still surfaces as one."""
    fault, counted = Fault("state store"), []
    state = GuardedState(await SqliteState.open(tmp_path / "s.sqlite"), fault, counted.append)
    try:
        with pytest.raises(TypeError):
            await state.hit("k")  # type: ignore[call-arg]
        assert counted == [] and not fault.failing
    finally:
        await state.close()


async def test_guarded_sqlite_locked_by_another_process_fails_visibly_and_recovers(tmp_path: Path) -> None:
    """Another connection (a backup tool, an operator's sqlite3 shell) holds the write lock past the busy timeout:
    writes fail as `StateError`; once the lock is released the probe ends the failure."""
    path = tmp_path / "s.sqlite"
    fault, counted = Fault("state store"), []
    state = GuardedState(await SqliteState.open(path, busy_timeout=0.2), fault, counted.append)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await state.hit("k", 10, 60, 1_800_000_000.0)
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StateError):
            await state.hit("k", 10, 60, 1_800_000_000.0)
        assert counted == ["hit"] and fault.failing and "locked" in fault.detail
        other.execute("ROLLBACK")
        await state.probe()
        assert not fault.failing
        assert await state.hit("k", 10, 60, 1_800_000_000.0) is None
    finally:
        other.close()
        await state.close()


async def test_guarded_check_on_a_locked_sqlite_counts_the_failed_count_and_still_reads(tmp_path: Path) -> None:
    """Another process holds the write lock: the trip's count fails (counted as `hit`), its read of the mark works
    (WAL), as the two separate operations did; with the rate limit failing closed the trip does not read at all."""
    path = tmp_path / "s.sqlite"
    fault, counted = Fault("state store"), []
    state = GuardedState(await SqliteState.open(path, busy_timeout=0.2), fault, counted.append)
    other = sqlite3.connect(path, isolation_level=None)
    mark = ("com.example.app", "production")
    try:
        await state.record_offer(*mark, "1.0.0")
        other.execute("BEGIN IMMEDIATE")
        result = await state.check(Trip("k", 10, 60, 1_800_000_000.0, mark))
        assert isinstance(result.count_error, sqlite3.OperationalError) and result.retry is None
        assert result.mark == "1.0.0" and result.mark_error is None
        assert counted == ["hit"] and fault.failing and "locked" in fault.detail
        closed = await state.check(Trip("k", 10, 60, 1_800_000_000.0, mark, read_after_failed_count=False))
        assert closed.count_error is not None and not closed.mark_read
        assert counted == ["hit", "hit"]
        other.execute("ROLLBACK")
        healthy = await state.check(Trip("k", 10, 60, 1_800_000_000.0, mark))
        assert healthy.count_error is None and healthy.mark == "1.0.0"
        assert not fault.failing  # both operations that failed have succeeded since
    finally:
        other.close()
        await state.close()


async def test_redis_check_out_of_memory_refuses_the_count_but_reads_the_mark(redis_url: str) -> None:
    """Redis at its `maxmemory` refuses writes, not reads: the script's count fails alone, as `hit` did beside a
    separate `high_water`. The twin: the same trip once memory is allowed again."""
    import redis.asyncio as aioredis

    admin = aioredis.from_url(redis_url)
    fault, counted = Fault("state store"), []
    state = GuardedState(await RedisState.open(redis_url, f"test-{uuid.uuid4().hex}:"), fault, counted.append)
    mark = ("com.example.app", "production")
    try:
        await state.record_offer(*mark, "1.0.0")
        await admin.config_set("maxmemory", "1")
        try:
            result = await state.check(Trip(f"k-{uuid.uuid4().hex}", 10, 60, 1_800_000_000.0, mark))
        finally:
            await admin.config_set("maxmemory", "0")
        assert result.count_error is not None and "OOM" in str(result.count_error)
        assert result.mark == "1.0.0" and result.mark_error is None
        assert counted == ["hit"] and fault.failing
        healthy = await state.check(Trip(f"k-{uuid.uuid4().hex}", 10, 60, 1_800_000_000.0, mark))
        assert healthy.count_error is None and healthy.retry is None and healthy.mark == "1.0.0"
        assert not fault.failing
    finally:
        await state.close()
        await admin.aclose()


async def test_guarded_check_with_redis_stopped_fails_both_parts_or_only_the_count() -> None:
    """Redis away: the whole trip fails; the read it would have made counts as failed too (the rate limit fails
    open, the check goes on and needs the mark), but not when the limit fails closed (the check is refused)."""
    server = RedisServer()
    server.start()
    fault, counted = Fault("state store"), []
    try:
        state = GuardedState(await RedisState.open(server.url), fault, counted.append)
        mark = ("com.example.app", "production")
        try:
            assert (await state.check(Trip("k", 10, 60, 1_800_000_000.0, mark))).mark is None
            server.stop()
            result = await state.check(Trip("k", 10, 60, 1_800_000_000.0, mark))
            assert result.count_error is not None and result.mark_read and result.mark_error is not None
            assert counted == ["hit", "high_water"] and fault.failing
            closed = await state.check(Trip("k", 10, 60, 1_800_000_000.0, mark, read_after_failed_count=False))
            assert closed.count_error is not None and not closed.mark_read
            assert counted == ["hit", "high_water", "hit"]
        finally:
            await state.close()
    finally:
        server.stop()


async def test_release_devices_count_once_within_the_window(store: StateStore) -> None:
    app, now = "com.example.app", 1_800_000_000.0
    assert await store.release_event(app, "1.3.0", "d1", False, now, 3600) == (1, 0)
    for _ in range(5):  # one noisy device: one failing device
        assert await store.release_event(app, "1.3.0", "d2", True, now + 1, 3600) == (2, 1)
    assert await store.release_event(app, "1.3.0", "d2", False, now + 2, 3600) == (2, 1)  # it failed in the window
    assert await store.release_event(app, "1.2.0", "d3", True, now, 3600) == (1, 1)  # per version
    assert await store.release_counts(app, "1.3.0", now + 3, 3600) == (2, 1)
    assert await store.release_counts(app, "1.3.0", now + 3600.5, 3600) == (1, 1)  # d1 left the window
    assert await store.release_counts(app, "1.3.0", now + 7200, 3600) == (0, 0)


async def test_halt_once_and_resume_clears_counts(store: StateStore) -> None:
    app, now = "com.example.app", 1_800_000_000.0
    assert await store.halts(app) == {}
    assert await store.halt(app, "1.3.0", "automatic") is True
    assert await store.halt(app, "1.3.0", "operator") is False  # the first halt is kept and reported once
    assert await store.halts(app) == {"1.3.0": "automatic"}
    await store.release_event(app, "1.3.0", "d1", True, now, 3600)
    assert await store.resume(app, "1.3.0") is True
    assert await store.resume(app, "1.3.0") is False
    assert await store.halts(app) == {}
    assert await store.release_counts(app, "1.3.0", now, 3600) == (0, 0)


async def test_store_thread_runs_in_order_passes_errors_back_and_skips_cancelled_calls() -> None:
    """The store's thread: calls run one after another, a call's exception reaches its caller, a call whose task
    was cancelled before the thread took it never runs, and a stopped thread refuses new calls."""
    import threading

    from gateway.state import StoreThread

    worker, ran, gate = StoreThread("test-state"), [], threading.Event()
    try:
        blocked = asyncio.ensure_future(worker.run(gate.wait, 10))
        await asyncio.sleep(0.05)  # the thread is in the first call
        skipped = asyncio.ensure_future(worker.run(ran.append, "cancelled"))
        await asyncio.sleep(0)  # queued behind the first
        skipped.cancel()
        kept = asyncio.ensure_future(worker.run(ran.append, "kept"))
        await asyncio.sleep(0)
        gate.set()
        assert await blocked is True
        await kept
        assert ran == ["kept"] and skipped.cancelled()
        with pytest.raises(ZeroDivisionError):
            await worker.run(lambda: 1 / 0)
    finally:
        worker.stop()
    with pytest.raises(RuntimeError, match="closed"):
        await worker.run(ran.append, "late")
