"""POST /updates and the ticket downloads it hands out, end to end: a real gateway, an HTTPS origin that answers
like a Capgo update server, and the real Capgo CLI fixtures.

Each attack of the threat model is shown failing through the gateway: a downgrade, a lowered channel, a checksum
signed by another key, an unsigned answer for an app with a public key, a tampered encrypted bundle, a replayed,
expired or altered ticket, a tampered range.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.core import capgo_crypto
from gateway.core.tickets import Ticket, TicketKey, seal
from gateway.publish import add_release
from tests.capgo_env import LIMITED_APP, SECURE_APP, CapgoEnv, capgo_env, default_apps, gateway_config
from tests.origin_server import HttpsOrigin
from tests.support import (
    APP_ID,
    CAPGO_FIXTURES,
    Pki,
    capgo_call,
    capgo_fixture,
    device_body,
    https_request,
    metric_value,
    run_gateway,
    write_config,
)

PLAIN_110 = (CAPGO_FIXTURES / "app_1.1.0.zip").read_bytes()
ENC_110 = (CAPGO_FIXTURES / "app_1.1.0.enc.zip").read_bytes()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[CapgoEnv]:
    with capgo_env(tmp_path_factory.mktemp("capgo"), pki) as env:
        yield env


def refusals(env: CapgoEnv, reason: str) -> float:
    return env.gw.metric("ota_gateway_refusals_total", reason=reason)


def incomplete(url: str, ctx: ssl.SSLContext, headers: dict[str, str] | None = None) -> int:
    """GET that must not complete; returns how many body bytes arrived before the connection was cut."""
    try:
        answer = https_request(url, ctx, headers=headers)
    except http.client.IncompleteRead as exc:
        return len(exc.partial)
    except (OSError, http.client.HTTPException):
        return 0
    raise AssertionError(f"download completed: {answer.status}, {len(answer.body)} bytes")


# --- new versions: plain and encrypted ----------------------------------------------------------------------


def test_plain_update_is_rewritten_to_a_ticket_and_downloads_verified(env: CapgoEnv) -> None:
    env.offer(APP_ID, "1.1.0", comment="bugfixes", major="yes")
    answer = env.check(device_body(APP_ID, "1.0.0"))
    assert answer.status == 200
    assert answer.headers["cache-control"] == "no-store"
    doc = answer.json()
    assert doc["version"] == "1.1.0"
    assert doc["checksum"] == capgo_fixture("1.1.0")["checksum"]
    assert doc["session_key"] == ""
    assert doc["comment"] == "bugfixes" and "major" not in doc  # a wrong type would break iOS's strict decoding
    assert doc["url"].startswith(f"{env.gw.base_url}/bundles/t/v1.k1.") and doc["url"].endswith("/1.1.0.zip")
    path, method, forwarded, agent = env.origin.state.capgo_calls[-1]
    assert (path, method, forwarded["version_name"]) == ("/updates", "POST", "1.0.0")
    assert agent == f"CapacitorUpdater/8.51.14 ({APP_ID}) android/14"
    download = https_request(doc["url"], env.ctx())
    assert download.status == 200 and download.body == PLAIN_110
    assert hashlib.sha256(download.body).hexdigest() == doc["checksum"]
    assert env.gw.metric("ota_gateway_download_tickets_total", result="issued") >= 1
    assert env.gw.metric("ota_gateway_update_answers_total", kind="new_version") >= 1


def test_encrypted_update_is_verified_by_decrypting_in_flight(env: CapgoEnv) -> None:
    fx = capgo_fixture("1.1.0")
    env.offer(SECURE_APP, "1.1.0", encrypted=True)
    doc = env.new_version(SECURE_APP)
    assert (doc["checksum"], doc["session_key"]) == (fx["encrypted_checksum"], fx["iv_session_key"])
    passed = env.gw.metric("ota_gateway_bundle_verifications_total", result="passed")
    download = https_request(doc["url"], env.ctx())
    assert download.status == 200 and download.body == ENC_110  # the encrypted bytes, unchanged
    key = serialization.load_pem_public_key((CAPGO_FIXTURES / "key.pub").read_bytes())
    assert isinstance(key, rsa.RSAPublicKey)
    aes_key, iv = capgo_crypto.open_session_key(key, doc["session_key"])
    plain = capgo_crypto.decrypt_bundle(download.body, aes_key, iv)
    assert hashlib.sha256(plain).hexdigest() == capgo_crypto.recover_checksum(key, doc["checksum"]) == fx["checksum"]
    assert env.gw.metric("ota_gateway_bundle_verifications_total", result="passed") == passed + 1


def test_tampered_encrypted_bundle_never_completes(env: CapgoEnv) -> None:
    env.offer(SECURE_APP, "1.1.0", encrypted=True, name="tampered.enc.zip")
    env.origin.state.modes[f"{SECURE_APP}/tampered.enc.zip"] = "flip:30000"
    doc = env.new_version(SECURE_APP)
    before = env.gw.metric("ota_gateway_bundle_verifications_total", result="checksum_mismatch")
    assert incomplete(doc["url"], env.ctx()) < len(ENC_110)
    assert env.gw.metric("ota_gateway_bundle_verifications_total", result="checksum_mismatch") == before + 1


# --- refusals at the update check ---------------------------------------------------------------------------


def test_older_offer_is_up_to_date_and_counted_as_a_downgrade(env: CapgoEnv) -> None:
    env.offer(APP_ID, "1.1.0")
    before = refusals(env, "downgrade")
    doc = env.check(device_body(APP_ID, "2.0.0")).json()
    assert doc == {
        "error": "no_new_version_available",
        "message": "the device runs 2.0.0; 1.1.0 is not newer",
        "kind": "up_to_date",
    }
    assert refusals(env, "downgrade") == before + 1
    same = env.check(device_body(APP_ID, "1.1.0")).json()  # the same version is no downgrade
    assert same["kind"] == "up_to_date" and refusals(env, "downgrade") == before + 1


def test_checksum_signed_by_another_key_is_refused_at_the_update_check(env: CapgoEnv) -> None:
    fx = capgo_fixture("1.1.0")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    env.offer(
        SECURE_APP,
        "1.1.0",
        encrypted=True,
        checksum=capgo_crypto.sign_checksum(other, fx["checksum"]),
        session_key=capgo_crypto.make_session_key(other, os.urandom(16), os.urandom(16)),
    )
    before = refusals(env, "signature_invalid")
    doc = env.check(device_body(SECURE_APP, "1.0.0")).json()
    assert (doc["error"], doc["kind"]) == ("signature_invalid", "failed")
    assert refusals(env, "signature_invalid") == before + 1


def test_unsigned_answer_for_an_app_with_a_public_key_is_refused(env: CapgoEnv) -> None:
    env.offer(SECURE_APP, "1.1.0")  # plain sha256, no session key: Android would install it unsigned
    doc = env.check(device_body(SECURE_APP, "1.0.0")).json()
    assert (doc["error"], doc["kind"]) == ("signature_invalid", "failed")


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"url": "http://127.0.0.1/x.zip"}, "not_https"),
        ({"url": "https://cdn.elsewhere.example/x.zip"}, "foreign_host"),
        ({"checksum": "1a2b3c4d"}, "unverifiable"),  # CRC32: no current plugin can match it
        ({"checksum": ""}, "unverifiable"),
        ({"version": "1.1"}, "origin_error"),
    ],
)
def test_answers_the_gateway_cannot_vouch_for_are_refused(env: CapgoEnv, override: dict[str, Any], error: str) -> None:
    env.offer(APP_ID, "1.1.0")
    env.origin.state.update_answers[APP_ID].update(override)
    before = refusals(env, error)
    doc = env.check(device_body(APP_ID, "1.0.0")).json()
    assert (doc["error"], doc["kind"]) == (error, "failed")
    assert "url" not in doc
    assert refusals(env, error) == before + 1  # each refusal under its own reason


def test_a_device_key_the_policy_does_not_list_is_counted_as_key_id_mismatch(env: CapgoEnv) -> None:
    """Not as `signature_invalid`, which alerts that the origin served a forged bundle."""
    env.offer(SECURE_APP, "1.1.0", encrypted=True)
    before = refusals(env, "key_id_mismatch"), refusals(env, "signature_invalid")
    doc = env.check(device_body(SECURE_APP, "1.0.0", key_id="MIIBCgKCAQEAxxxxxxxx")).json()
    assert (doc["error"], doc["kind"]) == ("key_id_mismatch", "blocked")
    assert (refusals(env, "key_id_mismatch"), refusals(env, "signature_invalid")) == (before[0] + 1, before[1])


def test_origin_errors_and_builtin_resets_pass_with_a_kind(env: CapgoEnv) -> None:
    env.origin.state.update_answers[APP_ID] = {"error": "disable_auto_update_to_major", "message": "no"}
    assert env.check(device_body(APP_ID, "1.0.0")).json()["kind"] == "blocked"
    env.origin.state.update_answers[APP_ID] = {"version": "builtin"}
    assert env.check(device_body(APP_ID, "1.0.0")).json() == {"version": "builtin"}
    assert env.check(device_body(APP_ID, "builtin")).json()["error"] == "already_on_builtin"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "the body is not JSON"),
        (b"[]", "the body must be a JSON object"),
        (json.dumps({**device_body(), "app_id": "nodots"}).encode(), "App ID must be a reverse domain string"),
        (json.dumps({**device_body(), "device_id": "1234"}).encode(), "Device ID must be a valid UUID string"),
        (json.dumps({**device_body(), "platform": "windows"}).encode(), "platform must be one of"),
        (json.dumps({**device_body(), "version_name": "latest"}).encode(), "version_name must be a semantic"),
        (json.dumps({**device_body(), "is_emulator": "no"}).encode(), "is_emulator must be a boolean"),
        (json.dumps({**device_body(), "version_build": ""}).encode(), "version_build is required"),
        (json.dumps({**device_body(), "custom_id": "x" * 300}).encode(), "custom_id is longer than 255"),
        (b" " * 70_000, "the body is larger than"),
        (b'{"a":' * 1000 + b"1" + b"}" * 1000, "the body is refused: JSON nested deeper than 32"),
        (b"[" * 20_000, "the body is refused: JSON nested deeper than 32"),
        (json.dumps({**device_body(), "custom_id": float("nan")}).encode(), "the body is not JSON"),  # NaN
    ],
)
def test_malformed_bodies_get_capgo_shaped_400s(env: CapgoEnv, raw: bytes, message: str) -> None:
    answer = capgo_call(f"{env.gw.base_url}/updates", env.ctx(), None, raw=raw)
    assert answer.status == 400
    doc = answer.json()
    assert (doc["error"], doc["kind"]) == ("invalid_request", "failed")
    assert doc["message"].startswith(message)


def test_rate_limit_answers_429_with_retry_after(env: CapgoEnv) -> None:
    env.offer(LIMITED_APP, "1.1.0")
    statuses = [env.check(device_body(LIMITED_APP, "1.0.0"), env.pki.client2).status for _ in range(2)]
    assert statuses == [200, 200]
    answer = env.check(device_body(LIMITED_APP, "1.0.0"), env.pki.client2)
    assert answer.status == 429
    assert 1 <= int(answer.headers["retry-after"]) <= 60
    assert answer.json()["error"] == "rate_limited" and answer.json()["kind"] == "failed"
    assert env.check(device_body(LIMITED_APP, "1.0.0")).status == 200  # another identity has its own budget


# --- tickets ------------------------------------------------------------------------------------------------


def test_ticket_replayed_by_another_client_certificate_is_refused(env: CapgoEnv) -> None:
    env.offer(APP_ID, "1.1.0")
    doc = env.new_version(APP_ID)
    replay = https_request(doc["url"], env.ctx(env.pki.client2))
    assert replay.status == 403
    assert replay.json()["reason"] == "ticket_invalid"
    assert https_request(doc["url"], env.ctx()).body == PLAIN_110


def test_altered_and_expired_tickets_are_refused(env: CapgoEnv) -> None:
    env.offer(APP_ID, "1.1.0")
    url = env.new_version(APP_ID)["url"]
    prefix, token, name = url.rsplit("/", 2)
    payload = token.split(".")[2]
    flipped = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
    altered = f"{prefix}/{token.replace(payload, flipped)}/{name}"
    assert https_request(altered, env.ctx()).status == 403
    expired = Ticket(
        app_id=APP_ID,
        version="1.1.0",
        sha256=capgo_fixture("1.1.0")["checksum"],
        origin="capgo",
        location=f"{env.origin.url}{APP_ID}/app_1.1.0.zip",
        identity=env.pki.client.sha256,
        expires=int(time.time()) - 1,
    )
    answer = https_request(f"{prefix}/{seal(expired, TicketKey(*env.ticket_key))}/{name}", env.ctx())
    assert answer.status == 403 and answer.json()["reason"] == "ticket_invalid"
    forged = https_request(f"{prefix}/{seal(expired, TicketKey('k1', b'x' * 32))}/{name}", env.ctx())
    assert forged.status == 403
    assert env.gw.metric("ota_gateway_download_tickets_total", result="refused") >= 3


def test_range_resume_gets_exactly_the_remaining_bytes(env: CapgoEnv) -> None:
    env.offer(APP_ID, "1.1.0")
    url = env.new_version(APP_ID)["url"]
    answer = https_request(url, env.ctx(), headers={"Range": "bytes=1000-"})
    assert answer.status == 206
    assert answer.headers["content-range"] == f"bytes 1000-{len(PLAIN_110) - 1}/{len(PLAIN_110)}"
    assert answer.body == PLAIN_110[1000:]
    beyond = https_request(url, env.ctx(), headers={"Range": f"bytes={len(PLAIN_110)}-"})
    assert beyond.status == 416 and beyond.headers["content-range"] == f"bytes */{len(PLAIN_110)}"
    assert https_request(url, env.ctx(), headers={"Range": "bytes=0-99"}).status == 416  # never a 200


def test_range_of_a_small_file_is_exact_and_a_tampered_one_sends_nothing(env: CapgoEnv) -> None:
    """A small file (read whole before its answer starts) keeps the Range rules: a 206 of exactly the bytes from N
    on; a bad byte inside the skipped prefix still fails it, and the client gets nothing."""
    good, bad = os.urandom(5000), os.urandom(5000)
    entries = [
        env.manifest_entry(APP_ID, "range.js", good),
        env.manifest_entry(APP_ID, "range-bad.js", bad, mode="flip:100"),
    ]
    env.offer(APP_ID, "1.1.0", manifest=entries)
    urls = [e["download_url"] for e in env.new_version(APP_ID)["manifest"]]
    answer = https_request(urls[0], env.ctx(), headers={"Range": "bytes=1000-"})
    assert answer.status == 206
    assert answer.headers["content-range"] == "bytes 1000-4999/5000"
    assert answer.body == good[1000:]
    assert https_request(urls[0], env.ctx(), headers={"Range": "bytes=5000-"}).status == 416
    before = env.gw.metric("ota_gateway_bundle_verifications_total", result="checksum_mismatch")
    assert incomplete(urls[1], env.ctx(), {"Range": "bytes=1000-"}) == 0
    assert env.gw.metric("ota_gateway_bundle_verifications_total", result="checksum_mismatch") == before + 1


CAPGO_SMALL = CAPGO_FIXTURES.parent / "capgo-small"  # tools/make_capgo_fixtures.sh ... 8: zips of about 8.7 KB
SMALL_SECURE_APP = "com.example.smallsecure"


def test_a_small_encrypted_bundle_is_verified_whole_and_a_tampered_one_sends_nothing(tmp_path: Path, pki: Pki) -> None:
    """A Capgo-encrypted bundle below 64 KiB is read whole and verified (decrypted, its SHA-256 against the
    publisher's signed checksum) before its answer starts: the real CLI's bundle arrives byte for byte; twin: the
    same bundle with one byte flipped sends the client nothing."""
    fx = next(f for f in json.loads((CAPGO_SMALL / "fixtures.json").read_text()) if f["version"] == "1.1.0")
    data = (CAPGO_SMALL / fx["encrypted_zip"]).read_bytes()
    assert len(data) < 64 * 1024
    secure = next(app for app in default_apps() if app["app_id"] == SECURE_APP)
    small = {
        **secure,
        "app_id": SMALL_SECURE_APP,
        "verification": {"public_keys": [(CAPGO_SMALL / "key.pub").read_text()]},
    }
    with capgo_env(tmp_path, pki, [*default_apps(), small]) as env:
        urls = {}
        for name, mode in (("small.enc.zip", None), ("small-bad.enc.zip", "flip:100")):
            url = env.host(SMALL_SECURE_APP, name, data, mode)
            env.origin.state.update_answers[SMALL_SECURE_APP] = {
                "version": "1.1.0",
                "url": url,
                "checksum": fx["encrypted_checksum"],
                "session_key": fx["iv_session_key"],
            }
            urls[name] = env.new_version(SMALL_SECURE_APP)["url"]
        passed = env.gw.metric("ota_gateway_bundle_verifications_total", result="passed")
        download = https_request(urls["small.enc.zip"], env.ctx())
        assert download.status == 200 and download.body == data
        assert env.gw.metric("ota_gateway_bundle_verifications_total", result="passed") == passed + 1
        failed = env.gw.metric("ota_gateway_bundle_verifications_total", result="checksum_mismatch")
        assert incomplete(urls["small-bad.enc.zip"], env.ctx()) == 0
        assert env.gw.metric("ota_gateway_bundle_verifications_total", result="checksum_mismatch") == failed + 1


def test_tampered_range_never_completes(env: CapgoEnv) -> None:
    env.offer(SECURE_APP, "1.1.0", encrypted=True, name="tampered-range.enc.zip")
    env.origin.state.modes[f"{SECURE_APP}/tampered-range.enc.zip"] = "flip:100"  # inside the skipped prefix
    url = env.new_version(SECURE_APP)["url"]
    assert incomplete(url, env.ctx(), {"Range": "bytes=20000-"}) < len(ENC_110) - 20000


def test_audit_log_holds_no_ticket(env: CapgoEnv) -> None:
    env.offer(APP_ID, "1.1.0")
    token = env.new_version(APP_ID)["url"].rsplit("/", 2)[1]
    https_request(env.new_version(APP_ID)["url"], env.ctx())
    assert token.split(".")[2][:40] not in env.gw.audit_path.read_text()


# --- the channel high-water mark: persisted, and lowered only by rollback_to ---------------------------------


def test_lowered_channel_is_refused_until_rollback_to_allows_it(tmp_path: Path, pki: Pki) -> None:
    with HttpsOrigin(tmp_path) as origin:
        key_file = tmp_path / "ticket.secret"
        key_file.write_bytes(os.urandom(32).hex().encode())
        cfg = gateway_config(tmp_path / "gw", pki, origin, default_apps(), key_file)
        with run_gateway(cfg) as gw:
            env = CapgoEnv(origin, gw, pki, ("k1", b""))
            env.offer(SECURE_APP, "2.0.0", encrypted=True)
            assert env.new_version(SECURE_APP)["version"] == "2.0.0"
            env.offer(SECURE_APP, "1.1.0", encrypted=True)  # the origin lowers the channel
            doc = env.check(device_body(SECURE_APP, "1.0.0")).json()
            assert (doc["error"], doc["kind"]) == ("rollback", "blocked")
            assert refusals(env, "rollback") == 1
        # same state file, and a policy that allows going back to 1.1.0
        cfg = gateway_config(tmp_path / "gw", pki, origin, default_apps(rollback_to="1.1.0"), key_file)
        with run_gateway(cfg) as gw:
            env = CapgoEnv(origin, gw, pki, ("k1", b""))
            assert env.new_version(SECURE_APP)["version"] == "1.1.0"
            env.offer(SECURE_APP, "1.0.0", encrypted=True)  # below rollback_to: still refused
            assert env.check(device_body(SECURE_APP, "builtin")).json()["error"] == "rollback"


# --- answers from a directory origin's release index -------------------------------------------------------


def test_directory_origin_answers_from_its_release_index(tmp_path: Path, pki: Pki) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    add_release(origin, APP_ID, "1.0.0", "production", CAPGO_FIXTURES / "app_1.0.0.zip")
    add_release(origin, APP_ID, "1.1.0", "production", CAPGO_FIXTURES / "app_1.1.0.zip")
    add_release(origin, APP_ID, "2.0.0", "beta", CAPGO_FIXTURES / "app_2.0.0.zip", capgo_key=CAPGO_FIXTURES / "key")
    apps = default_apps("local")[:1]
    apps[0]["verification"] = {"public_keys": []}
    cfg = write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(origin)}}, apps=apps)
    with run_gateway(cfg) as gw:
        ctx = pki.client_context(pki.client)
        doc = capgo_call(f"{gw.base_url}/updates", ctx, device_body(APP_ID, "1.0.0")).json()
        assert (doc["version"], doc["checksum"]) == ("1.1.0", capgo_fixture("1.1.0")["checksum"])
        assert https_request(doc["url"], ctx).body == PLAIN_110
        up = capgo_call(f"{gw.base_url}/updates", ctx, device_body(APP_ID, "1.1.0")).json()
        assert up["kind"] == "up_to_date"
        # beta holds an encrypted release; without a public key in the policy the index's digest of the stored
        # file still verifies the download
        beta = capgo_call(f"{gw.base_url}/updates", ctx, device_body(APP_ID, "1.1.0", defaultChannel="beta")).json()
        assert beta["version"] == "2.0.0" and len(beta["checksum"]) == 512 and beta["session_key"]
        stored = (origin / APP_ID / "2.0.0.enc.zip").read_bytes()
        assert https_request(beta["url"], ctx).body == stored
        other = capgo_call(f"{gw.base_url}/updates", ctx, device_body(APP_ID, "1.0.0", defaultChannel="nightly"))
        assert other.json()["error"] == "channel_not_allowed"
        assert metric_value(gw, "ota_gateway_refusals_total", {"reason": "downgrade"}) == 0


# --- delta manifests -----------------------------------------------------------------------------------------


def test_manifest_files_get_their_own_verified_tickets(env: CapgoEnv) -> None:
    good, bad = os.urandom(5000), os.urandom(7000)
    entries = [env.manifest_entry(APP_ID, "app.js", good), env.manifest_entry(APP_ID, "big.bin", bad, mode="flip:6000")]
    env.offer(APP_ID, "1.1.0", manifest=entries)
    doc = env.new_version(APP_ID)
    urls = [e["download_url"] for e in doc["manifest"]]
    assert all(u.startswith(f"{env.gw.base_url}/bundles/t/") for u in urls)
    assert [e["file_hash"] for e in doc["manifest"]] == [e["file_hash"] for e in entries]
    assert urls[0].endswith("/app.js") and https_request(urls[0], env.ctx()).body == good
    assert incomplete(urls[1], env.ctx()) < len(bad)
    env.offer(APP_ID, "1.1.0", manifest=[{**entries[0], "file_name": "assets/app.js.br"}])
    brotli = env.check(device_body(APP_ID, "1.0.0")).json()
    if "error" in brotli:  # without the brotli package a .br file cannot be verified: refused, never unverified
        assert brotli["error"] == "unverifiable"


@pytest.mark.parametrize("pause", [0.0, 0.3])
def test_a_chunked_check_is_taken_whole_or_read_in_pieces_and_one_past_the_limit_is_refused(
    env: CapgoEnv, pause: float
) -> None:
    """A check's body is taken at once when all of it came with the request, and read piece by piece while it is
    still arriving (`pause`: the handler starts before the second chunk is sent). Either way a valid body gets its
    answer, and a chunked body past 64 KiB (no Content-Length to refuse it up front) the bad_request refusal."""
    import urllib.parse

    where = urllib.parse.urlsplit(env.gw.base_url)

    def post(pieces: list[bytes]) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPSConnection(where.hostname or "", where.port, context=env.ctx(), timeout=10)

        def body() -> Iterator[bytes]:
            for i, piece in enumerate(pieces):
                if i:
                    time.sleep(pause)
                yield piece

        try:
            conn.request(
                "POST", "/updates", body=body(), headers={"Content-Type": "application/json"}, encode_chunked=True
            )
            answer = conn.getresponse()
            return answer.status, json.loads(answer.read())
        finally:
            conn.close()

    good = json.dumps(device_body(APP_ID, "1.0.0")).encode()
    status, doc = post([good[:20], good[20:]])
    assert status == 200 and doc.get("error") != "invalid_request", doc
    status, doc = post([b" " * 40_000, b" " * 40_000])
    assert status == 400 and (doc["error"], doc["kind"]) == ("invalid_request", "failed")
    assert doc["message"].startswith("the body is larger than 65536 bytes")
