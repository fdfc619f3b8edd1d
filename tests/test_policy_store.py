"""Policy files: strict validation, every problem as one line naming file, key path and line, all at once."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config import Config, load_config
from gateway.core.versions import parse as parse_version
from gateway.errors import ConfigError
from gateway.policy_store import load_policies
from tests.support import ROOT, Pki, write_config

SPKI = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="  # base64 SHA-256 of the empty string: a well-formed pin
SHA = "ab" * 32


@pytest.fixture(scope="module")
def config(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Config:
    base = tmp_path_factory.mktemp("policy-store")
    (base / "bundles").mkdir()
    return load_config(
        write_config(base / "gw", pki, origins={"local": {"type": "directory", "path": str(base / "bundles")}})
    )


@pytest.fixture(scope="module")
def rsa_pub(capgo_dir: Path) -> str:
    return (capgo_dir / "key.pub").read_text()


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def line_of(path: Path, needle: str) -> int:
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in {path}")


def problems(folder: Path, config: Config) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_policies(folder, config)
    lines = [str(issue) for issue in info.value.issues]
    assert str(info.value).splitlines() == lines  # one line per problem
    return lines


def expect_one(folder: Path, config: Config, path: Path, key_path: str, needle: str, message: str) -> None:
    found = problems(folder, config)
    assert len(found) == 1, found
    prefix = f"{path}:{line_of(path, needle)}: {key_path}: "
    assert found[0].startswith(prefix), (found[0], prefix)
    assert message in found[0], found[0]


APP_HEAD = """
apps:
  - app_id: com.example.app
    origin: local
"""


def test_complete_policy_loads(tmp_path: Path, config: Config, rsa_pub: str) -> None:
    pub = rsa_pub.replace("\n", "\\n")
    write(
        tmp_path,
        "apps.yaml",
        f"""
        apps:
          - app_id: com.example.app
            origin: local
            channels: {{default: beta, allowed: [production, beta], self_set: true}}
            clients:
              - name: fleet
                issuer: [ca]
                subject: {{cn: ["*.example.app"], o: [Example], ou: [Phones]}}
                san_dns: ["*.fleet.example.app"]
                san_uri: ["spiffe://trust.domain/device/*"]
                san_email: ["*@example.app"]
              - name: kiosk
                spki_pins: ["{SPKI}"]
                cert_sha256: ["{":".join(["AB"] * 32)}"]
                pin_only: true
            deny:
              cert_sha256: ["{SHA}"]
              serials: ["00:1F:aa", 255]
            versions: {{min_version: 1.2.0, blocked_versions: [1.3.0], rollback_to: 1.2.5, max_version_jump: 1}}
            verification:
              require_checksum: false
              max_bundle_bytes: 1000000
              public_keys: ["{pub}"]
              zip_scan: {{allow_native_code: true}}
            rate_limits: {{updates_per_minute: 10, stats_per_minute: 20}}
          - app_id: com.example.second
            origin: local
            clients: [{{issuer: [ca]}}]
        """,
    )
    ps = load_policies(tmp_path, config)
    app = ps.apps["com.example.app"]
    assert app.source == str(tmp_path / "apps.yaml")
    assert (app.channels.default, app.channels.allowed, app.channels.self_set) == ("beta", ("production", "beta"), True)
    fleet, kiosk = app.clients
    assert (fleet.name, fleet.issuers, fleet.cn, fleet.o, fleet.ou) == (
        "fleet",
        ("ca",),
        ("*.example.app",),
        ("Example",),
        ("Phones",),
    )
    assert fleet.san_uri == ("spiffe://trust.domain/device/*",) and not fleet.has_pins
    assert kiosk.pin_only and kiosk.spki_pins == {SPKI} and kiosk.cert_sha256 == {SHA}  # colons and case normalized
    assert app.deny.cert_sha256 == {SHA}
    assert app.deny.serials == {"1faa", "ff"}  # hex without leading zeros, like ClientIdentity.serial
    assert (app.versions.min_version, app.versions.blocked, app.versions.rollback_to) == ("1.2.0", ("1.3.0",), "1.2.5")
    assert app.versions.max_version_jump == 1
    assert not app.verification.require_checksum and app.verification.max_bundle_bytes == 1000000
    assert app.verification.public_keys[0].startswith("-----BEGIN RSA PUBLIC KEY-----")
    assert (app.rate_limits.updates_per_minute, app.rate_limits.stats_per_minute) == (10, 20)
    assert app.verification.zip_scan is not None and app.verification.zip_scan.allow_native_code
    second = ps.apps["com.example.second"]
    assert second.channels.default == "production" and second.channels.allowed == ("production",)
    assert second.verification.require_checksum and second.clients[0].name == "rule0"
    assert second.verification.zip_scan is None  # off unless the policy asks for it


def test_an_empty_zip_scan_block_turns_the_scan_on_with_native_code_refused(tmp_path: Path, config: Config) -> None:
    write(tmp_path, "a.yaml", APP_HEAD + "    clients: [{issuer: [ca]}]\n    verification:\n      zip_scan: {}\n")
    rules = load_policies(tmp_path, config).apps["com.example.app"].verification.zip_scan
    assert rules is not None and not rules.allow_native_code


def test_unknown_key(tmp_path: Path, config: Config) -> None:
    path = write(tmp_path, "a.yaml", APP_HEAD + "    clients: [{issuer: [ca]}]\n    colour: red\n")
    expect_one(tmp_path, config, path, "apps[0].colour", "colour:", "unknown key")


def test_unknown_nested_key(tmp_path: Path, config: Config) -> None:
    path = write(tmp_path, "a.yaml", APP_HEAD + "    clients:\n      - issuer: [ca]\n        subjekt: {cn: [x]}\n")
    expect_one(tmp_path, config, path, "apps[0].clients[0].subjekt", "subjekt", "unknown key")


@pytest.mark.parametrize(
    ("snippet", "key_path", "needle"),
    [
        ("    channels:\n      self_set: 'yes'\n", "apps[0].channels.self_set", "self_set"),
        ("    rate_limits:\n      updates_per_minute: '60'\n", "apps[0].rate_limits.updates_per_minute", "updates_per"),
        ("    verification:\n      require_checksum: 1\n", "apps[0].verification.require_checksum", "require_"),
        (
            "    verification:\n      zip_scan: {allow_native_code: 2}\n",
            "apps[0].verification.zip_scan.allow_native_code",
            "zip_scan",
        ),
        ("    versions:\n      max_version_jump: 1.5\n", "apps[0].versions.max_version_jump", "max_version_jump"),
        ("    deny:\n      cert_sha256: " + SHA + "\n", "apps[0].deny.cert_sha256", "cert_sha256"),
    ],
)
def test_wrong_type(tmp_path: Path, config: Config, snippet: str, key_path: str, needle: str) -> None:
    path = write(tmp_path, "a.yaml", APP_HEAD + "    clients: [{issuer: [ca]}]\n" + snippet)
    found = problems(tmp_path, config)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}:{line_of(path, needle)}: {key_path}: "), found


def test_bad_pem_public_key(tmp_path: Path, config: Config) -> None:
    path = write(
        tmp_path,
        "a.yaml",
        APP_HEAD
        + "    clients: [{issuer: [ca]}]\n    verification:\n      public_keys:\n"
        + '        - "-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----\\n"\n',
    )
    expect_one(tmp_path, config, path, "apps[0].verification.public_keys[0]", "BEGIN PUBLIC", "not a PEM public key")


def test_public_key_must_be_rsa(tmp_path: Path, config: Config) -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    path = write(
        tmp_path, "a.yaml", APP_HEAD + "    clients: [{issuer: [ca]}]\n    verification:\n      public_keys: []\n"
    )
    doc = yaml.safe_load(path.read_text())
    doc["apps"][0]["verification"]["public_keys"] = [pem]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    found = problems(tmp_path, config)
    assert len(found) == 1 and "apps[0].verification.public_keys[0]: " in found[0] and "RSA" in found[0]


@pytest.mark.parametrize("pin", ["abc", "AAAA", SPKI[:-4], "not base64 at all!"])
def test_malformed_spki_pin(tmp_path: Path, config: Config, pin: str) -> None:
    path = write(tmp_path, "a.yaml", APP_HEAD + f"    clients:\n      - pin_only: true\n        spki_pins: ['{pin}']\n")
    expect_one(tmp_path, config, path, "apps[0].clients[0].spki_pins[0]", "spki_pins", "SPKI pin")


@pytest.mark.parametrize("pin", ["zz", "ab" * 31, "g" * 64, "ab" * 33])
def test_malformed_cert_sha256(tmp_path: Path, config: Config, pin: str) -> None:
    path = write(
        tmp_path, "a.yaml", APP_HEAD + f"    clients:\n      - pin_only: true\n        cert_sha256: ['{pin}']\n"
    )
    expect_one(tmp_path, config, path, "apps[0].clients[0].cert_sha256[0]", "cert_sha256", "64 hex")


def test_malformed_deny_entries(tmp_path: Path, config: Config) -> None:
    path = write(
        tmp_path,
        "a.yaml",
        APP_HEAD + "    clients: [{issuer: [ca]}]\n    deny:\n      cert_sha256: [nothex]\n      serials: ['0x12zz']\n",
    )
    found = problems(tmp_path, config)
    assert len(found) == 2, found
    assert found[0].startswith(f"{path}:{line_of(path, 'cert_sha256')}: apps[0].deny.cert_sha256[0]: ")
    assert found[1].startswith(f"{path}:{line_of(path, 'serials')}: apps[0].deny.serials[0]: ")


@pytest.mark.parametrize(
    ("snippet", "key_path", "needle"),
    [
        ("      min_version: '1.0'\n", "apps[0].versions.min_version", "min_version"),
        ("      min_version: v1.0.0\n", "apps[0].versions.min_version", "min_version"),
        (
            "      blocked_versions:\n        - 1.2.3\n        - 1.2.x\n",
            "apps[0].versions.blocked_versions[1]",
            "1.2.x",
        ),
        ("      rollback_to: latest\n", "apps[0].versions.rollback_to", "rollback_to"),
    ],
)
def test_malformed_version(tmp_path: Path, config: Config, snippet: str, key_path: str, needle: str) -> None:
    path = write(tmp_path, "a.yaml", APP_HEAD + "    clients: [{issuer: [ca]}]\n    versions:\n" + snippet)
    expect_one(tmp_path, config, path, key_path, needle, "not a semantic version")


def test_versions_are_checked_by_the_parser_the_core_compares_with(tmp_path: Path, config: Config) -> None:
    """A version `check` accepts must parse in the core on every update check (core/versions.parse), and one it
    would not parse is refused here, with file and line, instead of failing every update check later."""
    head = APP_HEAD + "    clients: [{issuer: [ca]}]\n    versions:\n"
    too_long = "1.0.0-" + "a" * 64  # valid semver, 70 characters
    path = write(tmp_path / "long", "a.yaml", head + f"      min_version: {too_long}\n")
    expect_one(tmp_path / "long", config, path, "apps[0].versions.min_version", "min_version", "at most 64 characters")
    longest = "1.0.0-" + "a" * 58
    write(tmp_path / "ok", "a.yaml", head + f"      min_version: {longest}\n      blocked_versions: [{longest}]\n")
    versions = load_policies(tmp_path / "ok", config).apps["com.example.app"].versions
    assert parse_version(versions.min_version or "") == parse_version(versions.blocked[0])
    builtin = write(tmp_path / "builtin", "a.yaml", head + "      rollback_to: builtin\n")
    expect_one(
        tmp_path / "builtin", config, builtin, "apps[0].versions.rollback_to", "rollback_to", "not a semantic version"
    )


def test_rule_with_only_pins_needs_pin_only(tmp_path: Path, config: Config) -> None:
    path = write(tmp_path, "a.yaml", APP_HEAD + f"    clients:\n      - name: kiosk\n        spki_pins: ['{SPKI}']\n")
    expect_one(tmp_path, config, path, "apps[0].clients[0]", "name: kiosk", "pin_only: true")
    # the explicit form loads
    path.write_text(path.read_text() + "        pin_only: true\n")
    assert load_policies(tmp_path, config).apps["com.example.app"].clients[0].pin_only


def test_pin_only_without_pins(tmp_path: Path, config: Config) -> None:
    path = write(
        tmp_path, "a.yaml", APP_HEAD + "    clients:\n      - name: odd\n        issuer: [ca]\n        pin_only: true\n"
    )
    expect_one(tmp_path, config, path, "apps[0].clients[0]", "name: odd", "pin_only")


def test_rule_without_condition(tmp_path: Path, config: Config) -> None:
    path = write(tmp_path, "a.yaml", APP_HEAD + "    clients:\n      - issuer: [ca]\n      - name: everyone\n")
    expect_one(tmp_path, config, path, "apps[0].clients[1]", "name: everyone", "at least one condition")


def test_app_without_clients(tmp_path: Path, config: Config) -> None:
    path = write(tmp_path, "a.yaml", APP_HEAD + "    clients: []\n")
    expect_one(tmp_path, config, path, "apps[0].clients", "clients", "at least 1")


def test_unknown_issuer_ca(tmp_path: Path, config: Config) -> None:
    path = write(
        tmp_path, "a.yaml", APP_HEAD + "    clients:\n      - issuer:\n          - ca\n          - partner-ca\n"
    )
    expect_one(tmp_path, config, path, "apps[0].clients[0].issuer[1]", "partner-ca", "unknown client CA 'partner-ca'")


def test_unknown_origin(tmp_path: Path, config: Config) -> None:
    path = write(
        tmp_path, "a.yaml", "apps:\n  - app_id: com.example.app\n    origin: s3\n    clients: [{issuer: [ca]}]\n"
    )
    expect_one(tmp_path, config, path, "apps[0].origin", "origin: s3", "unknown origin 's3' (configured: local)")


def test_bad_app_id_and_channels(tmp_path: Path, config: Config) -> None:
    path = write(
        tmp_path,
        "a.yaml",
        "apps:\n  - app_id: ../etc\n    origin: local\n    clients: [{issuer: [ca]}]\n"
        "    channels:\n      default: nightly\n      allowed: [production]\n",
    )
    found = problems(tmp_path, config)
    assert len(found) == 2, found
    assert found[0].startswith(f"{path}:{line_of(path, 'app_id')}: apps[0].app_id: ")
    assert found[1].startswith(f"{path}:{line_of(path, 'channels:')}: apps[0].channels: ") and "nightly" in found[1]


def test_app_defined_in_two_files(tmp_path: Path, config: Config) -> None:
    first = write(tmp_path, "a.yaml", APP_HEAD + "    clients: [{issuer: [ca]}]\n")
    second = write(
        tmp_path,
        "b.yaml",
        "apps:\n  - app_id: com.example.other\n    origin: local\n    clients: [{issuer: [ca]}]\n"
        "  - app_id: com.example.app\n    origin: local\n    clients: [{issuer: [ca]}]\n",
    )
    found = problems(tmp_path, config)
    assert len(found) == 1, found
    assert found[0].startswith(f"{second}:5: apps[1].app_id: "), found
    assert f"already defined in {first}:2" in found[0]


def test_all_problems_of_all_files_at_once(tmp_path: Path, config: Config) -> None:
    a = write(
        tmp_path,
        "a.yaml",
        APP_HEAD + "    colour: red\n    clients:\n      - name: nothing\n    versions:\n      min_version: one\n",
    )
    b = write(
        tmp_path,
        "b.yml",
        "apps:\n  - app_id: com.example.b\n    origin: nowhere\n    clients:\n      - issuer: [ghost]\n",
    )
    found = problems(tmp_path, config)
    assert len(found) == 5, found
    assert {line.split(": ", 1)[0] for line in found} == {
        f"{a}:{line_of(a, 'colour')}",
        f"{a}:{line_of(a, 'name: nothing')}",
        f"{a}:{line_of(a, 'min_version')}",
        f"{b}:{line_of(b, 'origin')}",
        f"{b}:{line_of(b, 'issuer')}",
    }


def test_yaml_errors_name_file_and_line(tmp_path: Path, config: Config) -> None:
    dup = write(tmp_path, "dup.yaml", APP_HEAD + "    clients: [{issuer: [ca]}]\n    origin: local\n")
    broken = write(tmp_path, "syntax.yaml", "apps:\n  - app_id: com.example.x\n    origin: [local\n")
    empty = write(tmp_path, "empty.yaml", "")
    found = problems(tmp_path, config)
    assert len(found) == 3, found
    assert any(p.startswith(f"{dup}:5: apps[0].origin: duplicate key") for p in found), found
    assert any(p.startswith(f"{broken}:") and "invalid YAML" in p for p in found), found
    assert any(p.startswith(f"{empty}") for p in found), found


def test_folder_without_policy_files(tmp_path: Path, config: Config) -> None:
    (tmp_path / "README.md").write_text("nothing here")
    found = problems(tmp_path, config)
    assert len(found) == 1 and "no policy files" in found[0]


# ---- policies/README.md ---------------------------------------------------------------------------------------------


def _readme_example() -> str:
    text = (ROOT / "policies" / "README.md").read_text()
    match = re.search(r"^#+\s*Complete example\s*$(.*?)^```ya?ml\n(.*?)^```", text, re.M | re.S)
    assert match, "policies/README.md has no yaml block under the heading 'Complete example'"
    return match.group(2)


def _names(doc: Any) -> tuple[set[str], set[str]]:
    origins, cas = set(), set()
    for app in doc["apps"]:
        origins.add(app["origin"])
        for rule in app.get("clients") or []:
            cas.update(rule.get("issuer") or [])
    return origins, cas


def test_readme_complete_example_loads(tmp_path: Path, pki: Pki) -> None:
    example = _readme_example()
    doc = yaml.safe_load(example)
    origins, cas = _names(doc)
    (tmp_path / "bundles").mkdir()
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={name: {"type": "directory", "path": str(tmp_path / "bundles")} for name in sorted(origins)},
    )
    raw = yaml.safe_load(cfg.read_text())
    raw["listeners"][0]["client_ca"] = [{"file": str(pki.ca_pem), "name": name} for name in sorted(cas or {"ca"})]
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = load_config(cfg)
    folder = tmp_path / "example-policies"
    write(folder, "example.yaml", example)
    policies = load_policies(folder, config)
    assert {app["app_id"] for app in doc["apps"]} == set(policies.apps)


def test_shipped_example_policy_loads(tmp_path: Path, pki: Pki) -> None:
    """policies/example.yaml goes with the shipped gateway.yaml (origin `local`, CA `ca`)."""
    (tmp_path / "bundles").mkdir()
    config = load_config(
        write_config(tmp_path / "gw", pki, origins={"local": {"type": "directory", "path": str(tmp_path / "bundles")}})
    )
    folder = tmp_path / "shipped"
    write(folder, "example.yaml", (ROOT / "policies" / "example.yaml").read_text())
    assert "com.example.app" in load_policies(folder, config).apps


def test_rollout_and_halt_load_with_defaults(tmp_path: Path, config: Config) -> None:
    write(
        tmp_path,
        "a.yaml",
        APP_HEAD + "    clients: [{issuer: [ca]}]\n    rollout:\n      releases:\n        '1.3.0': {percent: 10}\n",
    )
    app = load_policies(tmp_path, config).apps["com.example.app"]
    assert app.rollout is not None and dict(app.rollout.releases) == {"1.3.0": 10.0}
    halt = app.rollout.halt
    assert app.rollout.identity == "certificate"
    assert (halt.failure_ratio, halt.min_devices, halt.window, halt.offer_previous) == (0.2, 50, 3600.0, True)
    write(tmp_path, "a.yaml", APP_HEAD + "    clients: [{issuer: [ca]}]\n    halt: {window: 30m, min_devices: 5}\n")
    app = load_policies(tmp_path, config).apps["com.example.app"]
    assert app.rollout is not None and app.rollout.halt.window == 1800.0 and app.rollout.halt.min_devices == 5
    write(tmp_path, "a.yaml", APP_HEAD + "    clients: [{issuer: [ca]}]\n")
    assert load_policies(tmp_path, config).apps["com.example.app"].rollout is None


@pytest.mark.parametrize(
    ("snippet", "key_path", "needle"),
    [
        (
            "    rollout:\n      releases:\n        '1.3.0': {percent: 101}\n",
            "apps[0].rollout.releases.1.3.0.percent",
            "101",
        ),
        ("    rollout:\n      releases:\n        'one': {percent: 5}\n", "apps[0].rollout.releases.one", "one"),
        ("    rollout:\n      identity: device_id\n", "apps[0].rollout.identity", "identity"),
        ("    halt:\n      failure_ratio: 0\n", "apps[0].halt.failure_ratio", "failure_ratio"),
        ("    halt:\n      window: 1 hour\n", "apps[0].halt.window", "window"),
        ("    halt:\n      window: 10s\n", "apps[0].halt.window", "window"),
        ("    halt:\n      offer_latest: true\n", "apps[0].halt.offer_latest", "offer_latest"),
    ],
)
def test_bad_rollout_and_halt(tmp_path: Path, config: Config, snippet: str, key_path: str, needle: str) -> None:
    path = write(tmp_path, "a.yaml", APP_HEAD + "    clients: [{issuer: [ca]}]\n" + snippet)
    found = problems(tmp_path, config)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}:{line_of(path, needle)}: {key_path}"), found


def test_bundle_urls_load_and_a_bad_one_names_file_line_and_key(tmp_path: Path, config: Config) -> None:
    good = APP_HEAD + "    clients: [{issuer: [ca]}]\n    verification:\n      bundle_urls:\n"
    path = write(tmp_path, "a.yaml", good + "        - https://cdn.example.com/apps/{app_id}/\n")
    app = load_policies(tmp_path, config).apps["com.example.app"]
    assert app.verification.bundle_urls == ("https://cdn.example.com/apps/{app_id}/",)
    path = write(
        tmp_path,
        "a.yaml",
        good + "        - https://cdn.example.com/apps/{app_id}/\n        - http://cdn.example.com/apps/{app_id}\n",
    )
    expect_one(tmp_path, config, path, "apps[0].verification.bundle_urls[1]", "http://", "https://")
