"""Client identity in HTTP headers: reading it from a trusted front proxy, writing it for the origin.

Owns the two formats. RFC 9440 `Client-Cert: :<base64 DER>:` (a structured-field byte sequence) and Envoy's
`x-forwarded-client-cert` (`By=...;Hash=...;Cert="<url-encoded PEM>";Subject="...";URI=...;DNS=...`, elements
separated by commas, the last one added by the nearest proxy). Pure: parsing returns DER bytes or raises ValueError.
Whether a header may be believed at all (it comes from a configured front proxy) is decided by the caller.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse

from gateway.core.identity import ClientIdentity

CLIENT_CERT = "Client-Cert"
XFCC = "X-Forwarded-Client-Cert"
IDENTITY_HEADERS = (CLIENT_CERT, "Client-Cert-Chain", XFCC)

_MAX_HEADER = 16 * 1024


def parse_client_cert(value: str) -> bytes:
    """DER bytes from an RFC 9440 Client-Cert header value."""
    value = value.strip()
    if len(value) > _MAX_HEADER or len(value) < 3 or not (value.startswith(":") and value.endswith(":")):
        raise ValueError("Client-Cert must be a structured-field byte sequence ':<base64>:'")
    try:
        return base64.b64decode(value[1:-1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("Client-Cert is not valid base64") from None


def _split_elements(value: str) -> list[dict[str, str]]:
    """XFCC elements (comma separated) of `key=value` pairs (semicolon separated); quoted values may hold , and ;."""
    elements: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key, buf, in_quotes, reading_key = "", "", False, True
    i = 0
    while i < len(value):
        ch = value[i]
        if in_quotes:
            if ch == "\\" and i + 1 < len(value):
                buf += value[i + 1]
                i += 2
                continue
            if ch == '"':
                in_quotes = False
            else:
                buf += ch
        elif ch == '"':
            in_quotes = True
        elif ch == "=" and reading_key:
            key, buf, reading_key = buf.strip(), "", False
        elif ch in ";,":
            if key:
                current[key.lower()] = buf
            key, buf, reading_key = "", "", True
            if ch == ",":
                elements.append(current)
                current = {}
        else:
            buf += ch
        i += 1
    if in_quotes:
        raise ValueError("x-forwarded-client-cert has an unterminated quote")
    if key:
        current[key.lower()] = buf
    elements.append(current)
    return elements


def parse_xfcc(value: str) -> bytes:
    """DER bytes of the client certificate in the last XFCC element (the one the nearest proxy added)."""
    if len(value) > _MAX_HEADER:
        raise ValueError("x-forwarded-client-cert is too long")
    last = _split_elements(value)[-1]
    pem = last.get("cert")
    if not pem:
        raise ValueError("x-forwarded-client-cert carries no Cert= element (configure the proxy to forward it)")
    text = urllib.parse.unquote(pem)
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if not lines or lines[0] != "-----BEGIN CERTIFICATE-----" or "-----END CERTIFICATE-----" not in lines:
        raise ValueError("x-forwarded-client-cert Cert= is not a PEM certificate")
    body = "".join(lines[1 : lines.index("-----END CERTIFICATE-----")])
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("x-forwarded-client-cert Cert= is not valid base64") from None


def client_cert_value(der: bytes) -> str:
    return ":" + base64.b64encode(der).decode("ascii") + ":"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fits_header(value: str) -> bool:
    """No control character: a header value cannot carry CR or LF (aiohttp refuses to send it), nor should others."""
    return not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)


def _fits_unquoted(value: str) -> bool:
    """Safe as an unquoted XFCC value: no separator (`,` `;`) or quote that would start elements or pairs of its own."""
    return _fits_header(value) and not any(ch in value for ch in ',;"')


def xfcc_value(identity: ClientIdentity, by: str | None = None) -> str:
    """`By=...;Hash=...;Subject="...";URI=...;DNS=...` as Envoy writes it (URI/DNS repeated per SAN).

    A name of the certificate that cannot be written faithfully is left out (the Hash always goes): a subject with
    a control character, a URI or DNS name with one or with `,` `;` `"` (a CA signs what a device's request names)."""
    parts = []
    if by:
        parts.append(f"By={by}")
    parts.append(f"Hash={identity.sha256}")
    if _fits_header(identity.subject):
        parts.append(f"Subject={_quote(identity.subject)}")
    parts.extend(f"URI={uri}" for uri in identity.san_uri if _fits_unquoted(uri))
    parts.extend(f"DNS={dns}" for dns in identity.san_dns if _fits_unquoted(dns))
    return ";".join(parts)
