"""Origin helpers that need no server: reading an origin's Retry-After; what an origin publishes without a
network call; which files a directory origin opens; how a body's chunks are sliced for the verifier and the
client (narrow, or wide past `WIDE_AFTER` while the client keeps up)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from gateway.config import DirectoryOriginConfig, HttpsOriginConfig
from gateway.core.reasons import Reason, Refusal
from gateway.core.releases import Release, ReleaseIndex, index_document
from gateway.core.verify import Expectation, State, Verifier
from gateway.origins import (
    WIDE_AFTER,
    WIDE_SLICE,
    DirectoryOrigin,
    FileBody,
    HttpsOrigin,
    OriginError,
    retry_after_seconds,
)
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


async def _read_file(origin: DirectoryOrigin, location: str, data_size: int, sha: str, small: bool) -> bytes:
    """A file of the directory origin, read through a verifier (on the event loop when `small`, else in a thread)."""
    hint = data_size if small else 1 << 30
    async with origin.open(APP, location, 64 * 1024, size_hint=hint) as body:
        verifier = Verifier(Expectation(sha, data_size))
        out = [bytes(p) async for pieces in body.through(verifier, 64 * 1024) for p in pieces]
        return b"".join([*out, bytes(verifier.finish())])


@pytest.mark.parametrize("small", [True, False])
def test_a_directory_origin_follows_the_app_folders_own_symlink(tmp_path: Path, small: bool) -> None:
    """The app folder may itself be a symlink (a release tree switched by a symlink): its files are inside it."""
    data = os.urandom(3000)
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "releases-v2").mkdir()
    (tmp_path / "releases-v2" / "1.0.0.zip").write_bytes(data)
    (tmp_path / "root").mkdir()
    os.symlink("../releases-v2", tmp_path / "root" / APP)
    origin = DirectoryOrigin("local", DirectoryOriginConfig(type="directory", path=tmp_path / "root"))
    assert asyncio.run(_read_file(origin, "1.0.0.zip", len(data), sha, small)) == data


@pytest.mark.parametrize("small", [True, False])
def test_a_directory_origin_refuses_a_folder_named_as_a_file_and_a_name_that_leads_out(
    tmp_path: Path, small: bool
) -> None:
    (tmp_path / APP / "assets").mkdir(parents=True)
    (tmp_path / "secret.zip").write_bytes(b"x" * 10)
    os.symlink("../secret.zip", tmp_path / APP / "out.zip")
    origin = DirectoryOrigin("local", DirectoryOriginConfig(type="directory", path=tmp_path))
    with pytest.raises(OriginError, match=r"cannot open com\.example\.app/assets: Is a directory"):
        asyncio.run(_read_file(origin, "assets", 10, "ab" * 32, small))
    with pytest.raises(OriginError, match="leads outside the app's folder"):
        asyncio.run(_read_file(origin, "out.zip", 10, "ab" * 32, small))
    descriptors = len(os.listdir("/proc/self/fd"))
    for _ in range(20):  # a refused open leaves no descriptor behind
        with pytest.raises(OriginError):
            asyncio.run(_read_file(origin, "out.zip", 10, "ab" * 32, small))
    assert len(os.listdir("/proc/self/fd")) <= descriptors


@pytest.mark.parametrize("small", [True, False])
def test_a_directory_origin_refuses_a_fifo_at_once_and_serves_a_regular_file_by_its_side(
    tmp_path: Path, small: bool
) -> None:
    """A FIFO listed as a bundle is refused without waiting for a writer (a small file is opened on the event loop:
    a blocking open would stall every request); twin: a regular file in the same folder is served."""
    (tmp_path / APP).mkdir()
    os.mkfifo(tmp_path / APP / "pipe.zip")
    data = os.urandom(1000)
    (tmp_path / APP / "real.zip").write_bytes(data)
    origin = DirectoryOrigin("local", DirectoryOriginConfig(type="directory", path=tmp_path))

    def writer_comes() -> None:  # ends a blocked open, so that a regression fails on time instead of hanging
        with contextlib.suppress(OSError):
            os.close(os.open(tmp_path / APP / "pipe.zip", os.O_WRONLY | os.O_NONBLOCK))

    rescue = threading.Timer(10, writer_comes)
    rescue.start()
    started = time.monotonic()
    try:
        with pytest.raises(OriginError, match=r"cannot open com\.example\.app/pipe\.zip: not a regular file"):
            asyncio.run(_read_file(origin, "pipe.zip", 10, "ab" * 32, small))
    finally:
        rescue.cancel()
    assert time.monotonic() - started < 5
    assert asyncio.run(_read_file(origin, "real.zip", len(data), hashlib.sha256(data).hexdigest(), small)) == data


def test_a_download_cancelled_while_its_file_opens_leaves_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large file is opened in a worker thread; a request cancelled meanwhile (the client went away) must not
    leak the descriptor the thread opens after it: it is closed once the thread is done. Twin: a download that is
    not cancelled gets its body."""
    from gateway import origins

    (tmp_path / APP).mkdir()
    data = os.urandom(3000)
    (tmp_path / APP / "big.zip").write_bytes(data)
    origin = DirectoryOrigin("local", DirectoryOriginConfig(type="directory", path=tmp_path))
    go, opened = threading.Event(), threading.Event()
    real_open = origins._open_first

    def slow_open(*args: object) -> tuple[int, int, bytes]:
        go.wait(10)
        try:
            return real_open(*args)  # type: ignore[arg-type]
        finally:
            opened.set()

    monkeypatch.setattr(origins, "_open_first", slow_open)

    async def cancelled() -> None:
        async def download() -> None:
            async with origin.open(APP, "big.zip", 64 * 1024, size_hint=1 << 30):
                raise AssertionError("the open was to be cancelled")

        task = asyncio.ensure_future(download())
        await asyncio.sleep(0.1)  # the thread is waiting in the open
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        go.set()
        await asyncio.to_thread(opened.wait, 10)
        await asyncio.sleep(0.1)  # the done-callback that closes the descriptor runs on the loop

    descriptors = len(os.listdir("/proc/self/fd"))
    asyncio.run(cancelled())
    assert len(os.listdir("/proc/self/fd")) <= descriptors
    opened.clear()
    assert asyncio.run(_read_file(origin, "big.zip", len(data), hashlib.sha256(data).hexdigest(), False)) == data


# -- how a body's chunks are sliced for the verifier and the client ----------------------------------------------


def _through(data: bytes, chunk: int, keeping_up: bool) -> tuple[list[list[int]], bytes, Verifier]:
    """A file body of `data` read in `chunk`-byte reads, fed through a real verifier in 64 KiB slices: the sizes of
    the pieces released per chunk, all released bytes (with the tail from `finish`), and the verifier."""
    stream = io.BytesIO(data)
    body = FileBody(len(data), lambda: stream.read(chunk))
    verifier = Verifier(Expectation(hashlib.sha256(data).hexdigest(), len(data)))
    sizes: list[list[int]] = []
    out = bytearray()

    async def run() -> None:
        async for pieces in body.through(verifier, PIECE, lambda: keeping_up):
            sizes.append([len(p) for p in pieces])
            for p in pieces:
                out.extend(p)

    asyncio.run(run())
    out.extend(verifier.finish())
    return sizes, bytes(out), verifier


PIECE = 64 * 1024
MIB = 1024 * 1024


def test_a_client_that_keeps_up_gets_wide_slices_past_the_mark_and_the_held_back_piece_stays_small() -> None:
    data = os.urandom(WIDE_AFTER + 3 * MIB + 12345)
    sizes, out, verifier = _through(data, MIB, keeping_up=True)
    assert out == data and verifier.state is State.PASSED
    narrow = sizes[: WIDE_AFTER // MIB]  # nothing wide until WIDE_AFTER bytes are out
    assert all(size <= PIECE for chunk in narrow for size in chunk)
    wide = sizes[WIDE_AFTER // MIB + 1 : -1]
    assert wide and all(max(chunk) == WIDE_SLICE and len(chunk) == 5 for chunk in wide)  # 4 x 256 KiB, one held
    assert all(size <= WIDE_SLICE for chunk in sizes for size in chunk)


def test_a_client_that_waits_gets_64_kib_slices_whatever_was_sent() -> None:
    data = os.urandom(WIDE_AFTER + 3 * MIB)
    sizes, out, verifier = _through(data, MIB, keeping_up=False)
    assert out == data and verifier.state is State.PASSED
    assert all(size <= PIECE for chunk in sizes for size in chunk)


def test_a_flipped_byte_in_the_wide_part_fails_and_the_last_piece_is_never_released() -> None:
    data = bytearray(os.urandom(WIDE_AFTER + 2 * MIB))
    good = hashlib.sha256(data).hexdigest()
    data[-1] ^= 1
    stream = io.BytesIO(bytes(data))
    body = FileBody(len(data), lambda: stream.read(MIB))
    verifier = Verifier(Expectation(good, len(data)))
    released = 0

    async def run() -> None:
        nonlocal released
        async for pieces in body.through(verifier, PIECE, lambda: True):
            released += sum(len(p) for p in pieces)

    asyncio.run(run())
    with pytest.raises(Refusal) as refused:
        verifier.finish()
    assert refused.value.reason is Reason.CHECKSUM_MISMATCH
    assert released == len(data) - PIECE  # the held-back piece, with the bad byte, never left


def _reader_buffer_sizes(wide: bool) -> list[tuple[int, int]]:
    """An HTTPS bundle body of WIDE_AFTER + 4 MiB and a bit decrypted into a `_BodyReader` whose client keeps up
    (`wide`) or not, each read taken at once: (bytes received before it, its size) for every buffer started."""
    from gateway.origins import _BodyReader

    reader = _BodyReader(WIDE_AFTER + 4 * MIB + 12345, None, None)
    sizes: list[tuple[int, int]] = []

    async def run() -> None:
        while reader.received < reader.length:
            reader.widen(wide)
            space = reader.space(reader.length - reader.received + 1)
            if reader._filled == 0:  # a buffer was started
                sizes.append((reader.received, len(space.obj)))  # type: ignore[arg-type]
            n = len(space)
            del space
            reader.filled(n)
            assert await reader.take() is not None

    asyncio.run(run())
    return sizes


def test_an_origin_body_is_read_into_1_mib_buffers_only_past_the_mark_while_the_client_keeps_up() -> None:
    """While the client keeps up, the body reader's buffers are 512 KiB until WIDE_AFTER bytes came, 1 MiB after
    (fewer pump rounds per download); not before, as a slow reader looks fast while the kernel takes its first MiBs."""
    sizes = _reader_buffer_sizes(wide=True)
    assert {size for before, size in sizes if before < WIDE_AFTER} == {512 * 1024}
    assert {size for before, size in sizes if before >= WIDE_AFTER} == {MIB}


def test_an_origin_body_for_a_client_that_waits_stays_in_128_kib_buffers_past_the_mark() -> None:
    """Twin: a client that makes the gateway wait gets 128 KiB buffers all along (memory per slow reader)."""
    assert {size for _, size in _reader_buffer_sizes(wide=False)} == {128 * 1024}
