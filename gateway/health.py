"""`ota-gateway health`: ask the running gateway's admin listener for /healthz (or /readyz), as a probe would.

Owns the probe's I/O: it reads only the `admin` section of gateway.yaml (so a config edited on disk but not yet
reloaded does not make a healthy gateway look dead), connects on loopback when the listener is bound to a wildcard
address, and speaks plain HTTP or, with `admin.tls`, mTLS: it presents `admin.tls.health_cert`/`health_key` and
accepts only the server certificate in `admin.tls.cert`. What the answer means is decided in `core/probe.py`.
Exit codes: 0 healthy, 1 unhealthy or not reachable, 2 a config problem (`ConfigError`, reported by the CLI).
"""

from __future__ import annotations

import http.client
import os
import ssl
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from gateway.config import AdminListener, AdminTls
from gateway.core.probe import Verdict, judge, probe_host, probe_url, unreachable
from gateway.errors import ConfigError
from gateway.tls import TlsMaterialError, load_certificates
from gateway.yamlsrc import read_yaml, validate

MAX_BODY = 64 * 1024


def admin_section(config_path: Path) -> AdminListener:
    """The `admin` section of gateway.yaml, validated like `check` does; raises `ConfigError`."""
    doc = read_yaml(config_path)
    if not isinstance(doc.data, dict):
        raise ConfigError([doc.issue((), "the top level must be a mapping of keys")])
    context = {"base": os.path.dirname(os.path.abspath(config_path))}
    admin = validate(doc, AdminListener, doc.data.get("admin", {}), ("admin",), context)
    if not admin.enabled:
        raise ConfigError([doc.issue(("admin", "enabled"), "the admin listener is disabled: there is nothing to ask")])
    if admin.tls is not None and admin.tls.health_cert is None:
        raise ConfigError(
            [
                doc.issue(
                    ("admin", "tls"),
                    "admin.tls is set but admin.tls.health_cert/health_key are not: health needs a client "
                    "certificate the admin listener accepts",
                )
            ]
        )
    return admin


def _client_context(tls: AdminTls, config_path: Path) -> tuple[ssl.SSLContext, bytes]:
    """An mTLS client context presenting the health certificate, and the DER of the server certificate to expect."""
    assert tls.health_cert is not None and tls.health_key is not None
    try:
        expected = load_certificates(tls.cert, "cert")[0].public_bytes(serialization.Encoding.DER)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # the server is identified by its exact certificate (admin.tls.cert), not by a CA and a host name:
        # the probe talks to its own gateway on loopback
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(tls.health_cert, tls.health_key)
    except TlsMaterialError as exc:
        raise ConfigError.single(str(config_path), f"admin.tls.{exc.field}", None, str(exc)) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError.single(
            str(config_path), "admin.tls.health_cert", None, f"cannot use the health certificate: {exc}"
        ) from None
    return ctx, expected


def probe(config_path: Path, *, ready: bool, timeout: float) -> Verdict:
    """Ask the admin listener once; a config problem raises `ConfigError`."""
    admin = admin_section(config_path)
    url = probe_url(admin.address, admin.port, tls=admin.tls is not None, ready=ready)
    host = probe_host(admin.address)
    path = "/readyz" if ready else "/healthz"
    conn: http.client.HTTPConnection
    expected = b""
    if admin.tls is not None:
        ctx, expected = _client_context(admin.tls, config_path)
        conn = http.client.HTTPSConnection(host, admin.port, context=ctx, timeout=timeout)
    else:
        conn = http.client.HTTPConnection(host, admin.port, timeout=timeout)
    refused = "refused the health certificate (is admin.tls.health_cert issued by one of admin.tls.client_ca?)"
    connected = False
    try:
        conn.connect()
        connected = True
        if expected:
            sock = conn.sock
            assert isinstance(sock, ssl.SSLSocket)
            if sock.getpeercert(binary_form=True) != expected:
                return unreachable(url, "the listener presented a certificate other than admin.tls.cert")
        conn.request("GET", path, headers={"User-Agent": "ota-gateway-health"})
        resp = conn.getresponse()
        body = resp.read(MAX_BODY)
        return judge(url, resp.status, body)
    except TimeoutError:
        return unreachable(url, f"no answer within {timeout:g} s")
    except ssl.SSLError as exc:  # TLS 1.2: the handshake fails
        return unreachable(url, f"TLS failed ({exc.reason or exc}); the listener {refused}")
    except (OSError, http.client.HTTPException) as exc:
        if connected and expected:  # TLS 1.3: the refusal arrives on the first read
            return unreachable(url, f"the listener closed the connection: it {refused}")
        return unreachable(url, f"cannot connect: {getattr(exc, 'strerror', None) or exc}")
    finally:
        conn.close()
