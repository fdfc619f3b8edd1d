"""Operator PKI tooling: a CA, a server certificate, client certificates, and a rogue CA for negative tests.

Owns `ota-gateway certs init` and `certs issue-client`. Keys are EC P-256, written with mode 0600, or with `group`
0640 and owned by that group (whose members, e.g. the gateway's service account, may then read them; the folder is
made enterable by the group). A CA's key stays 0600 whatever `group` says: the gateway never signs, and a service
account that could read it could mint client certificates the gateway accepts. Certificates and folders follow the
process umask (0644 and 0755 under umask 022). Each certificate is reported with its SHA-256 fingerprint and SPKI
pin, the two forms policies accept.
For development and tests; production material comes from the operator's own PKI.
"""

from __future__ import annotations

import datetime as dt
import grp
import hashlib
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.core.identity import spki_pin


@dataclass(frozen=True)
class Issued:
    name: str
    cert_path: Path
    key_path: Path
    sha256: str
    spki: str

    def describe(self) -> str:
        return f"{self.name}: {self.cert_path}\n  sha256 {self.sha256}\n  spki   {self.spki}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str, org: str = "ota-gateway dev") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def resolve_group(name: str) -> int:
    """The gid of a group name or number; `ValueError` (one line) if there is no such group."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ValueError(f"no such group: {name!r} (give a group name or a numeric gid)") from None


CA_NAMES = frozenset({"ca", "rogue-ca"})  # keys that stay 0600 (`_key_access`)


def _key_access(path: Path, gid: int | None) -> None:
    """0600, or 0640 owned by group `gid`: fchown before the group may read, so no moment exposes it wider. A CA's
    key is always 0600."""
    if gid is None or path.stem in CA_NAMES:
        os.chmod(path, 0o600)
    else:
        os.chown(path, -1, gid)
        os.chmod(path, 0o640)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, gid: int | None) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # an existing file keeps its old mode through O_TRUNC
        fh.write(data)
    _key_access(path, gid)


def _group_folder(directory: Path, gid: int | None) -> None:
    """With a group: the folder belongs to it and the group may enter and list it (other bits are kept)."""
    if gid is not None:
        os.chown(directory, -1, gid)
        os.chmod(directory, stat.S_IMODE(directory.stat().st_mode) | 0o050)


def _save(
    name: str, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, gid: int | None = None
) -> Issued:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key, gid)
    der = cert.public_bytes(serialization.Encoding.DER)
    return Issued(name, cert_path, key_path, hashlib.sha256(der).hexdigest(), spki_pin(cert))


def _load(directory: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / f"{name}.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def make_ca(cn: str, days: int = 3650) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    cn: str,
    *,
    server: bool,
    days: int = 825,
    not_before: dt.datetime | None = None,
    eku: list[x509.ObjectIdentifier] | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - dt.timedelta(minutes=5))
    if eku is None:
        eku = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
    if sans is None:
        sans = (
            [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]
            if server
            else [x509.DNSName(cn)]
            if "." in cn
            else []
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def init(directory: Path, *, force: bool = False, group: str | None = None) -> list[Issued]:
    """Create ca, server, client, rogue-ca and rogue-client in `directory` (kept if present, unless `force`).

    With `group`, the keys (existing ones too) become 0640 and owned by that group, and the folder enterable by it.
    """
    gid = resolve_group(group) if group is not None else None
    directory.mkdir(parents=True, exist_ok=True)
    _group_folder(directory, gid)
    names = ["ca", "server", "client", "rogue-ca", "rogue-client"]
    files = [directory / f"{n}.{ext}" for n in names for ext in ("pem", "key")]
    missing = [p.name for p in files if not p.exists()]
    if not force and not missing:
        if gid is not None:
            for n in names:
                _key_access(directory / f"{n}.key", gid)
        return [_describe(directory, n) for n in names]
    if not force and len(missing) < len(files):
        # never replace an existing CA (and orphan every client issued from it) without --force
        raise FileExistsError(
            f"{directory} holds part of a dev PKI ({', '.join(missing)} missing): use --force to replace all of it"
        )
    ca_cert, ca_key = make_ca("ota-gateway dev CA")
    rogue_cert, rogue_key = make_ca("ota-gateway ROGUE CA (negative tests only)")
    out = [_save("ca", directory, ca_cert, ca_key, gid)]
    # 365 days: Mozilla's guidelines (and TLS scanners) want server certificates to live less than 366 days
    out.append(_save("server", directory, *make_leaf(ca_cert, ca_key, "localhost", server=True, days=365), gid))
    out.append(_save("client", directory, *make_leaf(ca_cert, ca_key, "device-1.example.app", server=False), gid))
    out.append(_save("rogue-ca", directory, rogue_cert, rogue_key, gid))
    out.append(_save("rogue-client", directory, *make_leaf(rogue_cert, rogue_key, "rogue-device", server=False), gid))
    return out


def issue_client(directory: Path, name: str, *, days: int = 825, group: str | None = None) -> Issued:
    """A new client certificate signed by the CA in `directory`."""
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name in (
        "ca",
        "server",
        "rogue-ca",
    ):
        raise ValueError(f"client name must be letters, digits, '.', '-' or '_' and not a reserved name: {name!r}")
    if not (directory / "ca.pem").exists() or not (directory / "ca.key").exists():
        raise FileNotFoundError(f"no CA in {directory}: run 'ota-gateway certs init --dir {directory}' first")
    gid = resolve_group(group) if group is not None else None
    ca_cert, ca_key = _load(directory, "ca")
    _group_folder(directory, gid)
    return _save(name, directory, *make_leaf(ca_cert, ca_key, name, server=False, days=days), gid)


def _describe(directory: Path, name: str) -> Issued:
    cert = x509.load_pem_x509_certificate((directory / f"{name}.pem").read_bytes())
    der = cert.public_bytes(serialization.Encoding.DER)
    return Issued(
        name,
        directory / f"{name}.pem",
        directory / f"{name}.key",
        hashlib.sha256(der).hexdigest(),
        spki_pin(cert),
    )
