"""Release indexes: the list of an app's releases (version, channel, file, size, SHA-256, Capgo signature).

Owns parsing and checking an index (`releases.yaml` in a directory origin, `releases.json` on an HTTPS origin)
into a frozen `ReleaseIndex`, and looking releases up. `sha256` and `size` describe the file exactly as stored
and served; the optional `capgo` block carries what a Capgo update answer sends for an encrypted bundle
(`checksum`: RSA block over the plain zip's digest, `session_key`: `<iv b64>:<RSA block b64>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.core.names import is_channel, is_lower_hex, is_relative_file, is_version


class ReleaseIndexError(ValueError):
    """A problem in an index, with the key path that has it."""

    def __init__(self, key_path: str, message: str) -> None:
        super().__init__(f"{key_path}: {message}")
        self.key_path = key_path
        self.message = message


SHOWN = 64  # characters of a value from an index that an error quotes: an index is an origin's, of up to 4 MiB


def _shown(value: Any) -> str:
    """A value of an index as an error quotes it: its repr, cut at `SHOWN` characters."""
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[: SHOWN - 3]}..."


@dataclass(frozen=True, slots=True)
class CapgoSignature:
    checksum: str  # 512 lowercase hex
    session_key: str  # "<iv b64>:<rsa block b64>"


@dataclass(frozen=True, slots=True)
class Release:
    version: str
    channel: str
    file: str
    size: int
    sha256: str
    capgo: CapgoSignature | None = None


@dataclass(frozen=True, slots=True)
class ReleaseIndex:
    app_id: str
    releases: tuple[Release, ...]

    def find(self, version: str) -> Release | None:
        for release in self.releases:
            if release.version == version:
                return release
        return None


def _release(where: str, raw: Any) -> Release:
    if not isinstance(raw, dict):
        raise ReleaseIndexError(where, "each release must be a mapping")
    known = {"version", "channel", "file", "size", "sha256", "capgo"}
    for key in raw:
        if key not in known:
            raise ReleaseIndexError(f"{where}.{str(key)[:SHOWN]}", "unknown key")
    for key in ("version", "channel", "file", "size", "sha256"):
        if key not in raw:
            raise ReleaseIndexError(f"{where}.{key}", "required key is missing")
    version, channel, file, size, sha = (raw[k] for k in ("version", "channel", "file", "size", "sha256"))
    if not isinstance(version, str) or not is_version(version):
        raise ReleaseIndexError(f"{where}.version", f"not a valid version: {_shown(version)}")
    if not isinstance(channel, str) or not is_channel(channel):
        raise ReleaseIndexError(f"{where}.channel", f"not a valid channel name: {_shown(channel)}")
    if not isinstance(file, str) or not is_relative_file(file):
        raise ReleaseIndexError(f"{where}.file", f"must be a relative file name without '..': {_shown(file)}")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ReleaseIndexError(f"{where}.size", f"must be a positive integer, got {_shown(size)}")
    if not is_lower_hex(sha, 64):
        raise ReleaseIndexError(f"{where}.sha256", "must be 64 lowercase hex characters")
    capgo = None
    if raw.get("capgo") is not None:
        capgo = _capgo(f"{where}.capgo", raw["capgo"])
    return Release(version, channel, file, size, sha, capgo)


def _capgo(where: str, raw: Any) -> CapgoSignature:
    if not isinstance(raw, dict) or set(raw) != {"checksum", "session_key"}:
        raise ReleaseIndexError(where, "must be a mapping with exactly checksum and session_key")
    if not is_lower_hex(raw["checksum"], 512):
        raise ReleaseIndexError(f"{where}.checksum", "must be 512 lowercase hex characters (an RSA-2048 block)")
    key = raw["session_key"]
    if not isinstance(key, str) or key.count(":") != 1 or not all(key.split(":")):
        raise ReleaseIndexError(f"{where}.session_key", "must be '<iv base64>:<rsa block base64>'")
    return CapgoSignature(raw["checksum"], key)


def parse_index(app_id: str, data: Any) -> ReleaseIndex:
    """Check an index document (already parsed from YAML or JSON); raise `ReleaseIndexError` on the first problem."""
    if not isinstance(data, dict) or set(data) - {"app_id", "releases"}:
        raise ReleaseIndexError("", "an index is a mapping with 'releases' (and optionally 'app_id')")
    if data.get("app_id", app_id) != app_id:
        raise ReleaseIndexError("app_id", f"index is for {_shown(data.get('app_id'))}, not {app_id!r}")
    raw = data.get("releases")
    if not isinstance(raw, list):
        raise ReleaseIndexError("releases", "must be a list")
    releases = tuple(_release(f"releases[{i}]", item) for i, item in enumerate(raw))
    seen: set[str] = set()
    for i, rel in enumerate(releases):
        if rel.version in seen:
            raise ReleaseIndexError(f"releases[{i}].version", f"version {rel.version} is listed twice")
        seen.add(rel.version)
    return ReleaseIndex(app_id, releases)


def index_document(index: ReleaseIndex) -> dict[str, Any]:
    """The plain form written to `releases.yaml` / `releases.json`."""
    out = []
    for rel in index.releases:
        item: dict[str, Any] = {
            "version": rel.version,
            "channel": rel.channel,
            "file": rel.file,
            "size": rel.size,
            "sha256": rel.sha256,
        }
        if rel.capgo is not None:
            item["capgo"] = {"checksum": rel.capgo.checksum, "session_key": rel.capgo.session_key}
        out.append(item)
    return {"app_id": index.app_id, "releases": out}
