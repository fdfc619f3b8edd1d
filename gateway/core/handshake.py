"""Names the cause of a failed TLS handshake, from what OpenSSL reported.

Pure: takes the `reason` string and `verify_code` of an `ssl.SSLError` (or the name of another exception) and
returns one of `CAUSES`, the closed set used as the `cause` metric label.
"""

from __future__ import annotations

CAUSES: tuple[str, ...] = (
    "no_cert",
    "untrusted",
    "expired",
    "revoked",
    "purpose",
    "pin",
    "protocol",
    "timeout",
    "aborted",
    "other",
)

# X509_V_ERR_* codes (openssl/x509_vfy.h)
_VERIFY_CODES = {
    2: "untrusted",  # unable to get issuer certificate
    9: "expired",  # certificate is not yet valid
    10: "expired",  # certificate has expired
    18: "untrusted",  # self-signed leaf
    19: "untrusted",  # self-signed certificate in chain
    20: "untrusted",  # unable to get local issuer certificate
    21: "untrusted",  # unable to verify the first certificate
    23: "revoked",
    24: "untrusted",  # invalid CA certificate
    26: "purpose",  # unsupported certificate purpose
    3: "revoked",  # unable to get CRL (CRL checking on, no CRL)
    12: "revoked",  # CRL has expired
}

_PROTOCOL_REASONS = {
    "UNSUPPORTED_PROTOCOL",
    "NO_PROTOCOLS_AVAILABLE",
    "WRONG_VERSION_NUMBER",
    "VERSION_TOO_LOW",
    "TLSV1_ALERT_PROTOCOL_VERSION",
    "NO_SHARED_CIPHER",
    "NO_SUITABLE_SIGNATURE_ALGORITHM",
    "HTTP_REQUEST",
    "HTTPS_PROXY_REQUEST",
    "UNEXPECTED_MESSAGE",
    "UNEXPECTED_EOF_WHILE_READING",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "UNKNOWN_PROTOCOL",
    "INAPPROPRIATE_FALLBACK",
    "TLSV1_ALERT_INAPPROPRIATE_FALLBACK",
}


def classify(reason: str | None, verify_code: int | None) -> str:
    """The cause of a handshake failure, one of `CAUSES`."""
    if verify_code:
        return _VERIFY_CODES.get(verify_code, "untrusted")
    if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
        return "no_cert"
    if reason == "CERTIFICATE_VERIFY_FAILED":
        return "untrusted"
    if reason in _PROTOCOL_REASONS:
        return "protocol"
    return "other"


# the causes whose TLS alert the gateway sends before it drops the connection: its verdict on the client
# certificate, which the client's user needs to see (certificate required, unknown CA, expired, revoked,
# unsupported purpose). Protocol failures (old versions, no shared suite, unexpected messages) stay a bare close,
# as before: TLS scanners probe them by the thousand and some (sslyze) take an alert they do not expect for a bug.
ALERTED_CAUSES = frozenset({"no_cert", "untrusted", "expired", "revoked", "purpose"})


def alert_tells_client(cause: str) -> bool:
    """Whether the alert of a handshake that failed for `cause` (one of `CAUSES`) is sent to the client."""
    return cause in ALERTED_CAUSES
