"""TLS context factories for the SIP transports, built from the PEM files of the [tls] config section.

- Server side: ``CertificateOptions`` with our certificate, its chain (extra certificates after the
  leaf in the certificate file) and private key (its own file, or appended to the certificate file).
  With ``verify_client`` the peer must present a certificate issued by a CA in ``ca_file``.
- Client side: ``optionsForClientTLS`` so the server is verified by service_identity (DNS name or IP
  SAN); trust roots are ``ca_file`` when set, else the platform store. When we have a certificate we
  present it as a client certificate too (server-to-server SIP often wants mutual TLS).
- TLS 1.2 is the minimum on both sides.

Files are read once, at construction, so a bad file fails start-up with a message naming the file.
"""

from __future__ import annotations

import re
from typing import Any

from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

__all__ = ["TLSConfigError", "TLSContextFactory", "load_pem_certificates"]

_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_KEY_RE = re.compile(
    rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----.+?-----END (?:[A-Z]+ )?PRIVATE KEY-----", re.S
)
_MIN_VERSION = ssl.TLSVersion.TLSv1_2
# the key types a TLS server can sign its handshake with (and OpenSSL's Context accepts); an
# X25519, X448 or DH private key loads fine but can only do key agreement
_SigningKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey | dsa.DSAPrivateKey
)
_SIGNING_KEY_TYPES = (
    rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey, dsa.DSAPrivateKey,
)


class TLSConfigError(ValueError):
    """A TLS file is missing or unreadable; the message names the file."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"tls.{what}: cannot read {path!r}: {e.strerror or e}") from None


def load_pem_certificates(path: str, what: str = "ca_file") -> list[ssl.Certificate]:
    """Every certificate in a PEM file, in file order; TLSConfigError when there is none or one is bad."""
    data = _read(path, what)
    blocks = _CERT_RE.findall(data)
    if not blocks:
        raise TLSConfigError(f"tls.{what}: no PEM certificate in {path!r}")
    try:
        return [ssl.Certificate.loadPEM(b) for b in blocks]
    except Exception as e:
        raise TLSConfigError(f"tls.{what}: bad certificate in {path!r}: {e}") from None


def _load_key(path: str, what: str) -> _SigningKey:
    data = _read(path, what)
    match = _KEY_RE.search(data)
    if match is None:
        raise TLSConfigError(f"tls.{what}: no PEM private key in {path!r}")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, match.group(0)).to_cryptography_key()
    except Exception as e:
        raise TLSConfigError(f"tls.{what}: bad private key in {path!r}: {e}") from None
    if not isinstance(key, _SIGNING_KEY_TYPES):
        raise TLSConfigError(
            f"tls.{what}: {type(key).__name__.lstrip('_')} in {path!r} cannot sign:"
            " TLS needs an RSA, EC, Ed25519, Ed448 or DSA key"
        )
    return key


class TLSContextFactory:
    """Server options and per-destination client options for SIP over TLS."""

    def __init__(
        self,
        certificate: str = "",
        private_key: str = "",
        ca_file: str = "",
        verify_client: bool = False,
    ) -> None:
        if verify_client and not ca_file:
            raise TLSConfigError("tls.ca_file: required when tls.verify_client is true")
        self._chain: list[ssl.Certificate] = []
        self._key: crypto.PKey | None = None
        if certificate:
            self._chain = load_pem_certificates(certificate, "certificate")
            key = _load_key(private_key or certificate, "private_key" if private_key else "certificate")
            self._key = crypto.PKey.from_cryptography_key(key)
            leaf = self._chain[0].original
            try:
                ctx = SSL.Context(SSL.TLS_METHOD)
                ctx.use_certificate(leaf.to_cryptography())
                ctx.use_privatekey(key)
                ctx.check_privatekey()
            except SSL.Error:
                raise TLSConfigError(
                    f"tls.private_key: the key does not match the certificate {certificate!r}"
                ) from None
        elif private_key:
            raise TLSConfigError("tls.certificate: required when tls.private_key is set")
        self._cas = load_pem_certificates(ca_file, "ca_file") if ca_file else []
        self.verify_client = verify_client
        self._server: ssl.CertificateOptions | None = None

    @property
    def has_certificate(self) -> bool:
        return self._key is not None

    def server_options(self) -> ssl.CertificateOptions:
        """Context factory for listenSSL; needs a certificate."""
        if self._key is None:
            raise TLSConfigError("tls.certificate: a tls: listener needs a certificate and private key")
        if self._server is None:
            kwargs: dict[str, Any] = {}
            if self.verify_client:
                # a trustRoot on the server side makes the peer certificate required and verified
                kwargs["trustRoot"] = ssl.trustRootFromCertificates(self._cas)
            self._server = ssl.CertificateOptions(
                privateKey=self._key,
                certificate=self._chain[0].original,
                extraCertChain=[c.original for c in self._chain[1:]],
                raiseMinimumTo=_MIN_VERSION,
                **kwargs,
            )
        return self._server

    def client_creator(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """Connection creator that verifies the server's identity against ``hostname`` (name or IP)."""
        trust = ssl.trustRootFromCertificates(self._cas) if self._cas else ssl.platformTrust()
        client_cert = None
        if self._key is not None:
            client_cert = ssl.PrivateCertificate.fromCertificateAndKeyPair(
                self._chain[0], ssl.KeyPair(self._key)
            )
        extra: dict[str, Any] = {"raiseMinimumTo": _MIN_VERSION}
        if len(self._chain) > 1:
            extra["extraCertChain"] = [c.original for c in self._chain[1:]]
        return ssl.optionsForClientTLS(
            hostname, trustRoot=trust, clientCertificate=client_cert, extraCertificateOptions=extra
        )
