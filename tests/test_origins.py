"""Origin helpers that need no server: reading an origin's Retry-After; what an origin publishes without a
network call."""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from gateway.config import DirectoryOriginConfig, HttpsOriginConfig
from gateway.core.releases import Release, ReleaseIndex, index_document
from gateway.origins import DirectoryOrigin, HttpsOrigin, OriginError, retry_after_seconds
from tests.support import free_port

APP = "com.example.app"


def test_retry_after_forms() -> None:
    assert retry_after_seconds("120", 0) == 120
    assert retry_after_seconds("0", 0) == 1  # at least a second
    assert retry_after_seconds("999999", 0) == 86400  # the plugin caps at 24 h
    assert retry_after_seconds("Thu, 01 Jan 1970 00:10:00 GMT", 0) == 600
    assert retry_after_seconds("soon", 0) == 60 and retry_after_seconds(None, 0) == 60


def _index_yaml(*versions: str) -> str:
    index = ReleaseIndex(APP, tuple(Release(v, "production", f"{v}.zip", 1, "ab" * 32) for v in versions))
    return yaml.safe_dump(index_document(index))


def test_a_directory_origin_publishes_its_index_versions_and_nothing_when_it_cannot_read_it(tmp_path: Path) -> None:
    origin = DirectoryOrigin("local", DirectoryOriginConfig(type="directory", path=tmp_path))
    assert asyncio.run(origin.published(APP)) == frozenset()  # no index
    (tmp_path / APP).mkdir()
    (tmp_path / APP / "releases.yaml").write_text(_index_yaml("1.0.0", "1.3.0"))
    assert asyncio.run(origin.published(APP)) == {"1.0.0", "1.3.0"}
    (tmp_path / APP / "releases.yaml").write_text("releases: 3\n")  # a broken index
    assert asyncio.run(origin.published(APP)) == frozenset()


def test_an_https_origin_publishes_nothing_without_asking_the_network() -> None:
    origin = HttpsOrigin("cdn", HttpsOriginConfig(type="https", url=f"https://127.0.0.1:{free_port()}/"))

    async def both() -> tuple[frozenset[str], BaseException | None]:
        try:
            published = await origin.published(APP)
            try:
                await origin.index(APP)
            except OriginError as exc:
                return published, exc
            return published, None
        finally:
            await origin.close()

    published, error = asyncio.run(both())
    assert published == frozenset()
    assert isinstance(error, OriginError)  # the same origin's index is asked of the network (nobody listens)
