"""The zip scan: what a bundle's zip may hold, judged on the plain bytes as they stream.

Owns the "extraneous content" rule of the threat model: no entry may escape the folder a device unpacks the bundle
into (an absolute name, a `..` component, a backslash, a NUL, a symbolic link), and, unless the policy allows it,
no native code (`.so`, `.dex`, `.dylib`, ...: store rules allow a live update interpreted code only). Names are judged
as written in each header and in its Info-ZIP Unicode Path field, which some readers use instead. Both readers a
device uses are covered: Android's `ZipInputStream` reads the local headers front to back, iOS's minizip reads the
central directory found by scanning back from the end. So every local header is judged as it passes, the central
directory must list exactly the same entries (name, offset, method, sizes, CRC, in the same order), sit where the
end record says, and be the last thing in the file (no bytes after the end record, no end-record signature hidden in
the archive comment where a backward scan would find it first).

`ZipScanner` is fed the bytes the verifier hashes (for a Capgo encrypted bundle, the decrypted zip) and keeps at
most one header, never an entry's data: an entry is skipped by its size, or, when its size only follows it (a data
descriptor, general purpose bit 3), inflated to find its end, counting at most `MAX_INFLATED` bytes. It never raises
on bad input: the first problem is kept (`problem`) and the rest of the stream ignored; `finish()` returns it, or
one for a zip that ended early. Zip64, encrypted entries, and methods other than stored and deflate (which
Android cannot read either) are refused. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

LOCAL_SIG = 0x04034B50
CENTRAL_SIG = 0x02014B50
END_SIG = 0x06054B50
DESCRIPTOR_SIG = 0x08074B50
_END_SIG_BYTES = struct.pack("<I", END_SIG)
_ZIP64_LOCATOR_BYTES = struct.pack("<I", 0x07064B50)
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_END = struct.Struct("<IHHHHIIH")  # 22 bytes
_STORED, _DEFLATED = 0, 8
_DESCRIPTOR_FLAG = 0x08
_ENCRYPTED_FLAG = 0x01
MAX_INFLATED = 1 << 30  # bytes inflated (only to find where an entry with a data descriptor ends), per bundle
_INFLATE_STEP = 64 * 1024  # output kept per inflate call, then dropped
_NATIVE = re.compile(rb"\.(so(\.[0-9]+)*|dex|dylib|jar|apk|aar|odex|oat|vdex|node)$", re.IGNORECASE)
_DRIVE = re.compile(rb"^[A-Za-z]:")
_S_IFMT, _S_IFREG, _S_IFDIR, _S_IFLNK = 0o170000, 0o100000, 0o040000, 0o120000


@dataclass(frozen=True, slots=True)
class ZipRules:
    """What an app's policy asks of its bundles (`verification.zip_scan`)."""

    allow_native_code: bool = False  # False: entries named like native code (`lib/x.so`, `classes.dex`) are refused


def shown(name: bytes) -> str:
    """An entry name for a message: printable ASCII kept, everything else escaped, at most 80 characters."""
    text = name[:80].decode("ascii", "backslashreplace")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text + ("..." if len(name) > 80 else "")


def name_problem(name: bytes, rules: ZipRules) -> str | None:
    """Why an entry name may not be unpacked, or None. Names are compared as bytes: `/`, `\\`, `.` and `:` are
    the same byte in UTF-8 and in CP437, the two encodings a zip names."""
    if not name:
        return "an entry has an empty name"
    if b"\x00" in name:
        return f"entry {shown(name)!r} has a NUL in its name"
    if b"\\" in name:
        return f"entry {shown(name)!r} has a backslash in its name (a path separator on Windows)"
    if name.startswith(b"/") or _DRIVE.match(name):
        return f"entry {shown(name)!r} is an absolute path"
    if b".." in name.split(b"/"):
        return f"entry {shown(name)!r} has a '..' component (it would be unpacked outside the bundle)"
    if not rules.allow_native_code and _NATIVE.search(name.rstrip(b"/")):
        return f"entry {shown(name)!r} is native code, which this app's policy refuses"
    return None


class ZipScanner:
    """Feed it the plain zip bytes in order; `problem` is the first thing wrong, `finish()` the verdict."""

    def __init__(self, rules: ZipRules) -> None:
        self.rules = rules
        self.problem: str | None = None
        self._offset = 0  # bytes of the zip consumed so far
        self._buf = bytearray()  # the record being read (a header, at most 64 KiB * 3 + 46)
        self._need = 4  # bytes `_buf` must hold before `_step` is called
        self._step: Callable[[], None] = self._signature
        self._skip = 0  # entry data left to skip
        self._inflater: zlib._Decompress | None = None  # the entry whose end only its deflate stream tells
        self._inflated = 0
        self._entry: tuple[int, bytes, int] | None = None  # offset, name, method of an entry with a data descriptor
        self._entry_start = 0  # offset of the entry's data
        self._locals = hashlib.sha256()  # every local entry, as the central directory must repeat it
        self._centrals = hashlib.sha256()
        self._local_count = 0
        self._central_count = 0
        self._central_start: int | None = None
        self._done = False  # the end record and its comment were read

    # --- feeding -------------------------------------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view and self.problem is None:
            if self._done:
                self._fail(f"{len(view)} or more bytes follow the end of the zip's central directory")
            elif self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                self._offset += n
                view = view[n:]
            elif self._inflater is not None:
                view = self._inflate(view)
            else:
                n = min(self._need - len(self._buf), len(view))
                self._buf += view[:n]
                self._offset += n
                view = view[n:]
                if len(self._buf) == self._need:
                    self._step()

    def finish(self) -> str | None:
        """The verdict once the stream ended: its first problem, or one for a zip cut short; None: it passed."""
        if self.problem is None and not self._done:
            self._fail("the zip ends before its end of central directory record")
        return self.problem

    def _fail(self, problem: str) -> None:
        self.problem = problem
        self._buf = bytearray()
        self._inflater = None

    def _expect(self, need: int, step: Callable[[], None]) -> None:
        self._need = need
        self._step = step
        if len(self._buf) == need:  # nothing more to wait for (an end record without a comment)
            step()

    def _next_record(self) -> None:
        self._buf = bytearray()
        self._expect(4, self._signature)

    # --- records -------------------------------------------------------------------------------------------------

    def _signature(self) -> None:
        (sig,) = struct.unpack_from("<I", self._buf)
        if sig == LOCAL_SIG and self._central_start is None:
            self._expect(_LOCAL.size, self._local_fixed)
        elif sig == CENTRAL_SIG:
            if self._central_start is None:
                self._central_start = self._offset - 4
            self._expect(_CENTRAL.size, self._central_fixed)
        elif sig == END_SIG:
            if self._central_start is None:
                self._central_start = self._offset - 4
            self._expect(_END.size, self._end_fixed)
        elif sig == LOCAL_SIG:
            self._fail(f"a local file header at byte {self._offset - 4}, after the central directory began")
        else:
            self._fail(f"unknown zip record {sig:#010x} at byte {self._offset - 4} (zip64 is not supported)")

    def _local_fixed(self) -> None:
        n, m = struct.unpack_from("<HH", self._buf, 26)
        self._expect(_LOCAL.size + n + m, self._local_name)

    def _local_name(self) -> None:
        _, _, flags, method, _, _, crc, csize, usize, n, _ = _LOCAL.unpack_from(self._buf)
        name = bytes(self._buf[_LOCAL.size : _LOCAL.size + n])
        start = self._offset - len(self._buf)
        problem = name_problem(name, self.rules) or _entry_problem(name, flags, method, csize, usize)
        problem = problem or _extra_problem(name, bytes(self._buf[_LOCAL.size + n :]), self.rules)
        if problem is not None:
            self._fail(problem)
            return
        self._local_count += 1
        self._entry = (start, name, method)
        self._entry_start = self._offset
        self._buf = bytearray()
        if flags & _DESCRIPTOR_FLAG:  # sizes and CRC follow the data: inflate it to find its end
            self._inflater = zlib.decompressobj(-15)
            self._expect(4, self._descriptor_start)
            return
        self._record(self._locals, start, name, method, crc, csize, usize)
        self._skip = csize
        self._next_record()

    def _inflate(self, view: memoryview) -> memoryview:
        """Inflate an entry with a data descriptor up to the end of its deflate stream; return what follows it."""
        inflater = self._inflater
        assert inflater is not None
        data: bytes | memoryview = view
        try:
            while data and not inflater.eof:
                before = len(data)
                out = inflater.decompress(data, _INFLATE_STEP)
                self._inflated += len(out)
                if self._inflated > MAX_INFLATED:
                    self._fail(f"entries with a data descriptor inflate to more than {MAX_INFLATED} bytes")
                    return memoryview(b"")
                data = inflater.unconsumed_tail
                if not out and len(data) == before:
                    raise zlib.error("no progress")
        except zlib.error:
            self._fail(f"the entry whose data starts at byte {self._entry_start} is not a valid deflate stream")
            return memoryview(b"")
        if not inflater.eof:
            self._offset += len(view)
            return memoryview(b"")
        used = len(view) - len(inflater.unused_data)
        self._offset += used
        self._inflater = None
        return view[used:]

    def _descriptor_start(self) -> None:
        (first,) = struct.unpack_from("<I", self._buf)
        self._expect(16 if first == DESCRIPTOR_SIG else 12, self._descriptor)

    def _descriptor(self) -> None:
        crc, csize, usize = struct.unpack_from("<III", self._buf, len(self._buf) - 12)
        assert self._entry is not None
        start, name, method = self._entry
        data = self._offset - len(self._buf) - self._entry_start
        if csize != data:
            self._fail(f"entry {shown(name)!r}: its data descriptor says {csize} bytes, its data has {data}")
            return
        self._record(self._locals, start, name, method, crc, csize, usize)
        self._next_record()

    @staticmethod
    def _record(into: hashlib._Hash, offset: int, name: bytes, method: int, crc: int, csize: int, usize: int) -> None:
        into.update(struct.pack("<QHIQQH", offset, method, crc, csize, usize, len(name)) + name)

    def _central_fixed(self) -> None:
        n, m, k = struct.unpack_from("<HHH", self._buf, 28)
        self._expect(_CENTRAL.size + n + m + k, self._central_entry)

    def _central_entry(self) -> None:
        fields = _CENTRAL.unpack_from(self._buf)
        _, _, _, flags, method, _, _, crc, csize, usize, n, _, _, disk, _, external, offset = fields
        name = bytes(self._buf[_CENTRAL.size : _CENTRAL.size + n])
        mode = external >> 16
        kind = mode & _S_IFMT
        (m,) = struct.unpack_from("<H", self._buf, 30)
        extra = bytes(self._buf[_CENTRAL.size + n : _CENTRAL.size + n + m])
        problem = name_problem(name, self.rules) or _entry_problem(name, flags, method, csize, usize)
        problem = problem or _extra_problem(name, extra, self.rules)
        if problem is None and kind == _S_IFLNK:
            problem = f"entry {shown(name)!r} is a symbolic link"
        elif problem is None and kind not in (0, _S_IFREG, _S_IFDIR):
            problem = f"entry {shown(name)!r} is not a regular file or folder (mode {mode:#o})"
        elif problem is None and (disk != 0 or offset == 0xFFFFFFFF):
            problem = f"entry {shown(name)!r} lies on another disk or needs zip64"
        if problem is not None:
            self._fail(problem)
            return
        self._central_count += 1
        if self._central_count > self._local_count:
            self._fail(f"the central directory lists {shown(name)!r}, which no local header holds")
            return
        self._record(self._centrals, offset, name, method, crc, csize, usize)
        self._next_record()

    def _end_fixed(self) -> None:
        (k,) = struct.unpack_from("<H", self._buf, 20)
        self._expect(_END.size + k, self._end)

    def _end(self) -> None:
        _, disk, cd_disk, on_disk, entries, cd_size, cd_offset, _ = _END.unpack_from(self._buf)
        comment = bytes(self._buf[_END.size :])
        end_at = self._offset - len(self._buf)
        assert self._central_start is not None
        if disk or cd_disk or on_disk != entries:
            self._fail("the zip spans several disks")
        elif entries != self._local_count or entries != self._central_count:
            self._fail(
                f"the end record counts {entries} entries, the local headers {self._local_count}, "
                f"the central directory {self._central_count}"
            )
        elif cd_offset != self._central_start or cd_size != end_at - self._central_start:
            self._fail(
                f"the end record places the central directory at byte {cd_offset} ({cd_size} bytes); "
                f"it is at byte {self._central_start} ({end_at - self._central_start} bytes)"
            )
        elif self._locals.digest() != self._centrals.digest():
            self._fail("the central directory does not list the entries the local headers hold (names, offsets, sizes)")
        elif _END_SIG_BYTES in comment or _ZIP64_LOCATOR_BYTES in comment:
            self._fail("the zip comment holds an end-record signature (a reader scanning back would stop there)")
        else:
            self._done = True
            self._buf = bytearray()


def _entry_problem(name: bytes, flags: int, method: int, csize: int, usize: int) -> str | None:
    """What about an entry, other than its name, a device's reader cannot unpack or the scan cannot follow."""
    if flags & _ENCRYPTED_FLAG:
        return f"entry {shown(name)!r} is encrypted"
    if method not in (_STORED, _DEFLATED):
        return f"entry {shown(name)!r} uses compression method {method} (only stored and deflate are read)"
    if 0xFFFFFFFF in (csize, usize):
        return f"entry {shown(name)!r} needs zip64, which the zip scan does not read"
    if flags & _DESCRIPTOR_FLAG and method == _STORED:
        return f"entry {shown(name)!r} is stored with its size after its data (a stream reader cannot find its end)"
    return None


_UNICODE_PATH = 0x7075  # Info-ZIP Unicode Path extra field: version (1), CRC-32 of the name (4), the UTF-8 name


def _extra_problem(name: bytes, extra: bytes, rules: ZipRules) -> str | None:
    """An Info-ZIP Unicode Path field holds a second name that some readers unpack to instead of the entry's own:
    it is held to the same rules."""
    at = 0
    while at + 4 <= len(extra):
        kind, size = struct.unpack_from("<HH", extra, at)
        body = extra[at + 4 : at + 4 + size]
        if kind == _UNICODE_PATH and len(body) >= 5:
            problem = name_problem(body[5:], rules)
            if problem is not None:
                return f"{problem}, in the Unicode path field of entry {shown(name)!r}"
        at += 4 + size
    return None
