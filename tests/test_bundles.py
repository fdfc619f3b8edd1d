"""GET /bundles/{app}/{version}.zip end to end: a real `ota-gateway serve`, a real origin (a directory, or the
scriptable HTTPS origin), real TLS clients (http.client and curl).

The property under test is the design's tail holdback: a client gets the exact bytes of a good bundle, and for a
bad one (a flipped byte anywhere, too many bytes, too few, a broken origin) its transfer ends short of the declared
Content-Length, so it never holds a complete response that failed verification. Every refusal and abort is one
audit line with a closed-set reason, and moves exactly the counters it should.

One gateway per origin kind serves most tests (`directory_env`, `https_env`, module scope); each test publishes its
own versions so tests do not see each other's bundles.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from gateway.core.identity import spki_pin
from gateway.core.releases import CapgoSignature, Release, ReleaseIndex, index_document
from gateway.origins import WIDE_AFTER
from gateway.publish import add_release, read_index
from tests.origin_server import HttpsOrigin
from tests.support import APP_ID, GatewayProcess, Pki, free_port, run_gateway, wait_until, write_config

DOWN_APP = "com.example.down"  # served by an HTTPS origin on a port nobody listens on
BUNDLE_SIZE = 3 * 1024 * 1024  # several gateway chunks (256 KiB) and many origin chunks (16 KiB)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def app_policy(app_id: str, origin: str) -> dict[str, Any]:
    return {
        "app_id": app_id,
        "origin": origin,
        "channels": {"default": "production", "allowed": ["production", "beta"]},
        "clients": [{"name": "fleet", "issuer": ["ca"]}],
    }


def make_zip(payload_size: int) -> bytes:
    """A real zip (publish refuses anything else) around an incompressible payload, stored as is."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("www/index.html", b"<!doctype html><script src=app.js></script>")
        zf.writestr("www/asset.bin", os.urandom(payload_size))
    return buf.getvalue()


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    incomplete: http.client.IncompleteRead | None  # set when the body ended before Content-Length

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None else None

    def problem(self) -> dict[str, Any]:
        assert self.headers.get_content_type() == "application/problem+json", self.headers
        doc: dict[str, Any] = json.loads(self.body)
        return doc


def get(gw: GatewayProcess, pki: Pki, path: str, headers: dict[str, str] | None = None) -> Answer:
    """One GET over mTLS; the body is read with `read()`, which raises IncompleteRead on a short transfer."""
    conn = http.client.HTTPSConnection("127.0.0.1", gw.port, context=pki.client_context(pki.client), timeout=20)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        try:
            return Answer(resp.status, resp.headers, resp.read(), None)
        except http.client.IncompleteRead as exc:
            return Answer(resp.status, resp.headers, bytes(exc.partial), exc)
        finally:
            resp.close()
    finally:
        conn.close()


def curl(gw: GatewayProcess, pki: Pki, path: str, out: Path) -> subprocess.CompletedProcess[str]:
    assert shutil.which("curl"), "curl is needed for this test"
    cmd = ["curl", "-sS", "--max-time", "20", "-o", str(out), "--cacert", str(pki.ca_pem)]
    cmd += ["--cert", str(pki.client.cert), "--key", str(pki.client.key), f"{gw.base_url}{path}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def counters(gw: GatewayProcess) -> dict[str, float]:
    """Every sample of /metrics, keyed `name{label="value",...}` (labels sorted)."""
    out = {}
    for family in text_string_to_metric_families(gw.scrape()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = float(sample.value)
    return out


WATCHED = ("ota_gateway_refusals_total", "ota_gateway_bundle_verifications_total", "ota_gateway_origin_errors_total")


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The refusal, verification and origin-error counters that changed, with their increase."""
    keys = {k for k in (*before, *after) if k.startswith(WATCHED)}
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted(keys) if after.get(k) != before.get(k)}


def refusal(reason: str) -> str:
    return f'ota_gateway_refusals_total{{reason="{reason}"}}'


def verification(result: str) -> str:
    return f'ota_gateway_bundle_verifications_total{{result="{result}"}}'


def origin_error(origin: str) -> str:
    return f'ota_gateway_origin_errors_total{{origin="{origin}"}}'


def audit_lines(gw: GatewayProcess, path: str, count: int = 1) -> list[dict[str, Any]]:
    """The audit lines of the `count` requests made for `path` (waits for them; fails on more or fewer)."""
    lines: list[dict[str, Any]] = []

    def written() -> bool:
        lines[:] = [r for r in gw.audit() if r.get("path") == path]
        return len(lines) >= count

    assert wait_until(written, 5), f"expected {count} audit lines for {path}, got {lines}"
    assert len(lines) == count, lines
    return lines


def audit_line(gw: GatewayProcess, path: str) -> dict[str, Any]:
    """The one audit line of the one request for `path` (each test asks for its own versions)."""
    return audit_lines(gw, path)[0]


def bundle_path(version: str, app_id: str = APP_ID) -> str:
    return f"/bundles/{app_id}/{version}.zip"


# ---------------------------------------------------------------------------------------------------------------
# the two origin kinds behind one gateway each


@dataclass
class Env:
    """A running gateway in front of one origin kind, and the means to publish to and tamper with that origin."""

    kind: str
    gw: GatewayProcess
    pki: Pki
    scratch: Path
    origin_dir: Path | None = None
    https: HttpsOrigin | None = None

    def publish(self, version: str, data: bytes, *, channel: str = "production") -> None:
        if self.origin_dir is not None:
            src = self.scratch / f"{version}.zip"
            src.write_bytes(data)
            add_release(self.origin_dir, APP_ID, version, channel, src, replace=True)
        else:
            assert self.https is not None
            self.https.publish(APP_ID, version, data, channel=channel)

    def publish_raw(self, version: str, data: bytes, file: str, capgo: CapgoSignature | None) -> None:
        """Publish bytes as they are (Capgo-encrypted bundles are not zips, so `add_release` refuses them)."""
        if self.origin_dir is not None:
            app_dir = self.origin_dir / APP_ID
            app_dir.mkdir(exist_ok=True)
            (app_dir / file).write_bytes(data)
            release = Release(version, "production", file, len(data), hashlib.sha256(data).hexdigest(), capgo)
            index = read_index(app_dir, APP_ID)
            doc = index_document(ReleaseIndex(APP_ID, (*index.releases, release)))
            tmp = app_dir / ".releases.yaml.tmp"
            tmp.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
            tmp.replace(app_dir / "releases.yaml")
        else:
            assert self.https is not None
            self.https.publish(APP_ID, version, data, file=file)
            if capgo is not None:
                entry = self.https.state.indexes[APP_ID]["releases"][-1]
                entry["capgo"] = {"checksum": capgo.checksum, "session_key": capgo.session_key}

    def stored(self, version: str) -> Path:
        assert self.origin_dir is not None
        return self.origin_dir / APP_ID / f"{version}.zip"

    def key(self, version: str) -> str:
        return f"{APP_ID}/{version}.zip"

    def flip(self, version: str, at: int) -> None:
        """The origin serves the bundle with one byte flipped; the index keeps the good digest."""
        if self.origin_dir is not None:
            self.stored(version).write_bytes(flipped(self.stored(version).read_bytes(), at))
        else:
            assert self.https is not None
            self.https.state.modes[self.key(version)] = f"flip:{at}"

    def get(self, version: str, app_id: str = APP_ID, headers: dict[str, str] | None = None) -> Answer:
        return get(self.gw, self.pki, bundle_path(version, app_id), headers)


@contextlib.contextmanager
def _env(kind: str, base: Path, pki: Pki) -> Iterator[Env]:
    down = {
        "type": "https",
        "url": f"https://127.0.0.1:{free_port()}/",
        "ca": str(pki.ca_pem),
        "connect_timeout": 2.0,
    }
    with contextlib.ExitStack() as stack:
        origin_dir, https = None, None
        if kind == "directory":
            origin_dir = base / "origin"
            origin_dir.mkdir()
            main: dict[str, Any] = {"type": "directory", "path": str(origin_dir)}
        else:
            https = stack.enter_context(HttpsOrigin(base))
            main = https.origin_config(index_ttl=0.0)  # every request sees what the test just published
        cfg = write_config(
            base / "gw",
            pki,
            origins={"main": main, "down": down},
            apps=[app_policy(APP_ID, "main"), app_policy(DOWN_APP, "down")],
        )
        gw = stack.enter_context(run_gateway(cfg))
        scratch = base / "scratch"
        scratch.mkdir()
        yield Env(kind, gw, pki, scratch, origin_dir, https)


@pytest.fixture(scope="module")
def directory_env(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Env]:
    with _env("directory", tmp_path_factory.mktemp("bundles-directory"), pki) as env:
        yield env


@pytest.fixture(scope="module")
def https_env(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Env]:
    with _env("https", tmp_path_factory.mktemp("bundles-https"), pki) as env:
        yield env


@pytest.fixture(params=["directory", "https"])
def env(request: pytest.FixtureRequest) -> Env:
    result: Env = request.getfixturevalue(f"{request.param}_env")
    return result


@pytest.fixture(scope="module")
def bundle() -> bytes:
    data = make_zip(BUNDLE_SIZE)
    assert len(data) > BUNDLE_SIZE
    return data


# ---------------------------------------------------------------------------------------------------------------
# good bundles


def test_correct_bundle_arrives_byte_for_byte(env: Env, bundle: bytes) -> None:
    env.publish("1.0.0", bundle)
    before = counters(env.gw)
    answer = env.get("1.0.0")
    assert answer.status == 200
    assert answer.incomplete is None
    assert answer.content_length == len(bundle)
    assert answer.body == bundle
    assert answer.headers["Content-Type"] == "application/zip"
    assert answer.headers["ETag"] == f'"{hashlib.sha256(bundle).hexdigest()}"'
    line = audit_line(env.gw, bundle_path("1.0.0"))
    assert (line["outcome"], line["status"], line["bytes"]) == ("ok", 200, len(bundle))
    assert "reason" not in line
    assert (line["app"], line["version"], line["origin"]) == (APP_ID, "1.0.0", "main")
    assert moved(before, counters(env.gw)) == {verification("passed"): 1}


def test_correct_bundle_with_curl(env: Env, bundle: bytes, tmp_path: Path) -> None:
    env.publish("1.0.1", bundle)
    out = tmp_path / "bundle.zip"
    result = curl(env.gw, env.pki, bundle_path("1.0.1"), out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == bundle


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0", "2.0.0"])
def test_capgo_fixtures_stream_byte_for_byte(env: Env, capgo_dir: Path, version: str) -> None:
    """The real Capgo CLI artifacts: the plain zip, and the encrypted one with its signed checksum and session key."""
    meta = {f["version"]: f for f in json.loads((capgo_dir / "fixtures.json").read_text())}[version]
    plain = (capgo_dir / meta["zip"]).read_bytes()
    encrypted = (capgo_dir / meta["encrypted_zip"]).read_bytes()
    assert hashlib.sha256(plain).hexdigest() == meta["checksum"]
    assert encrypted != plain
    env.publish(f"{version}-capgo", plain)
    signature = CapgoSignature(meta["encrypted_checksum"], meta["iv_session_key"])
    env.publish_raw(f"{version}-capgo-enc", encrypted, f"{version}-capgo.enc.zip", signature)

    answer = env.get(f"{version}-capgo")
    assert (answer.status, answer.incomplete) == (200, None)
    assert answer.body == plain
    assert hashlib.sha256(answer.body).hexdigest() == meta["checksum"]

    answer = env.get(f"{version}-capgo-enc")
    assert (answer.status, answer.incomplete) == (200, None)
    assert answer.content_length == len(encrypted)
    assert answer.body == encrypted
    for v in (f"{version}-capgo", f"{version}-capgo-enc"):
        assert audit_line(env.gw, bundle_path(v))["outcome"] == "ok"


# ---------------------------------------------------------------------------------------------------------------
# tampered bundles: the transfer ends short, never complete


@pytest.mark.parametrize("where", ["start", "middle", "last_chunk"])
def test_flipped_byte_aborts_before_the_end(env: Env, bundle: bytes, where: str) -> None:
    at = {"start": 0, "middle": len(bundle) // 2, "last_chunk": len(bundle) - 1}[where]
    version = f"flip-{where}"
    env.publish(version, bundle)
    env.flip(version, at)
    before = counters(env.gw)

    answer = env.get(version)

    assert answer.status == 200  # the headers went out before the digest could be known
    assert answer.content_length == len(bundle)
    assert answer.incomplete is not None, "the client's read must fail"
    assert len(answer.body) < len(bundle)
    assert answer.incomplete.expected == len(bundle) - len(answer.body)
    assert answer.body == flipped(bundle, at)[: len(answer.body)]  # a prefix of what the origin sent, nothing else
    if where == "last_chunk":
        assert len(answer.body) <= at, "the held-back tail (with the bad byte) must never reach the client"
    line = audit_line(env.gw, bundle_path(version))
    assert (line["outcome"], line["reason"], line["status"]) == ("aborted", "checksum_mismatch", 200)
    assert len(answer.body) <= line["bytes"] < len(bundle)
    assert "does not match expected" in line["detail"]
    assert moved(before, counters(env.gw)) == {verification("checksum_mismatch"): 1, refusal("checksum_mismatch"): 1}


# ---------------------------------------------------------------------------------------------------------------
# Range: `bytes=N-` (Android resumes so) is a 206 of exactly the bytes from N on, the whole body still verified


def test_a_range_resume_gets_exactly_the_remaining_bytes_and_other_forms_a_416(env: Env, bundle: bytes) -> None:
    env.publish("range-ok", bundle)
    start = len(bundle) // 3
    answer = env.get("range-ok", headers={"Range": f"bytes={start}-"})
    assert (answer.status, answer.incomplete) == (206, None)
    assert answer.headers["Content-Range"] == f"bytes {start}-{len(bundle) - 1}/{len(bundle)}"
    assert answer.content_length == len(bundle) - start and answer.body == bundle[start:]
    line = audit_lines(env.gw, bundle_path("range-ok"))[0]
    assert (line["outcome"], line["status"], line["bytes"]) == ("ok", 206, len(bundle) - start)
    beyond = env.get("range-ok", headers={"Range": f"bytes={len(bundle)}-"})
    assert beyond.status == 416 and beyond.headers["Content-Range"] == f"bytes */{len(bundle)}"
    assert beyond.problem()["reason"] == "range_not_satisfiable"
    closed = env.get("range-ok", headers={"Range": "bytes=0-99"})  # never a 200: the plugin would append it
    assert closed.status == 416 and closed.problem()["reason"] == "range_not_satisfiable"
    unknown = env.get("no-such-version", headers={"Range": "bytes=0-"})  # the release is looked up first
    assert unknown.status == 404 and unknown.problem()["reason"] == "release_unknown"


def test_curl_resumes_a_bundle_download(env: Env, bundle: bytes, tmp_path: Path) -> None:
    env.publish("range-curl", bundle)
    out = tmp_path / "bundle.zip"
    out.write_bytes(bundle[:100_000])  # a download cut short, resumed with `curl -C -` (Range: bytes=100000-)
    cmd = ["curl", "-sS", "--max-time", "20", "-C", "-", "-o", str(out), "--cacert", str(env.pki.ca_pem)]
    cmd += ["--cert", str(env.pki.client.cert), "--key", str(env.pki.client.key)]
    result = subprocess.run([*cmd, f"{env.gw.base_url}{bundle_path('range-curl')}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == bundle


@pytest.mark.parametrize("where", ["skipped_prefix", "sent_part"])
def test_a_range_of_a_tampered_bundle_is_cut_wherever_the_bad_byte_is(env: Env, bundle: bytes, where: str) -> None:
    """The prefix before N is fetched and hashed but not sent: a bad byte there fails the download as surely."""
    start = len(bundle) // 2
    at = {"skipped_prefix": 100, "sent_part": len(bundle) - 1}[where]
    version = f"range-flip-{where}"
    env.publish(version, bundle)
    env.flip(version, at)
    answer = env.get(version, headers={"Range": f"bytes={start}-"})
    assert answer.status == 206 and answer.incomplete is not None, "the client's read must fail"
    assert len(answer.body) < len(bundle) - start
    assert answer.body == flipped(bundle, at)[start : start + len(answer.body)]
    line = audit_line(env.gw, bundle_path(version))
    assert (line["outcome"], line["reason"]) == ("aborted", "checksum_mismatch")


@pytest.fixture(scope="module")
def big_bundle() -> bytes:
    """Past `WIDE_AFTER`: a client that keeps up gets the rest in wide slices (`origins._feeder`)."""
    return make_zip(WIDE_AFTER + 4 * 1024 * 1024)


def test_a_bundle_past_the_wide_mark_arrives_whole(env: Env, big_bundle: bytes) -> None:
    env.publish("wide", big_bundle)
    answer = env.get("wide")
    assert (answer.status, answer.incomplete) == (200, None)
    assert answer.body == big_bundle


@pytest.mark.parametrize("where", ["past_the_mark", "last_byte"])
def test_a_flipped_byte_past_the_wide_mark_aborts_before_the_end(env: Env, big_bundle: bytes, where: str) -> None:
    at = {"past_the_mark": WIDE_AFTER + 1024 * 1024 + 7, "last_byte": len(big_bundle) - 1}[where]
    version = f"wide-flip-{where}"
    env.publish(version, big_bundle)
    env.flip(version, at)
    answer = env.get(version)
    assert answer.status == 200 and answer.incomplete is not None
    assert len(answer.body) < len(big_bundle)
    assert answer.body == flipped(big_bundle, at)[: len(answer.body)]
    if where == "last_byte":
        assert len(answer.body) <= at, "the held-back tail (with the bad byte) must never reach the client"
    line = audit_line(env.gw, bundle_path(version))
    assert (line["outcome"], line["reason"]) == ("aborted", "checksum_mismatch")


def test_flipped_byte_with_curl_is_a_partial_transfer(env: Env, bundle: bytes, tmp_path: Path) -> None:
    env.publish("flip-curl", bundle)
    env.flip("flip-curl", len(bundle) // 3)
    out = tmp_path / "bundle.zip"
    result = curl(env.gw, env.pki, bundle_path("flip-curl"), out)
    assert result.returncode == 18, result.stderr  # CURLE_PARTIAL_FILE
    m = re.search(r"transfer closed with (\d+) bytes remaining to read", result.stderr)
    assert m, result.stderr
    received = out.stat().st_size
    assert 0 < received < len(bundle)
    assert int(m.group(1)) == len(bundle) - received
    line = audit_line(env.gw, bundle_path("flip-curl"))
    assert (line["outcome"], line["reason"]) == ("aborted", "checksum_mismatch")


# ---------------------------------------------------------------------------------------------------------------
# small bundles (up to 64 KiB): read whole and verified before the answer starts (core/plans.read_whole)


def raw_bundle_get(gw: GatewayProcess, pki: Pki, path: str) -> bytes:
    """Everything the gateway sends for one GET on a fresh connection, read until it closes or cuts it."""
    data = b""
    with pki.client_context(pki.client).wrap_socket(
        socket.create_connection(("127.0.0.1", gw.port), timeout=20), server_hostname="localhost"
    ) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        try:
            while chunk := tls.recv(65536):
                data += chunk
        except (OSError, ssl.SSLError):
            pass
    return data


@pytest.fixture(scope="module")
def small_bundle() -> bytes:
    data = make_zip(1024)
    assert len(data) < 64 * 1024
    return data


def test_a_small_bundle_arrives_byte_for_byte_in_one_answer(env: Env, small_bundle: bytes) -> None:
    env.publish("small-ok", small_bundle)
    before = counters(env.gw)
    answer = env.get("small-ok")
    assert (answer.status, answer.incomplete, answer.content_length) == (200, None, len(small_bundle))
    assert answer.body == small_bundle
    assert answer.headers["ETag"] == f'"{hashlib.sha256(small_bundle).hexdigest()}"'
    line = audit_line(env.gw, bundle_path("small-ok"))
    assert (line["outcome"], line["status"], line["bytes"]) == ("ok", 200, len(small_bundle))
    assert moved(before, counters(env.gw)) == {verification("passed"): 1}


@pytest.mark.parametrize("where", ["start", "last_byte"])
def test_a_small_bundle_that_fails_verification_sends_not_one_byte(env: Env, small_bundle: bytes, where: str) -> None:
    """Read whole before the answer starts: the client gets the connection cut, not even the status line, and the
    outcome is the one a failed stream has (aborted, checksum_mismatch, counted once)."""
    at = {"start": 0, "last_byte": len(small_bundle) - 1}[where]
    version = f"small-flip-{where}"
    env.publish(version, small_bundle)
    env.flip(version, at)
    before = counters(env.gw)
    assert raw_bundle_get(env.gw, env.pki, bundle_path(version)) == b""
    line = audit_line(env.gw, bundle_path(version))
    assert (line["outcome"], line["reason"], line["status"], line["bytes"]) == ("aborted", "checksum_mismatch", 200, 0)
    assert "does not match expected" in line["detail"]
    assert moved(before, counters(env.gw)) == {verification("checksum_mismatch"): 1, refusal("checksum_mismatch"): 1}


def test_a_small_bundle_of_another_size_is_refused_before_a_byte(directory_env: Env, small_bundle: bytes) -> None:
    env = directory_env
    env.publish("small-short", small_bundle)
    env.stored("small-short").write_bytes(small_bundle[:-10])
    before = counters(env.gw)
    answer = env.get("small-short")
    assert answer.status == 502 and answer.problem()["reason"] == "short_body"
    line = audit_line(env.gw, bundle_path("small-short"))
    assert (line["outcome"], line["reason"], line["status"], line["bytes"]) == ("refused", "short_body", 502, 0)
    assert moved(before, counters(env.gw)) == {verification("short_body"): 1, refusal("short_body"): 1}


def test_origin_sends_more_than_declared(env: Env, bundle: bytes) -> None:
    env.publish("extra", bundle)
    before = counters(env.gw)
    if env.kind == "directory":
        # the stored file grew: its size differs from the index before anything is sent, so a plain refusal
        with env.stored("extra").open("ab") as fh:
            fh.write(b"\x00" * 4096)
        answer = env.get("extra")
        assert answer.status == 502
        problem = answer.problem()
        assert (problem["reason"], problem["status"]) == ("size_exceeded", 502)
        assert problem["detail"] == f"origin declares {len(bundle) + 4096} bytes, the index says {len(bundle)}"
        line = audit_line(env.gw, bundle_path("extra"))
        assert (line["outcome"], line["reason"], line["status"], line["bytes"]) == ("refused", "size_exceeded", 502, 0)
    else:
        # chunked, no Content-Length: the overflow is seen in flight and the transfer is cut
        assert env.https is not None
        env.https.state.modes[env.key("extra")] = "extra"
        answer = env.get("extra")
        assert answer.status == 200
        assert answer.content_length == len(bundle)
        assert answer.incomplete is not None
        assert len(answer.body) < len(bundle)
        assert answer.body == bundle[: len(answer.body)]
        line = audit_line(env.gw, bundle_path("extra"))
        assert (line["outcome"], line["reason"], line["status"]) == ("aborted", "size_exceeded", 200)
        assert line["detail"] == f"origin sent more than the declared size of {len(bundle)} bytes"
    assert moved(before, counters(env.gw)) == {verification("size_exceeded"): 1, refusal("size_exceeded"): 1}


def test_https_origin_declares_a_wrong_length(https_env: Env, bundle: bytes) -> None:
    assert https_env.https is not None
    https_env.publish("wrong-length", bundle)
    https_env.https.state.modes[https_env.key("wrong-length")] = "wrong_length"
    before = counters(https_env.gw)
    answer = https_env.get("wrong-length")
    assert answer.status == 502
    assert answer.problem()["reason"] == "size_exceeded"
    line = audit_line(https_env.gw, bundle_path("wrong-length"))
    assert (line["outcome"], line["reason"]) == ("refused", "size_exceeded")
    assert moved(before, counters(https_env.gw)) == {verification("size_exceeded"): 1, refusal("size_exceeded"): 1}


def test_origin_closes_early(env: Env, bundle: bytes) -> None:
    env.publish("short", bundle)
    before = counters(env.gw)
    if env.kind == "directory":
        # a truncated file is seen by its size before anything is sent
        with env.stored("short").open("r+b") as fh:
            fh.truncate(len(bundle) // 2)
        answer = env.get("short")
        assert answer.status == 502
        assert answer.problem()["reason"] == "short_body"
        line = audit_line(env.gw, bundle_path("short"))
        assert (line["outcome"], line["reason"], line["status"]) == ("refused", "short_body", 502)
        assert moved(before, counters(env.gw)) == {verification("short_body"): 1, refusal("short_body"): 1}
    else:
        # Content-Length is right but the origin hangs up halfway: the verifier sees a short body
        assert env.https is not None
        env.https.state.modes[env.key("short")] = "short"
        answer = env.get("short")
        assert answer.status == 200
        assert answer.incomplete is not None
        assert len(answer.body) < len(bundle) // 2
        assert answer.body == bundle[: len(answer.body)]
        line = audit_line(env.gw, bundle_path("short"))
        assert (line["outcome"], line["reason"], line["status"]) == ("aborted", "short_body", 200)
        assert f"of {len(bundle)} bytes" in line["detail"]
        assert moved(before, counters(env.gw)) == {
            verification("short_body"): 1,
            refusal("short_body"): 1,
            origin_error("main"): 1,
        }


# ---------------------------------------------------------------------------------------------------------------
# refusals before the first byte


def test_origin_down_is_origin_error(env: Env) -> None:
    before = counters(env.gw)
    answer = env.get("1.0.0", app_id=DOWN_APP)
    assert answer.status == 502
    problem = answer.problem()
    assert (problem["reason"], problem["status"]) == ("origin_error", 502)
    assert problem["detail"].startswith("origin down: ClientConnectorError: Cannot connect to host 127.0.0.1:"), problem
    line = audit_line(env.gw, bundle_path("1.0.0", DOWN_APP))
    assert (line["outcome"], line["reason"], line["status"], line["origin"]) == ("refused", "origin_error", 502, "down")
    assert moved(before, counters(env.gw)) == {refusal("origin_error"): 1, origin_error("down"): 1}


def test_bundle_missing_at_the_origin_is_origin_error(env: Env, bundle: bytes) -> None:
    env.publish("missing", bundle)
    if env.origin_dir is not None:
        env.stored("missing").unlink()
        detail = "is listed in the index but missing"
    else:
        assert env.https is not None
        del env.https.state.files[env.key("missing")]
        detail = "missing.zip answered HTTP 404"
    before = counters(env.gw)
    answer = env.get("missing")
    assert answer.status == 502
    problem = answer.problem()
    assert problem["reason"] == "origin_error"
    assert detail in problem["detail"]
    line = audit_line(env.gw, bundle_path("missing"))
    assert (line["outcome"], line["reason"], line["status"]) == ("refused", "origin_error", 502)
    assert moved(before, counters(env.gw)) == {refusal("origin_error"): 1, origin_error("main"): 1}


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("/bundles/com.example.other/1.0.0.zip", 404, "app_unknown"),
        ("/bundles/com.example.app/9.9.9.zip", 404, "release_unknown"),
        ("/bundles/com.example.app/internal-1.zip", 404, "release_unknown"),  # published on a channel not allowed
        ("/bundles/not_an_app_id/1.0.0.zip", 400, "bad_request"),
        ("/bundles/com.example.app/1.0.0%3Bx.zip", 400, "bad_request"),
    ],
)
def test_refused_before_streaming(env: Env, bundle: bytes, path: str, status: int, reason: str) -> None:
    env.publish("internal-1", bundle, channel="internal")
    before = counters(env.gw)
    answer = get(env.gw, env.pki, path)
    assert answer.status == status
    problem = answer.problem()
    assert (problem["reason"], problem["status"]) == (reason, status)
    assert problem["type"] == f"urn:ota-gateway:reason:{reason}"
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    assert moved(before, counters(env.gw)) == {refusal(reason): 1}


# ---------------------------------------------------------------------------------------------------------------
# a client that goes away


def test_client_disconnect_stops_the_download(env: Env) -> None:
    """The client reads a little and hangs up: aborted/client_gone, and the gateway lets go of the origin."""
    if env.kind == "directory":
        data = make_zip(64 * 1024 * 1024)  # far more than the socket buffers hold: the gateway waits on the client
        env.publish("gone", data)
    else:
        assert env.https is not None
        data = make_zip(BUNDLE_SIZE)
        env.publish("gone", data)
        env.https.state.modes[env.key("gone")] = "stall_watch"  # half, then wait for the gateway to hang up
    before = counters(env.gw)
    conn = http.client.HTTPSConnection("127.0.0.1", env.gw.port, context=env.pki.client_context(env.pki.client))
    try:
        conn.request("GET", bundle_path("gone"))
        resp = conn.getresponse()
        assert resp.status == 200
        head = resp.read(256 * 1024)
        assert head == data[: len(head)]
        assert env.gw.metric("ota_gateway_downloads_in_flight") == 1
        resp.close()
    finally:
        conn.close()
    assert wait_until(lambda: env.gw.metric("ota_gateway_downloads_in_flight") == 0, 5), "download still in flight"
    line = audit_line(env.gw, bundle_path("gone"))
    assert (line["outcome"], line["reason"]) == ("aborted", "client_gone")
    assert line["bytes"] < len(data)
    assert moved(before, counters(env.gw)) == {refusal("client_gone"): 1}
    if env.https is not None:
        https = env.https
        assert wait_until(lambda: env.key("gone") in https.state.disconnects, 5), "origin connection left open"


# ---------------------------------------------------------------------------------------------------------------
# HTTPS origin: redirects, pins, an origin that goes away


@pytest.mark.parametrize("target", ["https://localhost:{port}", "http://127.0.0.1:{port}"])
def test_redirect_outside_the_configured_hosts_is_refused(https_env: Env, bundle: bytes, target: str) -> None:
    """localhost is covered by the origin's certificate, so only the host check stops the first redirect."""
    assert https_env.https is not None
    origin = https_env.https
    version = "redirect-" + target.split(":")[0]
    https_env.publish(version, bundle)
    origin.publish(APP_ID, f"{version}-target", bundle)
    target_path = f"/{APP_ID}/{version}-target.zip"
    origin.state.modes[https_env.key(version)] = "redirect:" + target.format(port=origin.port) + target_path
    before = counters(https_env.gw)
    answer = https_env.get(version)
    assert answer.status == 502
    problem = answer.problem()
    assert problem["reason"] == "origin_error"
    assert "redirect to a host that is not configured" in problem["detail"]
    assert f"/{APP_ID}/{version}.zip" in origin.state.requests
    assert target_path not in origin.state.requests
    line = audit_line(https_env.gw, bundle_path(version))
    assert (line["outcome"], line["reason"]) == ("refused", "origin_error")
    assert moved(before, counters(https_env.gw)) == {refusal("origin_error"): 1, origin_error("main"): 1}


@pytest.mark.parametrize("listed", ["localhost", "LocalHost"])
def test_redirect_to_a_configured_host_is_followed(
    tmp_path: Path, pki: Pki, https_origin: HttpsOrigin, bundle: bytes, listed: str
) -> None:
    """The positive twin of the test above: with `redirect_hosts: [localhost]` the same redirect works (host names
    compare without case, as DNS does)."""
    https_origin.publish(APP_ID, "1.0.0", bundle)
    https_origin.publish(APP_ID, "1.0.0-target", bundle)
    target_path = f"/{APP_ID}/1.0.0-target.zip"
    https_origin.state.modes[f"{APP_ID}/1.0.0.zip"] = f"redirect:https://localhost:{https_origin.port}{target_path}"
    cfg = write_config(tmp_path / "gw", pki, origins={"cdn": https_origin.origin_config(redirect_hosts=[listed])})
    with run_gateway(cfg) as gw:
        answer = get(gw, pki, bundle_path("1.0.0"))
        assert (answer.status, answer.incomplete) == (200, None)
        assert answer.body == bundle
    assert target_path in https_origin.state.requests


def test_https_origin_spki_pin(tmp_path: Path, pki: Pki, https_origin: HttpsOrigin) -> None:
    leaf = x509.load_pem_x509_certificate(https_origin.cert.cert_chain_pems[0].bytes())
    right = spki_pin(leaf)
    assert right != pki.server.spki
    data = make_zip(64 * 1024)
    for app_id in ("com.example.pinned", "com.example.wrongpin"):
        https_origin.publish(app_id, "1.0.0", data)
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={
            "pinned": https_origin.origin_config(spki_pins=[right]),
            "wrongpin": https_origin.origin_config(spki_pins=[pki.server.spki]),  # a well-formed pin of another key
        },
        apps=[app_policy("com.example.pinned", "pinned"), app_policy("com.example.wrongpin", "wrongpin")],
    )
    with run_gateway(cfg) as gw:
        good = get(gw, pki, bundle_path("1.0.0", "com.example.pinned"))
        assert (good.status, good.incomplete) == (200, None)
        assert good.body == data

        bad = get(gw, pki, bundle_path("1.0.0", "com.example.wrongpin"))
        assert bad.status == 502
        problem = bad.problem()
        assert problem["reason"] == "origin_error"
        assert f"SPKI {right} matches no configured pin" in problem["detail"]
        # refused after the TLS handshake, before a request was sent on that connection
        assert not [p for p in https_origin.state.requests if p.startswith("/com.example.wrongpin/")]
        line = audit_line(gw, bundle_path("1.0.0", "com.example.wrongpin"))
        assert (line["outcome"], line["reason"], line["origin"]) == ("refused", "origin_error", "wrongpin")


def test_https_origin_stopped_is_origin_error(tmp_path: Path, pki: Pki) -> None:
    data = make_zip(64 * 1024)
    origin = HttpsOrigin(tmp_path)
    origin.start()
    try:
        origin.publish(APP_ID, "1.0.0", data)
        cfg = write_config(tmp_path / "gw", pki, origins={"cdn": origin.origin_config()})
        with run_gateway(cfg) as gw:
            first = get(gw, pki, bundle_path("1.0.0"))
            assert (first.status, first.body) == (200, data)
            origin.stop()
            with socket.socket() as probe:  # nobody listens there any more
                assert probe.connect_ex(("127.0.0.1", origin.port)) != 0
            answer = get(gw, pki, bundle_path("1.0.0"))
            assert answer.status == 502
            assert answer.problem()["reason"] == "origin_error"
            lines = audit_lines(gw, bundle_path("1.0.0"), count=2)
            assert [(r["outcome"], r.get("reason")) for r in lines] == [("ok", None), ("refused", "origin_error")]
    finally:
        origin.stop()


@pytest.mark.parametrize("grows", [False, True])
def test_a_small_file_is_read_at_once_and_one_that_grew_past_its_size_is_refused_whole(
    tmp_path: Path, small_bundle: bytes, grows: bool
) -> None:
    """The flat path of a small local file (`bundles._read_at_once`: no stream, no generator): a real file opened
    by the directory origin, read to its real end through the verifier. Bytes appended after the open (the file
    grew past the size the index and fstat gave) fail the size check and nothing is handed back; its twin, the
    file as it was, comes back byte for byte."""
    import asyncio

    from gateway.config import DirectoryOriginConfig
    from gateway.core.reasons import Refusal
    from gateway.core.verify import Expectation, Verifier
    from gateway.handlers.bundles import _read_at_once
    from gateway.origins import DirectoryOrigin

    (tmp_path / APP_ID).mkdir()
    stored = tmp_path / APP_ID / "small.zip"
    stored.write_bytes(small_bundle)
    origin = DirectoryOrigin("local", DirectoryOriginConfig(type="directory", path=tmp_path))
    expect = Expectation(hashlib.sha256(small_bundle).hexdigest(), len(small_bundle))

    async def read() -> bytes | memoryview:
        async with origin.open(APP_ID, "small.zip", 64 * 1024, size_hint=len(small_bundle)) as body:
            assert not body.waits  # read on the event loop: the path under test
            if grows:
                with stored.open("ab") as more:
                    more.write(b"appended")
            return _read_at_once(Verifier(expect), body)

    if not grows:
        assert asyncio.run(read()) == small_bundle
        return
    with pytest.raises(Refusal) as refused:
        asyncio.run(read())
    assert refused.value.reason.label == "size_exceeded"
