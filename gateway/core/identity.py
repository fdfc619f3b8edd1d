"""Client identity: what the gateway knows about a peer, derived once from its DER certificate.

Owns the mapping DER certificate -> `ClientIdentity` (fingerprints, subject, SANs, validity, EKU). Pure: it never
reads files or sockets and never decides whether an identity is allowed (that is `core/policy.py`).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """The identity of a TLS peer, from its leaf certificate."""

    sha256: str  # hex SHA-256 of the DER certificate (Envoy `verify_certificate_hash`)
    spki_sha256: str  # base64 SHA-256 of SubjectPublicKeyInfo (Envoy `verify_certificate_spki`)
    subject: str  # RFC 4514 string
    common_name: str | None
    organizations: tuple[str, ...]
    organizational_units: tuple[str, ...]
    issuer: str
    serial: str  # hex, lowercase
    not_after: datetime
    san_dns: tuple[str, ...]
    san_uri: tuple[str, ...]
    san_email: tuple[str, ...]
    san_ip: tuple[str, ...]
    client_auth_eku: bool  # the certificate may be used for TLS client authentication
    der: bytes = field(default=b"", repr=False, compare=False)  # for RFC 9440 forwarding; never logged

    @property
    def spiffe_ids(self) -> tuple[str, ...]:
        return tuple(u for u in self.san_uri if u.startswith("spiffe://"))


def spki_pin(cert: x509.Certificate) -> str:
    """Base64 SHA-256 of the certificate's SubjectPublicKeyInfo, the form Envoy and HPKP use."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def _attrs(name: x509.Name, oid: x509.ObjectIdentifier) -> tuple[str, ...]:
    return tuple(str(a.value) for a in name.get_attributes_for_oid(oid))


def _client_auth_allowed(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False  # a client certificate must say it is one; the gateway does not accept "any purpose"
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku


@lru_cache(maxsize=4096)
def identity_from_der(der: bytes) -> ClientIdentity:
    """Parse a DER certificate into a `ClientIdentity`. Cached: a connection's certificate is parsed once."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uri = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        email = tuple(san.get_values_for_type(x509.RFC822Name))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns = uri = email = ips = ()
    cns = _attrs(cert.subject, NameOID.COMMON_NAME)
    return ClientIdentity(
        sha256=hashlib.sha256(der).hexdigest(),
        spki_sha256=spki_pin(cert),
        subject=cert.subject.rfc4514_string(),
        common_name=cns[0] if cns else None,
        organizations=_attrs(cert.subject, NameOID.ORGANIZATION_NAME),
        organizational_units=_attrs(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc,
        san_dns=dns,
        san_uri=uri,
        san_email=email,
        san_ip=ips,
        client_auth_eku=_client_auth_allowed(cert),
        der=der,
    )
