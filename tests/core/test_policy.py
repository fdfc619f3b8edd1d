"""Policy evaluation without sockets: a pass and a fail case for every rule kind, pins, deny lists, rotation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import certs as gw_certs
from gateway.core.identity import ClientIdentity, identity_from_der
from gateway.core.policy import AppPolicy, Channels, ClientRule, Deny, Peer, PolicySet, admit, matches
from gateway.core.reasons import Reason, Refusal

APP = "com.example.app"
DER = serialization.Encoding.DER


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(DER)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def issue(ca: trustme.CA) -> Callable[..., ClientIdentity]:
    """A real certificate from the test CA with the given SANs and subject, as a ClientIdentity."""

    def make(*sans: str, cn: str | None = None, o: str | None = None, ou: str | None = None) -> ClientIdentity:
        leaf = ca.issue_cert(*sans, common_name=cn, organization_name=o, organization_unit_name=ou)
        return identity_from_der(_der(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())))

    return make


@pytest.fixture(scope="module")
def uri_identity() -> Callable[[str], ClientIdentity]:
    """A certificate whose only SAN is one URI (trustme cannot issue URI SANs; gateway.certs can)."""
    ca_cert, ca_key = gw_certs.make_ca("policy test CA")

    def make(uri: str) -> ClientIdentity:
        cert, _ = gw_certs.make_leaf(
            ca_cert, ca_key, "spiffe-device", server=False, sans=[x509.UniformResourceIdentifier(uri)]
        )
        return identity_from_der(_der(cert))

    return make


def policies(*rules: ClientRule, deny: Deny | None = None) -> PolicySet:
    app = AppPolicy(
        app_id=APP,
        origin="local",
        channels=Channels("production", ("production",)),
        source="test.yaml",
        clients=rules,
        deny=deny or Deny(),
    )
    return PolicySet({APP: app})


def refused(ps: PolicySet, peer: Peer, app_id: str = APP) -> Reason:
    with pytest.raises(Refusal) as info:
        admit(ps, peer, app_id)
    return info.value.reason


def admitted(ps: PolicySet, peer: Peer, app_id: str = APP) -> bool:
    return admit(ps, peer, app_id).app_id == app_id


# ---- issuer -------------------------------------------------------------------------------------------------------


def test_issuer_ca_name(issue: Callable[..., ClientIdentity]) -> None:
    ident = issue("device-1.example.app")
    ps = policies(ClientRule("fleet", issuers=("ca",)))
    assert admitted(ps, Peer(ident, issuer_ca="ca"))
    assert refused(ps, Peer(ident, issuer_ca="other-ca")) is Reason.IDENTITY_NOT_ALLOWED
    assert refused(ps, Peer(ident, issuer_ca=None)) is Reason.IDENTITY_NOT_ALLOWED


# ---- subject ------------------------------------------------------------------------------------------------------


def test_cn_star_matches_within_one_label(issue: Callable[..., ClientIdentity]) -> None:
    ps = policies(ClientRule("cn", cn=("*.fleet.example.com",)))
    assert admitted(ps, Peer(issue(cn="device-1.fleet.example.com")))
    assert admitted(ps, Peer(issue(cn="DEVICE-2.Fleet.Example.Com")))  # DNS-like: case-insensitive
    # `*` never crosses a dot
    assert refused(ps, Peer(issue(cn="a.b.fleet.example.com"))) is Reason.IDENTITY_NOT_ALLOWED
    assert refused(ps, Peer(issue(cn="device-1.fleet.example.com.evil"))) is Reason.IDENTITY_NOT_ALLOWED
    assert refused(ps, Peer(issue(cn="device-1.other.example.com"))) is Reason.IDENTITY_NOT_ALLOWED


def test_cn_double_star_crosses_labels(issue: Callable[..., ClientIdentity]) -> None:
    ps = policies(ClientRule("cn", cn=("**.fleet.example.com",)))
    assert admitted(ps, Peer(issue(cn="a.b.fleet.example.com")))
    assert admitted(ps, Peer(issue(cn="x.fleet.example.com")))
    assert refused(ps, Peer(issue(cn="a.b.fleet.example.org"))) is Reason.IDENTITY_NOT_ALLOWED


def test_cn_literal(issue: Callable[..., ClientIdentity]) -> None:
    ps = policies(ClientRule("cn", cn=("kiosk-7",)))
    assert admitted(ps, Peer(issue(cn="kiosk-7")))
    assert refused(ps, Peer(issue(cn="kiosk-70"))) is Reason.IDENTITY_NOT_ALLOWED
    # a certificate without a CN never matches a CN rule
    assert refused(ps, Peer(issue("kiosk-7.example.com"))) is Reason.IDENTITY_NOT_ALLOWED


def test_organization(issue: Callable[..., ClientIdentity]) -> None:
    ps = policies(ClientRule("o", o=("Example *",)))
    assert admitted(ps, Peer(issue(cn="d1", o="Example Fleet")))
    assert admitted(ps, Peer(issue(cn="d1", o="Example Fleet. Inc.")))  # `*` is anything outside DNS/URI
    assert refused(ps, Peer(issue(cn="d1", o="Other Fleet"))) is Reason.IDENTITY_NOT_ALLOWED
    assert refused(ps, Peer(issue(cn="d1", o="example fleet"))) is Reason.IDENTITY_NOT_ALLOWED  # case-sensitive


def test_organizational_unit(issue: Callable[..., ClientIdentity]) -> None:
    ps = policies(ClientRule("ou", ou=("Phones",)))
    assert admitted(ps, Peer(issue(cn="d1", o="Example", ou="Phones")))
    assert refused(ps, Peer(issue(cn="d1", o="Example", ou="Tablets"))) is Reason.IDENTITY_NOT_ALLOWED


def test_all_conditions_of_one_rule_must_hold(issue: Callable[..., ClientIdentity]) -> None:
    ps = policies(ClientRule("both", issuers=("ca",), o=("Example",), ou=("Phones",)))
    good = issue(cn="d1", o="Example", ou="Phones")
    assert admitted(ps, Peer(good, "ca"))
    assert refused(ps, Peer(good, "other")) is Reason.IDENTITY_NOT_ALLOWED
    assert refused(ps, Peer(issue(cn="d1", o="Example", ou="Tablets"), "ca")) is Reason.IDENTITY_NOT_ALLOWED


def test_any_rule_suffices(issue: Callable[..., ClientIdentity]) -> None:
    ps = policies(ClientRule("phones", ou=("Phones",)), ClientRule("tablets", ou=("Tablets",)))
    assert admitted(ps, Peer(issue(cn="d", o="E", ou="Phones")))
    assert admitted(ps, Peer(issue(cn="d", o="E", ou="Tablets")))
    assert refused(ps, Peer(issue(cn="d", o="E", ou="Watches"))) is Reason.IDENTITY_NOT_ALLOWED


# ---- SANs ---------------------------------------------------------------------------------------------------------


def test_san_dns(issue: Callable[..., ClientIdentity]) -> None:
    ps = policies(ClientRule("dns", san_dns=("*.fleet.example.com",)))
    assert admitted(ps, Peer(issue("other.example.org", "device-9.fleet.example.com")))  # any SAN may match
    assert refused(ps, Peer(issue("a.b.fleet.example.com"))) is Reason.IDENTITY_NOT_ALLOWED
    assert refused(ps, Peer(issue("fleet.example.com"))) is Reason.IDENTITY_NOT_ALLOWED
    # the CN is not a DNS SAN
    assert refused(ps, Peer(issue("x.example.org", cn="device-9.fleet.example.com"))) is Reason.IDENTITY_NOT_ALLOWED
    deep = policies(ClientRule("dns", san_dns=("**.example.com",)))
    assert admitted(deep, Peer(issue("a.b.fleet.example.com")))


def test_san_uri_spiffe_one_segment(uri_identity: Callable[[str], ClientIdentity]) -> None:
    ps = policies(ClientRule("spiffe", san_uri=("spiffe://trust.domain/device/*",)))
    assert admitted(ps, Peer(uri_identity("spiffe://trust.domain/device/abc-123")))
    # `*` is one path segment: deeper paths, other trust domains and prefixes do not match
    assert refused(ps, Peer(uri_identity("spiffe://trust.domain/device/abc/def"))) is Reason.IDENTITY_NOT_ALLOWED
    assert refused(ps, Peer(uri_identity("spiffe://other.domain/device/abc"))) is Reason.IDENTITY_NOT_ALLOWED
    assert refused(ps, Peer(uri_identity("spiffe://trust.domain/admin/abc"))) is Reason.IDENTITY_NOT_ALLOWED
    assert refused(ps, Peer(uri_identity("spiffe://trust.domain/device"))) is Reason.IDENTITY_NOT_ALLOWED
    deep = policies(ClientRule("spiffe", san_uri=("spiffe://trust.domain/device/**",)))
    assert admitted(deep, Peer(uri_identity("spiffe://trust.domain/device/abc/def")))
    assert refused(deep, Peer(uri_identity("spiffe://trust.domain/admin/abc"))) is Reason.IDENTITY_NOT_ALLOWED


def test_san_email(issue: Callable[..., ClientIdentity]) -> None:
    ps = policies(ClientRule("email", san_email=("*@ops.example.com",)))
    assert admitted(ps, Peer(issue("alice@ops.example.com")))
    assert refused(ps, Peer(issue("alice@evil.example.com"))) is Reason.IDENTITY_NOT_ALLOWED
    assert refused(ps, Peer(issue("ops.example.com"))) is Reason.IDENTITY_NOT_ALLOWED  # a DNS SAN is not an email


def test_matches_patterns() -> None:
    assert matches("*.example.com", "a.example.com", "dns")
    assert not matches("*.example.com", "a.b.example.com", "dns")
    assert matches("**", "a.b.c", "dns")
    assert matches("a.b", "A.B", "dns") and not matches("a.b", "A.B", "text")
    assert not matches("a.b", "axb", "dns")  # `.` is literal, not a regex
    assert not matches("dev(ice)?", "device", "text")
    assert matches("spiffe://t/*/x", "spiffe://t/y/x", "uri")
    assert not matches("spiffe://t/*/x", "spiffe://t/y/z/x", "uri")


# ---- pins ---------------------------------------------------------------------------------------------------------


def test_spki_pin_only(issue: Callable[..., ClientIdentity]) -> None:
    good, other = issue("a.example.app"), issue("b.example.app")
    ps = policies(ClientRule("pinned", spki_pins=frozenset({good.spki_sha256}), pin_only=True))
    assert admitted(ps, Peer(good, "ca"))
    assert refused(ps, Peer(other, "ca")) is Reason.PIN_MISMATCH


def test_cert_sha256_pin(issue: Callable[..., ClientIdentity]) -> None:
    good, other = issue("a.example.app"), issue("a.example.app")  # same names, different certificate
    ps = policies(ClientRule("pinned", cert_sha256=frozenset({good.sha256}), pin_only=True))
    assert admitted(ps, Peer(good, "ca"))
    assert refused(ps, Peer(other, "ca")) is Reason.PIN_MISMATCH


def test_names_match_but_pin_does_not(issue: Callable[..., ClientIdentity]) -> None:
    pinned, unpinned = issue("kiosk.example.app"), issue("kiosk.example.app")
    ps = policies(
        ClientRule("kiosk", issuers=("ca",), san_dns=("kiosk.example.app",), spki_pins=frozenset({pinned.spki_sha256}))
    )
    assert admitted(ps, Peer(pinned, "ca"))
    assert refused(ps, Peer(unpinned, "ca")) is Reason.PIN_MISMATCH
    # names that do not match are not a pin problem
    assert refused(ps, Peer(issue("other.example.app"), "ca")) is Reason.IDENTITY_NOT_ALLOWED
    # a pinned certificate still needs the names of its rule
    assert refused(ps, Peer(pinned, "other-ca")) is Reason.IDENTITY_NOT_ALLOWED


def test_pin_mismatch_in_one_rule_does_not_hide_another_rule(issue: Callable[..., ClientIdentity]) -> None:
    ident = issue("kiosk.example.app")
    ps = policies(
        ClientRule("pinned", san_dns=("kiosk.example.app",), spki_pins=frozenset({issue("x.example.app").spki_sha256})),
        ClientRule("fleet", issuers=("ca",)),
    )
    assert admitted(ps, Peer(ident, "ca"))


def test_two_pins_valid_during_rotation(issue: Callable[..., ClientIdentity]) -> None:
    old, new, third = issue("d.example.app"), issue("d.example.app"), issue("d.example.app")
    assert len({old.spki_sha256, new.spki_sha256, third.spki_sha256}) == 3
    spki = policies(ClientRule("rotating", spki_pins=frozenset({old.spki_sha256, new.spki_sha256}), pin_only=True))
    assert admitted(spki, Peer(old))
    assert admitted(spki, Peer(new))
    assert refused(spki, Peer(third)) is Reason.PIN_MISMATCH
    certs = policies(ClientRule("rotating", cert_sha256=frozenset({old.sha256, new.sha256}), pin_only=True))
    assert admitted(certs, Peer(old))
    assert admitted(certs, Peer(new))
    assert refused(certs, Peer(third)) is Reason.PIN_MISMATCH


# ---- deny, unknown app, no rule -------------------------------------------------------------------------------------


def test_deny_by_fingerprint_even_when_a_rule_matches(issue: Callable[..., ClientIdentity]) -> None:
    bad, good = issue("d.example.app"), issue("d.example.app")
    ps = policies(ClientRule("fleet", issuers=("ca",)), deny=Deny(cert_sha256=frozenset({bad.sha256})))
    assert refused(ps, Peer(bad, "ca")) is Reason.DENIED
    assert admitted(ps, Peer(good, "ca"))
    # denied even when the certificate is pinned by a rule
    pinned = policies(
        ClientRule("pinned", spki_pins=frozenset({bad.spki_sha256}), pin_only=True),
        deny=Deny(cert_sha256=frozenset({bad.sha256})),
    )
    assert refused(pinned, Peer(bad, "ca")) is Reason.DENIED


def test_deny_by_serial_even_when_a_rule_matches(issue: Callable[..., ClientIdentity]) -> None:
    bad, good = issue("d.example.app"), issue("d.example.app")
    assert bad.serial == bad.serial.lower() and not bad.serial.startswith("0")
    ps = policies(ClientRule("fleet", issuers=("ca",)), deny=Deny(serials=frozenset({bad.serial})))
    assert refused(ps, Peer(bad, "ca")) is Reason.DENIED
    assert admitted(ps, Peer(good, "ca"))


def test_no_rule_admits(issue: Callable[..., ClientIdentity]) -> None:
    ident = issue("d.example.app")
    assert refused(policies(), Peer(ident, "ca")) is Reason.IDENTITY_NOT_ALLOWED
    assert refused(policies(ClientRule("tablets", ou=("Tablets",))), Peer(ident, "ca")) is Reason.IDENTITY_NOT_ALLOWED


def test_unknown_app(issue: Callable[..., ClientIdentity]) -> None:
    ps = policies(ClientRule("fleet", issuers=("ca",)))
    peer = Peer(issue("d.example.app"), "ca")
    assert refused(ps, peer, "com.example.other") is Reason.APP_UNKNOWN
    assert refused(PolicySet({}), peer) is Reason.APP_UNKNOWN
    assert Reason.APP_UNKNOWN.status == 404 and Reason.IDENTITY_NOT_ALLOWED.status == 403


def test_via_proxy_identity_is_judged_like_any_other(issue: Callable[..., ClientIdentity]) -> None:
    ident = issue("d.example.app")
    ps = policies(ClientRule("fleet", issuers=("ca",)))
    assert admitted(ps, Peer(ident, "ca", via_proxy="edge"))
    assert refused(ps, Peer(ident, None, via_proxy="edge")) is Reason.IDENTITY_NOT_ALLOWED


def test_policy_types_are_frozen(issue: Callable[..., ClientIdentity]) -> None:
    rule = ClientRule("fleet", issuers=("ca",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.name = "x"  # type: ignore[misc]
