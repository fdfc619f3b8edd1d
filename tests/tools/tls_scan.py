"""Scan a TLS endpoint with sslyze and check it against Mozilla's "intermediate" configuration.

Run with the interpreter of the scanner's own virtual environment (sslyze pins an older `cryptography` than the
gateway uses), as an operator runs a TLS scanner: `python tls_scan.py HOST PORT CA_FILE CERT KEY`.
Prints one JSON object: {"compliant": bool, "problems": {...}, "tls_versions": [...], "client_auth": "..."}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sslyze import (
    ClientAuthenticationCredentials,
    ScanCommandAttemptStatusEnum,
    Scanner,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)
from sslyze.plugins.certificate_info.implementation import CertificateInfoExtraArgument
from sslyze.scanner.models import ScanCommandsExtraArguments

VERSIONS = ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3")


def main(host: str, port: str, ca: str, cert: str, key: str) -> int:
    creds = ClientAuthenticationCredentials(certificate_chain_path=Path(cert), key_path=Path(key))
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(hostname="localhost", port=int(port), ip_address=host),
        network_configuration=ServerNetworkConfiguration(
            tls_server_name_indication="localhost", tls_client_auth_credentials=creds
        ),
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=Path(ca))
        ),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    for result in scanner.get_results():
        if result.scan_status != ServerScanStatusEnum.COMPLETED or result.scan_result is None:
            print(json.dumps({"compliant": False, "problems": {"connectivity": str(result.connectivity_error_trace)}}))
            return 1
        versions = []
        for name in VERSIONS:
            attempt = getattr(result.scan_result, f"{name}_cipher_suites")
            if attempt.status == ScanCommandAttemptStatusEnum.COMPLETED and attempt.result.accepted_cipher_suites:
                versions.append(name)
        problems: dict[str, str] = {}
        try:
            check_server_against_tls_configuration(
                result, MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
            )
        except ServerNotCompliantWithTlsConfiguration as exc:
            problems = dict(exc.issues)
        auth = result.connectivity_result.client_auth_requirement.name if result.connectivity_result else ""
        print(
            json.dumps({"compliant": not problems, "problems": problems, "tls_versions": versions, "client_auth": auth})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
