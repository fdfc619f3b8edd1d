"""Handshake failure causes (core/handshake.py): OpenSSL's reason and verify code -> a closed set of labels."""

from __future__ import annotations

import pytest

from gateway.core.handshake import CAUSES, classify


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (2, "untrusted"),
        (9, "expired"),  # not yet valid
        (10, "expired"),
        (18, "untrusted"),
        (19, "untrusted"),
        (20, "untrusted"),
        (21, "untrusted"),
        (23, "revoked"),
        (24, "untrusted"),
        (26, "purpose"),
        (3, "revoked"),  # no CRL while CRL checking is on
        (12, "revoked"),  # CRL expired
        (7, "untrusted"),  # any other verification failure: signature failure
        (9999, "untrusted"),
    ],
)
def test_verify_codes(code: int, cause: str) -> None:
    assert classify("CERTIFICATE_VERIFY_FAILED", code) == cause
    assert classify(None, code) == cause  # the code decides, whatever the reason string


@pytest.mark.parametrize(
    ("reason", "cause"),
    [
        ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "no_cert"),
        ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "no_cert"),
        ("CERTIFICATE_VERIFY_FAILED", "untrusted"),
        ("UNSUPPORTED_PROTOCOL", "protocol"),
        ("VERSION_TOO_LOW", "protocol"),
        ("WRONG_VERSION_NUMBER", "protocol"),
        ("HTTP_REQUEST", "protocol"),  # plain HTTP sent to the TLS port
        ("NO_SHARED_CIPHER", "protocol"),
        ("TLSV1_ALERT_PROTOCOL_VERSION", "protocol"),
        ("INAPPROPRIATE_FALLBACK", "protocol"),
        ("UNEXPECTED_EOF_WHILE_READING", "protocol"),
        ("SSLV3_ALERT_BAD_CERTIFICATE", "other"),
        ("something new in OpenSSL 4", "other"),
        ("", "other"),
        (None, "other"),
    ],
)
def test_reasons(reason: str | None, cause: str) -> None:
    assert classify(reason, None) == cause
    assert classify(reason, 0) == cause  # verify code 0 is X509_V_OK: no verification failure


def test_every_result_is_in_the_closed_set() -> None:
    reasons = [None, "", "PEER_DID_NOT_RETURN_A_CERTIFICATE", "HTTP_REQUEST", "x" * 1000, "CERTIFICATE_VERIFY_FAILED"]
    for reason in reasons:
        for code in [None, 0, 1, 2, 9, 10, 23, 26, 50, -1]:
            assert classify(reason, code) in CAUSES


def test_causes_are_unique_label_values() -> None:
    assert len(set(CAUSES)) == len(CAUSES)
    assert all(c.isidentifier() and c.islower() for c in CAUSES)
    # the causes the listener reports itself, outside classify(), are in the set too
    assert {"timeout", "aborted", "purpose", "no_cert"} <= set(CAUSES)


def test_only_the_verdicts_on_the_client_certificate_are_alerted() -> None:
    from gateway.core.handshake import CAUSES, alert_tells_client

    told = {cause for cause in CAUSES if alert_tells_client(cause)}
    assert told == {"no_cert", "untrusted", "expired", "revoked", "purpose"}
    assert not alert_tells_client("protocol") and not alert_tells_client("other")  # scanners probe these
