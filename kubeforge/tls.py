"""TLS between a Service's router and its replicas.

The operator gives each Service its own CA and one serving certificate that all its replicas
present, in the `<name>-tls` Secret. Replicas are reached at pod IPs, which are not known when
the certificate is made, so the certificate names the Service instead (`server_name`) and the
router checks that name, whichever pod answers. The CA's key is used once, to sign, and kept
nowhere: nothing can issue another certificate that routers of this Service would trust.

Routers mount only `ca.crt`; replicas the certificate and its key (`KUBEFORGE_TLS_DIR`).

With `spec.tls.issuerRef`, cert-manager issues the certificate into the same Secret instead,
and renews it: replicas load each new one (`follow`). Routers keep the CA they started with, so
the issuer must keep its CA across renewals (a CA issuer does), and the issuer is fixed for the
Service's life (the CRD refuses a change).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kubeforge.tokens import mounted_version

ENV_DIR = "KUBEFORGE_TLS_DIR"
MOUNT_PATH = "/var/run/kubeforge/tls"
KEY_CA, KEY_CERT, KEY_KEY = "ca.crt", "tls.crt", "tls.key"
log = logging.getLogger("kubeforge.tls")
VALIDITY = datetime.timedelta(days=3650)
# The `<name>-tls` Secret before cert-manager has issued into it: every key, each empty.
PENDING = {KEY_CA: b"", KEY_CERT: b"", KEY_KEY: b""}


def server_name(service: str, namespace: str) -> str:
    """The name a Service's replicas prove and its routers check."""
    return f"{service}.{namespace}.replicas.kubeforge.internal"


def issue(service: str, namespace: str, now: datetime.datetime) -> dict[str, bytes]:
    """A fresh CA and a serving certificate signed by it: the Secret's data (PEM)."""
    return issue_series(service, namespace, now, 1)[0]


def issue_series(
    service: str, namespace: str, now: datetime.datetime, count: int
) -> list[dict[str, bytes]]:
    """One fresh CA and `count` serving certificates it signed, each with a key of its own:
    a certificate and its renewals, as an issuer that keeps its CA makes them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common: str) -> x509.Name:  # a common name holds 64 characters at most
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common[:64])])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"kubeforge CA of {namespace}/{service}")
    start, end = now - datetime.timedelta(minutes=5), now + VALIDITY
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    dns = server_name(service, namespace)
    pem = serialization.Encoding.PEM
    series = []
    for _ in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"kubeforge replica {service}"))  # the name proven: the SAN
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        series.append(
            {
                KEY_CA: ca.public_bytes(pem),
                KEY_CERT: cert.public_bytes(pem),
                KEY_KEY: key.private_bytes(
                    pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                ),
            }
        )
    return series


def directory(environ: Mapping[str, str] = os.environ) -> Path | None:
    """Where the mounted `<name>-tls` Secret is, when TLS is on."""
    value = environ.get(ENV_DIR)
    return Path(value) if value else None


def _read(path: Path, keys: tuple[str, ...]) -> list[bytes]:
    base = mounted_version(path)
    return [(base / key).read_bytes() for key in keys]


def wait_issued(path: Path, keys: tuple[str, ...], poll: float = 0.5) -> None:
    """Block until the mounted Secret holds `keys` (cert-manager issues into a Secret that
    the operator made empty); says once what it waits for."""
    said = False
    while True:
        try:
            if all(_read(path, keys)):
                return
        except FileNotFoundError:
            pass
        if not said:
            log.warning(
                "waiting for %s in %s: the Service's certificate is not issued yet (with "
                "spec.tls.issuerRef, cert-manager issues it; see the Service's events)",
                ", ".join(keys),
                path,
            )
            said = True
        time.sleep(poll)


async def follow(path: Path, ctx: ssl.SSLContext, interval: float = 1.0) -> None:
    """Load each new certificate and key the Secret gets (a renewal) into `ctx`: the
    handshakes after it present the new one, connections already open go on. Until
    cancelled."""
    current = refused = _read(path, (KEY_CERT, KEY_KEY))
    while True:
        await asyncio.sleep(interval)
        try:
            base = mounted_version(path)
            cert, key = base / KEY_CERT, base / KEY_KEY
            loaded = [cert.read_bytes(), key.read_bytes()]
            if loaded in (current, refused) or not all(loaded):
                continue
            # Tried on a scratch context first: a pair that does not match would leave the
            # live one holding the new certificate with the old key.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:  # mid-update, or a pair that does not match
            log.warning("TLS certificate not reloaded, keeping the loaded one: %s", exc)
            refused = loaded  # tried again once the files change
            continue
        current = loaded
        log.info("TLS certificate reloaded (a renewal)")


def server_context(path: Path) -> ssl.SSLContext:
    """A replica's: its certificate and key. No session tickets: a router's pooled connection
    must carry nothing unread between calls (the relay drops one that does)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(path / KEY_CERT, path / KEY_KEY)
    ctx.num_tickets = 0
    return ctx


@dataclass(frozen=True)
class ClientTls:
    """A router's side: trust the Service's CA only, and check the Service's name."""

    context: ssl.SSLContext
    name: str
    ca: bytes  # PEM, for the native relay


def client(path: Path, name: str) -> ClientTls:
    wait_issued(path, (KEY_CA,))
    ca = (path / KEY_CA).read_bytes()
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ClientTls(ctx, name, ca)
