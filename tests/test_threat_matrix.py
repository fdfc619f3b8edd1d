"""The threat model, row by row, from outside: each attack against the bare origin, then through the gateway.

As python-tuf and tuf-conformance test a client: an origin simulator the test tells to misbehave
(`tests/origin_server.py`: a Capgo-style update server and bundle host), the real gateway in between (`ota-gateway
serve`), and a scripted client: `gateway/device.py`, which speaks the Capgo Android plugin's protocol (the update-check
body and User-Agent, following `url`, the plugin's checksum check: SHA-256 of the plain zip, with a public key and a
session key the AES key recovered and the digest opened from the signed checksum; and the plugin's weakness: it
installs whatever version it is offered, and an unsigned SHA-256 answer even with a public key). For every row the
attack is shown succeeding against the bare origin (the device ends with the attacker's bundle, or, where the
device's own check catches it, it first receives the complete bad body), and failing through the gateway: the status
or Capgo answer, the bytes the device received (none, or short of complete), and the Prometheus counter of the
reason. docs/threat-model.md has the table this file proves, with where each rule is enforced.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import secrets
import socket
import ssl
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.core import capgo_crypto
from gateway.device import Device, DeviceOptions
from tests.origin_server import HttpsOrigin
from tests.support import (
    CAPGO_FIXTURES,
    GatewayProcess,
    Pki,
    capgo_call,
    device_body,
    free_port,
    https_request,
    refused_request,
    run_gateway,
    wait_until,
    write_config,
)

PUB = CAPGO_FIXTURES / "key.pub"


def zip_of(entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return out.getvalue()


def bundle(tag: str, *extra: tuple[str, bytes], size: int = 200_000) -> bytes:
    """A bundle large enough to stream (past the 64 KiB read-whole size), incompressible, unique per `tag`."""
    return zip_of([("index.html", f"<html>{tag}</html>".encode()), ("assets/blob.bin", os.urandom(size)), *extra])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the test bed: one origin, one gateway, one app per row (so that no row's high-water mark meets another's) ---

ROWS = [
    "unsigned",
    "tampered",
    "nochecksum",
    "wrongapp",
    "rollback",
    "fastforward",
    "freeze",
    "endless",
    "slow",
    "zip",
    "mix",
    "ticket",
    "identity",
]


def app_id(row: str) -> str:
    return f"com.threat.{row}"


@dataclass
class Bed:
    origin: HttpsOrigin
    gw: GatewayProcess
    pki: Pki
    plain_port: int
    tmp: Path
    _counter: list[int] = field(default_factory=lambda: [0])

    def put(self, row: str, name: str, data: bytes, mode: str | None = None) -> str:
        """A file on the origin, below the row's app folder (or another app's, for `wrongapp`); its url."""
        app = app_id(row)
        self.origin.state.files[f"{app}/{name}"] = data
        if mode is not None:
            self.origin.state.modes[f"{app}/{name}"] = mode
        return f"{self.origin.url}{app}/{name}"

    def answer(self, row: str, answer: dict[str, Any] | Callable[[Any], Any]) -> None:
        self.origin.state.update_answers[app_id(row)] = answer

    def device(self, row: str, version: str, *, bare: bool, public_key: bool = False) -> Outcome:
        """Run the plugin-exact client once, against the bare origin or through the gateway."""
        self._counter[0] += 1
        out = self.tmp / f"installed-{self._counter[0]}.zip"
        opts = DeviceOptions(
            gateway=self.origin.url if bare else self.gw.base_url,
            cert=self.pki.client.cert,
            key=self.pki.client.key,
            ca=self.origin.ca_pem if bare else self.pki.ca_pem,
            app_id=app_id(row),
            version=version,
            public_key=PUB if public_key else None,
            out=out,
            timeout=20,
        )
        lines: list[str] = []
        device = Device(opts, lines.append)
        started = time.monotonic()
        code = device.run()
        return Outcome(
            code, lines, device.received, out.read_bytes() if out.exists() else None, time.monotonic() - started
        )

    def metric(self, name: str, **labels: str) -> float:
        return self.gw.metric(name, **labels)

    @contextlib.contextmanager
    def counted(self, name: str, n: int = 1, **labels: str) -> Iterator[None]:
        """The block raises the counter `name{labels}` by exactly `n` (checked after the block's own asserts)."""
        before = self.metric(name, **labels)
        yield
        assert self.metric(name, **labels) == before + n, (name, labels)


@dataclass
class Outcome:
    code: int  # the device's exit code: 0 installed (or up to date), 1 refused or failed
    lines: list[str]
    received: int | None  # bundle bytes the device received (None: it never downloaded)
    installed: bytes | None  # the zip it installed
    seconds: float

    @property
    def said(self) -> str:
        return "\n".join(self.lines)


def policy(origin: HttpsOrigin, row: str, **over: Any) -> dict[str, Any]:
    verification = {"bundle_urls": [f"{origin.url}{{app_id}}/"], "zip_scan": {}, **over.pop("verification", {})}
    return {
        "app_id": app_id(row),
        "origin": "capgo",
        "channels": {"default": "production", "allowed": ["production"]},
        "clients": [{"name": "fleet", "issuer": ["ca"]}],
        "rate_limits": {"updates_per_minute": 1000, "stats_per_minute": 1000},
        "verification": verification,
        **over,
    }


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Bed]:
    tmp = tmp_path_factory.mktemp("threat")
    key_file = tmp / "ticket.secret"
    key_file.write_bytes(secrets.token_hex(32).encode())
    plain_port = free_port()
    with HttpsOrigin(tmp) as origin:
        apps = [
            policy(origin, "unsigned", verification={"public_keys": [PUB.read_text()]}),
            policy(origin, "fastforward", versions={"max_version_jump": 1}),
            policy(origin, "endless", verification={"max_bundle_bytes": ENDLESS_CAP}),
            *(policy(origin, row) for row in ROWS if row not in ("unsigned", "fastforward", "endless")),
        ]
        cfg = write_config(
            tmp / "gw",
            pki,
            origins={"capgo": origin.origin_config(updates_path="updates", stats_path="stats")},
            apps=apps,
            extra={
                "tickets": {"keys": [{"id": "k1", "secret_file": str(key_file)}]},
                # slow retrieval: an origin below 1000 bytes/s over 2 s of waiting is cut
                "limits": {"origin_min_rate": 1000, "rate_window": 2},
                "plain_http": {"enabled": True, "address": "127.0.0.1", "port": plain_port},
            },
        )
        with run_gateway(cfg) as gw:
            yield Bed(origin, gw, pki, plain_port, tmp)


# --- the rows ------------------------------------------------------------------------------------------------------


def arbitrary_installation_unsigned(bed: Bed) -> None:
    """An app with a public key; the origin answers with an attacker's zip and its plain SHA-256, no signature.
    Android checks only the SHA-256 then (capgo-protocol.md): it installs it."""
    evil = bundle("evil")
    bed.put("unsigned", "1.1.0.zip", evil)
    bed.answer("unsigned", {"version": "1.1.0", "url": f"{bed.origin.url}{app_id('unsigned')}/1.1.0.zip",
                            "checksum": sha(evil), "session_key": ""})  # fmt: skip
    bare = bed.device("unsigned", "1.0.0", bare=True, public_key=True)
    assert bare.code == 0 and bare.installed == evil, bare.said
    with bed.counted("ota_gateway_refusals_total", reason="signature_invalid"):
        gated = bed.device("unsigned", "1.0.0", bare=False, public_key=True)
        assert gated.code == 1 and gated.received is None and gated.installed is None, gated.said
        assert "signature_invalid" in gated.said


def arbitrary_installation_tampered(bed: Bed) -> None:
    """The update answer is the publisher's; the bundle host serves other bytes (one flipped byte)."""
    good = bundle("good")
    bed.put("tampered", "1.1.0.zip", good, mode="flip:150000")
    bed.answer("tampered", {"version": "1.1.0", "url": f"{bed.origin.url}{app_id('tampered')}/1.1.0.zip",
                            "checksum": sha(good), "session_key": ""})  # fmt: skip
    bare = bed.device("tampered", "1.0.0", bare=True)
    # the device receives the whole bad body; its own SHA-256 check refuses it
    assert bare.code == 1 and bare.received == len(good) and "checksum_fail" in bare.said, bare.said
    with bed.counted("ota_gateway_bundle_verifications_total", result="checksum_mismatch"):
        gated = bed.device("tampered", "1.0.0", bare=False)
        assert gated.code == 1 and gated.received is not None and gated.received < len(good), gated.said
        assert "download cut off" in gated.said


def arbitrary_installation_no_checksum(bed: Bed) -> None:
    """No checksum: a device without a public key installs the bundle unverified."""
    evil = bundle("unverified")
    url = bed.put("nochecksum", "1.1.0.zip", evil)
    bed.answer("nochecksum", {"version": "1.1.0", "url": url, "checksum": "", "session_key": ""})
    bare = bed.device("nochecksum", "1.0.0", bare=True)
    assert bare.code == 0 and bare.installed == evil, bare.said
    for checksum in ("", f"{0x1234ABCD:08x}"):  # missing, and a CRC32 (which older plugins matched)
        bed.answer("nochecksum", {"version": "1.1.0", "url": url, "checksum": checksum, "session_key": ""})
        with bed.counted("ota_gateway_refusals_total", reason="unverifiable"):
            gated = bed.device("nochecksum", "1.0.0", bare=False)
            assert gated.code == 1 and gated.received is None and "unverifiable" in gated.said, gated.said


def wrong_software(bed: Bed) -> None:
    """The answer for app A names app B's bundle (a valid one, with its right checksum) on the same host."""
    other = bundle("app B")
    url = f"{bed.origin.url}com.threat.other/1.1.0.zip"
    bed.origin.state.files["com.threat.other/1.1.0.zip"] = other
    bed.answer("wrongapp", {"version": "1.1.0", "url": url, "checksum": sha(other), "session_key": ""})
    bare = bed.device("wrongapp", "1.0.0", bare=True)
    assert bare.code == 0 and bare.installed == other, bare.said
    with bed.counted("ota_gateway_refusals_total", reason="foreign_app"):
        gated = bed.device("wrongapp", "1.0.0", bare=False)
        assert gated.code == 1 and gated.received is None and "foreign_app" in gated.said, gated.said


def rollback(bed: Bed) -> None:
    """The origin offers 1.0.0 to a device on 1.1.0: the plugin installs any version other than its own."""
    old = bundle("1.0.0 with a known hole")
    url = bed.put("rollback", "1.0.0.zip", old)
    bed.answer("rollback", {"version": "1.0.0", "url": url, "checksum": sha(old), "session_key": ""})
    bare = bed.device("rollback", "1.1.0", bare=True)
    assert bare.code == 0 and bare.installed == old, bare.said
    with bed.counted("ota_gateway_refusals_total", reason="downgrade"):
        gated = bed.device("rollback", "1.1.0", bare=False)
        assert gated.code == 0 and gated.installed is None and gated.received is None, gated.said  # up to date
        assert "up_to_date" in gated.said


def fast_forward(bed: Bed) -> None:
    """99999.0.0 offered, so that real updates later look like rollbacks (`max_version_jump: 1`)."""
    inflated = bundle("99999")
    url = bed.put("fastforward", "99999.0.0.zip", inflated)
    bed.answer("fastforward", {"version": "99999.0.0", "url": url, "checksum": sha(inflated), "session_key": ""})
    bare = bed.device("fastforward", "1.0.0", bare=True)
    assert bare.code == 0 and bare.installed == inflated, bare.said
    with bed.counted("ota_gateway_refusals_total", reason="version_jump"):
        gated = bed.device("fastforward", "1.0.0", bare=False)
        assert gated.code == 1 and gated.received is None and "blocked" in gated.said, gated.said


def indefinite_freeze(bed: Bed) -> None:
    """A stale answer kept and replayed by a cache, and an origin that fails: the bare origin's answer may be
    cached (no Cache-Control); the gateway's never is, and a failing origin is `failed`, never "up to date"."""
    body = device_body(app_id("freeze"), "1.0.0")
    bare = capgo_call(f"{bed.origin.url}updates", ssl.create_default_context(cafile=str(bed.origin.ca_pem)), body)
    assert bare.status == 200 and "cache-control" not in bare.headers
    gated = capgo_call(f"{bed.gw.base_url}/updates", bed.pki.client_context(bed.pki.client), body)
    assert gated.status == 200 and gated.headers["cache-control"] == "no-store"
    assert gated.json()["kind"] == "up_to_date"

    def broken(_: Any) -> Any:
        raise RuntimeError("the update server fails")  # a text/plain 500

    bed.answer("freeze", broken)
    with (
        bed.counted("ota_gateway_update_answers_total", kind="failed"),
        bed.counted("ota_gateway_refusals_total", reason="origin_error"),
    ):
        outcome = bed.device("freeze", "1.0.0", bare=False)
        assert outcome.code == 1 and "failed: origin_error" in outcome.said, outcome.said


ENDLESS_CAP = 202_000  # the app's verification.max_bundle_bytes


def endless_data(bed: Bed) -> None:
    """The bundle host sends more than the bundle holds (chunked, no length: it could go on forever). An update
    answer names no size, so the app's `verification.max_bundle_bytes` is the bound."""
    good = bundle("endless")
    assert len(good) <= ENDLESS_CAP < len(good) + 4096  # the origin's "extra" mode adds 4096 bytes
    bed.put("endless", "1.1.0.zip", good, mode="extra")
    bed.answer("endless", {"version": "1.1.0", "url": f"{bed.origin.url}{app_id('endless')}/1.1.0.zip",
                           "checksum": sha(good), "session_key": ""})  # fmt: skip
    bare = bed.device("endless", "1.0.0", bare=True)
    assert bare.received is not None and bare.received > len(good), bare.said  # it took all that came
    with bed.counted("ota_gateway_bundle_verifications_total", result="size_exceeded"):
        gated = bed.device("endless", "1.0.0", bare=False)
        assert gated.code == 1 and gated.received is not None and gated.received < len(good), gated.said


def slow_retrieval(bed: Bed) -> None:
    """The bundle host trickles one byte every 40 ms: every read of the device returns within its read timeout,
    so it never gives up; the gateway cuts the origin below `limits.origin_min_rate` (1000 bytes/s over 2 s)."""
    tiny = zip_of([("a.js", b"1")])
    bed.put("slow", "1.1.0.zip", tiny, mode="trickle:0.04")
    bed.answer("slow", {"version": "1.1.0", "url": f"{bed.origin.url}{app_id('slow')}/1.1.0.zip",
                        "checksum": sha(tiny), "session_key": ""})  # fmt: skip
    result: list[Outcome] = []
    thread = threading.Thread(target=lambda: result.append(bed.device("slow", "1.0.0", bare=True)), daemon=True)
    thread.start()
    thread.join(3.0)
    assert thread.is_alive()  # 3 s on, more than the gateway's whole window: the device still waits, undisturbed
    thread.join(30)
    assert result and result[0].code == 0 and result[0].installed == tiny  # and it ends only when the origin wants
    with bed.counted("ota_gateway_bundle_verifications_total", result="origin_too_slow"):
        gated = bed.device("slow", "1.0.0", bare=False)
        assert gated.code == 1 and gated.received == 0, gated.said  # a small body is read whole: not a byte went out


def extraneous_content(bed: Bed) -> None:
    """The publisher's own pipeline (or whoever holds its key) made the bundle, with entries that escape the
    folder the device unpacks into, or native code: the checksum is right, the content is not."""
    for name in ("../../../files/evil.js", "/data/evil.js", "lib/arm64-v8a/libevil.so"):
        bad = bundle(name, (name, b"payload"))
        url = bed.put("zip", f"{len(bad)}.zip", bad)
        bed.answer("zip", {"version": "1.1.0", "url": url, "checksum": sha(bad), "session_key": ""})
        bare = bed.device("zip", "1.0.0", bare=True)
        assert bare.code == 0 and bare.installed == bad, bare.said
        assert name in zipfile.ZipFile(io.BytesIO(bare.installed)).namelist()
        with (
            bed.counted("ota_gateway_bundle_verifications_total", result="zip_content"),
            bed.counted("ota_gateway_refusals_total", reason="zip_content"),
        ):
            gated = bed.device("zip", "1.0.0", bare=False)
            assert gated.code == 1 and gated.received is not None and gated.received < len(bad), gated.said
        audit = [r for r in bed.gw.audit() if r.get("reason") == "zip_content"][-1]
        assert audit["outcome"] == "aborted" and "verification.zip_scan" in audit["detail"]
    # the twin: names that only look like an escape or like native code, installed through the gateway
    clean = bundle("twin", ("a..b.js", b"x"), ("assets/..hidden/x.js", b"y"), ("assets/so.js", b"z"))
    url = bed.put("zip", "clean.zip", clean)
    bed.answer("zip", {"version": "1.1.0", "url": url, "checksum": sha(clean), "session_key": ""})
    gated = bed.device("zip", "1.0.0", bare=False)
    assert gated.code == 0 and gated.installed == clean, gated.said


def mix_and_match(bed: Bed) -> None:
    """A manifest of release 2 listing a file of release 1 (its download_url), with release 2's hash."""
    v1, v2 = os.urandom(90_000), os.urandom(90_000)
    full = bundle("2.0")
    bed.put("mix", "2.0.0.zip", full)
    old_url = bed.put("mix", "app.js.v1", v1)
    entry = {"file_name": "assets/app.js", "file_hash": sha(v2), "download_url": old_url}
    bed.answer("mix", {"version": "2.0.0", "url": f"{bed.origin.url}{app_id('mix')}/2.0.0.zip",
                       "checksum": sha(full), "session_key": "", "manifest": [entry]})  # fmt: skip
    # the bare origin: the device gets release 1's file whole (its per-file check, when it makes one, refuses it)
    body = device_body(app_id("mix"), "1.0.0")
    bare_doc = capgo_call(f"{bed.origin.url}updates", ssl.create_default_context(cafile=str(bed.origin.ca_pem)), body)
    file_url = bare_doc.json()["manifest"][0]["download_url"]
    got = https_request(file_url, ssl.create_default_context(cafile=str(bed.origin.ca_pem)))
    assert got.status == 200 and got.body == v1
    gated_doc = capgo_call(f"{bed.gw.base_url}/updates", bed.pki.client_context(bed.pki.client), body).json()
    ticket_url = gated_doc["manifest"][0]["download_url"]
    assert ticket_url.startswith(f"{bed.gw.base_url}/bundles/t/")
    with bed.counted("ota_gateway_bundle_verifications_total", result="checksum_mismatch"):
        assert _incomplete(ticket_url, bed.pki.client_context(bed.pki.client)) < len(v1)


def ticket_replay(bed: Bed) -> None:
    """A download url used by someone it was not given to, or edited."""
    good = bundle("ticket")
    url = bed.put("ticket", "1.1.0.zip", good)
    bed.answer("ticket", {"version": "1.1.0", "url": url, "checksum": sha(good), "session_key": ""})
    body = device_body(app_id("ticket"), "1.0.0")
    bare_doc = capgo_call(f"{bed.origin.url}updates", ssl.create_default_context(cafile=str(bed.origin.ca_pem)), body)
    anyone = https_request(bare_doc.json()["url"], ssl.create_default_context(cafile=str(bed.origin.ca_pem)))
    assert anyone.status == 200 and anyone.body == good  # no certificate at all, and the whole bundle
    doc = capgo_call(f"{bed.gw.base_url}/updates", bed.pki.client_context(bed.pki.client), body).json()
    ticket = doc["url"]
    with bed.counted("ota_gateway_refusals_total", 2, reason="ticket_invalid"):
        other = https_request(ticket, bed.pki.client_context(bed.pki.client2))  # another device's certificate
        assert other.status == 403 and other.json()["reason"] == "ticket_invalid" and good not in other.body
        at = ticket.index("/bundles/t/") + len("/bundles/t/v1.k1.") + 5
        flipped = ticket[:at] + ("A" if ticket[at] != "A" else "B") + ticket[at + 1 :]
        edited = https_request(flipped, bed.pki.client_context(bed.pki.client))
        assert edited.status == 403 and edited.json()["reason"] == "ticket_invalid"
    own = https_request(ticket, bed.pki.client_context(bed.pki.client))  # the twin: its holder downloads it
    assert own.status == 200 and own.body == good


def identity(bed: Bed) -> None:
    """A client without a certificate: the bare origin answers it; the gateway completes no handshake."""
    body = device_body(app_id("identity"), "1.0.0")
    bare = capgo_call(f"{bed.origin.url}updates", ssl.create_default_context(cafile=str(bed.origin.ca_pem)), body)
    assert bare.status == 200
    labels = {"listener": "main", "cause": "no_cert"}
    before = bed.metric("ota_gateway_tls_handshake_failures_total", **labels)
    refused_request(f"{bed.gw.base_url}/updates", bed.pki.client_context(None))
    assert wait_until(lambda: bed.metric("ota_gateway_tls_handshake_failures_total", **labels) == before + 1)


def transport_downgrade(bed: Bed) -> None:
    """TLS 1.1 and plain HTTP: the gateway serves neither, and says HSTS on every answer (the bare origin does
    not: a client that met it once has no reason to refuse a downgrade later)."""
    bare = https_request(f"{bed.origin.url}com.threat.other/releases.json", ssl.create_default_context(
        cafile=str(bed.origin.ca_pem)))  # fmt: skip
    assert "strict-transport-security" not in bare.headers
    gated = capgo_call(f"{bed.gw.base_url}/updates", bed.pki.client_context(bed.pki.client), device_body())
    assert gated.headers["strict-transport-security"].startswith("max-age=")
    ctx = bed.pki.client_context(bed.pki.client)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is deprecated, that is the point
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that only the server can be the one refusing
    labels = {"listener": "main", "cause": "protocol"}
    before = bed.metric("ota_gateway_tls_handshake_failures_total", **labels)
    refused_request(f"{bed.gw.base_url}/updates", ctx)
    assert wait_until(lambda: bed.metric("ota_gateway_tls_handshake_failures_total", **labels) == before + 1)
    upgrades = bed.metric("ota_gateway_plain_http_requests_total", answer="upgrade_required")
    conn = http.client.HTTPConnection("127.0.0.1", bed.plain_port, timeout=10)
    try:
        conn.request("POST", "/updates", body=json.dumps(device_body()), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 426 and json.loads(resp.read())["reason"] == "not_https"
    finally:
        conn.close()
    assert bed.metric("ota_gateway_plain_http_requests_total", answer="upgrade_required") == upgrades + 1


def request_smuggling(bed: Bed) -> None:
    """An update check of 200 KB: the bare origin takes it (aiohttp's default is 1 MiB), the gateway refuses it;
    and CL.TE, duplicate Content-Length, obs-fold and a 1 MB header: each one 400 `bad_request`, one answer, the
    connection closed (no second request smuggled behind it). The client's hop-by-hop headers never reach the origin."""
    big = device_body(app_id("identity"), "1.0.0", custom_id="x" * 200_000)
    bare = capgo_call(f"{bed.origin.url}updates", ssl.create_default_context(cafile=str(bed.origin.ca_pem)), big)
    assert bare.status == 200
    before = bed.metric("ota_gateway_refusals_total", reason="bad_request")
    gated = capgo_call(f"{bed.gw.base_url}/updates", bed.pki.client_context(bed.pki.client), big)
    assert gated.status == 400 and gated.json()["kind"] == "failed"
    for raw in SMUGGLED:
        status_line, count = _raw_exchange(bed, raw)
        assert status_line.endswith(b" 400 Bad Request") and count == 1, (raw, status_line)  # one answer only
    assert wait_until(
        lambda: bed.metric("ota_gateway_refusals_total", reason="bad_request") == before + 1 + len(SMUGGLED)
    )
    # hop-by-hop and identity headers of the client never reach the origin: the gateway writes its own request
    calls = len(bed.origin.state.headers)
    hop = {"Connection": "X-Secret, Upgrade", "X-Secret": "1", "Upgrade": "h2c", "TE": "trailers",
           "Proxy-Authorization": "Basic c2VjcmV0", "Client-Cert": ":AAAA:", "Cookie": "s=1"}  # fmt: skip
    answer = https_request(
        f"{bed.gw.base_url}/updates",
        bed.pki.client_context(bed.pki.client),
        method="POST",
        headers={"Content-Type": "application/json", **hop},
        body=json.dumps(device_body(app_id("identity"), "1.0.0")).encode(),
    )
    assert answer.status == 200
    sent = [dict(h) for p, h in bed.origin.state.headers[calls:] if p == "/updates"]
    assert sent and not {k.lower() for k in hop if k not in ("Connection", "Client-Cert")} & {
        k.lower() for k in sent[-1]
    }
    assert sent[-1]["Client-Cert"] != ":AAAA:"  # the gateway's own RFC 9440 header (forward_identity), not the client's
    assert "x-secret" not in sent[-1].get("Connection", "").lower()


SMUGGLED = [
    # CL.TE: Content-Length and Transfer-Encoding together
    b"POST /updates HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
    # two Content-Lengths that disagree
    b"POST /updates HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}GET / HTTP/1.1\r\n\r\n",
    # a header folded over two lines (obs-fold)
    b"GET /updates HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n",
    # a 1 MB header
    b"GET /updates HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 1_000_000 + b"\r\n\r\n",
]


def _raw_exchange(bed: Bed, raw: bytes) -> tuple[bytes, int]:
    """Send raw bytes on one mTLS connection; the first status line that comes back and how many answers did."""
    ctx = bed.pki.client_context(bed.pki.client)
    answer = b""
    with (
        socket.create_connection(("127.0.0.1", bed.gw.port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        with contextlib.suppress(OSError):  # the gateway may answer and close before a 1 MB header is all sent
            tls.sendall(raw)
        try:
            while chunk := tls.recv(65536):
                answer += chunk
        except OSError:
            pass
    return answer.split(b"\r\n", 1)[0], answer.count(b"HTTP/1.")


def _incomplete(url: str, ctx: ssl.SSLContext) -> int:
    """GET that must not complete; how many body bytes arrived before the connection was cut."""
    try:
        answer = https_request(url, ctx)
    except http.client.IncompleteRead as exc:
        return len(exc.partial)
    except (OSError, http.client.HTTPException):
        return 0
    raise AssertionError(f"download completed: {answer.status}, {len(answer.body)} bytes")


MATRIX: dict[str, Callable[[Bed], None]] = {
    "arbitrary-installation-unsigned": arbitrary_installation_unsigned,
    "arbitrary-installation-tampered": arbitrary_installation_tampered,
    "arbitrary-installation-no-checksum": arbitrary_installation_no_checksum,
    "wrong-software": wrong_software,
    "rollback": rollback,
    "fast-forward": fast_forward,
    "indefinite-freeze": indefinite_freeze,
    "endless-data": endless_data,
    "slow-retrieval": slow_retrieval,
    "extraneous-content": extraneous_content,
    "mix-and-match": mix_and_match,
    "ticket-replay-forgery": ticket_replay,
    "identity": identity,
    "transport-downgrade": transport_downgrade,
    "request-smuggling": request_smuggling,
}


@pytest.mark.parametrize("row", list(MATRIX))
def test_threat_matrix(bed: Bed, row: str) -> None:
    MATRIX[row](bed)


def test_the_encrypted_bundle_is_scanned_after_decryption(bed: Bed) -> None:
    """Extraneous content in a Capgo-encrypted bundle: the gateway decrypts with the app's public key and scans the
    plain zip. The fixture's key signs a zip-slip bundle (as the publisher's CLI would); its clean twin installs."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = serialization.load_pem_private_key((CAPGO_FIXTURES / "key").read_bytes(), password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    for name, refused in (("../../evil.js", True), ("a..b.js", False)):
        plain = bundle(name, (name, b"payload"))
        aes_key, iv = os.urandom(16), os.urandom(16)
        encrypted = capgo_crypto.encrypt_bundle(plain, aes_key, iv)
        url = bed.put("unsigned", f"{name.count('.')}.enc.zip", encrypted)
        checksum = capgo_crypto.sign_checksum(private, sha(plain))
        session_key = capgo_crypto.make_session_key(private, aes_key, iv)
        bed.answer("unsigned", {"version": "1.1.0", "url": url, "checksum": checksum, "session_key": session_key})
        with bed.counted("ota_gateway_bundle_verifications_total", int(refused), result="zip_content"):
            gated = bed.device("unsigned", "1.0.0", bare=False, public_key=True)
        if refused:
            assert gated.code == 1 and gated.received is not None and gated.received < len(encrypted), gated.said
        else:
            assert gated.code == 0 and gated.installed == plain, gated.said
