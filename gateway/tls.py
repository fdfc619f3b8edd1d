"""TLS material and contexts: the server's mTLS context and the upstream context for HTTPS origins.

Owns: reading PEM files (certificates, CA bundles, private keys) with errors that say which file and what is wrong,
checking that a key matches its certificate, and building `ssl.SSLContext`s with the gateway's settings:
client certificates required, TLS 1.2 minimum (1.3 preferred), Mozilla "intermediate" ciphers and key exchange
groups (X25519, P-256, P-384), no compression, no renegotiation, and **no session resumption** in either version:
no TLS 1.3 tickets, no TLS 1.2 tickets, no TLS 1.2 session-ID cache. Every connection is a full handshake, so
OpenSSL checks the client's chain against the CAs and CRLs of the current context every time, whatever a reload
changed, and no worker holds sessions in memory (bench/README.md, "Handshakes", has the measurements behind this).
A server sends the certificate chain of its `cert` file as it is: OpenSSL builds none from the client CAs (it would
otherwise, in every handshake, verify the server's own certificate against them and send along the CA that issued it,
when that CA also issues client certificates).
Towards HTTPS origins the gateway is the TLS client: Python's default client context (certificate and host name
checked), TLS 1.2 minimum, the same suites as Python's default but AES-128-GCM offered first in both versions
(`ORIGIN_TLS13_SUITES`, `prefer_aes128`), which an origin that follows the client's order picks.
Four of these settings (the group list, the session cache, the chain, the TLS 1.3 suites) are not offered by Python
3.11's `ssl` module and are made through libssl itself (`_LibSsl`). It never accepts connections; `listener.py` does.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import ssl
import sys
import tempfile
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config import AdminTls, HttpsOriginConfig, TlsListener
from gateway.core.handshake import alert_tells_client, classify
from gateway.core.revocation import RevocationList, RevocationSet

# Mozilla server-side TLS guidelines, "intermediate" configuration (TLS 1.2 suites; TLS 1.3 suites are
# OpenSSL's defaults, which match the guideline). DHE suites are left out: no DH parameters are configured.
INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

# Mozilla "intermediate" key exchange groups, in its order. X25519 first: the key share most clients send in their
# first TLS 1.3 ClientHello (OpenSSL, BoringSSL, Apple); a server without it answers each with a HelloRetryRequest,
# a second round trip and a second key share. P-256 for clients without X25519 (Java 8, Android 6).
KEY_EXCHANGE_GROUPS = "X25519:P-256:P-384"

# The TLS 1.3 suites offered to HTTPS origins, in order: OpenSSL's default three, AES-128-GCM first. A bundle's
# bytes are decrypted from the origin and encrypted again to the client, and AES-128-GCM costs 15-20 % less CPU per
# byte than AES-256-GCM here (bench/README.md, "The verified stream, session 3"); an origin that offers only
# AES-256-GCM or ChaCha20 still gets its suite.
ORIGIN_TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsMaterialError(ValueError):
    """A PEM file that cannot be used; `field` names the config key it belongs to (cert, key, client_ca, ca)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _LibSsl:
    """The libssl calls the `ssl` module of Python 3.11 does not offer, made through ctypes on the very libssl `_ssl`
    is linked to: the key exchange group list, the TLS 1.3 suites, the session cache mode and the mode flags of an
    `SSLContext`'s `SSL_CTX`.

    The `SSL_CTX *` is read from the `SSLContext` object (CPython's `PySSLContext` starts with it, right after the
    object header) and checked before any use: libssl must report the same options and verify mode the `ssl` module
    does for that context, else nothing is changed and `ssl.SSLError` is raised (the listener then refuses to start:
    "TLS setup failed")."""

    # openssl/ssl.h
    MODE = 33  # SSL_CTRL_MODE: ORs the flags in, returns the new mode
    MODE_NO_AUTO_CHAIN = 0x8
    SET_SESS_CACHE_MODE = 44
    GET_SESS_CACHE_MODE = 45
    SET_GROUPS_LIST = 92
    SESS_CACHE_OFF = 0
    VERIFY = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}  # SSL_VERIFY_PEER | FAIL_IF_NO_PEER_CERT

    def __init__(self) -> None:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)  # symbols resolve through _ssl's own libssl
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.restype = ctypes.c_long
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.restype = ctypes.c_uint64
        self.get_options.argtypes = [ctypes.c_void_p]
        self.get_verify_mode = lib.SSL_CTX_get_verify_mode
        self.get_verify_mode.restype = ctypes.c_int
        self.get_verify_mode.argtypes = [ctypes.c_void_p]
        self.set_ciphersuites_fn = lib.SSL_CTX_set_ciphersuites
        self.set_ciphersuites_fn.restype = ctypes.c_int
        self.set_ciphersuites_fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

    def handle(self, ctx: ssl.SSLContext) -> int:
        """The `SSL_CTX *` behind `ctx`, once libssl confirms it is that context."""
        if sys.implementation.name != "cpython":
            raise ssl.SSLError(f"cannot reach libssl from {sys.implementation.name}: CPython is required")
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not ptr or self.get_options(ptr) != ctx.options or self.get_verify_mode(ptr) != self.VERIFY[ctx.verify_mode]:
            raise ssl.SSLError("cannot reach the SSL_CTX of an ssl.SSLContext (unexpected CPython layout)")
        return ptr

    def set_groups(self, ctx: ssl.SSLContext, groups: str) -> None:
        if self.ctrl(self.handle(ctx), self.SET_GROUPS_LIST, 0, groups.encode()) != 1:
            raise ssl.SSLError(f"libssl refused the key exchange groups {groups}")

    def set_ciphersuites(self, ctx: ssl.SSLContext, suites: str) -> None:
        """The TLS 1.3 suites of `ctx`, in order of preference (what `set_ciphers` is for TLS 1.2)."""
        if self.set_ciphersuites_fn(self.handle(ctx), suites.encode()) != 1:
            raise ssl.SSLError(f"libssl refused the TLS 1.3 suites {suites}")
        got = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
        if got != suites.split(":"):
            raise ssl.SSLError(f"libssl set the TLS 1.3 suites {':'.join(got)}, not {suites}")

    def session_cache_mode(self, ctx: ssl.SSLContext) -> int:
        return int(self.ctrl(self.handle(ctx), self.GET_SESS_CACHE_MODE, 0, None))

    def disable_session_cache(self, ctx: ssl.SSLContext) -> None:
        """No server-side session cache: TLS 1.2 ServerHellos carry no session ID, none is ever looked up."""
        ptr = self.handle(ctx)
        self.ctrl(ptr, self.SET_SESS_CACHE_MODE, self.SESS_CACHE_OFF, None)
        if self.ctrl(ptr, self.GET_SESS_CACHE_MODE, 0, None) != self.SESS_CACHE_OFF:
            raise ssl.SSLError("libssl kept its session cache on")

    def mode(self, ctx: ssl.SSLContext) -> int:
        return int(self.ctrl(self.handle(ctx), self.MODE, 0, None))  # ORing in no flag reads the mode

    def no_auto_chain(self, ctx: ssl.SSLContext) -> None:
        """Send the certificate chain as loaded (`load_cert_chain`), never one built from the verify store.

        Without this flag OpenSSL, for a certificate loaded without extra chain certificates, runs
        `X509_verify_cert` on the server's own certificate in every handshake and sends what it found: with a server
        certificate issued by a client CA, that CA (about 450 bytes, and one ECDSA verification per handshake)."""
        if not self.ctrl(self.handle(ctx), self.MODE, self.MODE_NO_AUTO_CHAIN, None) & self.MODE_NO_AUTO_CHAIN:
            raise ssl.SSLError("libssl kept building certificate chains")


_LIBSSL: _LibSsl | None = None


def libssl() -> _LibSsl:
    global _LIBSSL
    if _LIBSSL is None:
        try:
            _LIBSSL = _LibSsl()
        except (OSError, AttributeError) as exc:
            raise ssl.SSLError(f"cannot load libssl functions: {exc}") from None
    return _LIBSSL


def _common_settings(ctx: ssl.SSLContext) -> None:
    """What every mTLS server context of the gateway has: suites, groups, no compression, no renegotiation, no
    resumption of any kind (TLS 1.3 tickets, TLS 1.2 tickets, TLS 1.2 session IDs), the chain of the `cert` file
    sent as it is."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    ctx.verify_mode = ssl.CERT_REQUIRED
    lib = libssl()
    lib.set_groups(ctx, KEY_EXCHANGE_GROUPS)
    lib.disable_session_cache(ctx)
    lib.no_auto_chain(ctx)


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsMaterialError(field, f"cannot read {path}: {exc.strerror or exc}") from None


def load_certificates(path: Path, field: str) -> list[x509.Certificate]:
    data = _read(path, field)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TlsMaterialError(field, f"no PEM certificate in {path}")
    return certs


def load_ca_bundle(path: Path, field: str = "client_ca") -> list[x509.Certificate]:
    certs = load_certificates(path, field)
    for cert in certs:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise TlsMaterialError(
                field, f"{path} holds a certificate that is not a CA: {cert.subject.rfc4514_string()}"
            )
    return certs


def check_key_pair(cert_path: Path, key_path: Path) -> x509.Certificate:
    """The leaf of `cert_path`; raise `TlsMaterialError` unless `key_path` holds its unencrypted private key."""
    leaf = load_certificates(cert_path, "cert")[0]
    data = _read(key_path, "key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsMaterialError("key", f"{key_path} is encrypted; the gateway needs an unencrypted key") from None
    except ValueError:
        raise TlsMaterialError("key", f"no PEM private key in {key_path}") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, pub) != leaf.public_key().public_bytes(der, pub):
        raise TlsMaterialError("key", f"{key_path} does not match the certificate in {cert_path}")
    return leaf


def load_crl(
    path: Path, ca_file: Path, field: str = "crl", cas: list[x509.Certificate] | None = None
) -> x509.CertificateRevocationList:
    """A PEM or DER CRL, which must be signed by the CA in `ca_file` (`cas`: that file's certificates, if loaded)."""
    data = _read(path, field)
    try:
        crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
    except ValueError:
        raise TlsMaterialError(field, f"{path} is not a PEM or DER CRL") from None
    for ca in cas if cas is not None else load_ca_bundle(ca_file):
        if ca.subject == crl.issuer and crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            return crl
    raise TlsMaterialError(field, f"{path} is not signed by the CA in {ca_file} (issuer {crl.issuer.rfc4514_string()})")


@dataclass(frozen=True)
class Expiry:
    """One certificate or CRL whose end of validity is exported as a metric."""

    kind: str  # server_cert | client_ca | crl
    name: str  # from config: listener name, CA name
    not_after: dt.datetime
    not_before: dt.datetime | None = None  # a server certificate's start: before it, clients refuse it too


@dataclass(frozen=True)
class ListenerMaterial:
    """Everything a listener needs per connection; built whole and swapped whole on reload."""

    context: ssl.SSLContext
    revocation: RevocationSet
    cas: dict[str, tuple[str, x509.Certificate]]  # CA subject (RFC 4514) -> (client CA name, certificate)
    expiries: tuple[Expiry, ...] = field(default=())
    pins: frozenset[str] = frozenset()  # listener-wide client pins (SPKI base64 or certificate sha256 hex)

    def pinned_out(self, spki: str, sha256: str) -> bool:
        """True if the listener has pins and the certificate matches none of them."""
        return bool(self.pins) and spki not in self.pins and sha256 not in self.pins


class ListenerMaterialError(ValueError):
    """Every problem of one listener's files; each issue is (key path under the listener, message)."""

    def __init__(self, issues: list[tuple[tuple[str | int, ...], str]]) -> None:
        super().__init__("; ".join(message for _, message in issues))
        self.issues = issues


def build_material(listener: TlsListener, now: dt.datetime | None = None) -> ListenerMaterial:
    """Load and check every file of one listener, once (config loading and reloads both come here); raise
    `ListenerMaterialError` naming every unusable file by its key (cert, key, client_ca[j], client_ca[j].crl[k])."""
    now = now or dt.datetime.now(dt.UTC)
    issues: list[tuple[tuple[str | int, ...], str]] = []
    expiries: list[Expiry] = []
    try:
        leaf = check_key_pair(listener.cert, listener.key)
        expiries.append(Expiry("server_cert", listener.name, leaf.not_valid_after_utc, leaf.not_valid_before_utc))
    except TlsMaterialError as exc:
        issues.append(((exc.field,), str(exc)))
    lists: list[RevocationList] = []
    cas: dict[str, tuple[str, x509.Certificate]] = {}
    crl_pems: list[str] = []
    for j, ca in enumerate(listener.client_ca):
        try:
            bundle = load_ca_bundle(ca.file)
        except TlsMaterialError as exc:
            issues.append((("client_ca", j), str(exc)))
            continue
        for cert in bundle:
            cas[cert.subject.rfc4514_string()] = (ca.label, cert)
            expiries.append(Expiry("client_ca", ca.label, cert.not_valid_after_utc))
        for k, crl_path in enumerate(ca.crl):
            try:
                crl = load_crl(crl_path, ca.file, cas=bundle)
            except TlsMaterialError as exc:
                issues.append((("client_ca", j, "crl", k), str(exc)))
                continue
            lists.append(
                RevocationList(
                    ca_name=ca.label,
                    issuer=crl.issuer.rfc4514_string(),
                    serials=frozenset(format(r.serial_number, "x") for r in crl),
                    next_update=crl.next_update_utc,
                    source=str(crl_path),
                )
            )
            if crl.next_update_utc is not None:
                expiries.append(Expiry("crl", ca.label, crl.next_update_utc))
            crl_pems.append(crl.public_bytes(serialization.Encoding.PEM).decode())
    if issues:
        raise ListenerMaterialError(issues)
    revocation = RevocationSet(tuple(lists), listener.crl_expired)
    try:
        context = server_context(listener, crl_pems if listener.crl_check == "chain" else [])
    except ssl.SSLError as exc:
        raise ListenerMaterialError([((), f"TLS setup failed: {exc}")]) from None
    pins = frozenset([*listener.client_spki_pins, *listener.client_cert_sha256])
    return ListenerMaterial(context, revocation, cas, tuple(expiries), pins)


# where the alert of a failed handshake goes: set by the listener for each connection it accepts, in the context
# its TLS protocol runs in (asyncio: the handshake task's; uvloop: the transport's)
HANDSHAKE_ALERTS: ContextVar[Callable[[bytes], None] | None] = ContextVar("handshake_alerts", default=None)


def _cause(exc: ssl.SSLError) -> str:
    return classify(exc.reason, exc.verify_code if isinstance(exc, ssl.SSLCertVerificationError) else None)


class AlertingSSLObject(ssl.SSLObject):
    """An SSLObject that sends the alert of a failed handshake before the connection is dropped.

    OpenSSL writes the alert (certificate required, unknown CA, certificate expired, ...) into the outgoing buffer,
    but asyncio's and uvloop's SSLProtocol drop the connection on a handshake error without sending it: the client
    saw an end of stream instead of the reason. A `do_handshake` that fails on the client certificate hands the alert
    to the connection's raw transport first (`HANDSHAKE_ALERTS`, as it was when the object was made); which failures
    tell the client is core/handshake.alert_tells_client."""

    _outgoing_bio: ssl.MemoryBIO
    _send_alert: Callable[[bytes], None] | None

    @classmethod
    def _create(cls, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *args: Any, **kwargs: Any) -> AlertingSSLObject:
        obj = cast(AlertingSSLObject, super()._create(incoming, outgoing, *args, **kwargs))  # type: ignore[misc]
        obj._outgoing_bio, obj._send_alert = outgoing, HANDSHAKE_ALERTS.get()
        return obj

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            send, outgoing = self._send_alert, self._outgoing_bio
            if send is not None and outgoing.pending and alert_tells_client(_cause(exc)):
                send(outgoing.read())
            raise


def server_context(listener: TlsListener, chain_crls: list[str] | None = None) -> ssl.SSLContext:
    """The mTLS server context for one listener. With `chain_crls`, OpenSSL checks every certificate of the
    chain against them (crl_check: chain); leaf checks are made by the gateway itself after the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = AlertingSSLObject
    _common_settings(ctx)
    ctx.minimum_version = _VERSIONS[listener.min_tls]
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_cert_chain(listener.cert, listener.key)
    for ca in listener.client_ca:
        ctx.load_verify_locations(cafile=str(ca.file))
    if chain_crls:
        # the ssl module reads CRLs only from files, not from `cadata`
        with tempfile.NamedTemporaryFile("w", suffix=".pem", prefix="ota-crls-") as fh:
            fh.write("".join(chain_crls))
            fh.flush()
            ctx.load_verify_locations(cafile=fh.name)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def admin_context(tls: AdminTls) -> ssl.SSLContext:
    """mTLS for the admin listener: the same settings as a public listener (no resumption either), its own
    certificate and CAs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common_settings(ctx)
    ctx.load_cert_chain(tls.cert, tls.key)
    for ca in tls.client_ca:
        ctx.load_verify_locations(cafile=str(ca))
    return ctx


def follow_admin_context(current: Callable[[], ssl.SSLContext | None], first: ssl.SSLContext) -> ssl.SSLContext:
    """The context the admin listener is bound with (`first`, made like the current one): every handshake switches
    to `current()` in OpenSSL's server-name callback, which runs on each ClientHello, with or without SNI. The new
    context brings its certificate, key and CAs, so a reload applies to new connections without a new socket."""

    def switch(conn: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        ctx = current()
        if ctx is not None and ctx is not conn.context:
            conn.context = ctx

    first.sni_callback = switch
    return first


def prefer_aes128(ctx: ssl.SSLContext) -> None:
    """Reorder the TLS 1.2 suites of `ctx` so that ECDHE with AES-128-GCM comes first, the rest in their order; the
    set of suites (and the security level) stays as it was."""
    names = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    names.sort(key=lambda name: not (name.startswith("ECDHE-") and "-AES128-GCM-" in name))  # stable sort
    ctx.set_ciphers(f"@SECLEVEL={ctx.security_level}:" + ":".join(names))


def upstream_context(origin: HttpsOriginConfig) -> ssl.SSLContext:
    """Client context towards an HTTPS origin: its own CA bundle (or the system store), certificate and host name
    checked, TLS 1.2 minimum, Python's default suites with AES-128-GCM offered first (`ORIGIN_TLS13_SUITES`)."""
    ctx = ssl.create_default_context(cafile=str(origin.ca) if origin.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    prefer_aes128(ctx)
    libssl().set_ciphersuites(ctx, ORIGIN_TLS13_SUITES)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
