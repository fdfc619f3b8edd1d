"""Client identity (core/identity.py): what the gateway reads out of a peer's DER certificate.

Fingerprints are checked against independent computations (hashlib over the DER; the openssl command line for the
SPKI pin), names and SANs against certificates made by trustme and by gateway.certs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import subprocess
from dataclasses import dataclass

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import certs
from gateway.core.identity import ClientIdentity, identity_from_der, spki_pin

NOT_AFTER = dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


@dataclass
class Made:
    pem: bytes
    der: bytes
    cert: x509.Certificate

    @property
    def identity(self) -> ClientIdentity:
        return identity_from_der(self.der)


def _made(cert: x509.Certificate) -> Made:
    return Made(cert.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.DER), cert)


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    return certs.make_ca("identity test CA")


@pytest.fixture(scope="module")
def trustme_ca() -> trustme.CA:
    return trustme.CA(key_type=trustme.KeyType.ECDSA)


@pytest.fixture(scope="module")
def trustme_leaf(trustme_ca: trustme.CA) -> Made:
    leaf = trustme_ca.issue_cert(
        "device-1.example.app",
        "*.fleet.example.app",
        "device-1@example.com",
        "10.1.2.3",
        "::1",
        common_name="device-1",
        organization_name="Example Fleet",
        organization_unit_name="Phones",
        not_after=NOT_AFTER,
    )
    return _made(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()))


@pytest.fixture(scope="module")
def spiffe_leaf(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> Made:
    cert, _ = certs.make_leaf(
        *ca,
        "workload",
        server=False,
        sans=[
            x509.DNSName("workload.example.app"),
            x509.UniformResourceIdentifier("spiffe://example.org/ns/fleet/device/42"),
            x509.UniformResourceIdentifier("https://example.org/devices/42"),
            x509.RFC822Name("ops@example.org"),
            x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
            x509.IPAddress(ipaddress.ip_address("2001:db8::7")),
        ],
    )
    return _made(cert)


@pytest.fixture(scope="module")
def openssl_view(tmp_path_factory: pytest.TempPathFactory, trustme_leaf: Made, spiffe_leaf: Made) -> dict[str, str]:
    """SPKI pins and serials as the openssl command line computes them (one subprocess for all certificates)."""
    folder = tmp_path_factory.mktemp("openssl")
    names = {"trustme": trustme_leaf, "spiffe": spiffe_leaf}
    for name, made in names.items():
        (folder / f"{name}.pem").write_bytes(made.pem)
    script = "; ".join(
        f"printf '{name} spki %s\\n' \"$(openssl x509 -pubkey -noout -in {name}.pem | openssl pkey -pubin -outform der"
        f" | openssl dgst -sha256 -binary | base64)\"; printf '{name} %s\\n' \"$(openssl x509 -noout -serial -in"
        f' {name}.pem)"'
        for name in names
    )
    out = subprocess.run(["bash", "-c", f"set -o pipefail; {script}"], cwd=folder, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    view: dict[str, str] = {}
    for line in out.stdout.splitlines():
        name, rest = line.split(" ", 1)
        key, value = rest.split(" ", 1) if rest.startswith("spki ") else rest.split("=", 1)
        view[f"{name}.{key.strip()}"] = value.strip()
    return view


def test_sha256_is_the_digest_of_the_der(trustme_leaf: Made, spiffe_leaf: Made) -> None:
    for made in (trustme_leaf, spiffe_leaf):
        assert made.identity.sha256 == hashlib.sha256(made.der).hexdigest()
        assert made.identity.sha256 == made.cert.fingerprint(hashes.SHA256()).hex()


def test_spki_pin_matches_openssl(trustme_leaf: Made, spiffe_leaf: Made, openssl_view: dict[str, str]) -> None:
    assert trustme_leaf.identity.spki_sha256 == openssl_view["trustme.spki"]
    assert spiffe_leaf.identity.spki_sha256 == openssl_view["spiffe.spki"]
    assert spki_pin(spiffe_leaf.cert) == openssl_view["spiffe.spki"]


def test_serial_matches_openssl(trustme_leaf: Made, spiffe_leaf: Made, openssl_view: dict[str, str]) -> None:
    for name, made in (("trustme", trustme_leaf), ("spiffe", spiffe_leaf)):
        assert made.identity.serial == format(made.cert.serial_number, "x")
        # openssl prints uppercase hex, padded to whole bytes
        assert made.identity.serial == openssl_view[f"{name}.serial"].lower().lstrip("0")


def test_trustme_subject_and_sans(trustme_leaf: Made, trustme_ca: trustme.CA) -> None:
    ident = trustme_leaf.identity
    assert ident.common_name == "device-1"
    assert ident.organizations == ("Example Fleet",)
    assert ident.organizational_units == ("Phones",)
    assert "CN=device-1" in ident.subject and "O=Example Fleet" in ident.subject and "OU=Phones" in ident.subject
    ca_cert = x509.load_pem_x509_certificate(trustme_ca.cert_pem.bytes())
    assert ident.issuer == ca_cert.subject.rfc4514_string()
    assert ident.san_dns == ("device-1.example.app", "*.fleet.example.app")
    assert ident.san_email == ("device-1@example.com",)
    assert ident.san_ip == ("10.1.2.3", "::1")
    assert ident.san_uri == ()
    assert ident.spiffe_ids == ()
    assert ident.not_after == NOT_AFTER
    assert ident.not_after.tzinfo is not None
    assert ident.client_auth_eku is True  # trustme certificates carry clientAuth and serverAuth


def test_certs_made_subject_and_sans(
    spiffe_leaf: Made, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]
) -> None:
    ident = spiffe_leaf.identity
    assert ident.common_name == "workload"
    assert ident.organizations == ("ota-gateway dev",)
    assert ident.organizational_units == ()
    assert ident.issuer == ca[0].subject.rfc4514_string()
    assert ident.san_dns == ("workload.example.app",)
    assert ident.san_uri == ("spiffe://example.org/ns/fleet/device/42", "https://example.org/devices/42")
    assert ident.spiffe_ids == ("spiffe://example.org/ns/fleet/device/42",)
    assert ident.san_email == ("ops@example.org",)
    assert ident.san_ip == ("192.0.2.7", "2001:db8::7")
    assert ident.not_after == spiffe_leaf.cert.not_valid_after_utc
    assert ident.client_auth_eku is True


@pytest.mark.parametrize(
    ("eku", "expected"),
    [
        ([ExtendedKeyUsageOID.CLIENT_AUTH], True),
        ([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], True),
        ([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], True),
        ([ExtendedKeyUsageOID.SERVER_AUTH], False),
        ([ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.EMAIL_PROTECTION], False),
        ([], False),  # no EKU extension at all: OpenSSL would accept it as a client; the gateway does not
    ],
    ids=["clientAuth", "server+client", "anyEKU", "serverAuth-only", "other-purposes", "no-EKU"],
)
def test_client_auth_eku(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], eku: list[x509.ObjectIdentifier], expected: bool
) -> None:
    cert, _ = certs.make_leaf(*ca, "device-9.example.app", server=False, eku=eku)
    has_extension = any(isinstance(e.value, x509.ExtendedKeyUsage) for e in cert.extensions)
    assert has_extension == bool(eku)
    assert _made(cert).identity.client_auth_eku is expected


def test_server_certificate_from_certs_is_not_a_client(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    cert, _ = certs.make_leaf(*ca, "localhost", server=True)
    ident = _made(cert).identity
    assert ident.client_auth_eku is False
    assert ident.san_dns == ("localhost",)
    assert ident.san_ip == ("127.0.0.1", "::1")


def test_no_san_no_cn(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "A"),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "B"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "u1"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "u2"),
                ]
            )
        )
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(0x0ABC)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca[1], hashes.SHA256())
    )
    ident = _made(cert).identity
    assert ident.common_name is None
    assert ident.organizations == ("A", "B")
    assert ident.organizational_units == ("u1", "u2")
    assert ident.san_dns == ident.san_uri == ident.san_email == ident.san_ip == ()
    assert ident.serial == "abc"
    assert ident.client_auth_eku is False


def test_identity_is_cached_per_der(spiffe_leaf: Made) -> None:
    assert identity_from_der(spiffe_leaf.der) is identity_from_der(bytes(spiffe_leaf.der))


def test_identity_is_frozen(spiffe_leaf: Made) -> None:
    with pytest.raises(AttributeError):
        spiffe_leaf.identity.common_name = "someone else"  # type: ignore[misc]


def test_garbage_is_not_an_identity() -> None:
    with pytest.raises(ValueError):
        identity_from_der(b"\x30\x03\x02\x01\x00")
