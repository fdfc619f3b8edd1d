"""Client identity headers: RFC 9440 Client-Cert and Envoy x-forwarded-client-cert, parsed and written."""

from __future__ import annotations

import base64
import urllib.parse

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import certs as gw_certs
from gateway.core.forwarded import (
    _split_elements,
    client_cert_value,
    parse_client_cert,
    parse_xfcc,
    xfcc_value,
)
from gateway.core.identity import ClientIdentity, identity_from_der


@pytest.fixture(scope="module")
def certs() -> tuple[x509.Certificate, x509.Certificate]:
    ca = trustme.CA()
    a = ca.issue_cert("device-1.example.app", common_name="device-1", organization_name='Example, "Fleet" Inc.')
    b = ca.issue_cert("device-2.example.app")
    return (
        x509.load_pem_x509_certificate(a.cert_chain_pems[0].bytes()),
        x509.load_pem_x509_certificate(b.cert_chain_pems[0].bytes()),
    )


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pem_param(cert: x509.Certificate) -> str:
    return urllib.parse.quote(cert.public_bytes(serialization.Encoding.PEM).decode(), safe="")


# ---- RFC 9440 ---------------------------------------------------------------------------------------------------


def test_client_cert_round_trip(certs: tuple[x509.Certificate, ...]) -> None:
    der = _der(certs[0])
    value = client_cert_value(der)
    assert value.startswith(":") and value.endswith(":")
    assert value[1:-1] == base64.b64encode(der).decode()
    assert parse_client_cert(value) == der
    assert parse_client_cert(f"  {value} ") == der  # surrounding whitespace is not part of the value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "::",
        ":",
        "AAAA",  # not a byte sequence
        ":AAAA",
        "AAAA:",
        ":not base64!:",
        ":AAA:",  # bad padding
        ":" + "A" * (17 * 1024) + ":",  # too long
        '"' + "AAAA" + '"',
    ],
)
def test_client_cert_malformed(value: str) -> None:
    with pytest.raises(ValueError):
        parse_client_cert(value)


# ---- XFCC ---------------------------------------------------------------------------------------------------------


def test_xfcc_takes_the_last_element(certs: tuple[x509.Certificate, ...]) -> None:
    a, b = certs
    value = (
        f'By=spiffe://edge/a;Hash=00;Cert="{_pem_param(b)}";Subject="CN=first";DNS=b.example.app,'
        f'By=spiffe://edge/b;Hash=11;Cert="{_pem_param(a)}";Subject="CN=device-1,O=Example\\, \\"Fleet\\" Inc.";'
        "URI=spiffe://t/device/1;DNS=device-1.example.app"
    )
    assert parse_xfcc(value) == _der(a)


def test_xfcc_quoted_subject_with_commas_and_escaped_quotes(certs: tuple[x509.Certificate, ...]) -> None:
    a, _ = certs
    # the comma inside the quoted Subject must not start a new element, or Cert would be lost
    value = f'Hash=ab;Subject="CN=x,O=\\"Quoted, Inc.\\",OU=a;b";Cert="{_pem_param(a)}"'
    elements = _split_elements(value)
    assert len(elements) == 1
    assert elements[0]["subject"] == 'CN=x,O="Quoted, Inc.",OU=a;b'
    assert parse_xfcc(value) == _der(a)


def test_xfcc_unquoted_url_encoded_cert(certs: tuple[x509.Certificate, ...]) -> None:
    a, _ = certs
    assert parse_xfcc(f"Hash=ab;Cert={_pem_param(a)}") == _der(a)
    assert parse_xfcc(f"hash=ab;cert={_pem_param(a)}") == _der(a)  # keys are case-insensitive


@pytest.mark.parametrize(
    "value",
    [
        "",
        'Hash=abc;Subject="CN=x"',  # no Cert
        'Cert="-----BEGIN%20CERTIFICATE-----"',  # no END line
        'Cert="not a pem"',
        'Cert="-----BEGIN%20CERTIFICATE-----%0A%21%21%21%0A-----END%20CERTIFICATE-----%0A"',  # bad base64
        'Hash=abc;Subject="CN=unterminated',
        "Cert=" + "A" * (17 * 1024),
    ],
)
def test_xfcc_malformed(value: str) -> None:
    with pytest.raises(ValueError):
        parse_xfcc(value)


def test_xfcc_cert_only_in_an_earlier_element_is_not_used(certs: tuple[x509.Certificate, ...]) -> None:
    a, _ = certs
    # the nearest proxy (last element) forwarded no certificate: an upstream element must not speak for it
    with pytest.raises(ValueError):
        parse_xfcc(f'Cert="{_pem_param(a)}",By=spiffe://edge;Hash=00')


def _identity(cert: x509.Certificate) -> ClientIdentity:
    return identity_from_der(_der(cert))


def test_xfcc_value_format(certs: tuple[x509.Certificate, ...]) -> None:
    a, _ = certs
    ident = _identity(a)
    value = xfcc_value(ident)
    assert value.startswith(f"Hash={ident.sha256};Subject=")
    assert value.endswith(";DNS=device-1.example.app")
    parsed = _split_elements(value)
    assert len(parsed) == 1
    assert parsed[0]["hash"] == ident.sha256
    assert parsed[0]["subject"] == ident.subject
    assert '"' in ident.subject and "," in ident.subject  # the quoting was exercised
    assert xfcc_value(ident, by="spiffe://gw").startswith(f"By=spiffe://gw;Hash={ident.sha256};")


def test_xfcc_value_with_uri_and_dns_sans() -> None:
    ca_cert, ca_key = gw_certs.make_ca("xfcc CA")
    cert, _ = gw_certs.make_leaf(
        ca_cert,
        ca_key,
        "dev",
        server=False,
        sans=[
            x509.UniformResourceIdentifier("spiffe://trust.domain/device/1"),
            x509.UniformResourceIdentifier("https://x.example/a,b"),  # would break the format: left out
            x509.DNSName("a.example.app"),
            x509.DNSName("b.example.app"),
        ],
    )
    ident = _identity(cert)
    assert xfcc_value(ident) == (
        f'Hash={ident.sha256};Subject="{ident.subject}";URI=spiffe://trust.domain/device/1;'
        "DNS=a.example.app;DNS=b.example.app"
    )


def test_xfcc_value_leaves_out_names_that_would_break_the_header_or_its_format() -> None:
    """Names in a CA-signed certificate can hold any character (a device that enrolls with its own CSR picks them): a
    DNS name with ';' or ',' added elements of its own to what the origin reads (`URI=spiffe://evil/admin`), and a
    CR or LF in any name made each request of that client a 500 (aiohttp refuses such a header). Such names are
    left out, as URIs with ',' or ';' already were; the Hash always goes. The twin: plain names go as before."""
    ca_cert, ca_key = gw_certs.make_ca("xfcc CA")
    odd = x509.DNSName._init_without_validation
    cert, _ = gw_certs.make_leaf(
        ca_cert,
        ca_key,
        "dev\r\nX-Injected: 1",
        server=False,
        sans=[
            odd("a.example;URI=spiffe://evil/admin"),
            odd('b.example,By="x"'),
            odd("c.example\r\nX-Injected: 1"),
            x509.UniformResourceIdentifier._init_without_validation("spiffe://trust.domain/\n1"),
            x509.UniformResourceIdentifier("spiffe://trust.domain/device/1"),
            x509.DNSName("ok.example.app"),
        ],
    )
    ident = _identity(cert)
    value = xfcc_value(ident)
    assert value == f"Hash={ident.sha256};URI=spiffe://trust.domain/device/1;DNS=ok.example.app"
    assert len(_split_elements(value)) == 1
    plain, _ = gw_certs.make_leaf(ca_cert, ca_key, "dev", server=False, sans=[x509.DNSName("ok.example.app")])
    twin = _identity(plain)
    assert xfcc_value(twin) == f'Hash={twin.sha256};Subject="{twin.subject}";DNS=ok.example.app'
