"""The zip scan (core/zipscan.py): entries that escape the bundle, native code, and a central directory that does
not agree with the local headers are refused, however the bytes are cut into chunks; each refusal has its twin.

Zips are made by Python's `zipfile` (stored, deflate, and with data descriptors as a streaming writer makes them),
then altered byte by byte where an attacker would alter them.
"""

from __future__ import annotations

import io
import random
import struct
import zipfile

import pytest

from gateway.core.zipscan import MAX_INFLATED, ZipRules, ZipScanner, name_problem

STRICT = ZipRules()  # the default: native code refused
DEFAULT = ZipRules(allow_native_code=True)


class _Unseekable(io.RawIOBase):
    """A write-only stream without seek/tell: zipfile then writes data descriptors (general purpose bit 3)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.data += b
        return len(b)


def make_zip(
    entries: list[tuple[str, bytes]] | list[tuple[zipfile.ZipInfo | str, bytes]],
    *,
    method: int = zipfile.ZIP_DEFLATED,
    streamed: bool = False,
    comment: bytes = b"",
) -> bytes:
    out: io.BytesIO | _Unseekable = _Unseekable() if streamed else io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=method) as zf:  # type: ignore[arg-type]
        for name, data in entries:
            zf.writestr(name, data)
        zf.comment = comment
    return bytes(out.data) if isinstance(out, _Unseekable) else out.getvalue()


def scan(data: bytes, rules: ZipRules = DEFAULT, chunk: int | None = None, seed: int = 0) -> str | None:
    scanner = ZipScanner(rules)
    if chunk is None:  # random cuts
        rng = random.Random(seed)
        i = 0
        while i < len(data):
            n = rng.randint(1, 5000)
            scanner.feed(memoryview(data)[i : i + n])
            i += n
    else:
        for i in range(0, len(data), chunk):
            scanner.feed(data[i : i + chunk])
    return scanner.finish()


CHUNKINGS = [1, 3, 29, 64 * 1024, None]
APP = [("index.html", b"<html>" * 50), ("assets/", b""), ("assets/app.js", random.Random(1).randbytes(20_000))]


def symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (0o120777 << 16) & 0xFFFFFFFF
    return info


def regular(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (0o100644 << 16) & 0xFFFFFFFF
    return info


# --- clean bundles pass, however they are cut -------------------------------------------------------------------


@pytest.mark.parametrize("chunk", CHUNKINGS)
@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_clean_bundle_passes(chunk: int | None, method: int) -> None:
    assert scan(make_zip(APP, method=method), STRICT, chunk) is None


@pytest.mark.parametrize("chunk", CHUNKINGS)
def test_deflated_entries_with_data_descriptors_pass(chunk: int | None) -> None:
    data = make_zip(APP, streamed=True)
    assert zipfile.ZipFile(io.BytesIO(data)).infolist()[0].flag_bits & 0x08  # the writer did use descriptors
    assert scan(data, STRICT, chunk) is None


def test_the_capgo_fixtures_pass() -> None:
    from tests.support import CAPGO_FIXTURES

    for path in sorted(CAPGO_FIXTURES.glob("app_*.zip")):
        if not path.name.endswith(".enc.zip"):
            assert scan(path.read_bytes(), STRICT) is None, path


def test_an_empty_zip_passes() -> None:
    assert scan(make_zip([]), STRICT, 1) is None


# --- names: each refusal and its harmless twin -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "twin", "why"),
    [
        ("../evil.js", "a..b.js", "'..' component"),
        ("www/../../evil.js", "www/..evil/x.js", "'..' component"),
        ("assets/..", "assets/...", "'..' component"),
        ("/etc/evil.js", "etc/evil.js", "absolute path"),
        ("C:/evil.js", "C/evil.js", "absolute path"),
        ("..\\evil.js", "evil.js", "backslash"),
    ],
)
def test_names_that_escape_are_refused_and_their_twins_pass(bad: str, twin: str, why: str) -> None:
    problem = scan(make_zip([(regular(bad), b"x"), ("index.html", b"y")]), DEFAULT, 7)
    assert problem is not None and why in problem, problem
    assert scan(make_zip([(regular(twin), b"x"), ("index.html", b"y")]), DEFAULT, 7) is None


@pytest.mark.parametrize("name", ["lib/arm64-v8a/libx.so", "classes.dex", "Frameworks/x.dylib", "lib/libx.so.1"])
def test_native_code_is_refused_only_when_the_policy_says_so(name: str) -> None:
    data = make_zip([*APP, (name, b"\x7fELF")])
    problem = scan(data, STRICT)
    assert problem is not None and "native code" in problem
    assert scan(data, DEFAULT) is None  # the twin: the same bundle, native code allowed


@pytest.mark.parametrize("name", ["assets/so.js", "x.so.js", "dex.html", "lib/sound.sox"])
def test_names_that_only_look_native_pass(name: str) -> None:
    assert scan(make_zip([*APP, (name, b"x")]), STRICT) is None


def test_name_problem_covers_empty_and_nul() -> None:
    assert name_problem(b"", DEFAULT) is not None
    assert "NUL" in (name_problem(b"a\x00.js", DEFAULT) or "")
    assert name_problem(b"./a.js", DEFAULT) is None


# --- entry kinds -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, None])
def test_a_symlink_entry_is_refused_and_a_regular_twin_passes(chunk: int | None) -> None:
    problem = scan(make_zip([*APP, (symlink("assets/link"), b"../../../../data")]), DEFAULT, chunk)
    assert problem is not None and "symbolic link" in problem
    assert scan(make_zip([*APP, (regular("assets/link"), b"../../../../data")]), DEFAULT, chunk) is None


def test_stored_entries_with_data_descriptors_are_refused() -> None:
    problem = scan(make_zip(APP, method=zipfile.ZIP_STORED, streamed=True), DEFAULT, 100)
    assert problem is not None and "stored with its size after its data" in problem


def test_other_compression_methods_are_refused() -> None:
    problem = scan(make_zip(APP, method=zipfile.ZIP_BZIP2), DEFAULT)
    assert problem is not None and "compression method 12" in problem


def test_an_encrypted_entry_is_refused() -> None:
    data = bytearray(make_zip(APP))
    data[6] |= 0x01  # general purpose flags of the first local header
    problem = scan(bytes(data), DEFAULT)
    assert problem is not None and "encrypted" in problem


# --- the central directory must agree with the local headers ------------------------------------------------------


def _patch_central_name(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new)
    at = data.rindex(old)  # the last occurrence: the central directory's copy
    return data[:at] + new + data[at + len(old) :]


def _patch_local_name(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new)
    at = data.index(old)  # the first occurrence: the local header's copy
    return data[:at] + new + data[at + len(old) :]


@pytest.mark.parametrize("chunk", [1, None])
def test_a_central_directory_that_names_other_entries_is_refused(chunk: int | None) -> None:
    data = make_zip([("aa/index.js", b"x" * 100), ("index.html", b"y")])
    problem = scan(_patch_central_name(data, b"aa/index.js", b"bb/index.js"), DEFAULT, chunk)
    assert problem is not None and "does not list the entries the local headers hold" in problem
    assert scan(data, DEFAULT, chunk) is None


def test_a_zip_slip_hidden_from_the_central_directory_is_refused() -> None:
    """The local header (what Android unpacks) names ../x, the central directory (what iOS reads) a harmless name."""
    data = make_zip([("aa/evil.js", b"x"), ("index.html", b"y")])
    problem = scan(_patch_local_name(data, b"aa/evil.js", b"../evil.js"), DEFAULT)
    assert problem is not None and "'..' component" in problem
    problem = scan(_patch_central_name(data, b"aa/evil.js", b"../evil.js"), DEFAULT)
    assert problem is not None and "'..' component" in problem


def test_a_central_entry_no_local_header_holds_is_refused() -> None:
    one = make_zip([("index.html", b"y")])
    cd_at = one.index(struct.pack("<I", 0x02014B50))
    end_at = one.index(struct.pack("<I", 0x06054B50))
    central = one[cd_at:end_at]
    # two central entries for one local one, the end record patched to agree in size but not in count
    end = bytearray(one[end_at:])
    struct.pack_into("<HHI", end, 8, 2, 2, len(central) * 2)
    problem = scan(one[:cd_at] + central + central + bytes(end), DEFAULT)
    assert problem is not None and "which no local header holds" in problem


def test_an_end_record_that_misplaces_the_central_directory_is_refused() -> None:
    data = bytearray(make_zip(APP))
    end_at = data.rindex(struct.pack("<I", 0x06054B50))
    (offset,) = struct.unpack_from("<I", data, end_at + 16)
    struct.pack_into("<I", data, end_at + 16, offset - 1)
    problem = scan(bytes(data), DEFAULT)
    assert problem is not None and "places the central directory" in problem


def test_bytes_after_the_end_record_are_refused() -> None:
    problem = scan(make_zip(APP) + b"PK\x05\x06" + b"\0" * 18, DEFAULT, 5)
    assert problem is not None and "follow the end" in problem


def test_an_end_signature_in_the_comment_is_refused_and_a_plain_comment_passes() -> None:
    problem = scan(make_zip(APP, comment=b"hi PK\x05\x06 there"), DEFAULT)
    assert problem is not None and "comment" in problem
    assert scan(make_zip(APP, comment=b"built by capgo"), DEFAULT) is None


def test_a_zip_cut_short_is_refused_wherever_it_ends() -> None:
    data = make_zip(APP)
    for end in (0, 10, 40, len(data) // 2, len(data) - 30, len(data) - 1):
        problem = scan(data[:end], DEFAULT)
        assert problem is not None and "ends before" in problem, end


def test_bytes_before_the_first_entry_are_refused() -> None:
    problem = scan(b"MZ\x90\x00" + make_zip(APP), DEFAULT)
    assert problem is not None and "unknown zip record" in problem


def test_a_broken_deflate_stream_with_a_data_descriptor_is_refused() -> None:
    data = bytearray(make_zip(APP, streamed=True))
    header_end = 30 + len("index.html")
    data[header_end : header_end + 8] = b"\xff" * 8
    problem = scan(bytes(data), DEFAULT)
    assert problem is not None and "not a valid deflate stream" in problem


def test_inflating_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.core import zipscan

    data = make_zip([("zeros.bin", bytes(300_000))], streamed=True)
    monkeypatch.setattr(zipscan, "MAX_INFLATED", 100_000)
    problem = scan(data, DEFAULT)
    assert problem is not None and "inflate to more than" in problem
    monkeypatch.setattr(zipscan, "MAX_INFLATED", MAX_INFLATED)
    assert scan(data, DEFAULT) is None


def test_after_a_problem_nothing_more_is_judged() -> None:
    scanner = ZipScanner(DEFAULT)
    scanner.feed(make_zip([(regular("../a"), b"x")]))
    first = scanner.problem
    scanner.feed(b"anything at all")
    assert scanner.finish() == first


def _unicode_path(header_name: str, unicode_name: str) -> zipfile.ZipInfo:
    import zlib

    info = regular(header_name)
    u = unicode_name.encode()
    info.extra = struct.pack("<HHB", 0x7075, 5 + len(u), 1) + struct.pack("<I", zlib.crc32(header_name.encode())) + u
    return info


@pytest.mark.parametrize("chunk", [1, None])
def test_an_escape_hidden_in_the_unicode_path_field_is_refused_and_its_twin_passes(chunk: int | None) -> None:
    """Some readers unpack to the Info-ZIP Unicode Path field's name rather than the entry's own."""
    problem = scan(make_zip([*APP, (_unicode_path("aa/evil.js", "../evil.js"), b"x")]), DEFAULT, chunk)
    assert problem is not None and "'..' component" in problem and "Unicode path field" in problem
    assert scan(make_zip([*APP, (_unicode_path("aa/evil.js", "aa/\u00e9vil.js"), b"x")]), DEFAULT, chunk) is None
