"""Revocation decisions from parsed CRLs, without files or sockets: listed, stale (fail_closed / keep_serving)."""

from __future__ import annotations

import datetime as dt

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.core.identity import ClientIdentity, identity_from_der
from gateway.core.revocation import RevocationList, RevocationSet

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)


def _identity(leaf: trustme.LeafCert) -> ClientIdentity:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return identity_from_der(cert.public_bytes(serialization.Encoding.DER))


@pytest.fixture(scope="module")
def idents() -> tuple[ClientIdentity, ClientIdentity, ClientIdentity]:
    ca, other = trustme.CA(), trustme.CA()
    return (
        _identity(ca.issue_cert("a.example.app")),
        _identity(ca.issue_cert("b.example.app")),
        _identity(other.issue_cert("c.example.app")),
    )


def crl(ident: ClientIdentity, serials: set[str], next_update: dt.datetime | None) -> RevocationList:
    return RevocationList("ca", ident.issuer, frozenset(serials), next_update, "/etc/crl.pem")


def test_listed_serial_is_revoked_unlisted_passes(idents: tuple[ClientIdentity, ...]) -> None:
    a, b, _ = idents
    rs = RevocationSet((crl(a, {a.serial}, NOW + dt.timedelta(days=1)),))
    why = rs.check(a, NOW)
    assert why is not None and a.serial in why and "CA ca" in why
    assert "/etc/crl.pem" not in why  # a client may read it: no server path
    assert rs.check(b, NOW) is None


def test_crl_of_another_issuer_does_not_apply(idents: tuple[ClientIdentity, ...]) -> None:
    a, _, c = idents
    # same serial listed, but by a CRL of a different CA
    rs = RevocationSet((crl(a, {c.serial}, NOW + dt.timedelta(days=1)),))
    assert rs.check(c, NOW) is None


def test_stale_crl_fail_closed_refuses_every_client_of_that_ca(idents: tuple[ClientIdentity, ...]) -> None:
    a, b, c = idents
    stale = crl(a, {a.serial}, NOW - dt.timedelta(seconds=1))
    rs = RevocationSet((stale,), "fail_closed")
    assert stale.stale(NOW)
    why = rs.check(b, NOW)
    assert why is not None and "expired" in why and "fail_closed" in why and "/etc/crl.pem" not in why
    assert rs.check(a, NOW) is not None
    assert rs.check(c, NOW) is None  # clients of other CAs are not affected
    assert rs.stale_lists(NOW) == (stale,)


def test_stale_crl_keep_serving_still_revokes_what_it_lists(idents: tuple[ClientIdentity, ...]) -> None:
    a, b, _ = idents
    stale = crl(a, {a.serial}, NOW - dt.timedelta(days=3))
    rs = RevocationSet((stale,), "keep_serving")
    assert rs.check(b, NOW) is None
    assert rs.check(a, NOW) is not None
    assert rs.stale_lists(NOW) == (stale,)  # still reported


def test_fresh_crl_and_crl_without_next_update_are_not_stale(idents: tuple[ClientIdentity, ...]) -> None:
    a, b, _ = idents
    fresh = crl(a, set(), NOW + dt.timedelta(hours=1))
    forever = crl(a, set(), None)
    assert not fresh.stale(NOW) and not forever.stale(NOW)
    rs = RevocationSet((fresh, forever), "fail_closed")
    assert rs.check(b, NOW) is None
    assert rs.stale_lists(NOW) == ()
    # the same CRL goes stale once the clock passes nextUpdate
    assert fresh.stale(NOW + dt.timedelta(hours=2))
    assert rs.check(b, NOW + dt.timedelta(hours=2)) is not None


def test_empty_set_admits_everyone(idents: tuple[ClientIdentity, ...]) -> None:
    assert all(RevocationSet().check(i, NOW) is None for i in idents)
