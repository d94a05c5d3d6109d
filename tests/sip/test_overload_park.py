"""sip/overload.py: the detector's timer parks on an idle server and the first message read re-arms it.

Everything on a Clock, with the detector wired by ``install`` to a real TransportLayer (an in-memory
UDP listener and one TCP connection on a StringTransport), so a message re-arms the timer the way it
does in the server: through the transport's one-shot ``on_read``. A busy reactor is simulated by
advancing the Clock past a tick's due time (the tick then runs that much late), a UDP backlog by the
queue delay the transport reports per wake-up before it hands the datagrams on (UDPEndpoint.drain).
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from libon_tsilo.sip.overload import OverloadDetector, install
from libon_tsilo.sip.transport import TransportLayer
from libon_tsilo.sip.twisted_io import ServerFactory
from tests.sip.fakes import Env
from tests.sip.test_transport_flow_contract import MemorySocket
from tests.sip.tlsutil import sip_request

INTERVAL = 0.1
UDP_VIA = "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK-u"
TCP_VIA = "SIP/2.0/TCP 10.1.2.3:40000;branch=z9hG4bK-t"


def new_detector(clock: Clock) -> OverloadDetector:
    return OverloadDetector(clock, enter_lag=0.1, leave_lag=0.02, interval=INTERVAL)


def run(clock: Clock, seconds: float) -> None:
    """Let ``seconds`` pass on an idle reactor: every timer fires on time."""
    end = clock.seconds() + seconds
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= end]
        if not due:
            clock.advance(max(0.0, end - clock.seconds()))
            return
        clock.advance(max(min(due) - clock.seconds(), 1e-12))


class Node:
    """A detector installed on a real TransportLayer, on its own Clock."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.layer = TransportLayer([], self.clock, 60, 4096)
        self.got: list = []
        self.layer.sink = lambda msg, flow: self.got.append(msg)
        self.sock = MemorySocket()
        self.layer.add_udp_endpoint(self.sock)
        self.tcp = ServerFactory(self.layer, "tcp").buildProtocol(None)
        self.tcp.makeConnection(StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 5060), peerAddress=IPv4Address("TCP", "10.1.2.3", 40000)
        ))
        self.d = new_detector(self.clock)
        install(self.d, self.layer, Env().layer, retry_after=7)
        self.d.start()
        self.n = 0

    def udp(self, queue_delay: float | None = None) -> None:
        """One UDP wake-up: its queue delay reported first, then its datagram, as drain() does."""
        if queue_delay is not None and self.layer.on_queue_delay is not None:
            self.layer.on_queue_delay(queue_delay)
        self.n += 1
        self.layer.datagram_received(self.sock, sip_request(via=UDP_VIA, call_id=f"u{self.n}"), ("192.0.2.1", 5070))

    def stream(self, data: bytes | None = None) -> None:
        self.n += 1
        self.tcp.dataReceived(sip_request(via=TCP_VIA, call_id=f"t{self.n}") if data is None else data)

    def ticking(self) -> bool:
        """Is the detector's timer armed? (The connection's own deadlines are on the Clock too.)"""
        return any(getattr(c.func, "__self__", None) is self.d for c in self.clock.getDelayedCalls())

    def run(self, seconds: float) -> None:
        run(self.clock, seconds)

    def park(self) -> None:
        self.run(3 * INTERVAL)
        assert not self.ticking() and self.d.parks >= 1


def test_a_tick_that_saw_no_message_parks_the_timer():
    node = Node()
    for _ in range(20):  # a message every tick: the timer keeps ticking
        node.udp()
        node.run(INTERVAL)
        assert node.ticking()
    assert node.d.parks == 0
    node.run(INTERVAL)  # a tick that saw none
    assert not node.ticking() and node.d.parks == 1
    assert node.d.stats()["parks"] == 1 and node.d.stats()["state"] == "normal"
    node.run(3600)  # nothing wakes an idle server
    assert not node.ticking() and node.d.parks == 1
    assert len(node.got) == 20


def test_a_datagram_rearms_the_timer_one_interval_later_and_a_quiet_tick_parks_it_again():
    node = Node()
    node.park()
    node.run(50)
    now = node.clock.seconds()
    node.udp()
    [timer] = [c for c in node.clock.getDelayedCalls() if getattr(c.func, "__self__", None) is node.d]
    assert timer.getTime() == now + INTERVAL
    assert node.layer.on_read is None  # consumed: the next datagrams pay one `is None` test
    node.udp()
    node.run(INTERVAL)
    assert node.ticking()  # that tick saw messages: it ticks on, and waits for the next one
    assert node.layer.on_read is not None
    node.run(INTERVAL)
    assert not node.ticking() and node.d.parks == 2


def test_stream_bytes_rearm_the_timer_even_before_the_message_is_complete():
    node = Node()
    node.stream()
    node.park()
    raw = sip_request(via=TCP_VIA, call_id="partial")
    node.stream(raw[:10])
    assert node.ticking()
    node.stream(raw[10:])
    assert node.got[-1].call_id == "partial"


def test_a_new_connection_rearms_the_timer_before_its_first_byte():
    # a TLS handshake is work the reactor does before any message: a flood of them shows as lag
    node = Node()
    node.park()
    proto = ServerFactory(node.layer, "tcp").buildProtocol(None)
    proto.makeConnection(StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 5060), peerAddress=IPv4Address("TCP", "10.1.2.4", 40001)
    ))
    assert node.ticking()


def test_no_park_while_overloaded_or_with_lag_left_to_decay():
    node = Node()
    for _ in range(2):
        node.udp()
        node.clock.advance(INTERVAL + 0.5)  # the reactor held 0.6 s: the tick is 0.5 s late
    assert node.d.overloaded
    node.run(INTERVAL * 10)  # no message since, but overloaded: the fraction must come back
    assert node.ticking() and node.d.parks == 0
    node.run(INTERVAL * 30)
    assert not node.d.overloaded and node.d.fraction == 1.0
    # parked only once the smoothed lag has decayed to ~0, on a tick that saw no message
    assert not node.ticking() and node.d.parks == 1 and node.d.lag < 0.005


def test_the_first_tick_after_a_park_measures_from_its_arming_not_from_the_park():
    node = Node()
    node.park()
    node.run(3600)
    node.udp()
    node.run(INTERVAL)  # on time
    assert node.d.max_lag < 1e-6 and node.d.lag < 1e-6 and not node.d.overloaded


def detection(node: Node | None, start: float, wake: float, growth: float | None) -> float:
    """Seconds from ``start`` to overload, a wake-up each ``wake`` seconds of reactor work: UDP whose
    oldest datagram waited ``growth`` * the time since the burst began, or (growth None) TCP bytes.
    ``node`` None: today's detector, which ticks whatever comes (nothing tells it of messages)."""
    if node is None:
        clock = Clock()
        d = new_detector(clock)
        d.start()
    else:
        clock, d = node.clock, node.d
    run(clock, start)
    if node is not None:
        assert not node.ticking()  # the burst finds the detector parked
    while not d.overloaded:
        t = clock.seconds() - start
        assert t < 5.0
        if node is None:
            if growth is not None:
                d.observe_delay(growth * t)
        elif growth is None:
            node.stream()
        else:
            node.udp(growth * t)
        clock.advance(wake)
    return clock.seconds() - start


def test_a_udp_burst_on_a_parked_detector_is_seen_at_most_one_interval_later_than_today():
    # a wake-up every 10 ms, each finding the oldest datagram older: arrivals at twice capacity
    for k in range(20):  # the burst at every phase of today's ticks
        start = 5.0 + k * INTERVAL / 20
        node = Node()
        parked = detection(node, start, wake=0.01, growth=1.0)
        today = detection(None, start, wake=0.01, growth=1.0)
        assert parked <= today + INTERVAL + 1e-9, (start, parked, today)
        assert parked < 0.6
        assert node.d.max_lag > 0.2  # the queue delay counted, from the first tick on


def test_a_tcp_only_burst_on_a_parked_detector_is_seen_at_most_one_interval_later_than_today():
    # no queue delay over a stream: only the timer's lateness shows the burst (each batch of bytes
    # holds the reactor 0.3 s); the stream's bytes are what re-arm the timer
    for k in range(20):
        start = 5.0 + k * INTERVAL / 20
        node = Node()
        parked = detection(node, start, wake=0.3, growth=None)
        today = detection(None, start, wake=0.3, growth=None)
        assert parked <= today + INTERVAL + 1e-9, (start, parked, today)
        assert node.d.overloaded and node.d.episodes == 1


def test_a_detector_nothing_tells_of_messages_never_parks():
    clock = Clock()
    d = new_detector(clock)
    d.start()
    for _ in range(100):
        clock.advance(INTERVAL)
    assert d.parks == 0 and len(clock.getDelayedCalls()) == 1


def test_stop_while_parked_unhooks_and_a_message_after_it_arms_nothing():
    node = Node()
    node.park()
    node.d.stop()
    assert node.layer.on_read is None
    node.udp()
    assert not node.ticking()
    node.d.start()
    assert node.ticking()
    node.run(INTERVAL)
    assert node.layer.on_read is not None  # the first tick sets the hook again
