"""The verifier state machine (core/verify.py): tail holdback, and nothing released after a failure.

The invariant under test: the concatenation of everything the verifier releases equals the origin's bytes only
when the digest (and size) matched; on any failure the client can never have been given the whole body.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from gateway.core.reasons import Reason, Refusal
from gateway.core.verify import Expectation, State, Verifier, VerifierStateError
from tests.core.verifying import random_chunks, run

DATA = random.Random(1234).randbytes(10_000)
SHA = hashlib.sha256(DATA).hexdigest()


def chunks_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


# --- success: exact bytes, tail held back ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 1000, 4096, len(DATA) - 1, len(DATA), len(DATA) + 1])
def test_releases_exact_bytes_and_holds_the_tail_until_finish(chunk: int) -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)))
    parts = chunks_of(DATA, chunk)
    released = b""
    for i, part in enumerate(parts):
        out = verifier.feed(part)
        # each feed releases exactly the previous chunk: the newest one is always held back
        assert out == (parts[i - 1] if i else b"")
        released += out
    assert released == DATA[: len(DATA) - len(parts[-1])]
    assert verifier.state.value == "streaming"
    tail = verifier.finish()
    assert tail == parts[-1]
    assert released + tail == DATA
    assert verifier.state is State.PASSED
    assert verifier.reason is None
    assert verifier.received == verifier.released == len(DATA)


@pytest.mark.parametrize("seed", range(8))
def test_random_chunkings_release_the_input_only_on_success(seed: int) -> None:
    parts = random_chunks(DATA, seed)
    released, refusal = run(Verifier(Expectation(SHA, len(DATA))), parts)
    assert refusal is None
    assert released == DATA

    at = random.Random(seed).randrange(len(DATA))
    bad = random_chunks(flip(DATA, at), seed)
    released, refusal = run(Verifier(Expectation(SHA, len(DATA))), bad)
    assert refusal is not None and refusal.reason is Reason.CHECKSUM_MISMATCH
    assert len(released) < len(DATA)
    assert released != flip(DATA, at)


def test_empty_chunks_change_nothing() -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)))
    assert verifier.feed(b"") == b""
    assert verifier.feed(DATA[:10]) == b""
    assert verifier.feed(b"") == b""
    assert verifier.received == 10 and verifier.released == 0
    assert verifier.feed(DATA[10:]) == DATA[:10]
    assert verifier.finish() == DATA[10:]


def test_single_chunk_body_is_released_only_by_finish() -> None:
    small = b"one small bundle"
    verifier = Verifier(Expectation(hashlib.sha256(small).hexdigest(), len(small)))
    assert verifier.feed(small) == b""
    assert verifier.released == 0
    assert verifier.finish() == small


# --- digest mismatch --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("at", [0, len(DATA) // 2, len(DATA) - 1], ids=["start", "middle", "end"])
@pytest.mark.parametrize("chunk", [1000, len(DATA)])
def test_flipped_byte_is_checksum_mismatch_and_finish_releases_nothing(at: int, chunk: int) -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)))
    released = b""
    for part in chunks_of(flip(DATA, at), chunk):
        released += verifier.feed(part)
    before = verifier.released
    with pytest.raises(Refusal) as info:
        verifier.finish()
    assert info.value.reason is Reason.CHECKSUM_MISMATCH
    assert SHA in info.value.detail
    assert verifier.state is State.FAILED
    assert verifier.reason is Reason.CHECKSUM_MISMATCH
    assert verifier.released == before == len(released)
    # everything but the last chunk went out; the last chunk (which completes the body) never does
    assert released == flip(DATA, at)[: len(DATA) - len(chunks_of(DATA, chunk)[-1])]
    # the failed verifier releases nothing more, whatever happens next
    with pytest.raises(VerifierStateError):
        verifier.finish()
    with pytest.raises(VerifierStateError):
        verifier.feed(b"more")
    assert verifier.released == before


def test_wrong_expected_digest_fails_even_with_pristine_bytes() -> None:
    other = hashlib.sha256(b"something else").hexdigest()
    released, refusal = run(Verifier(Expectation(other, len(DATA))), chunks_of(DATA, 4096))
    assert refusal is not None and refusal.reason is Reason.CHECKSUM_MISMATCH
    assert released == DATA[: 2 * 4096]


# --- size -------------------------------------------------------------------------------------------------------


def test_overflow_is_size_exceeded_at_the_chunk_that_crosses_the_size() -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)))
    parts = chunks_of(DATA + b"\x00" * 3000, 3000)  # 3000, 6000, 9000, 12000 (crosses), 13000
    released = verifier.feed(parts[0]) + verifier.feed(parts[1]) + verifier.feed(parts[2])
    assert released == DATA[:6000]
    with pytest.raises(Refusal) as info:
        verifier.feed(parts[3])
    assert info.value.reason is Reason.SIZE_EXCEEDED
    assert "declared size" in info.value.detail and str(len(DATA)) in info.value.detail
    assert verifier.state is State.FAILED and verifier.reason is Reason.SIZE_EXCEEDED
    assert verifier.released == 6000  # the held chunk [6000:9000] is dropped, never released
    with pytest.raises(VerifierStateError):
        verifier.feed(parts[4])
    with pytest.raises(VerifierStateError):
        verifier.finish()
    assert verifier.released == 6000


def test_one_extra_byte_after_an_exact_body_is_an_overflow() -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)))
    assert verifier.feed(DATA) == b""
    with pytest.raises(Refusal) as info:
        verifier.feed(b"!")
    assert info.value.reason is Reason.SIZE_EXCEEDED
    assert verifier.released == 0  # the complete, correct body was held back and is never released


def test_overflow_inside_a_single_chunk() -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)))
    with pytest.raises(Refusal) as info:
        verifier.feed(DATA + b"x")
    assert info.value.reason is Reason.SIZE_EXCEEDED
    assert verifier.released == 0


@pytest.mark.parametrize("cut", [1, 5000, len(DATA) - 1])
def test_short_body_is_short_body(cut: int) -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)))
    parts = chunks_of(DATA[:cut], 1000)
    released = b"".join(verifier.feed(p) for p in parts)
    with pytest.raises(Refusal) as info:
        verifier.finish()
    assert info.value.reason is Reason.SHORT_BODY
    assert f"{cut} of {len(DATA)}" in info.value.detail
    assert verifier.state is State.FAILED
    assert released == DATA[: cut - len(parts[-1])]
    assert verifier.released == len(released)


def test_empty_body_is_short() -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)))
    with pytest.raises(Refusal) as info:
        verifier.finish()
    assert info.value.reason is Reason.SHORT_BODY
    assert verifier.released == 0


# --- unknown size, max_bytes ------------------------------------------------------------------------------------


def test_unknown_size_with_max_bytes_passes_within_the_cap() -> None:
    released, refusal = run(Verifier(Expectation(SHA, None, max_bytes=len(DATA))), chunks_of(DATA, 999))
    assert refusal is None and released == DATA


def test_unknown_size_with_max_bytes_refuses_beyond_the_cap() -> None:
    verifier = Verifier(Expectation(SHA, None, max_bytes=5000))
    released = verifier.feed(DATA[:4000])
    with pytest.raises(Refusal) as info:
        verifier.feed(DATA[4000:8000])
    assert info.value.reason is Reason.SIZE_EXCEEDED
    assert "size limit of 5000" in info.value.detail
    assert released == b"" and verifier.released == 0


def test_unknown_size_without_cap_checks_the_digest_only() -> None:
    released, refusal = run(Verifier(Expectation(SHA)), chunks_of(DATA, 777))
    assert refusal is None and released == DATA
    released, refusal = run(Verifier(Expectation(SHA)), chunks_of(DATA[:-1], 777))
    assert refusal is not None and refusal.reason is Reason.CHECKSUM_MISMATCH


def test_max_bytes_below_the_declared_size_is_the_limit() -> None:
    expect = Expectation(SHA, len(DATA), max_bytes=100)
    assert expect.limit == 100
    verifier = Verifier(expect)
    with pytest.raises(Refusal) as info:
        verifier.feed(DATA[:101])
    assert info.value.reason is Reason.SIZE_EXCEEDED
    assert "size limit of 100" in info.value.detail


def test_limit() -> None:
    assert Expectation(SHA).limit is None
    assert Expectation(SHA, 10).limit == 10
    assert Expectation(SHA, None, 20).limit == 20
    assert Expectation(SHA, 30, 20).limit == 20
    assert Expectation(SHA, 10, 20).limit == 10


# --- errors from outside, illegal transitions -------------------------------------------------------------------


def test_error_while_streaming_fails_and_drops_the_held_chunk() -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)))
    verifier.feed(DATA[:1000])
    verifier.feed(DATA[1000:2000])
    refusal = verifier.error(Reason.ORIGIN_ERROR, "origin reset")
    assert refusal.reason is Reason.ORIGIN_ERROR and refusal.detail == "origin reset"
    assert verifier.state is State.FAILED and verifier.reason is Reason.ORIGIN_ERROR
    assert verifier.released == 1000
    with pytest.raises(VerifierStateError):
        verifier.finish()
    assert verifier.released == 1000


def test_error_after_failed_keeps_the_first_reason() -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)))
    verifier.feed(DATA[:10])
    verifier.error(Reason.CLIENT_TOO_SLOW, "slow")
    again = verifier.error(Reason.CLIENT_GONE, "gone")
    assert verifier.state is State.FAILED
    assert again.reason is Reason.CLIENT_TOO_SLOW
    assert verifier.reason is Reason.CLIENT_TOO_SLOW


def test_error_after_passed_keeps_passed() -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)))
    released, refusal = run(verifier, chunks_of(DATA, 4096))
    assert refusal is None and released == DATA
    result = verifier.error(Reason.CLIENT_GONE, "client went away after the tail")
    assert verifier.state is State.PASSED
    assert verifier.reason is None
    assert result.reason is Reason.CLIENT_GONE
    assert verifier.released == len(DATA)


@pytest.mark.parametrize("how", ["mismatch", "overflow", "short", "error"])
def test_feeding_after_failed_raises_naming_state_and_event(how: str) -> None:
    verifier = Verifier(Expectation(SHA, 100))
    payload = DATA[:100]
    if how == "mismatch":
        verifier.feed(flip(payload, 3))
        with pytest.raises(Refusal):
            verifier.finish()
    elif how == "overflow":
        with pytest.raises(Refusal):
            verifier.feed(DATA[:101])
    elif how == "short":
        verifier.feed(payload[:50])
        with pytest.raises(Refusal):
            verifier.finish()
    else:
        verifier.error(Reason.ORIGIN_ERROR, "boom")
    assert verifier.state is State.FAILED
    released = verifier.released
    with pytest.raises(VerifierStateError, match=r"state failed .*event chunk"):
        verifier.feed(payload)
    with pytest.raises(VerifierStateError, match=r"state failed .*event end"):
        verifier.finish()
    assert verifier.released == released
    assert verifier.state is State.FAILED


def test_feeding_or_finishing_after_passed_raises() -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)))
    run(verifier, [DATA])
    assert verifier.state is State.PASSED
    with pytest.raises(VerifierStateError, match=r"state passed .*event chunk"):
        verifier.feed(b"x")
    with pytest.raises(VerifierStateError, match=r"state passed .*event end"):
        verifier.finish()
    assert verifier.state is State.PASSED


def test_verifier_state_error_is_not_a_refusal() -> None:
    # a caller bug must not be mistaken for a client-facing refusal reason
    assert not issubclass(VerifierStateError, Refusal)


# --- send_from (Range answers) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 1, 999, 1000, 1001, 5000, len(DATA) - 1000, len(DATA) - 1])
@pytest.mark.parametrize("chunk", [1000, 3333])
def test_send_from_releases_only_bytes_from_the_offset(offset: int, chunk: int) -> None:
    verifier = Verifier(Expectation(SHA, len(DATA)), send_from=offset)
    released, refusal = run(verifier, chunks_of(DATA, chunk))
    assert refusal is None
    assert released == DATA[offset:]
    assert verifier.released == len(DATA) - offset
    assert verifier.received == len(DATA)


@pytest.mark.parametrize("at", [0, 10, len(DATA) - 1])
def test_send_from_still_hashes_the_bytes_before_the_offset(at: int) -> None:
    # a flipped byte before the offset is never sent, but it still fails the digest
    verifier = Verifier(Expectation(SHA, len(DATA)), send_from=5000)
    released, refusal = run(verifier, chunks_of(flip(DATA, at), 1000))
    assert refusal is not None and refusal.reason is Reason.CHECKSUM_MISMATCH
    assert len(released) < len(DATA) - 5000
    assert DATA[5000:].startswith(released)  # the last chunk, which holds the end of the body, is never sent


def test_send_from_hashes_everything_with_a_custom_digest() -> None:
    seen: list[bytes] = []

    class Recorder:
        def __init__(self) -> None:
            self._h = hashlib.sha256()

        def update(self, data: bytes, /) -> None:
            seen.append(data)
            self._h.update(data)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    verifier = Verifier(Expectation(SHA, len(DATA)), send_from=2500, digest_factory=Recorder)
    released, refusal = run(verifier, chunks_of(DATA, 1000))
    assert refusal is None
    assert b"".join(seen) == DATA
    assert released == DATA[2500:]


@pytest.mark.parametrize("offset", [-1, len(DATA), len(DATA) + 1])
def test_send_from_outside_the_body_is_rejected(offset: int) -> None:
    with pytest.raises(ValueError, match="outside the body"):
        Verifier(Expectation(SHA, len(DATA)), send_from=offset)


def test_send_from_with_unknown_size_is_allowed() -> None:
    released, refusal = run(Verifier(Expectation(SHA), send_from=9000), chunks_of(DATA, 4000))
    assert refusal is None and released == DATA[9000:]


# --- Expectation validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sha",
    ["", "abc", SHA[:-1], SHA + "0", SHA.upper(), "g" * 64, " " + SHA[1:], SHA[:32] + ":" + SHA[33:]],
    ids=["empty", "short", "63", "65", "upper", "non-hex", "space", "colon"],
)
def test_expectation_rejects_a_malformed_digest(sha: str) -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        Expectation(sha, 10)


@pytest.mark.parametrize("size", [0, -1])
def test_expectation_rejects_a_non_positive_size(size: int) -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        Expectation(SHA, size)


@pytest.mark.parametrize("cap", [0, -5])
def test_expectation_rejects_a_non_positive_cap(cap: int) -> None:
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        Expectation(SHA, None, max_bytes=cap)


def test_expectation_is_frozen() -> None:
    expect = Expectation(SHA, 10)
    with pytest.raises(AttributeError):
        expect.size = 11  # type: ignore[misc]


def test_slices_of_a_buffer_pass_and_detach_keeps_a_copy_of_the_held_slice() -> None:
    data = bytes(range(256)) * 1024
    verifier = Verifier(Expectation(hashlib.sha256(data).hexdigest(), len(data)))
    view = memoryview(data)
    out = [verifier.feed(view[i : i + 4096]) for i in range(0, len(data), 4096)]
    verifier.detach()
    held = verifier._held
    assert isinstance(held, bytes) and held == data[-4096:]
    assert b"".join(out) + verifier.finish() == data
