"""gateway.yaml and policy files: every class of mistake is one line `<file>:<line>: <key.path>: <message>`.

Each case starts from a valid configuration written line by line (so line numbers are known), breaks one thing,
and checks the error through `load_config`/`load_all` (ConfigError) and through `ota-gateway check` (in process
for every case, as a real subprocess for a good config, a bad one and a bad policy).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import Config, load_config
from gateway.errors import ConfigError, ConfigIssue
from gateway.reload import load_all
from tests.support import Pki, free_port

Edit = Callable[[list[str]], None]


@dataclass
class Layout:
    """A config folder: gateway.yaml, policies/apps.yaml and an origin folder, written from lists of lines."""

    dir: Path
    pki: Pki
    port: int
    admin_port: int

    @property
    def config(self) -> Path:
        return self.dir / "gateway.yaml"

    @property
    def policy(self) -> Path:
        return self.dir / "policies" / "apps.yaml"

    def config_lines(self) -> list[str]:
        p = self.pki
        return [
            "listeners:",  # 1
            "  - name: main",  # 2
            "    address: 127.0.0.1",  # 3
            f"    port: {self.port}",  # 4
            f"    cert: {p.server.cert}",  # 5
            f"    key: {p.server.key}",  # 6
            f"    client_ca: [{p.ca_pem}]",  # 7
            '    min_tls: "1.2"',  # 8
            "admin:",  # 9
            "  address: 127.0.0.1",  # 10
            f"  port: {self.admin_port}",  # 11
            "origins:",  # 12
            "  local:",  # 13
            "    type: directory",  # 14
            "    path: origin",  # 15
            "policies: policies",  # 16
            "audit:",  # 17
            "  path: audit.log",  # 18
        ]

    @staticmethod
    def policy_lines() -> list[str]:
        return [
            "apps:",  # 1
            "  - app_id: com.example.app",  # 2
            "    origin: local",  # 3
            "    channels:",  # 4
            "      default: production",  # 5
            "      allowed: [production, beta]",  # 6
            "    clients:",  # 7
            "      - name: fleet",  # 8
            "        issuer: [ca]",  # 9
        ]

    def write(self, config_edit: Edit | None = None, policy_edit: Edit | None = None) -> Path:
        lines = self.config_lines()
        if config_edit:
            config_edit(lines)
        self.config.write_text("\n".join(lines) + "\n")
        lines = self.policy_lines()
        if policy_edit:
            policy_edit(lines)
        self.policy.write_text("\n".join(lines) + "\n")
        return self.config


@pytest.fixture
def layout(tmp_path: Path, pki: Pki) -> Layout:
    (tmp_path / "policies").mkdir()
    (tmp_path / "origin").mkdir()
    return Layout(tmp_path, pki, free_port(), free_port())


def replace(line: int, text: str) -> Edit:
    def edit(lines: list[str]) -> None:
        lines[line - 1] = text

    return edit


def insert(after: int, *texts: str) -> Edit:
    def edit(lines: list[str]) -> None:
        lines[after:after] = list(texts)

    return edit


def delete(line: int) -> Edit:
    def edit(lines: list[str]) -> None:
        del lines[line - 1]

    return edit


def both(*edits: Edit) -> Edit:
    def edit(lines: list[str]) -> None:
        for e in edits:
            e(lines)

    return edit


def https_origin(*extra: str, url: str = "https://cdn.example.com/") -> Edit:
    """Replace the directory origin (lines 13-15) with an https origin named cdn; extra lines follow line 15."""

    def edit(lines: list[str]) -> None:
        lines[12:15] = ["  cdn:", "    type: https", f"    url: {url}", *extra]

    return edit


def only_issue(exc: ConfigError) -> ConfigIssue:
    assert len(exc.issues) == 1, str(exc)
    return exc.issues[0]


def expect_line(issue: ConfigIssue, source: Path, line: int | None, key: str, fragment: str) -> str:
    """Check one issue and its rendering; return the rendered line."""
    assert (issue.source, issue.line, issue.key_path) == (str(source), line, key), str(issue)
    assert fragment in issue.message, str(issue)
    where = f"{source}:{line}" if line else f"{source}"
    rendered = f"{where}: {key}: {issue.message}" if key else f"{where}: {issue.message}"
    assert str(issue) == rendered
    assert "\n" not in rendered
    return rendered


def check_cli(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main(["check", "--config", str(config)])
    out, err = capsys.readouterr()
    return code, err.splitlines(), out


# --- gateway.yaml ------------------------------------------------------------------------------------------------


def second_listener(address: str) -> list[str]:
    """A second TLS listener (6 lines, inserted after line 8) on the first one's port, `{port}` filled later."""
    return [
        "  - name: second",
        f"    address: {address}",
        "    port: {port}",
        "    cert: {server_cert}",
        "    key: {server_key}",
        "    client_ca: [{ca}]",
    ]


CONFIG_CASES: list[tuple[str, Edit, int | None, str, str]] = [
    ("unknown top-level key", insert(18, "colour: blue"), 19, "colour", "unknown key"),
    ("unknown nested key", replace(8, '    min_tsl: "1.2"'), 8, "listeners[0].min_tsl", "unknown key"),
    ("unknown key in admin", insert(11, "  prot: 9"), 12, "admin.prot", "unknown key"),
    ("port as a string", replace(4, '    port: "8443"'), 4, "listeners[0].port", "valid integer"),
    ("port out of range", replace(4, "    port: 70000"), 4, "listeners[0].port", "less than or equal to 65535"),
    ("client_ca not a list", replace(7, "    client_ca: {ca}"), 7, "listeners[0].client_ca", "valid list"),
    ("missing listeners[0].cert", delete(5), 2, "listeners[0].cert", "required key is missing"),
    ("missing policies", delete(16), 1, "policies", "required key is missing"),  # no line of its own
    ("missing file", replace(5, "    cert: /nonexistent/server.pem"), 5, "listeners[0].cert", "file not found"),
    ("not a file", replace(5, "    cert: /"), 5, "listeners[0].cert", "not a file"),
    ("empty path", replace(5, '    cert: ""'), 5, "listeners[0].cert", "must be a path, got ''"),
    ("path as a number", replace(5, "    cert: 5"), 5, "listeners[0].cert", "must be a path, got 5"),
    ("key of another certificate", replace(6, "    key: {client_key}"), 6, "listeners[0].key", "does not match"),
    (
        "CA bundle that is not a CA",
        replace(7, "    client_ca: [{server_cert}]"),
        7,
        "listeners[0].client_ca[0]",
        "not a CA",
    ),
    (
        "CA file without a certificate",
        replace(7, "    client_ca: [{server_key}]"),
        7,
        "listeners[0].client_ca[0]",
        "no PEM certificate",
    ),
    ("bad YAML syntax", replace(3, "    address: 127.0.0.1: x"), 3, "", "invalid YAML"),
    ("duplicate key", insert(4, "    port: 9443"), 5, "listeners[0].port", "duplicate key (first defined on line 4)"),
    ("http:// origin url", https_origin(url="http://cdn.example.com/"), 15, "origins.cdn.url", "must be https://"),
    ("origin url without host", https_origin(url="https:///x"), 15, "origins.cdn.url", "must be https://"),
    (
        "bad SPKI pin",
        https_origin("    spki_pins: [not-a-pin]"),
        16,
        "origins.cdn.spki_pins",
        "SPKI pin must be base64",
    ),
    ("unknown origin type", replace(14, "    type: ftp"), 13, "origins.local", "tag 'ftp'"),
    ("min_tls 1.1 (string)", replace(8, '    min_tls: "1.1"'), 8, "listeners[0].min_tls", "'1.2' or '1.3'"),
    ("min_tls 1.1 (number)", replace(8, "    min_tls: 1.1"), 8, "listeners[0].min_tls", "'1.2' or '1.3'"),
    ("admin port = listener port", replace(11, "  port: {port}"), 11, "admin.port", "also used by a TLS listener"),
    (
        "admin on 0.0.0.0 and the listener's port",
        both(replace(10, "  address: 0.0.0.0"), replace(11, "  port: {port}")),
        11,
        "admin.port",
        "also used by a TLS listener (listeners[0], main)",
    ),
    (
        "two TLS listeners on one address and port",
        insert(8, *second_listener("127.0.0.1")),
        11,
        "listeners[1].port",
        "127.0.0.1:{port} is also used by a TLS listener (listeners[0], main); listeners cannot share a port",
    ),
    (
        "a TLS listener on 0.0.0.0 and the port of one on 127.0.0.1",
        insert(8, *second_listener("0.0.0.0")),
        11,
        "listeners[1].port",
        "0.0.0.0:{port} is also used by a TLS listener (listeners[0], main)",
    ),
    (
        "plain_http on the admin port",
        insert(18, "plain_http:", "  enabled: true", "  port: {admin_port}"),
        21,
        "plain_http.port",
        "also used by the admin listener",
    ),
    ("origin folder missing", replace(15, "    path: nowhere"), 15, "origins.local.path", "directory not found"),
    ("top level not a mapping", lambda lines: lines.__setitem__(slice(None), ["- a", "- b"]), 1, "", "mapping"),
    (
        "client buffer too small",
        insert(18, "limits:", "  client_buffer: 1024"),
        20,
        "limits.client_buffer",
        "greater than or equal to 16384",
    ),
    (
        "negative minimum rate",
        insert(18, "limits:", "  origin_min_rate: -1"),
        20,
        "limits.origin_min_rate",
        "greater than or equal to 0",
    ),
    ("rate window of 0", insert(18, "limits:", "  rate_window: 0"), 20, "limits.rate_window", "greater than 0"),
    ("total_timeout of 0", https_origin("    total_timeout: 0"), 16, "origins.cdn.total_timeout", "greater than 0"),
]


def test_listeners_on_other_addresses_may_use_the_same_port_number(layout: Layout) -> None:
    """The negative twin of the port clashes above: 127.0.0.1 and 127.0.0.2, or 0.0.0.0 and :: (IPv6-only
    sockets), are different sockets on one port number."""
    config = layout.write(
        _fill(both(insert(8, *second_listener("127.0.0.2")), insert(14, *second_listener("::"))), layout)
    )
    text = config.read_text().replace("name: second\n    address: ::", "name: third\n    address: '::'")
    config.write_text(text)
    loaded = load_config(config)
    assert [(lst.address, lst.port) for lst in loaded.listeners] == [
        ("127.0.0.1", layout.port),
        ("127.0.0.2", layout.port),
        ("::", layout.port),
    ]


def _fill(edit: Edit, layout: Layout) -> Edit:
    """Let a case name PKI files by placeholder."""
    p = layout.pki
    values = {
        "ca": str(p.ca_pem),
        "client_key": str(p.client.key),
        "server_cert": str(p.server.cert),
        "server_key": str(p.server.key),
        "port": str(layout.port),
        "admin_port": str(layout.admin_port),
    }

    def filled(lines: list[str]) -> None:
        edit(lines)
        lines[:] = [line.format(**values) if "{" in line else line for line in lines]

    return filled


@pytest.mark.parametrize(
    ("edit", "line", "key", "fragment"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_gateway_yaml_is_one_line(
    layout: Layout, capsys: pytest.CaptureFixture[str], edit: Edit, line: int | None, key: str, fragment: str
) -> None:
    config = layout.write(_fill(edit, layout))
    with pytest.raises(ConfigError) as info:
        load_config(config)
    rendered = expect_line(only_issue(info.value), config, line, key, fragment.replace("{port}", str(layout.port)))
    code, err, out = check_cli(config, capsys)
    assert code == 2
    assert err == [f"ota-gateway: {rendered}"]
    assert out == ""


def test_unreadable_file(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: a chmod 000 file is still readable, so there is no error to report")
    cert = layout.dir / "server.pem"
    shutil.copy(layout.pki.server.cert, cert)
    cert.chmod(0)
    try:
        config = layout.write(replace(5, f"    cert: {cert}"))
        with pytest.raises(ConfigError) as info:
            load_config(config)
        rendered = expect_line(only_issue(info.value), config, 5, "listeners[0].cert", "permission denied")
        code, err, _ = check_cli(config, capsys)
        assert (code, err) == (2, [f"ota-gateway: {rendered}"])
    finally:
        cert.chmod(0o600)


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    issue = only_issue(info.value)
    assert str(issue) == f"{missing}: cannot read: No such file or directory"
    code, err, _ = check_cli(missing, capsys)
    assert (code, err) == (2, [f"ota-gateway: {missing}: cannot read: No such file or directory"])


def test_config_that_is_not_utf8(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    layout.write()
    layout.config.write_bytes(b"listeners: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_config(layout.config)
    assert "not UTF-8" in str(only_issue(info.value))


def test_empty_config(layout: Layout) -> None:
    layout.write()
    layout.config.write_text("")
    with pytest.raises(ConfigError) as info:
        load_config(layout.config)
    assert only_issue(info.value).message == "the top level must be a mapping of keys"


def test_relative_paths_are_relative_to_the_config_folder(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    config = layout.write()
    monkeypatch.chdir("/")
    loaded = load_config(config)
    assert isinstance(loaded, Config)
    assert loaded.policies == layout.dir / "policies"
    origin = loaded.origins["local"]
    assert getattr(origin, "path", None) == layout.dir / "origin"


def test_all_problems_in_a_file_are_reported_at_once(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    config = layout.write(both(replace(4, '    port: "8443"'), insert(18, "colour: blue")))
    with pytest.raises(ConfigError) as info:
        load_config(config)
    rendered = sorted(str(i) for i in info.value.issues)
    assert rendered == sorted(
        [
            f"{config}:4: listeners[0].port: Input should be a valid integer (got '8443')",
            f"{config}:19: colour: unknown key",
        ]
    )
    code, err, _ = check_cli(config, capsys)
    assert code == 2
    assert sorted(err) == [f"ota-gateway: {line}" for line in rendered]


def test_cross_checks_are_reported_together(layout: Layout) -> None:
    edit = both(replace(6, f"    key: {layout.pki.client.key}"), replace(11, f"  port: {layout.port}"))
    config = layout.write(edit)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert sorted((i.line, i.key_path) for i in info.value.issues) == [(6, "listeners[0].key"), (11, "admin.port")]


# --- policy files ------------------------------------------------------------------------------------------------

POLICY_CASES: list[tuple[str, Edit, int, str, str]] = [
    (
        "unknown origin",
        replace(3, "    origin: nope"),
        3,
        "apps[0].origin",
        "unknown origin 'nope' (configured: local)",
    ),
    ("bad app_id", replace(2, "  - app_id: myapp"), 2, "apps[0].app_id", "reverse-domain"),
    ("unknown key", insert(3, "    colour: blue"), 4, "apps[0].colour", "unknown key"),
    ("unknown nested key", insert(5, "      defualt: beta"), 6, "apps[0].channels.defualt", "unknown key"),
    ("unknown client CA", replace(9, "        issuer: [nope]"), 9, "apps[0].clients[0].issuer[0]", "unknown client CA"),
    ("default channel not allowed", replace(5, "      default: alpha"), 4, "apps[0].channels", "not in allowed"),
    ("no apps", lambda lines: lines.__setitem__(slice(None), ["apps: []"]), 1, "apps", "at least 1 item"),
    ("policy syntax error", replace(3, "    origin: [local"), 4, "", "invalid YAML"),
    ("policy duplicate key", insert(3, "    origin: local"), 4, "apps[0].origin", "duplicate key"),
    (
        "version the core cannot parse",  # valid semver, but longer than core/versions accepts
        insert(9, "    versions:", "      min_version: 1.0.0-" + "a" * 64),
        11,
        "apps[0].versions.min_version",
        "at most 64 characters",
    ),
]


@pytest.mark.parametrize(
    ("edit", "line", "key", "fragment"), [c[1:] for c in POLICY_CASES], ids=[c[0] for c in POLICY_CASES]
)
def test_bad_policy_is_one_line(
    layout: Layout, capsys: pytest.CaptureFixture[str], edit: Edit, line: int, key: str, fragment: str
) -> None:
    config = layout.write(policy_edit=edit)
    load_config(config)  # gateway.yaml itself is fine
    with pytest.raises(ConfigError) as info:
        load_all(config)
    rendered = expect_line(only_issue(info.value), layout.policy, line, key, fragment)
    code, err, out = check_cli(config, capsys)
    assert (code, err, out) == (2, [f"ota-gateway: {rendered}"], "")


def test_longest_version_the_core_parses_passes_check(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    longest = "1.0.0-" + "a" * 58
    config = layout.write(policy_edit=insert(9, "    versions:", f"      min_version: {longest}"))
    assert load_all(config).policies.apps["com.example.app"].versions.min_version == longest
    code, err, _ = check_cli(config, capsys)
    assert (code, err) == (0, [])


def test_no_policy_files(layout: Layout, capsys: pytest.CaptureFixture[str]) -> None:
    config = layout.write()
    layout.policy.unlink()
    (layout.dir / "policies" / "README.md").write_text("not a policy\n")
    with pytest.raises(ConfigError) as info:
        load_all(config)
    folder = layout.dir / "policies"
    issue = only_issue(info.value)
    assert str(issue) == f"{folder}: no policy files (*.yaml) in this folder"
    code, err, _ = check_cli(config, capsys)
    assert (code, err) == (2, [f"ota-gateway: {folder}: no policy files (*.yaml) in this folder"])


def test_problems_in_several_policy_files_are_reported_at_once(layout: Layout) -> None:
    config = layout.write(policy_edit=replace(3, "    origin: nope"))
    other = layout.dir / "policies" / "other.yaml"
    other.write_text(
        "apps:\n  - app_id: com.example.other\n    origin: local\n    clients: [{issuer: [ca]}]\n    x: 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_all(config)
    assert sorted(str(i) for i in info.value.issues) == sorted(
        [
            f"{layout.policy}:3: apps[0].origin: unknown origin 'nope' (configured: local)",
            f"{other}:5: apps[0].x: unknown key",
        ]
    )


def test_app_defined_twice(layout: Layout) -> None:
    config = layout.write()
    other = layout.dir / "policies" / "zz.yaml"
    other.write_text("apps:\n  - app_id: com.example.app\n    origin: local\n    clients: [{issuer: [ca]}]\n")
    with pytest.raises(ConfigError) as info:
        load_all(config)
    issue = only_issue(info.value)
    expect_line(issue, other, 2, "apps[0].app_id", f"already defined in {layout.policy}:2")


# --- the CLI as a real subprocess --------------------------------------------------------------------------------


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_subprocess_good_config(layout: Layout) -> None:
    config = layout.write()
    done = _check(config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ota-gateway: {config}: OK")
    assert "1 app(s)" in done.stdout
    assert done.stderr == ""


def test_check_subprocess_bad_config(layout: Layout) -> None:
    config = layout.write(both(replace(4, '    port: "8443"'), insert(18, "colour: blue")))
    done = _check(config)
    assert done.returncode == 2
    assert done.stdout == ""
    assert sorted(done.stderr.splitlines()) == sorted(
        [
            f"ota-gateway: {config}:4: listeners[0].port: Input should be a valid integer (got '8443')",
            f"ota-gateway: {config}:19: colour: unknown key",
        ]
    )


def test_check_subprocess_bad_policy(layout: Layout) -> None:
    config = layout.write(policy_edit=replace(2, "  - app_id: myapp"))
    done = _check(config)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"ota-gateway: {layout.policy}:2: apps[0].app_id: app_id must be a reverse-domain")


def test_audit_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    from gateway.config import AuditConfig

    config = AuditConfig.model_validate({"path": "logs/audit.log"}, context={"base": str(tmp_path)})
    assert config.path == str(tmp_path / "logs" / "audit.log")
    assert AuditConfig.model_validate({"path": "-"}, context={"base": str(tmp_path)}).path == "-"


def test_listener_tls_files_are_read_once_per_load(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking the config and building the listener's TLS material share one read of each file."""
    import gateway.tls

    reads: list[Path] = []
    real_read = gateway.tls._read

    def counting_read(path: Path, field: str) -> bytes:
        reads.append(Path(path))
        return real_read(path, field)

    monkeypatch.setattr(gateway.tls, "_read", counting_read)
    loaded = load_all(layout.write())
    assert set(loaded.material) == {lst.name for lst in loaded.config.listeners}
    lst = loaded.config.listeners[0]
    files = [Path(lst.cert), Path(lst.key), *(Path(ca.file) for ca in lst.client_ca)]
    assert sorted(map(str, reads)) == sorted(map(str, files))
