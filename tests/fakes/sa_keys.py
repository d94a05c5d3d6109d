"""Throw-away Google service accounts for tests: an RSA key made on the fly, never committed.

The JSON has the fields google-auth reads (``type``, ``project_id``, ``private_key_id``,
``private_key``, ``client_email``, ``token_uri``); ``token_uri`` points at the fake FCM server so
the OAuth2 JWT-bearer grant goes to loopback with a real RS256 assertion.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = ["TestServiceAccount", "make_service_account", "rsa_key_pair"]


@dataclass(frozen=True)
class TestServiceAccount:
    __test__ = False  # not a pytest test class despite the name

    project_id: str
    client_email: str
    private_key_pem: bytes
    public_key_pem: bytes
    private_key_id: str

    def to_json(self, token_uri: str) -> dict[str, str]:
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": self.private_key_pem.decode("ascii"),
            "client_email": self.client_email,
            "client_id": "100000000000000000001",
            "token_uri": token_uri,
        }

    def write(self, directory: Path, token_uri: str, name: str = "service-account.json") -> Path:
        """Write the service-account JSON into ``directory`` and return its path."""
        path = Path(directory) / name
        path.write_text(json.dumps(self.to_json(token_uri), indent=2))
        return path

    def write_public_key(self, directory: Path, name: str = "sa-pub.pem") -> Path:
        path = Path(directory) / name
        path.write_bytes(self.public_key_pem)
        return path


@functools.lru_cache(maxsize=4)
def rsa_key_pair(slot: int = 0) -> tuple[bytes, bytes]:
    """Return (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM).

    Cached per ``slot`` because RSA generation costs tens of milliseconds; tests that need a key
    the fake does not know ask for another slot.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public


def make_service_account(
    project_id: str = "tsilo-test", client_email: str | None = None, slot: int = 0
) -> TestServiceAccount:
    private, public = rsa_key_pair(slot)
    return TestServiceAccount(
        project_id=project_id,
        client_email=client_email or f"fcm-sender@{project_id}.iam.gserviceaccount.com",
        private_key_pem=private,
        public_key_pem=public,
        private_key_id=f"testkey{slot}",
    )
