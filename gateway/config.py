"""gateway.yaml: its schema, and loading it into a frozen `Config`.

Owns the declaration of every key of gateway.yaml (pydantic models: strict types, unknown keys are errors,
frozen) and the checks that need the file system: referenced files exist and are readable, a private key matches
its certificate. Files are opened and folders listed as the user that runs the command, so a folder that user
cannot enter is named. Relative paths are relative to the config file's folder. Every problem is reported as
`file:line: key.path: message`; `load_config` reports all problems of a file at once.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo

from gateway.errors import ConfigError, ConfigIssue
from gateway.preflight import readable_file, readable_folder
from gateway.yamlsrc import KeyPath, YamlDoc, read_yaml, validation_issues

if TYPE_CHECKING:
    from gateway.tls import ListenerMaterial

DEFAULT_CONFIG = Path("gateway.yaml")


def _resolve(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, Path):  # built in code (tests, the CLI), not read from YAML
        value = str(value)
    if not isinstance(value, str) or not value:  # an empty string, a number, a list: say what is expected
        raise ValueError(f"must be a path, got {value!r}")
    base = Path((info.context or {}).get("base", "."))
    # absolute, but symlinks kept: a watched `current/tls.crt` must follow a swap of `current` (cert-manager,
    # Kubernetes secrets); a resolved path would stay pinned to the old target
    return Path(os.path.abspath(base / os.path.expanduser(value)))


def _readable_file(path: Path) -> Path:
    readable_file(path)  # opened as the user that runs the gateway: a folder it cannot enter is named
    return path


def _directory(path: Path) -> Path:
    readable_folder(path)
    return path


def _tls_version(value: Any) -> Any:
    # YAML reads 1.2 as a float; accept it as the version string it obviously is
    return f"{value:.1f}" if isinstance(value, float) else value


def _address(value: str) -> str:
    if value == "localhost":
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None
    return value


def _endpoint_path(value: str) -> str:
    parts = value.split("/")
    if not value or "://" in value or "?" in value or "#" in value or ".." in parts or len(value) > 256:
        raise ValueError(f"must be a path relative to the origin url, like 'updates', got {value!r}")
    return value


File = Annotated[Path, BeforeValidator(_resolve), AfterValidator(_readable_file)]
Directory = Annotated[Path, BeforeValidator(_resolve), AfterValidator(_directory)]
LaterPath = Annotated[Path, BeforeValidator(_resolve)]  # created by the gateway if missing
Port = Annotated[int, Field(ge=1, le=65535)]
Address = Annotated[str, AfterValidator(_address)]
Seconds = Annotated[float, Field(gt=0, le=86400)]
PositiveInt = Annotated[int, Field(gt=0)]


class Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)


class ClientCa(Model):
    """A CA that issues client certificates; written as a path, or as a mapping with a name and CRLs."""

    file: File
    name: str | None = None  # default: the file name without extension (ca.pem -> ca)
    crl: list[File] = []  # PEM or DER CRLs issued by this CA

    @pydantic.model_validator(mode="before")
    @classmethod
    def _from_path(cls, data: Any) -> Any:
        return {"file": data} if isinstance(data, str) else data

    @property
    def label(self) -> str:
        return self.name or self.file.stem


class TlsListener(Model):
    """A public mTLS listener."""

    name: str = "main"
    address: Address = "127.0.0.1"
    port: Port = 8443
    cert: File
    key: File
    client_ca: Annotated[list[ClientCa], Field(min_length=1)]
    min_tls: Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)] = "1.2"
    handshake_timeout: Seconds = 10.0
    hsts_max_age: Annotated[int, Field(ge=0)] = 63072000  # two years, as Mozilla recommends
    crl_check: Literal["leaf", "chain"] = "leaf"
    crl_expired: Literal["fail_closed", "keep_serving"] = "fail_closed"
    # listener-wide pins: when set, a client certificate must also match one of them or its connection is cut
    # right after the handshake (cause "pin"); per-app pins belong in policies
    client_spki_pins: list[str] = []
    client_cert_sha256: list[str] = []

    @pydantic.field_validator("client_spki_pins")
    @classmethod
    def _spki(cls, value: list[str]) -> list[str]:
        from gateway.core.pins import check_spki_pin

        return [check_spki_pin(pin) for pin in value]

    @pydantic.field_validator("client_cert_sha256")
    @classmethod
    def _sha(cls, value: list[str]) -> list[str]:
        from gateway.core.pins import normalize_cert_sha256

        return [normalize_cert_sha256(pin) for pin in value]


class AdminTls(Model):
    """Optional mTLS for the admin listener (for scrapers that hold a client certificate)."""

    cert: File
    key: File
    client_ca: Annotated[list[File], Field(min_length=1)]
    # what `ota-gateway health` presents: a client certificate issued by one of `client_ca`, and its key
    health_cert: File | None = None
    health_key: File | None = None

    @pydantic.model_validator(mode="after")
    def _health_pair(self) -> AdminTls:
        if (self.health_cert is None) != (self.health_key is None):
            raise ValueError("health_cert and health_key go together: give both or neither")
        return self


class AdminListener(Model):
    """Admin listener for /metrics, /healthz and /readyz: plain HTTP on loopback by default, or mTLS."""

    enabled: bool = True
    address: Address = "127.0.0.1"
    port: Port = 9901
    tls: AdminTls | None = None
    max_connections: PositiveInt = 32


class DirectoryOriginConfig(Model):
    """Bundles and `releases.yaml` indexes in a local folder: `<path>/<app_id>/releases.yaml`."""

    type: Literal["directory"]
    path: Directory


class HttpsOriginConfig(Model):
    """A remote HTTPS origin: `<url>/<app_id>/releases.json` and the files it names."""

    type: Literal["https"]
    url: str
    ca: File | None = None  # None: the system trust store
    spki_pins: list[str] = []
    connect_timeout: Seconds = 5.0
    read_timeout: Seconds = 30.0
    total_timeout: Seconds = 8.0  # whole API and index calls, and a bundle GET up to its headers
    close_grace: Seconds = 1.0  # after a bundle's body, if the origin announced its close: wait that long for it
    redirect_hosts: list[str] = []
    max_redirects: Annotated[int, Field(ge=0, le=10)] = 3
    index_ttl: Annotated[float, Field(ge=0)] = 5.0
    forward_identity: Literal["none", "client-cert", "xfcc"] = "client-cert"
    # Capgo-style update server endpoints on this origin (relative to `url`); unset: answers from the release index
    updates_path: Annotated[str, AfterValidator(_endpoint_path)] | None = None
    stats_path: Annotated[str, AfterValidator(_endpoint_path)] | None = None
    channel_path: Annotated[str, AfterValidator(_endpoint_path)] | None = None

    @pydantic.field_validator("url")
    @classmethod
    def _https_only(cls, value: str) -> str:
        from yarl import URL

        url = URL(value)
        if url.scheme != "https" or not url.host:
            raise ValueError(f"origin url must be https://host[:port][/path], got {value!r}")
        return value.rstrip("/") + "/"

    @pydantic.field_validator("spki_pins")
    @classmethod
    def _pins(cls, value: list[str]) -> list[str]:
        from gateway.core.pins import check_spki_pin

        for pin in value:
            check_spki_pin(pin)
        return value


OriginConfig = Annotated[DirectoryOriginConfig | HttpsOriginConfig, Field(discriminator="type")]


class Limits(Model):
    chunk_size: Annotated[int, Field(ge=4096, le=16 * 1024 * 1024)] = 1024 * 1024  # bench/README.md: best per CPU
    # memory and time per download (README "Limits"): the client's transport buffer above which origin reads
    # pause, and the minimum rates, both directions, averaged over rate_window seconds of waiting on that side
    client_buffer: Annotated[int, Field(ge=16 * 1024, le=16 * 1024 * 1024)] = 128 * 1024
    origin_min_rate: Annotated[int, Field(ge=0)] = 4096
    client_min_rate: Annotated[int, Field(ge=0)] = 1024
    rate_window: Seconds = 60.0
    max_bundle_bytes: PositiveInt = 1024 * 1024 * 1024
    shutdown_grace: Annotated[float, Field(ge=0, le=3600)] = 30.0
    keepalive_timeout: Seconds = 75.0
    header_timeout: Seconds = 10.0
    body_timeout: Seconds = 30.0
    max_connections: PositiveInt | None = None  # per worker, all listeners; None: connguard.auto_max_connections
    max_handshakes: PositiveInt = 256
    max_handshakes_per_address: PositiveInt = 32


class FrontProxy(Model):
    """A TLS client trusted to vouch for device identities in a header (a CDN doing authenticated origin pulls)."""

    name: str
    spki_pins: list[str] = []
    cert_sha256: list[str] = []
    header: Literal["client-cert", "xfcc"] = "client-cert"

    @pydantic.model_validator(mode="after")
    def _pinned(self) -> FrontProxy:
        from gateway.core.pins import check_spki_pin, normalize_cert_sha256

        if not self.spki_pins and not self.cert_sha256:
            raise ValueError("a front proxy is identified by spki_pins or cert_sha256; give at least one")
        for pin in self.spki_pins:
            check_spki_pin(pin)
        for pin in self.cert_sha256:
            normalize_cert_sha256(pin)
        return self


class PlainHttp(Model):
    """Optional plain-HTTP listener: 308 to https for GET/HEAD, 426 otherwise. It never contacts an origin."""

    enabled: bool = False
    address: Address = "127.0.0.1"
    port: Port = 8080
    https_port: Port | None = None  # port in the redirect; default: the first TLS listener's
    max_connections: PositiveInt = 128


class ReloadConfig(Model):
    watch: bool = True  # poll certificate, CA, CRL, policy and config files for changes
    interval: Annotated[float, Field(ge=0.2, le=3600)] = 2.0


class StateConfig(Model):
    path: LaterPath = Path("state/gateway.sqlite")
    redis_url: str | None = None  # redis:// or rediss://: share marks and rate limits between hosts
    # while the store fails: let requests pass the rate limit (fail_open, as Envoy's failure_mode_deny: false)
    rate_limit_on_failure: Literal["fail_open", "fail_closed"] = "fail_open"
    probe_interval: Annotated[float, Field(ge=0.1, le=3600)] = 10.0  # seconds between write probes of the store

    @pydantic.field_validator("redis_url")
    @classmethod
    def _redis(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {value!r}")
        return value


class TicketKeyConfig(Model):
    """A download-ticket key: an id (named in every ticket it signs) and a file holding at least 32 secret bytes."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")]
    secret_file: File


class TicketsConfig(Model):
    """Download tickets: the first key signs, every key verifies (rotate by adding a key in front)."""

    keys: list[TicketKeyConfig] = []  # empty: a key generated once into the state folder (ticket.key)
    ttl: Annotated[int, Field(ge=10, le=7 * 86400)] = 3600
    public_url: str | None = None  # https://host[:port] devices reach the gateway at; default: the request's Host

    @pydantic.field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        from yarl import URL

        if value is None:
            return None
        url = URL(value)
        if url.scheme != "https" or not url.host or url.query_string or url.fragment:
            raise ValueError(f"public_url must be https://host[:port][/path], got {value!r}")
        return value.rstrip("/")


class AuditConfig(Model):
    path: str = "-"  # "-" is standard output; a file path is relative to the config file's folder
    on_failure: Literal["keep_serving", "fail_closed"] = "keep_serving"  # fail_closed: 503 while lines are lost

    @pydantic.field_validator("path")
    @classmethod
    def _relative_to_config(cls, value: str, info: ValidationInfo) -> str:
        return value if value == "-" else str(_resolve(value, info))


class Config(Model):
    """The whole of gateway.yaml."""

    listeners: Annotated[list[TlsListener], Field(min_length=1)]
    admin: AdminListener = AdminListener()
    origins: Annotated[dict[str, OriginConfig], Field(min_length=1)]
    policies: Directory
    limits: Limits = Limits()
    state: StateConfig = StateConfig()
    audit: AuditConfig = AuditConfig()
    front_proxies: list[FrontProxy] = []
    plain_http: PlainHttp = PlainHttp()
    reload: ReloadConfig = ReloadConfig()
    tickets: TicketsConfig = TicketsConfig()


def _cross_checks(doc: YamlDoc, config: Config, material: dict[str, ListenerMaterial]) -> list[ConfigIssue]:
    """Checks across keys and files; each listener's TLS material is built here (its files read once) into
    `material`."""
    from gateway.tls import ListenerMaterialError, TlsMaterialError, build_material, check_key_pair, load_ca_bundle

    issues = []
    names: dict[str, int] = {}
    for i, lst in enumerate(config.listeners):
        path: KeyPath = ("listeners", i)
        if lst.name in names:
            issues.append(
                doc.issue(
                    (*path, "name"),
                    f"listener name {lst.name!r} already used by listeners[{names[lst.name]}]",
                )
            )
        names[lst.name] = i
        try:
            material[lst.name] = build_material(lst)
        except ListenerMaterialError as exc:
            issues += [doc.issue((*path, *where), message) for where, message in exc.issues]
    issues += _port_clashes(doc, config)
    seen_cas: dict[str, Path] = {}
    for i, lst in enumerate(config.listeners):
        for j, ca in enumerate(lst.client_ca):
            other = seen_cas.setdefault(ca.label, ca.file)
            if other != ca.file:
                issues.append(
                    doc.issue(
                        ("listeners", i, "client_ca", j), f"client CA name {ca.label!r} is already used for {other}"
                    )
                )
    if config.admin.tls is not None:
        try:
            check_key_pair(config.admin.tls.cert, config.admin.tls.key)
        except TlsMaterialError as exc:
            issues.append(doc.issue(("admin", "tls", exc.field), str(exc)))
        if config.admin.tls.health_cert is not None and config.admin.tls.health_key is not None:
            try:
                check_key_pair(config.admin.tls.health_cert, config.admin.tls.health_key)
            except TlsMaterialError as exc:
                field = "health_cert" if exc.field == "cert" else "health_key"
                issues.append(doc.issue(("admin", "tls", field), str(exc)))
        for j, ca_file in enumerate(config.admin.tls.client_ca):
            try:
                load_ca_bundle(ca_file)
            except TlsMaterialError as exc:
                issues.append(doc.issue(("admin", "tls", "client_ca", j), str(exc)))
    issues += _ticket_key_checks(doc, config)
    for name, origin in config.origins.items():
        if isinstance(origin, HttpsOriginConfig) and origin.ca is not None:
            try:
                load_ca_bundle(origin.ca)
            except TlsMaterialError as exc:
                issues.append(doc.issue(("origins", name, "ca"), str(exc)))
    return issues


def _port_clashes(doc: YamlDoc, config: Config) -> list[ConfigIssue]:
    """Two listeners (TLS, admin, plain HTTP) whose addresses take the same port: each later one is named."""
    from gateway.core.startup import endpoint_text, endpoints_overlap

    taken: list[tuple[tuple[str, int], str]] = []
    issues = []
    ends: list[tuple[KeyPath, tuple[str, int], str]] = [
        (("listeners", i), (lst.address, lst.port), f"a TLS listener (listeners[{i}], {lst.name})")
        for i, lst in enumerate(config.listeners)
    ]
    if config.admin.enabled:
        ends.append((("admin",), (config.admin.address, config.admin.port), "the admin listener"))
    if config.plain_http.enabled:
        ends.append((("plain_http",), (config.plain_http.address, config.plain_http.port), "the plain_http listener"))
    for path, end, owner in ends:
        clash = next((other for seen, other in taken if endpoints_overlap(end, seen)), None)
        if clash is not None:
            where = endpoint_text(*end)
            issues.append(doc.issue((*path, "port"), f"{where} is also used by {clash}; listeners cannot share a port"))
        taken.append((end, owner))
    return issues


def _ticket_key_checks(doc: YamlDoc, config: Config) -> list[ConfigIssue]:
    from gateway.core.tickets import MIN_SECRET_BYTES

    issues = []
    seen: set[str] = set()
    for i, key in enumerate(config.tickets.keys):
        if key.id in seen:
            issues.append(doc.issue(("tickets", "keys", i, "id"), f"ticket key id {key.id!r} is used twice"))
        seen.add(key.id)
        try:
            size = len(key.secret_file.read_bytes().strip())
        except OSError as exc:
            issues.append(doc.issue(("tickets", "keys", i, "secret_file"), f"cannot read: {exc.strerror}"))
            continue
        if size < MIN_SECRET_BYTES:
            issues.append(
                doc.issue(
                    ("tickets", "keys", i, "secret_file"),
                    f"holds {size} bytes; a ticket key needs at least {MIN_SECRET_BYTES} (e.g. openssl rand -hex 32)",
                )
            )
    return issues


def client_ca_names(config: Config) -> dict[str, Path]:
    """Client CA name -> CA file, over all listeners."""
    return {ca.label: ca.file for lst in config.listeners for ca in lst.client_ca}


def load_config(path: Path) -> Config:
    """Read, validate and check gateway.yaml; raise `ConfigError` with every problem found."""
    return load_config_and_material(path)[0]


def load_config_and_material(path: Path) -> tuple[Config, dict[str, ListenerMaterial]]:
    """`load_config`, also returning each listener's TLS material (by listener name), loaded while checking it."""
    doc = read_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError([doc.issue((), "the top level must be a mapping of keys")])
    context = {"base": os.path.dirname(os.path.abspath(path))}
    try:
        config = Config.model_validate(doc.data, context=context)
    except pydantic.ValidationError as exc:
        raise ConfigError(validation_issues(doc, exc)) from None
    material: dict[str, ListenerMaterial] = {}
    issues = _cross_checks(doc, config, material)
    if issues:
        raise ConfigError(issues)
    return config, material
