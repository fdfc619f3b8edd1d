"""Reviewing update answers (core/review.py): the three downgrade floors, https only, checksums and signatures,
delta manifests, builtin resets, and answers made from a release index. Real Capgo fixtures for signatures."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core import capgo_crypto
from gateway.core.capgo import DeviceInfo, Kind, parse_info
from gateway.core.policy import AppPolicy, Channels, Verification, Versions
from gateway.core.reasons import Reason
from gateway.core.releases import CapgoSignature, Release, ReleaseIndex
from gateway.core.review import (
    Builtin,
    Decline,
    Offer,
    Outcome,
    Served,
    index_answer,
    key_id,
    load_public_keys,
    new_version_body,
    review_answer,
)
from tests.support import CAPGO_FIXTURES, capgo_fixture, device_body

HOSTS = frozenset({"origin.example"})
PUB = (CAPGO_FIXTURES / "key.pub").read_text()
KEYS = load_public_keys((PUB,))
FX = capgo_fixture("1.1.0")
APP = AppPolicy("com.example.app", "capgo", Channels("production", ("production", "beta")), "test.yaml")
SIGNED = dataclasses.replace(APP, verification=Verification(public_keys=(PUB,)))


def device(version: str = "1.0.0", **extra: Any) -> DeviceInfo:
    return parse_info(device_body(version=version, **extra))


def plain(version: str = "1.1.0", **over: Any) -> dict[str, Any]:
    return {"version": version, "url": "https://origin.example/b.zip", "checksum": FX["checksum"], **over}


def encrypted(**over: Any) -> dict[str, Any]:
    return plain(**{"checksum": FX["encrypted_checksum"], "session_key": FX["iv_session_key"], **over})


def review(
    answer: Any,
    dev: DeviceInfo | None = None,
    app: AppPolicy = APP,
    high_water: str | None = None,
    **kw: Any,
) -> Outcome:
    keys = load_public_keys(app.verification.public_keys)
    return review_answer(answer, dev or device(), app, public_keys=keys, high_water=high_water, hosts=HOSTS, **kw)


def declined(outcome: Outcome, error: str, kind: Kind, reason: Reason | None) -> Decline:
    assert isinstance(outcome, Decline), outcome
    assert (outcome.error, outcome.kind, outcome.reason) == (error, kind, reason), outcome
    return outcome


def test_plain_offer() -> None:
    offer = review(plain(link="https://x", breaking=True, major="yes", data={"a": "b"}, extra="dropped"))
    assert isinstance(offer, Offer)
    assert (offer.version, offer.digest, offer.decrypt, offer.lowers_channel) == ("1.1.0", FX["checksum"], False, False)
    body = new_version_body(offer, "https://gw/t/x/1.1.0.zip")
    assert body == {
        "version": "1.1.0",
        "url": "https://gw/t/x/1.1.0.zip",
        "checksum": FX["checksum"],
        "session_key": "",
        "link": "https://x",
        "breaking": True,
        "data": {"a": "b"},
    }


def test_signed_offer_recovers_the_plain_digest() -> None:
    offer = review(encrypted(), app=SIGNED)
    assert isinstance(offer, Offer)
    assert offer.digest == FX["checksum"] and offer.decrypt
    assert (offer.checksum, offer.session_key) == (FX["encrypted_checksum"], FX["iv_session_key"])


@pytest.mark.parametrize(("current", "downgrade"), [("2.0.0", True), ("1.1.0", False), ("1.1.0+build.7", False)])
def test_not_newer_is_up_to_date(current: str, downgrade: bool) -> None:
    outcome = review(plain(), device(current))
    declined(outcome, "no_new_version_available", Kind.UP_TO_DATE, Reason.DOWNGRADE if downgrade else None)


def test_builtin_device_takes_any_version() -> None:
    assert isinstance(review(plain("0.0.1"), device("builtin")), Offer)


def test_floor_and_blocked_versions() -> None:
    app = dataclasses.replace(APP, versions=Versions(min_version="1.2.0", blocked=("1.3.0",)))
    declined(review(plain("1.1.0"), app=app), "below_floor", Kind.BLOCKED, Reason.BELOW_FLOOR)
    declined(review(plain("1.3.0"), app=app), "below_floor", Kind.BLOCKED, Reason.BELOW_FLOOR)
    assert isinstance(review(plain("1.3.1"), app=app), Offer)


def test_high_water_mark_and_rollback_to() -> None:
    declined(review(plain("1.1.0"), high_water="2.0.0"), "rollback", Kind.BLOCKED, Reason.ROLLBACK)
    app = dataclasses.replace(APP, versions=Versions(rollback_to="1.1.0"))
    offer = review(plain("1.1.0"), app=app, high_water="2.0.0")
    assert isinstance(offer, Offer) and offer.lowers_channel
    declined(review(plain("1.0.5"), device("1.0.0"), app, "2.0.0"), "rollback", Kind.BLOCKED, Reason.ROLLBACK)
    raised = review(plain("2.1.0"), app=app, high_water="2.0.0")
    assert isinstance(raised, Offer) and not raised.lowers_channel


def test_version_jump() -> None:
    app = dataclasses.replace(APP, versions=Versions(max_version_jump=1))
    declined(review(plain("3.0.0"), app=app), "version_jump", Kind.BLOCKED, Reason.VERSION_JUMP)
    assert isinstance(review(plain("2.0.0"), app=app), Offer)


@pytest.mark.parametrize(
    ("over", "error", "reason"),
    [
        ({"url": "http://origin.example/b.zip"}, "not_https", Reason.NOT_HTTPS),
        ({"url": "https://evil.example/b.zip"}, "foreign_host", Reason.FOREIGN_HOST),
        ({"url": "https://user:pw@origin.example/b.zip"}, "foreign_host", Reason.FOREIGN_HOST),
        ({"url": "https://origin.example:99999/b.zip"}, "origin_error", Reason.ORIGIN_ERROR),
        ({"url": None}, "origin_error", Reason.ORIGIN_ERROR),
        ({"checksum": "c0ffee01"}, "unverifiable", Reason.UNVERIFIABLE),
        ({"checksum": None}, "unverifiable", Reason.UNVERIFIABLE),
        ({"checksum": FX["checksum"].upper()}, "unverifiable", Reason.UNVERIFIABLE),
        ({"checksum": 5}, "origin_error", Reason.ORIGIN_ERROR),
        (
            {"checksum": FX["encrypted_checksum"], "session_key": FX["iv_session_key"]},
            "unverifiable",
            Reason.UNVERIFIABLE,
        ),
        ({"version": "v1.1.0"}, "origin_error", Reason.ORIGIN_ERROR),
        ({"version": None}, "origin_error", Reason.ORIGIN_ERROR),
    ],
)
def test_answers_that_cannot_be_vouched_for(over: dict[str, Any], error: str, reason: Reason) -> None:
    declined(review(plain(**over)), error, Kind.FAILED, reason)


def test_require_checksum_false_passes_unverified() -> None:
    app = dataclasses.replace(APP, verification=Verification(require_checksum=False))
    offer = review(plain(checksum=""), app=app)
    assert isinstance(offer, Offer) and offer.digest is None


def test_app_with_a_public_key_refuses_unsigned_and_foreign_signatures() -> None:
    declined(review(plain(), app=SIGNED), "signature_invalid", Kind.FAILED, Reason.SIGNATURE_INVALID)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = encrypted(checksum=capgo_crypto.sign_checksum(other, FX["checksum"]))
    declined(review(forged, app=SIGNED), "signature_invalid", Kind.FAILED, Reason.SIGNATURE_INVALID)
    wrong_session = encrypted(session_key=capgo_crypto.make_session_key(other, os.urandom(16), os.urandom(16)))
    declined(review(wrong_session, app=SIGNED), "signature_invalid", Kind.FAILED, Reason.SIGNATURE_INVALID)
    declined(
        review(encrypted(session_key="bad"), app=SIGNED), "signature_invalid", Kind.FAILED, Reason.SIGNATURE_INVALID
    )


def test_key_rotation_accepts_either_key() -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pub = other.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode()
    app = dataclasses.replace(APP, verification=Verification(public_keys=(other_pub, PUB)))
    assert isinstance(review(encrypted(), app=app), Offer)


def test_key_id_of_another_key_is_blocked_and_the_right_one_passes() -> None:
    assert key_id(KEYS[0]) == "".join(PUB.splitlines()[1:])[:20]  # as the plugin computes it from its PEM
    assert isinstance(review(encrypted(), device(key_id=key_id(KEYS[0])), SIGNED), Offer)
    declined(
        review(encrypted(), device(key_id="MIIBCgKCAQEAxxxxxxxx"), SIGNED),
        "key_id_mismatch",
        Kind.BLOCKED,
        Reason.KEY_ID_MISMATCH,
    )
    assert isinstance(review(plain(), device(key_id="MIIBCgKCAQEAxxxxxxxx")), Offer)  # no keys in policy: not checked


def test_manifest_entries_are_checked_one_by_one() -> None:
    entry = {
        "file_name": "assets/index.js",
        "file_hash": FX["checksum"].upper(),
        "download_url": "https://origin.example/i.js",
    }
    offer = review(plain(manifest=[entry]))
    assert isinstance(offer, Offer)
    assert offer.manifest[0].digest == FX["checksum"]  # compared case-insensitively, as the plugin does
    assert offer.manifest[0].file_hash == entry["file_hash"]  # but passed on as sent
    body = new_version_body(offer, "https://gw/main", ["https://gw/one"])
    assert body["manifest"] == [
        {"file_name": "assets/index.js", "file_hash": entry["file_hash"], "download_url": "https://gw/one"}
    ]
    for bad in (
        {**entry, "file_name": "../../etc/passwd"},
        {**entry, "file_name": "/abs"},
        {**entry, "download_url": "http://origin.example/i.js"},
        {**entry, "file_hash": "abc"},
        "not an entry",
    ):
        assert isinstance(review(plain(manifest=[bad])), Decline), bad
    signed_entry = {**entry, "file_hash": FX["encrypted_checksum"]}
    signed = review(encrypted(manifest=[signed_entry]), app=SIGNED)
    assert isinstance(signed, Offer) and signed.manifest[0].digest == FX["checksum"]
    declined(
        review(encrypted(manifest=[entry]), app=SIGNED), "signature_invalid", Kind.FAILED, Reason.SIGNATURE_INVALID
    )


def test_origin_errors_pass_with_a_kind() -> None:
    declined(review({"error": "no_new_version_available"}), "no_new_version_available", Kind.UP_TO_DATE, None)
    declined(
        review({"error": "disable_auto_update_to_major", "message": "m"}),
        "disable_auto_update_to_major",
        Kind.BLOCKED,
        None,
    )
    declined(review({"error": "whatever", "kind": "blocked"}), "whatever", Kind.BLOCKED, None)
    declined(review({"error": "Cannot parse json: x"}), "origin_error", Kind.FAILED, None)
    declined(review(["not", "an", "object"]), "origin_error", Kind.FAILED, Reason.ORIGIN_ERROR)


def test_builtin_reset() -> None:
    assert isinstance(review({"version": "builtin"}), Builtin)
    declined(review({"version": "builtin"}, device("builtin")), "already_on_builtin", Kind.UP_TO_DATE, None)
    floor = dataclasses.replace(APP, versions=Versions(min_version="1.1.0"))
    declined(review({"version": "builtin"}, app=floor), "below_floor", Kind.BLOCKED, Reason.BELOW_FLOOR)
    assert isinstance(review({"version": "builtin"}, device(version_build="1.2.0"), floor), Builtin)
    no_reset = dataclasses.replace(APP, versions=Versions(allow_builtin=False))
    declined(
        review({"version": "builtin"}, app=no_reset), "builtin_not_allowed", Kind.BLOCKED, Reason.BUILTIN_NOT_ALLOWED
    )


def test_served_digest_verifies_an_encrypted_index_release_without_a_key() -> None:
    offer = review(encrypted(), served=Served("ab" * 32, 100))
    assert isinstance(offer, Offer) and offer.digest == "ab" * 32 and not offer.decrypt


def test_index_answer() -> None:
    sig = CapgoSignature(FX["encrypted_checksum"], FX["iv_session_key"])
    index = ReleaseIndex(
        "com.example.app",
        (
            Release("1.0.0", "production", "1.0.0.zip", 10, "aa" * 32),
            Release("1.10.0", "production", "1.10.0.enc.zip", 20, "bb" * 32, sig),
            Release("1.9.0", "production", "1.9.0.zip", 30, "cc" * 32),
            Release("2.0.0", "beta", "2.0.0.zip", 40, "dd" * 32),
        ),
    )
    answer, release = index_answer(index, "production", device())
    assert release is not None and release.version == "1.10.0"
    assert answer == {"version": "1.10.0", "checksum": sig.checksum, "session_key": sig.session_key}
    answer, release = index_answer(index, "beta", device("2.0.0"))
    assert release is None and answer["kind"] == "up_to_date"
    assert index_answer(index, "nightly", device())[1] is None


OWN = dataclasses.replace(APP, verification=Verification(bundle_urls=("https://origin.example/apps/{app_id}/",)))


def test_an_offer_from_the_apps_own_folder_passes_bundle_urls() -> None:
    offer = review(plain(url="https://origin.example/apps/com.example.app/1.1.0.zip?sig=x"), app=OWN)
    assert isinstance(offer, Offer)
    entry = {
        "file_name": "a.js",
        "file_hash": FX["checksum"],
        "download_url": "https://origin.example/apps/com.example.app/m/a.js",
    }
    assert isinstance(
        review(plain(url="https://origin.example/apps/com.example.app/b.zip", manifest=[entry]), app=OWN), Offer
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://origin.example/apps/com.other.app/1.1.0.zip",
        "https://origin.example/apps/com.example.app/../com.other.app/1.1.0.zip",
        "https://origin.example/b.zip",
    ],
)
def test_another_apps_bundle_is_foreign_app(url: str) -> None:
    declined(review(plain(url=url), app=OWN), "foreign_app", Kind.FAILED, Reason.FOREIGN_APP)
    assert isinstance(review(plain(url=url)), Offer)  # without bundle_urls only the host is checked


def test_a_manifest_entry_of_another_app_is_foreign_app() -> None:
    own = "https://origin.example/apps/com.example.app/b.zip"
    entry = {
        "file_name": "a.js",
        "file_hash": FX["checksum"],
        "download_url": "https://origin.example/apps/com.other.app/a.js",
    }
    declined(review(plain(url=own, manifest=[entry]), app=OWN), "foreign_app", Kind.FAILED, Reason.FOREIGN_APP)
