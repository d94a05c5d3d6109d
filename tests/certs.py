"""A throwaway test CA and certificates for 127.0.0.1, ::1 and localhost, made fresh per test session.

Nothing here is committed: keys are generated into a tmp dir (EC P-256, fast) by the `test_certs`
fixture in tests/conftest.py.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertPaths", "issue", "make_test_certs", "new_ca"]

DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class CertPaths:
    directory: Path
    ca: Path  # CA certificate (PEM): the trust root for clients
    cert: Path  # server certificate (PEM), signed by the CA
    key: Path  # server private key (PEM, PKCS#8, unencrypted)
    client_cert: Path  # a client certificate for mutual-TLS tests
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def new_ca(name: x509.Name) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh self-signed test CA (EC P-256, valid two days): the trust root every test PKI builds on."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name | str,
    usage: x509.ObjectIdentifier,
    hosts: tuple[str, ...] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by the CA: a server's (SERVER_AUTH) or a client's (CLIENT_AUTH), with
    ``hosts`` (IP addresses or DNS names) as its subjectAltName when given. Valid two days."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject) if isinstance(subject, str) else subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_test_certs(directory: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> CertPaths:
    """Write ca.pem, server.pem, server.key, client.pem, client.key into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_name = _name("libon-tsilo test CA")
    ca_key, ca_cert = new_ca(ca_name)
    server_cert, server_key = issue(ca_key, ca_cert, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, hosts)
    client_cert, client_key = issue(ca_key, ca_cert, "test-client", ExtendedKeyUsageOID.CLIENT_AUTH, ("localhost",))

    paths = CertPaths(
        directory=directory,
        ca=directory / "ca.pem",
        cert=directory / "server.pem",
        key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    pem = serialization.Encoding.PEM
    paths.ca.write_bytes(ca_cert.public_bytes(pem))
    paths.cert.write_bytes(server_cert.public_bytes(pem))
    _write_key(paths.key, server_key)
    paths.client_cert.write_bytes(client_cert.public_bytes(pem))
    _write_key(paths.client_key, client_key)
    return paths
