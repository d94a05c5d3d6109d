"""TLS transport with a throwaway CA: server side, client verification, outbound client, bad files."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.defer import DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock

from libon_tsilo.sip.message import make_response, parse_message
from libon_tsilo.sip.tls import TLSConfigError, TLSContextFactory
from libon_tsilo.sip.transport import Target, TransportLayer
from tests.sip.tlsutil import StreamPeer, TestPKI, sip_request, wait

VIA = "SIP/2.0/TLS 127.0.0.1:5099;rport;branch=z9hG4bK-tls"


@pytest.fixture
def pki(tmp_path) -> TestPKI:
    return TestPKI(tmp_path / "pki")


class Server:
    def __init__(self, tls: TLSContextFactory, listen: str = "tls:127.0.0.1:0") -> None:
        self.clock = Clock()
        self.layer = TransportLayer([listen], self.clock, 60, 4096, tls_context_factory=tls)
        self.inbox: DeferredQueue = DeferredQueue()
        self.layer.sink = lambda msg, flow: self.inbox.put((msg, flow))
        self.errors: DeferredQueue = DeferredQueue()
        self.layer.on_send_error = lambda target, reason: self.errors.put((target, reason))
        self.layer.startService()

    @property
    def port(self) -> int:
        return self.layer.bound[0][2]

    def next(self):
        return wait(self.inbox.get())


@pytest.fixture
def server():
    made: list[Server] = []

    def make(tls: TLSContextFactory, **kw) -> Server:
        s = Server(tls, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        pytest_twisted.blockon(s.layer.stopService())
        assert s.layer.flows.live_count() == 0 and s.layer._protos == {}


@pytest.fixture
def tls_listener():
    """A plain TLS server (our test peer) whose accepted connections are StreamPeers."""
    ports: list = []

    def make(cert, key, ca_file=None) -> tuple[DeferredQueue, int]:
        accepted: DeferredQueue = DeferredQueue()

        class F(Factory):
            def buildProtocol(self, addr):
                peer = StreamPeer()
                accepted.put(peer)
                return peer

        opts = TLSContextFactory(str(cert), str(key)).server_options()
        ports.append(reactor.listenSSL(0, F(), opts, interface="127.0.0.1"))
        return accepted, ports[-1].getHost().port

    yield make
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


def _client_options(pki: TestPKI, hostname: str = "localhost", cert=None):
    ca = ssl.Certificate.loadPEM(pki.ca_file.read_bytes())
    client_cert = None
    if cert is not None:
        client_cert = ssl.PrivateCertificate.loadPEM(cert.cert.read_bytes() + cert.key.read_bytes())
    return ssl.optionsForClientTLS(hostname, trustRoot=ca, clientCertificate=client_cert)


async def tls_connect(port: int, options) -> StreamPeer:
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
    return await wait(connectProtocol(endpoint, StreamPeer()))


@pytest_twisted.ensureDeferred
async def test_tls_server_request_and_response(pki, server) -> None:
    issued = pki.issue("server")
    s = server(TLSContextFactory(str(issued.cert), str(issued.key)))
    client = await tls_connect(s.port, _client_options(pki))
    client.transport.write(sip_request(via=VIA))
    msg, flow = await s.next()
    assert flow.transport == "tls" and flow.id.startswith("tls:127.0.0.1:")
    assert msg.top_via.received == "127.0.0.1"
    s.layer.send_response(make_response(msg, 200), flow)
    kind, data = await client.next()
    assert kind == "msg" and parse_message(data).status == 200


@pytest_twisted.ensureDeferred
async def test_verify_client_requires_a_certificate_from_the_ca(pki, server) -> None:
    issued = pki.issue("server")
    tls = TLSContextFactory(str(issued.cert), str(issued.key), ca_file=str(pki.ca_file), verify_client=True)
    s = server(tls)
    # without a client certificate the handshake fails and nothing reaches the sink
    anonymous = await tls_connect(s.port, _client_options(pki))
    anonymous.transport.write(sip_request(via=VIA, call_id="anon"))
    await wait(anonymous.closed)
    # with one, it works
    phone = pki.issue("phone", client=True)
    client = await tls_connect(s.port, _client_options(pki, cert=phone))
    client.transport.write(sip_request(via=VIA, call_id="mtls"))
    msg, _ = await s.next()
    assert msg.call_id == "mtls"
    assert s.inbox.pending == []


@pytest_twisted.ensureDeferred
async def test_outbound_tls_verifies_server_by_ip(pki, server, tls_listener) -> None:
    ours = pki.issue("ours", key_in_cert_file=True)
    s = server(TLSContextFactory(str(ours.cert), ca_file=str(pki.ca_file)))
    peer_cert = pki.issue("peer", dns=("peer.example.com",), ips=("127.0.0.1",))
    accepted, port = tls_listener(peer_cert.cert, peer_cert.key)
    req = parse_message(sip_request(method="MESSAGE", via="SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK-o"))
    flow = s.layer.send_request(req, Target("tls", "127.0.0.1", port))
    peer = await wait(accepted.get())
    kind, data = await peer.next()
    assert kind == "msg" and parse_message(data).method == "MESSAGE"
    peer.transport.write(make_response(parse_message(data), 200).to_bytes())
    resp, rflow = await s.next()
    assert resp.status == 200 and rflow is flow and flow.transport == "tls"
    assert s.errors.pending == []


@pytest_twisted.ensureDeferred
async def test_outbound_tls_by_server_name(pki, server, tls_listener) -> None:
    s = server(TLSContextFactory(ca_file=str(pki.ca_file)), listen="udp:127.0.0.1:0")
    peer_cert = pki.issue("peer", dns=("peer.example.com",), ips=())
    accepted, port = tls_listener(peer_cert.cert, peer_cert.key)
    req = parse_message(sip_request(method="MESSAGE", via="SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK-n"))
    s.layer.send_request(req, Target("tls", "127.0.0.1", port, server_name="peer.example.com"))
    peer = await wait(accepted.get())
    kind, data = await peer.next()
    assert parse_message(data).method == "MESSAGE"


@pytest_twisted.ensureDeferred
async def test_outbound_tls_untrusted_or_wrong_name_is_reported(pki, server, tls_listener, tmp_path) -> None:
    s = server(TLSContextFactory(ca_file=str(pki.ca_file)), listen="udp:127.0.0.1:0")
    rogue = TestPKI(tmp_path / "rogue").issue("rogue")
    _, rogue_port = tls_listener(rogue.cert, rogue.key)
    req = parse_message(sip_request(via="SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bK-r"))
    target = Target("tls", "127.0.0.1", rogue_port)
    flow = s.layer.send_request(req, target)
    got, reason = await wait(s.errors.get())
    assert got is target and "TLS" in reason
    assert not flow.live
    # a trusted certificate that does not name the host we asked for
    other = pki.issue("other", dns=("other.example.com",), ips=())
    _, other_port = tls_listener(other.cert, other.key)
    target = Target("tls", "127.0.0.1", other_port)
    s.layer.send_request(req, target)
    got, reason = await wait(s.errors.get())
    assert got is target
    assert s.layer.flows.live_count() == 0


def test_context_factory_errors(pki, tmp_path) -> None:
    issued = pki.issue("server")
    other = pki.issue("other")
    with pytest.raises(TLSConfigError, match="tls.certificate: cannot read"):
        TLSContextFactory(str(tmp_path / "missing.pem"), str(issued.key))
    with pytest.raises(TLSConfigError, match="does not match"):
        TLSContextFactory(str(issued.cert), str(other.key))
    with pytest.raises(TLSConfigError, match="no PEM private key"):
        TLSContextFactory(str(issued.cert))
    with pytest.raises(TLSConfigError, match="tls.ca_file: required"):
        TLSContextFactory(str(issued.cert), str(issued.key), verify_client=True)
    with pytest.raises(TLSConfigError, match="tls.certificate: required"):
        TLSContextFactory(private_key=str(issued.key))
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSConfigError, match="bad certificate"):
        TLSContextFactory(ca_file=str(junk))
    with pytest.raises(TLSConfigError, match="needs a certificate"):
        TLSContextFactory(ca_file=str(pki.ca_file)).server_options()
    assert TLSContextFactory(str(issued.cert), str(issued.key)).has_certificate


def test_key_that_cannot_sign_is_a_config_error(pki, tmp_path) -> None:
    # an X25519 key loads but TLS cannot sign with it: one line naming the key, not a TypeError
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519

    key = tmp_path / "x25519.pem"
    key.write_bytes(x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    with pytest.raises(TLSConfigError, match=r"tls.private_key: X25519PrivateKey .* cannot sign"):
        TLSContextFactory(str(pki.issue("server").cert), str(key))
