"""Test helpers for the transport tests.

- A throwaway PKI: a CA plus leaf certificates, written as PEM files under a test's tmp_path. Nothing
  generated here is committed; every run makes fresh keys (EC P-256: fast to generate).
- Loopback peers (UDP and stream) and a request builder, shared so the transport test modules do not
  import one another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, reactor
from twisted.internet.defer import DeferredQueue
from twisted.internet.protocol import DatagramProtocol, Protocol

from libon_tsilo.sip.framing import StreamFramer
from tests.certs import issue, new_ca

__all__ = ["TestPKI", "Issued", "make_pki", "UDPPeer", "StreamPeer", "sip_request", "wait"]


@dataclass
class Issued:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class TestPKI:
    """A CA under ``directory`` that can issue server and client certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, ca_name: str = "libon-tsilo test CA") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ca_key, self._ca_cert = new_ca(_name(ca_name))
        self.ca_file = self.dir / "ca.pem"
        self.ca_file.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        name: str,
        dns: tuple[str, ...] = ("localhost",),
        ips: tuple[str, ...] = ("127.0.0.1", "::1"),
        client: bool = False,
        key_in_cert_file: bool = False,
    ) -> Issued:
        """Issue a leaf certificate (server, or client with ``client=True``) and write cert/key PEM files."""
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert, key = issue(self._ca_key, self._ca_cert, name, usage, dns + ips)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        cert_path = self.dir / f"{name}.crt.pem"
        key_path = self.dir / f"{name}.key.pem"
        if key_in_cert_file:
            cert_path.write_bytes(cert_pem + _pem_key(key))
            key_path = cert_path
        else:
            cert_path.write_bytes(cert_pem)
            key_path.write_bytes(_pem_key(key))
        return Issued(cert_path, key_path)


def make_pki(directory: Path) -> TestPKI:
    return TestPKI(directory)


# -- loopback peers -------------------------------------------------------------------------------

WAIT = 5.0  # a guard against a hung test, not a sleep: every wait returns as soon as data arrives


def wait(d: defer.Deferred, seconds: float = WAIT) -> defer.Deferred:
    return d.addTimeout(seconds, reactor)


def sip_request(
    method: str = "OPTIONS",
    via: str = "SIP/2.0/UDP 127.0.0.1:5099;branch=z9hG4bK-t1",
    body: bytes = b"",
    content_length: int | None = -1,
    call_id: str = "call-1@test",
    extra: str = "",
) -> bytes:
    """A request; ``content_length=None`` leaves the header out, -1 computes it from the body."""
    lines = [
        f"{method} sip:bob@example.com SIP/2.0",
        f"Via: {via}",
        "Max-Forwards: 70",
        "From: <sip:alice@example.com>;tag=a1",
        "To: <sip:bob@example.com>",
        f"Call-ID: {call_id}",
        f"CSeq: 1 {method}",
    ]
    if extra:
        lines.append(extra)
    if content_length is not None:
        lines.append(f"Content-Length: {len(body) if content_length == -1 else content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class UDPPeer(DatagramProtocol):
    """A UDP endpoint whose received datagrams land in ``queue`` as (data, (host, port))."""

    def __init__(self) -> None:
        self.queue: DeferredQueue = DeferredQueue()

    def datagramReceived(self, data: bytes, addr) -> None:
        self.queue.put((data, (addr[0], addr[1])))

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.write(data, addr)

    def next(self) -> defer.Deferred:
        return wait(self.queue.get())


class StreamPeer(Protocol):
    """A TCP/TLS peer: framed items land in ``queue``; ("closed", b"") when the connection ends."""

    def __init__(self) -> None:
        self.queue: DeferredQueue = DeferredQueue()
        self.framer = StreamFramer()
        self.raw: DeferredQueue = DeferredQueue()  # every chunk as received
        self.closed: defer.Deferred = defer.Deferred()
        self.reason = None

    def dataReceived(self, data: bytes) -> None:
        self.raw.put(data)
        for item in self.framer.feed(data):
            self.queue.put(item)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.queue.put(("closed", b""))
        self.closed.callback(None)

    def next(self) -> defer.Deferred:
        return wait(self.queue.get())
