"""The state store (gateway/state.py): high-water marks only rise (unless a rollback sets them), rate-limit
windows count per key, the SQLite store persists and is shared by several connections (workers)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.state import MemoryState, RedisState, SqliteState, StateStore
from tests.support import free_port, redis_server


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
