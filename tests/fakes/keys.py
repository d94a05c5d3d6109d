"""Throw-away keys and certificates for the fake APNs: made on the fly, never committed.

- ``make_team_key()``: an APNs token-auth key, as Apple hands it out (a P-256 key in a PKCS#8
  PEM ``.p8`` file), plus its public half for the fake to check ES256 signatures.
- ``make_pki()``: a test CA, a server certificate for localhost/127.0.0.1 and a client
  certificate whose subject UID is the bundle id (what Apple's push certificates carry; the
  fake checks the topic against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.certs import issue, new_ca

__all__ = ["TeamKey", "Pki", "make_team_key", "make_pki"]


@dataclass(frozen=True)
class TeamKey:
    team_id: str
    key_id: str
    p8_pem: bytes  # private, PKCS#8 (what a .p8 file holds)
    public_pem: bytes

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write ``AuthKey_<kid>.p8`` and its public key; returns (p8 path, public path)."""
        p8 = directory / f"AuthKey_{self.key_id}.p8"
        pub = directory / f"AuthKey_{self.key_id}.pub.pem"
        p8.write_bytes(self.p8_pem)
        pub.write_bytes(self.public_pem)
        return p8, pub


def make_team_key(team_id: str = "TEAM123456", key_id: str = "KEY1234567") -> TeamKey:
    key = ec.generate_private_key(ec.SECP256R1())
    p8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return TeamKey(team_id, key_id, p8, pub)


@dataclass(frozen=True)
class Pki:
    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    client_pem: bytes  # client certificate + key in one PEM, as [[push.apns]] cert_file takes it

    def write(self, directory: Path) -> dict[str, Path]:
        paths = {
            "ca": directory / "ca.pem",
            "server_cert": directory / "server.pem",
            "server_key": directory / "server.key",
            "client": directory / "client.pem",
        }
        paths["ca"].write_bytes(self.ca_pem)
        paths["server_cert"].write_bytes(self.server_cert_pem)
        paths["server_key"].write_bytes(self.server_key_pem)
        paths["client"].write_bytes(self.client_pem)
        return paths


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def make_pki(bundle_id: str = "com.example.app") -> Pki:
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "libon-tsilo test CA")])
    ca_key, ca = new_ca(ca_name)

    srv, srv_key = issue(ca_key, ca, "localhost", ExtendedKeyUsageOID.SERVER_AUTH, ("localhost", "127.0.0.1"))
    cli_name = x509.Name(
        [
            x509.NameAttribute(NameOID.USER_ID, bundle_id),
            x509.NameAttribute(NameOID.COMMON_NAME, f"VoIP Services: {bundle_id}"),
        ]
    )
    cli, cli_key = issue(ca_key, ca, cli_name, ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    return Pki(
        ca_pem=ca.public_bytes(pem),
        server_cert_pem=srv.public_bytes(pem),
        server_key_pem=_pem_key(srv_key),
        client_pem=cli.public_bytes(pem) + _pem_key(cli_key),
    )
