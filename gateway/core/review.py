"""Reviewing an update answer before a device sees it: the gateway's refusals of downgrades and unverifiable bundles.

Owns the decision over one origin answer to one device's update check (capgo-protocol.md, threat-model.md):

- the offered version must be strictly newer than the device's (`builtin` is older than everything); an older
  offer is answered `up_to_date` and counted as a `downgrade`;
- not below the app's `min_version`, not in its blocked list (`below_floor`), not more major versions ahead than
  `max_version_jump` allows (`version_jump`);
- not below the channel's high-water mark unless `rollback_to` allows it (`rollback`);
- the url is https (`not_https`) on a host of the app's origin, without credentials (`foreign_host`), and, when
  the policy lists `verification.bundle_urls`, below one of the app's own patterns (`foreign_app`);
- the checksum is a SHA-256 (64 lowercase hex) or a Capgo RSA block (512 hex); for an app with public keys in its
  policy the answer must be signed (Android would install an unsigned one), the checksum must open with one of the
  keys to a 32-byte digest and the session key must open with the same key (`signature_invalid`); a missing, CRC32
  or otherwise unverifiable checksum is refused when the app requires verification (`unverifiable`);
- delta manifest entries are checked the same way, each on its own.

The result is an `Offer` (what the gateway will hand out, with the digest each download is verified against), a
`Builtin` reset, or a `Decline` (the Capgo error answer, with the refusal reason to count, if any). Pure: the
public keys, the high-water mark and the allowed hosts are passed in.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core.bundle_urls import belongs
from gateway.core.capgo import DeviceInfo, Kind, error_body
from gateway.core.capgo_crypto import CapgoCryptoError, open_session_key, recover_checksum
from gateway.core.locations import url_problem
from gateway.core.names import is_lower_hex
from gateway.core.policy import AppPolicy
from gateway.core.reasons import Reason
from gateway.core.releases import Release, ReleaseIndex
from gateway.core.versions import BUILTIN, BundleVersion, VersionError, major_jump, newest, parse

MAX_MANIFEST_ENTRIES = 10_000
_UP_TO_DATE_ERRORS = frozenset({"no_new_version_available", "already_on_builtin"})
_BLOCKED_ERRORS = frozenset({"cannot_update_via_private_channel", "key_id_mismatch"})
_EXTRAS: dict[str, type] = {"link": str, "comment": str, "breaking": bool, "major": bool}


@dataclass(frozen=True, slots=True)
class Decline:
    """A Capgo error answer (HTTP 200) and the refusal reason to count, if the gateway refused something."""

    error: str
    message: str
    kind: Kind
    reason: Reason | None = None

    def body(self) -> dict[str, str]:
        return error_body(self.error, self.message, self.kind)


@dataclass(frozen=True, slots=True)
class Builtin:
    """`{"version": "builtin"}`: reset the device to the bundle in its store binary."""


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    file_name: str
    file_hash: str  # as the device will see it
    location: str  # the origin's download url
    digest: str | None  # SHA-256 the download is verified against; None: unverified (require_checksum: false)


@dataclass(frozen=True, slots=True)
class Offer:
    version: str
    location: str  # the origin's url, or a file of a directory origin
    checksum: str  # as the device will see it
    session_key: str  # "" when not encrypted
    digest: str | None  # SHA-256 the download is verified against; None: unverified (require_checksum: false)
    decrypt: bool  # the served bytes are AES-128-CBC and `digest` is of the plain bytes: decrypt before hashing
    lowers_channel: bool  # below the high-water mark, allowed by rollback_to
    manifest: tuple[ManifestEntry, ...] = ()
    extras: Mapping[str, Any] = field(default_factory=dict)


Outcome = Offer | Builtin | Decline


@dataclass(frozen=True, slots=True)
class Served:
    """What the gateway knows of the served file without asking the origin (a release index entry)."""

    sha256: str
    size: int


@lru_cache(maxsize=64)
def load_public_keys(pems: tuple[str, ...]) -> tuple[rsa.RSAPublicKey, ...]:
    """The policy's Capgo public keys (PEM); policy loading has already refused anything that is not RSA."""
    keys = []
    for pem in pems:
        key = serialization.load_pem_public_key(pem.encode())
        if isinstance(key, rsa.RSAPublicKey):
            keys.append(key)
    return tuple(keys)


def key_id(key: rsa.RSAPublicKey) -> str:
    """What the plugin sends as `key_id`: the first 20 base64 characters of its embedded (PKCS#1) public key."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return base64.b64encode(der).decode("ascii")[:20]


def _key_mismatch(device: DeviceInfo, public_keys: Sequence[rsa.RSAPublicKey]) -> Decline | None:
    sent = device.fields.get("key_id")
    if not public_keys or not isinstance(sent, str) or not sent:
        return None
    if sent in {key_id(k) for k in public_keys}:
        return None
    return Decline(
        "key_id_mismatch",
        "the device's public key is not one this app's policy lists; it could not verify the bundle",
        Kind.BLOCKED,
        Reason.KEY_ID_MISMATCH,
    )


def _origin_declined(answer: Mapping[str, Any]) -> Decline:
    """The origin's own error answer, passed on with a `kind` the plugin understands and no client-made labels."""
    raw = answer.get("error")
    error = raw if isinstance(raw, str) and 0 < len(raw) <= 64 and raw.replace("_", "").isalnum() else "origin_error"
    message = answer.get("message")
    text = message[:512] if isinstance(message, str) else ""
    kinds = {k.value: k for k in Kind}
    kind = kinds.get(str(answer.get("kind")))
    if kind is None:
        if error in _UP_TO_DATE_ERRORS:
            kind = Kind.UP_TO_DATE
        elif error.startswith("disable_") or error in _BLOCKED_ERRORS:
            kind = Kind.BLOCKED
        else:
            kind = Kind.FAILED
    return Decline(error, text, kind)


def _url_problem(url: Any, hosts: frozenset[str] | None, app: AppPolicy) -> Decline | None:
    if hosts is None:  # a file the gateway itself resolved (directory origin)
        return None
    problem = url_problem(url, hosts)
    if problem is not None:
        reason, message = problem
        return Decline(reason.label, message, Kind.FAILED, reason)
    patterns = app.verification.bundle_urls
    if patterns and not belongs(url, patterns, app.app_id):
        return Decline(
            "foreign_app",
            f"the bundle url is not below a bundle_urls pattern of {app.app_id} (another app's bundle?)",
            Kind.FAILED,
            Reason.FOREIGN_APP,
        )
    return None


@dataclass(frozen=True, slots=True)
class _Signing:
    key: rsa.RSAPublicKey | None  # the policy key that opened the answer, if signed
    session_key: str
    encrypted: bool


def _signature(
    answer: Mapping[str, Any], app: AppPolicy, keys: Sequence[rsa.RSAPublicKey]
) -> tuple[str | None, _Signing] | Decline:
    """The digest the bundle is verified against, and how; or the refusal."""
    checksum, session_key = answer.get("checksum"), answer.get("session_key")
    if checksum is not None and not isinstance(checksum, str):
        return Decline("origin_error", "checksum is not a string", Kind.FAILED, Reason.ORIGIN_ERROR)
    if session_key is not None and not isinstance(session_key, str):
        return Decline("origin_error", "session_key is not a string", Kind.FAILED, Reason.ORIGIN_ERROR)
    checksum, session_key = checksum or "", session_key or ""
    if keys:
        if not session_key or not is_lower_hex(checksum, 512):
            return Decline(
                "signature_invalid",
                "the app has a public key: an answer without an RSA-signed checksum and session key is refused",
                Kind.FAILED,
                Reason.SIGNATURE_INVALID,
            )
        for key in keys:
            try:
                digest = recover_checksum(key, checksum)
                open_session_key(key, session_key)
            except CapgoCryptoError:
                continue
            return digest, _Signing(key, session_key, True)
        return Decline(
            "signature_invalid",
            "the checksum or session key does not open with any public key of the app",
            Kind.FAILED,
            Reason.SIGNATURE_INVALID,
        )
    if not session_key and is_lower_hex(checksum, 64):
        return checksum, _Signing(None, "", False)
    if not app.verification.require_checksum:
        return None, _Signing(None, session_key, bool(session_key))
    why = (
        "an encrypted bundle, but the policy lists no public key to verify it"
        if session_key or is_lower_hex(checksum, 512)
        else "the checksum is missing, CRC32 or malformed: a SHA-256 is required"
    )
    return Decline("unverifiable", why, Kind.FAILED, Reason.UNVERIFIABLE)


def _manifest_entry(
    raw: Any, index: int, signing: _Signing, app: AppPolicy, hosts: frozenset[str] | None
) -> ManifestEntry | Decline:
    bad = Decline("origin_error", f"manifest entry {index} is malformed", Kind.FAILED, Reason.ORIGIN_ERROR)
    if not isinstance(raw, dict):
        return bad
    name, file_hash, url = raw.get("file_name"), raw.get("file_hash"), raw.get("download_url")
    if not isinstance(name, str) or not isinstance(file_hash, str) or not 0 < len(name) <= 1024:
        return bad
    if name.startswith("/") or "\\" in name or ".." in name.split("/") or "\x00" in name:
        return bad
    problem = _url_problem(url, hosts, app)
    if problem is not None:
        return problem
    file_hash_lc = file_hash.lower()  # the plugin compares manifest hashes case-insensitively
    digest: str | None
    if signing.key is not None:
        try:
            digest = recover_checksum(signing.key, file_hash_lc) if is_lower_hex(file_hash_lc, 512) else None
        except CapgoCryptoError:
            digest = None
        if digest is None:
            return Decline(
                "signature_invalid",
                f"manifest entry {index}: file_hash is not signed by the app's key",
                Kind.FAILED,
                Reason.SIGNATURE_INVALID,
            )
    elif is_lower_hex(file_hash_lc, 64) and not signing.encrypted:
        digest = file_hash_lc
    elif app.verification.require_checksum:
        return Decline(
            "unverifiable", f"manifest entry {index}: file_hash is not a SHA-256", Kind.FAILED, Reason.UNVERIFIABLE
        )
    else:
        digest = None
    return ManifestEntry(name, file_hash, str(url) if hosts is not None else name, digest)


def _extras(answer: Mapping[str, Any]) -> dict[str, Any]:
    """Optional fields passed on only with the type iOS decodes (a wrong type would fail the whole answer)."""
    out = {k: answer[k] for k, t in _EXTRAS.items() if isinstance(answer.get(k), t)}
    data = answer.get("data")
    if isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        out["data"] = dict(data)
    return out


def _review_builtin(device: DeviceInfo, app: AppPolicy) -> Builtin | Decline:
    if device.version_name == BUILTIN:
        return Decline("already_on_builtin", "the device already runs the builtin bundle", Kind.UP_TO_DATE)
    if not app.versions.allow_builtin:
        return Decline(
            "builtin_not_allowed",
            "the policy does not allow resetting devices to the builtin bundle",
            Kind.BLOCKED,
            Reason.BUILTIN_NOT_ALLOWED,
        )
    floor = app.versions.min_version
    if floor is not None:
        # the builtin bundle ships with the store binary, whose version is version_build
        try:
            below = parse(device.version_build) < parse(floor)
        except VersionError:
            below = True
        if below:
            return Decline(
                "below_floor",
                f"a reset to the builtin bundle ({device.version_build}) would go below the floor {floor}",
                Kind.BLOCKED,
                Reason.BELOW_FLOOR,
            )
    return Builtin()


def _review_version(
    offered: BundleVersion, current: BundleVersion, app: AppPolicy, high_water: str | None
) -> bool | Decline:
    """Decline, or whether the offer lowers the channel (allowed by rollback_to)."""
    if not offered > current:
        return Decline(
            "no_new_version_available",
            f"the device runs {current}; {offered} is not newer",
            Kind.UP_TO_DATE,
            Reason.DOWNGRADE if offered < current else None,
        )
    versions = app.versions
    if versions.min_version is not None and offered < parse(versions.min_version):
        return Decline(
            "below_floor", f"{offered} is below the floor {versions.min_version}", Kind.BLOCKED, Reason.BELOW_FLOOR
        )
    if any(offered == parse(v) for v in versions.blocked):
        return Decline("below_floor", f"{offered} is a blocked version", Kind.BLOCKED, Reason.BELOW_FLOOR)
    lowers = False
    if high_water is not None and offered < parse(high_water):
        if versions.rollback_to is None or offered < parse(versions.rollback_to):
            return Decline(
                "rollback",
                f"the channel already shipped {high_water}; lowering it to {offered} needs rollback_to in the policy",
                Kind.BLOCKED,
                Reason.ROLLBACK,
            )
        lowers = True
    jump = versions.max_version_jump
    if jump is not None and major_jump(current, offered) > jump:
        return Decline(
            "version_jump",
            f"{current} -> {offered} jumps more than {jump} major version(s)",
            Kind.BLOCKED,
            Reason.VERSION_JUMP,
        )
    return lowers


def review_answer(
    answer: Any,
    device: DeviceInfo,
    app: AppPolicy,
    *,
    public_keys: Sequence[rsa.RSAPublicKey],
    high_water: str | None,
    hosts: frozenset[str] | None,
    served: Served | None = None,
) -> Outcome:
    """Decide over an origin's update answer.

    `hosts`: the hosts a url may name, or None when `url` is a file of a directory origin that the gateway resolved
    itself. `served`: the digest of the file as stored, when a release index gives it; it verifies a download that
    the answer alone cannot (an encrypted release of an app without a public key in its policy).
    """
    if not isinstance(answer, dict):
        return Decline("origin_error", "the origin's answer is not a JSON object", Kind.FAILED, Reason.ORIGIN_ERROR)
    if "error" in answer:
        return _origin_declined(answer)
    version = answer.get("version")
    if version == BUILTIN:
        return _review_builtin(device, app)
    try:
        offered = parse(version if isinstance(version, str) else "")
    except VersionError:
        return Decline(
            "origin_error", "the offered version is not a semantic version", Kind.FAILED, Reason.ORIGIN_ERROR
        )
    lowers = _review_version(offered, parse(device.version_name), app, high_water)
    if isinstance(lowers, Decline):
        return lowers
    problem = _url_problem(answer.get("url"), hosts, app)
    if problem is not None:
        return problem
    mismatch = _key_mismatch(device, public_keys)
    if mismatch is not None:
        return mismatch
    signed = _signature(answer, app, public_keys)
    if isinstance(signed, Decline) and signed.reason is Reason.UNVERIFIABLE and served is not None:
        session_key = str(answer.get("session_key") or "")
        signed = served.sha256, _Signing(None, session_key, bool(session_key))
    if isinstance(signed, Decline):
        return signed
    digest, signing = signed
    raw_manifest = answer.get("manifest")
    entries: list[ManifestEntry] = []
    if raw_manifest is not None:
        if not isinstance(raw_manifest, list) or len(raw_manifest) > MAX_MANIFEST_ENTRIES:
            return Decline("origin_error", "the manifest is not a list of entries", Kind.FAILED, Reason.ORIGIN_ERROR)
        for i, raw in enumerate(raw_manifest):
            entry = _manifest_entry(raw, i, signing, app, hosts)
            if isinstance(entry, Decline):
                return entry
            entries.append(entry)
    return Offer(
        version=offered.text,
        location=str(answer.get("url")),
        checksum=str(answer.get("checksum") or ""),
        session_key=signing.session_key,
        digest=digest,
        decrypt=signing.key is not None,
        lowers_channel=lowers,
        manifest=tuple(entries),
        extras=_extras(answer),
    )


def new_version_body(offer: Offer, url: str, manifest_urls: Sequence[str] = ()) -> dict[str, Any]:
    """The answer the device gets for an accepted offer, with the gateway's download urls."""
    body: dict[str, Any] = {
        "version": offer.version,
        "url": url,
        "checksum": offer.checksum,
        "session_key": offer.session_key,
        **offer.extras,
    }
    if offer.manifest:
        body["manifest"] = [
            {"file_name": e.file_name, "file_hash": e.file_hash, "download_url": u}
            for e, u in zip(offer.manifest, manifest_urls, strict=True)
        ]
    return body


def index_answer(index: ReleaseIndex, channel: str, device: DeviceInfo) -> tuple[dict[str, Any], Release | None]:
    """What a release index answers an update check: the newest release of `channel`, without its url (the caller
    locates the file). A channel whose newest release is not newer than the device's is `up_to_date`: the gateway
    made that answer itself, so nothing was offered and no downgrade is counted."""
    best = newest([r.version for r in index.releases if r.channel == channel])
    release = index.find(best) if best is not None else None
    if release is None or not parse(release.version) > parse(device.version_name):
        return error_body("no_new_version_available", f"no newer release on channel {channel}", Kind.UP_TO_DATE), None
    return release_answer(release), release


def release_answer(release: Release) -> dict[str, Any]:
    """An update answer offering one index release, without its url."""
    return {
        "version": release.version,
        "checksum": release.capgo.checksum if release.capgo else release.sha256,
        "session_key": release.capgo.session_key if release.capgo else "",
    }
