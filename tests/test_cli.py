"""The `ota-gateway` command line: `certs init`, `certs issue-client`, `release add`, and option values.

The certificate commands run as real subprocesses (the installed `ota-gateway` script); `release add` runs
through `main(argv)` in process, with one subprocess for the Capgo path. User errors are one line on stderr and
exit code 2.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.cli import main
from gateway.core.capgo_crypto import decrypt_bundle, open_session_key, recover_checksum
from gateway.core.identity import spki_pin
from gateway.core.releases import parse_index
from tests.support import APP_ID, CAPGO_FIXTURES

NAMES = ["ca", "server", "client", "rogue-ca", "rogue-client"]
SCRIPT = Path(sys.executable).parent / "ota-gateway"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "gateway"]


def cli(*args: str | Path, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *map(str, args)], capture_output=True, text=True, timeout=60, umask=umask)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def described(output: str) -> dict[str, tuple[Path, str, str]]:
    """Parse `certs` output: `name: path` / `  sha256 X` / `  spki   Y` blocks."""
    out: dict[str, tuple[Path, str, str]] = {}
    lines = output.splitlines()
    for i in range(0, len(lines), 3):
        name, path = lines[i].split(": ", 1)
        sha = lines[i + 1].split()
        spki = lines[i + 2].split()
        assert sha[0] == "sha256" and spki[0] == "spki", output
        out[name] = (Path(path), sha[1], spki[1])
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    folder = tmp_path_factory.mktemp("cli") / "nested" / "dev"
    done = cli("certs", "init", "--dir", folder)
    assert done.returncode == 0, done.stderr
    return folder, done


# --- certs init --------------------------------------------------------------------------------------------------


def test_init_writes_every_file_with_private_modes(pki_dir: tuple[Path, Any]) -> None:
    folder, _ = pki_dir
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{n}.{ext}" for n in NAMES for ext in ("pem", "key"))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # the umask's; the keys are what stays private
    for name in NAMES:
        assert stat.S_IMODE((folder / f"{name}.pem").stat().st_mode) == 0o644
        assert stat.S_IMODE((folder / f"{name}.key").stat().st_mode) == 0o600
        key = serialization.load_pem_private_key((folder / f"{name}.key").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        public = load_cert(folder / f"{name}.pem").public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert key.public_key().public_numbers() == public.public_numbers()


def test_init_prints_sha256_and_spki_of_each_certificate(pki_dir: tuple[Path, Any]) -> None:
    folder, done = pki_dir
    printed = described(done.stdout)
    assert list(printed) == NAMES
    for name, (path, sha, spki) in printed.items():
        assert path == folder / f"{name}.pem"
        cert = load_cert(path)
        assert sha == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        assert spki == spki_pin(cert)
    assert done.stderr == ""


def test_init_server_certificate(pki_dir: tuple[Path, Any]) -> None:
    folder, _ = pki_dir
    server, ca = load_cert(folder / "server.pem"), load_cert(folder / "ca.pem")
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_init_client_certificates(pki_dir: tuple[Path, Any]) -> None:
    folder, _ = pki_dir
    ca, rogue_ca = load_cert(folder / "ca.pem"), load_cert(folder / "rogue-ca.pem")
    client, rogue_client = load_cert(folder / "client.pem"), load_cert(folder / "rogue-client.pem")
    assert eku(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert eku(rogue_client) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    client.verify_directly_issued_by(ca)
    rogue_client.verify_directly_issued_by(rogue_ca)
    with pytest.raises((ValueError, InvalidSignature)):
        rogue_client.verify_directly_issued_by(ca)


def test_init_rogue_ca_differs_from_ca(pki_dir: tuple[Path, Any]) -> None:
    folder, _ = pki_dir
    ca, rogue = load_cert(folder / "ca.pem"), load_cert(folder / "rogue-ca.pem")
    assert ca.subject != rogue.subject
    assert spki_pin(ca) != spki_pin(rogue)
    for cert in (ca, rogue):
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
        cert.verify_directly_issued_by(cert)  # self-signed


def test_init_keeps_existing_material_and_force_replaces_it(tmp_path: Path) -> None:
    folder = tmp_path / "pki"
    folder.mkdir(mode=0o755)
    first = cli("certs", "init", "--dir", folder)
    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # an existing folder keeps its mode
    before = snapshot(folder)

    again = cli("certs", "init", "--dir", folder)
    assert again.returncode == 0, again.stderr
    assert snapshot(folder) == before
    assert again.stdout == first.stdout

    forced = cli("certs", "init", "--dir", folder, "--force")
    assert forced.returncode == 0, forced.stderr
    after = snapshot(folder)
    assert sorted(after) == sorted(before)
    assert all(after[name] != before[name] for name in before)
    old, new = described(first.stdout), described(forced.stdout)
    assert all(old[n][1] != new[n][1] and old[n][2] != new[n][2] for n in NAMES)
    for name in NAMES:
        assert stat.S_IMODE((folder / f"{name}.key").stat().st_mode) == 0o600


def test_init_never_replaces_part_of_a_pki_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "pki"
    assert main(["certs", "init", "--dir", str(folder)]) == 0
    (folder / "rogue-client.pem").unlink()
    (folder / "rogue-client.key").unlink()
    before = snapshot(folder)
    capsys.readouterr()
    code = main(["certs", "init", "--dir", str(folder)])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"ota-gateway: {folder} holds part of a dev PKI (rogue-client.pem, rogue-client.key missing): "
        "use --force to replace all of it"
    ]
    assert snapshot(folder) == before  # the CA that issued existing clients is still there
    assert main(["certs", "init", "--dir", str(folder), "--force"]) == 0
    assert (folder / "rogue-client.pem").exists()
    assert (folder / "ca.pem").read_bytes() != before["ca.pem"]


# --- certs issue-client ------------------------------------------------------------------------------------------


def test_issue_client(tmp_path: Path, pki_dir: tuple[Path, Any]) -> None:
    source, _ = pki_dir
    folder = tmp_path / "pki"
    folder.mkdir(mode=0o700)
    for name in ("ca.pem", "ca.key"):
        (folder / name).write_bytes((source / name).read_bytes())
    done = cli("certs", "issue-client", "--dir", folder, "--days", "30", "tablet-7.example.app")
    assert done.returncode == 0, done.stderr
    cert_path, key_path = folder / "tablet-7.example.app.pem", folder / "tablet-7.example.app.key"
    cert = load_cert(cert_path)
    cert.verify_directly_issued_by(load_cert(folder / "ca.pem"))
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "tablet-7.example.app"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days == 30
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    printed = described(done.stdout)
    assert printed == {
        "tablet-7.example.app": (
            cert_path,
            hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
            spki_pin(cert),
        )
    }


@pytest.mark.parametrize("name", ["../evil", "a/b", "ca", "server", "rogue-ca", "", "..", "x y", "x;rm"])
def test_issue_client_refuses_bad_names(
    tmp_path: Path, pki_dir: tuple[Path, Any], capsys: pytest.CaptureFixture[str], name: str
) -> None:
    folder, _ = pki_dir
    before = snapshot(folder)
    code = main(["certs", "issue-client", "--dir", str(folder), name])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.splitlines() == [
        f"ota-gateway: client name must be letters, digits, '.', '-' or '_' and not a reserved name: {name!r}"
    ]
    assert snapshot(folder) == before


def test_issue_client_bad_name_subprocess(pki_dir: tuple[Path, Any]) -> None:
    folder, _ = pki_dir
    done = cli("certs", "issue-client", "--dir", folder, "../escape")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "ota-gateway: client name must be letters, digits, '.', '-' or '_' and not a reserved name: '../escape'"
    ]
    assert not (folder.parent / "escape.pem").exists()


def test_issue_client_without_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["certs", "issue-client", "--dir", str(tmp_path), "device"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.splitlines() == [
        f"ota-gateway: no CA in {tmp_path}: run 'ota-gateway certs init --dir {tmp_path}' first"
    ]


# --- release add -------------------------------------------------------------------------------------------------


def fixture_entry(version: str) -> dict[str, Any]:
    entries = json.loads((CAPGO_FIXTURES / "fixtures.json").read_text())
    return next(e for e in entries if e["version"] == version)


def index_of(origin: Path) -> dict[str, Any]:
    data = yaml.safe_load((origin / APP_ID / "releases.yaml").read_text())
    parse_index(APP_ID, data)  # what the directory origin will read
    assert isinstance(data, dict)
    return data


def release_add(
    capsys: pytest.CaptureFixture[str], origin: Path, version: str, bundle: Path, *extra: str
) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["release", "add", "--origin", str(origin), "--app", APP_ID, "--version", version, *extra, str(bundle)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    folder = tmp_path / "origin"
    folder.mkdir()
    return folder


def test_release_add_publishes_into_the_origin(origin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = (CAPGO_FIXTURES / "app_1.0.0.zip").read_bytes()
    code, out, err = release_add(capsys, origin, "1.0.0", CAPGO_FIXTURES / "app_1.0.0.zip")
    assert (code, err) == (0, "")
    sha = hashlib.sha256(plain).hexdigest()
    assert sha == fixture_entry("1.0.0")["checksum"]
    assert out.splitlines() == [f"published {APP_ID} 1.0.0 (production): 1.0.0.zip {len(plain)} bytes sha256 {sha}"]
    assert (origin / APP_ID / "1.0.0.zip").read_bytes() == plain
    assert index_of(origin) == {
        "app_id": APP_ID,
        "releases": [
            {"version": "1.0.0", "channel": "production", "file": "1.0.0.zip", "size": len(plain), "sha256": sha}
        ],
    }

    code, _, err = release_add(capsys, origin, "1.1.0", CAPGO_FIXTURES / "app_1.1.0.zip", "--channel", "beta")
    assert (code, err) == (0, "")
    releases = index_of(origin)["releases"]
    assert [(r["version"], r["channel"]) for r in releases] == [("1.0.0", "production"), ("1.1.0", "beta")]
    assert releases[1]["sha256"] == fixture_entry("1.1.0")["checksum"]
    leftovers = [p.name for p in (origin / APP_ID).iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic writes leave no temporary files behind


def test_release_add_duplicate_needs_replace(origin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert release_add(capsys, origin, "1.0.0", CAPGO_FIXTURES / "app_1.0.0.zip")[0] == 0
    before = snapshot(origin / APP_ID)
    code, out, err = release_add(capsys, origin, "1.0.0", CAPGO_FIXTURES / "app_1.1.0.zip")
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"ota-gateway: {APP_ID} 1.0.0 is already published (use --replace to overwrite)"]
    assert snapshot(origin / APP_ID) == before

    code, _, err = release_add(capsys, origin, "1.0.0", CAPGO_FIXTURES / "app_1.1.0.zip", "--replace")
    assert (code, err) == (0, "")
    releases = index_of(origin)["releases"]
    assert len(releases) == 1
    assert releases[0]["sha256"] == fixture_entry("1.1.0")["checksum"]
    assert (origin / APP_ID / "1.0.0.zip").read_bytes() == (CAPGO_FIXTURES / "app_1.1.0.zip").read_bytes()


def test_release_add_refuses_what_is_not_a_zip(
    tmp_path: Path, origin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "bundle.zip"
    bogus.write_bytes(b"<html>not a zip</html>")
    code, out, err = release_add(capsys, origin, "1.0.0", bogus)
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"ota-gateway: {bogus}: not a zip file"]
    assert list(origin.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--app", "myapp", "--version", "1.0.0"], "app id must be reverse-domain (com.example.app): 'myapp'"),
        (["--app", APP_ID, "--version", "../1.0.0"], "not a valid version: '../1.0.0'"),
        (["--app", APP_ID, "--version", "1.0.0", "--channel", "be ta"], "not a valid channel name: 'be ta'"),
    ],
)
def test_release_add_refuses_bad_names(
    origin: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code = main(["release", "add", "--origin", str(origin), *args, str(CAPGO_FIXTURES / "app_1.0.0.zip")])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.splitlines() == [f"ota-gateway: {message}"]
    assert list(origin.iterdir()) == []


def test_release_add_missing_origin_or_bundle(tmp_path: Path, origin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = release_add(capsys, tmp_path / "nowhere", "1.0.0", CAPGO_FIXTURES / "app_1.0.0.zip")
    assert (code, err.splitlines()) == (2, [f"ota-gateway: origin directory not found: {tmp_path / 'nowhere'}"])
    code, _, err = release_add(capsys, origin, "1.0.0", tmp_path / "missing.zip")
    assert (code, err.splitlines()) == (2, [f"ota-gateway: {tmp_path / 'missing.zip'}: No such file or directory"])


def test_release_add_with_capgo_key_matches_the_capgo_cli(origin: Path) -> None:
    entry = fixture_entry("1.0.0")
    plain = (CAPGO_FIXTURES / "app_1.0.0.zip").read_bytes()
    done = cli(
        "release", "add", "--origin", origin, "--app", APP_ID, "--version", "1.0.0",
        "--capgo-key", CAPGO_FIXTURES / "key", CAPGO_FIXTURES / "app_1.0.0.zip",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (release,) = index_of(origin)["releases"]
    stored = (origin / APP_ID / "1.0.0.enc.zip").read_bytes()
    assert not (origin / APP_ID / "1.0.0.zip").exists()
    assert release["file"] == "1.0.0.enc.zip"
    assert release["size"] == len(stored)
    assert release["sha256"] == hashlib.sha256(stored).hexdigest()
    assert release["capgo"]["checksum"] == entry["encrypted_checksum"]  # RSA PKCS#1 v1.5 type 1 is deterministic

    public = serialization.load_pem_public_key((CAPGO_FIXTURES / "key.pub").read_bytes())
    assert isinstance(public, rsa.RSAPublicKey)
    aes_key, iv = open_session_key(public, release["capgo"]["session_key"])
    assert decrypt_bundle(stored, aes_key, iv) == plain
    assert recover_checksum(public, release["capgo"]["checksum"]) == hashlib.sha256(plain).hexdigest()
    assert f"  capgo checksum    {entry['encrypted_checksum']}" in done.stdout.splitlines()


def test_release_add_capgo_key_must_be_an_rsa_private_key(
    tmp_path: Path, origin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    bundle = CAPGO_FIXTURES / "app_1.0.0.zip"
    code, _, err = release_add(capsys, origin, "1.0.0", bundle, "--capgo-key", str(ec_key))
    assert (code, err.splitlines()) == (2, [f"ota-gateway: {ec_key}: a Capgo v2 key is an RSA private key"])
    code, _, err = release_add(capsys, origin, "1.0.0", bundle, "--capgo-key", str(CAPGO_FIXTURES / "key.pub"))
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(f"ota-gateway: {CAPGO_FIXTURES / 'key.pub'}: not a readable unencrypted PEM private key")
    assert not (origin / APP_ID / "releases.yaml").exists()


# --- option values ---------------------------------------------------------------------------------------------

BAD_VALUES = [
    (["health", "--timeout", "-1"], "--timeout: must be more than 0"),  # was a traceback
    (["health", "--timeout", "0"], "--timeout: must be more than 0"),  # was "Operation now in progress"
    (["serve", "--workers", "0"], "--workers: must be at least 1"),  # was taken as the default
    (["serve", "--workers", "-2"], "--workers: must be at least 1"),  # was one process, silently
    (["serve", "--crash-limit", "0"], "--crash-limit: must be at least 1"),
    (["serve", "--workers", "2", "--crash-window", "0"], "--crash-window: must be more than 0"),
    (["certs", "issue-client", "--days", "0", "x"], "--days: must be at least 1"),  # was a certificate expired at once
]


@pytest.mark.parametrize(("args", "fragment"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_an_option_value_out_of_range_is_a_usage_error(
    args: list[str], fragment: str, pki_dir: tuple[Path, Any], tmp_path: Path
) -> None:
    folder, _ = pki_dir
    extra = ["--dir", str(folder)] if args[0] == "certs" else ["--config", str(tmp_path / "gateway.yaml")]
    done = cli(*args[:-1], *extra, args[-1]) if args[0] == "certs" else cli(*args, *extra)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert fragment in done.stderr.splitlines()[-1], done.stderr
    assert not (folder / "x.pem").exists()


def test_option_values_in_range_are_taken(pki_dir: tuple[Path, Any], tmp_path: Path) -> None:
    """The twins: a one-day client certificate, and a health probe with a short timeout (nothing listens: 1)."""
    folder, _ = pki_dir
    done = cli("certs", "issue-client", "--dir", folder, "--days", "1", "short-lived")
    assert done.returncode == 0, done.stderr
    cert = load_cert(folder / "short-lived.pem")
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 1
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"admin": {"port": 9}}))  # health reads only the admin listener
    done = cli("health", "--config", config, "--timeout", "0.5")
    assert done.returncode == 1 and "cannot connect" in done.stdout, (done.stdout, done.stderr)


def test_device_names_the_file_it_cannot_use(pki_dir: tuple[Path, Any], tmp_path: Path) -> None:
    folder, _ = pki_dir
    base = ["device", "--gateway", "https://127.0.0.1:9", "--app", APP_ID, "--version", "1.0.0"]
    missing = cli(*base, "--cert", tmp_path / "nope.pem", "--key", folder / "client.key")
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [f"ota-gateway: --cert: no such file: {tmp_path / 'nope.pem'}"]
    other = cli(*base, "--cert", folder / "client.pem", "--key", folder / "server.key")
    assert other.returncode == 2 and len(other.stderr.splitlines()) == 1
    assert f"--cert {folder / 'client.pem'}, --key {folder / 'server.key'}: not a PEM certificate" in other.stderr
