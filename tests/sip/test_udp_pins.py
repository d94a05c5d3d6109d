"""sip/udp_pins.py: a connected socket on a shared (SO_REUSEPORT) UDP port brings one device's
datagrams to the worker that opened it; every other source keeps the worker the kernel's hash gave it.

Two TransportLayers in this process stand for two workers sharing a port (real loopback sockets,
OS-picked ports). Nothing runs the reactor while a test sends: each test reads the sockets itself
(``_collect``: every datagram sent lands on exactly one socket, so it waits until all are in), and
the pins' timers run on a Clock.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from libon_tsilo.sip.flow import FlowKey
from libon_tsilo.sip.transport import Target, TransportLayer
from libon_tsilo.sip.udp_pins import PIN_IDLE, PinReader


class _Readers:
    """The pins' reactor: remembers the readers, which the test reads itself."""

    def __init__(self, fail: bool = False) -> None:
        self.readers: list[PinReader] = []
        self.fail = fail

    def addReader(self, reader: PinReader) -> None:
        if self.fail:
            raise RuntimeError("no more readers")
        self.readers.append(reader)

    def removeReader(self, reader: PinReader) -> None:
        self.readers.remove(reader)


class _Worker:
    def __init__(self, name: str, listen: str, clock: Clock, max_pins: int) -> None:
        self.name = name
        self.layer = TransportLayer([listen], clock, 60, 4096, reuse_port=[listen], max_udp_pins=max_pins)
        self.layer.pins.reactor = self.readers = _Readers()
        self.got: list[tuple[str, tuple[str, int], tuple[str, int]]] = []  # (data, local, remote)
        self.layer.early = self._early

    def _early(self, data: bytes, local: tuple[str, int], remote: tuple[str, int]) -> bytes | None:
        if data.startswith(b"OPTIONS"):
            return None  # a test of the whole path: handled, to the sink
        self.got.append((data.decode(), local, remote))
        return b""  # dropped: the test only asks who got it

    @property
    def local(self) -> tuple[str, int]:
        _, host, port = self.layer.bound[0]
        return (host, port)

    def readable(self) -> list[Any]:
        return [self.layer._ports[0].socket, *(r.sock for r in self.readers.readers)]

    def read(self, sock: Any) -> None:
        if sock is self.layer._ports[0].socket:
            self.layer._ports[0].doRead()
        else:
            next(r for r in self.readers.readers if r.sock is sock).doRead()


@pytest.fixture
def workers():
    made: list[_Worker] = []
    clock = Clock()

    def start(max_pins: int = 8) -> tuple[_Worker, _Worker, Clock]:
        a = _Worker("a", "udp:127.0.0.1:0", clock, max_pins)
        a.layer.startService()
        b = _Worker("b", f"udp:127.0.0.1:{a.local[1]}", clock, max_pins)
        b.layer.startService()
        made.extend((a, b))
        return a, b, clock

    yield start
    for w in made:
        pytest_twisted.blockon(w.layer.stopService())


def _collect(workers: tuple[_Worker, ...], n: int) -> dict[str, tuple[str, tuple[str, int]]]:
    """Read until ``n`` datagrams arrived: text -> (worker name, local address it was handled as)."""
    seen: dict[str, tuple[str, tuple[str, int]]] = {}
    deadline = time.monotonic() + 5.0
    while sum(len(w.got) for w in workers) < n:
        socks = {s: w for w in workers for s in w.readable()}
        ready, _, _ = select.select(list(socks), [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"only {sum(len(w.got) for w in workers)} of {n} datagrams arrived")
        for s in ready:
            socks[s].read(s)
    for w in workers:
        for data, local, _remote in w.got:
            seen[data] = (w.name, local)
        w.got.clear()
    return seen


def _sweeps(clock: Clock) -> list[Any]:
    return [c for c in clock.getDelayedCalls() if getattr(c.func, "__name__", "") == "_swept"]


def _peers(n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        out.append(s)
    return out


def _round(a: _Worker, b: _Worker, peers: list[socket.socket], tag: str) -> dict[int, str]:
    for i, p in enumerate(peers):
        p.sendto(f"{tag}{i}".encode(), a.local)
    seen = _collect((a, b), len(peers))
    assert all(local == a.local for _, local in seen.values())  # a pin's datagram is the shared socket's
    return {i: seen[f"{tag}{i}"][0] for i in range(len(peers))}


def test_a_pinned_device_reaches_the_pinning_worker_and_every_other_source_keeps_its_worker(workers):
    a, b, _ = workers()
    peers = _peers(40)
    try:
        before = _round(a, b, peers, "r1-")
        assert set(before.values()) == {"a", "b"}  # the kernel spreads sources over both
        device_i = next(i for i, w in before.items() if w == "b")
        device = peers[device_i].getsockname()
        assert a.layer.pin_udp(a.local, device) is True
        assert a.layer.pin_udp(a.local, device) is True  # the live pin, reused
        assert a.layer.pins.stats() == {"open": 1, "made": 1, "refused_full": 0, "failed": 0, "closed_idle": 0}
        pinned = _round(a, b, peers, "r2-")
        assert pinned[device_i] == "a"
        assert {i: w for i, w in pinned.items() if i != device_i} == \
            {i: w for i, w in before.items() if i != device_i}
        # what A sends there goes through the pin, from the shared address and port
        assert a.layer.forward_data(b"to the device", Target("udp", *device)) is True
        data, source = peers[device_i].recvfrom(100)
        assert (data, source) == (b"to the device", a.local)
        assert a.layer.pins.endpoints[device].used
        # unpinned: back to the kernel's hash
        a.layer.pins.unpin(device)
        assert a.readers.readers == []
        assert _round(a, b, peers, "r3-") == before
    finally:
        for p in peers:
            p.close()


def test_a_request_on_a_pin_is_handled_as_on_the_shared_socket(workers):
    a, b, _ = workers()
    handled: list[tuple[Any, Any]] = []
    a.layer.sink = lambda msg, flow: handled.append((msg, flow))
    device_sock = next(p for p in _peers(64) if _round(a, b, [p], "probe")[0] == "b")
    try:
        device = device_sock.getsockname()
        a.layer.forward_data(b"hello", Target("udp", *device))  # A talks to it first: A's flow
        flow = a.layer.flows.lookup("udp", a.local, device)
        assert flow is not None
        assert a.layer.pin_udp(a.local, device)
        device_sock.sendto(
            b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 10.9.9.9:5060;branch=z9hG4bK1;rport\r\n"
            b"From: <sip:d@x>;tag=1\r\nTo: <sip:x@x>\r\nCall-ID: c1\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
            b"Content-Length: 0\r\n\r\n", a.local)
        deadline = time.monotonic() + 5.0
        while not handled and time.monotonic() < deadline:
            select.select([a.readers.readers[0].sock], [], [], 0.5)
            a.readers.readers[0].doRead()
        msg, got_flow = handled[0]
        assert got_flow is flow and got_flow.key == FlowKey("udp", a.local, device)
        assert (msg.top_via.received, msg.top_via.rport) == ("127.0.0.1", device[1])
    finally:
        device_sock.close()


def test_an_idle_pin_is_closed_and_its_flows_send_from_the_shared_socket(workers):
    a, _b, clock = workers()
    device_sock = _peers(1)[0]
    try:
        device = device_sock.getsockname()
        assert a.layer.pin_udp(a.local, device)
        a.layer.forward_data(b"1", Target("udp", *device))
        endpoint = a.layer.pins.endpoints[device]  # the flow made by that send sends with it
        assert a.layer.flows.lookup("udp", a.local, device) is not None
        clock.advance(PIN_IDLE)
        assert len(a.layer.pins) == 1  # used since it was made
        clock.advance(PIN_IDLE - 0.1)
        a.layer.forward_data(b"2", Target("udp", *device))
        clock.advance(0.1)
        assert len(a.layer.pins) == 1  # used in that period too
        clock.advance(PIN_IDLE)
        assert len(a.layer.pins) == 0 and a.readers.readers == []
        assert a.layer.pins.stats()["closed_idle"] == 1
        assert not _sweeps(clock)  # no sweep left without pins
        endpoint.send_to(b"3", device)  # the pin is closed: its flows go on from the shared socket
        device_sock.settimeout(5.0)
        assert [device_sock.recvfrom(10) for _ in range(3)] == [(d, a.local) for d in (b"1", b"2", b"3")]
    finally:
        device_sock.close()


def test_at_the_bound_no_new_pin_and_a_failed_pin_is_no_pin(workers):
    a, _b, _ = workers(max_pins=2)
    peers = _peers(3)
    try:
        addrs = [p.getsockname() for p in peers]
        assert [a.layer.pin_udp(a.local, d) for d in addrs] == [True, True, False]
        assert a.layer.pin_udp(a.local, addrs[0]) is True  # a live one is still reused at the bound
        assert a.layer.pins.limit_hits() == {"udp_pins_full": 1}
        assert a.layer.connection_stats()["udp_pins"] == {
            "open": 2, "made": 2, "refused_full": 1, "failed": 0, "closed_idle": 0}
        a.layer.pins.unpin(addrs[1])
        assert a.layer.pin_udp(a.local, addrs[2]) is True  # room again
        # a socket error (an IPv6 address on an IPv4 socket), a reactor that refuses: no pin, counted
        a.layer.pins.unpin(addrs[2])
        assert a.layer.pin_udp(a.local, ("::1", 5060)) is False
        a.readers.fail = True
        assert a.layer.pin_udp(a.local, addrs[2]) is False
        assert a.layer.pins.stats()["failed"] == 2 and len(a.layer.pins) == 1
        # not a shared listener of ours: nothing to pin on
        assert a.layer.pin_udp(("127.0.0.1", 9), addrs[2]) is False
    finally:
        for p in peers:
            p.close()


def test_pinning_off_and_stop_closes_every_pin(workers):
    a, b, clock = workers(max_pins=0)
    device_sock = _peers(1)[0]
    try:
        device = device_sock.getsockname()
        assert a.layer.pin_udp(a.local, device) is False
        assert a.layer.pins.stats() == {"open": 0, "made": 0, "refused_full": 0, "failed": 0, "closed_idle": 0}
        b.layer.pins.max_pins = 4
        assert b.layer.pin_udp(b.local, device)
        b.layer.stopService()  # the pins close at once (the fixture waits for the ports)
        assert len(b.layer.pins) == 0 and b.readers.readers == [] and not _sweeps(clock)
    finally:
        device_sock.close()


@pytest_twisted.ensureDeferred
async def test_the_open_file_limit_makes_room_for_every_pin(monkeypatch):
    """A pin is a file descriptor: a UDP-only worker with pins raises its open-file limit for them,
    and one with stream listeners too for its connections and its pins together."""
    from libon_tsilo.sip import connlimits

    asked: list[int] = []  # the soft limits set (the module is compiled: its calls are not patchable)
    monkeypatch.setattr(connlimits.resource, "getrlimit", lambda _: (16, 1 << 20))
    monkeypatch.setattr(connlimits.resource, "setrlimit", lambda _, v: asked.append(v[0]))
    reserve = connlimits._FD_RESERVE
    udp = TransportLayer(["udp:127.0.0.1:0"], Clock(), 60, 4096, reuse_port=["udp:127.0.0.1:0"],
                         max_udp_pins=300)
    both = TransportLayer(["udp:127.0.0.1:0", "tcp:127.0.0.1:0"], Clock(), 60, 4096,
                          reuse_port=["udp:127.0.0.1:0"], max_udp_pins=300)
    none = TransportLayer(["udp:127.0.0.1:0"], Clock(), 60, 4096)
    try:
        for layer in (udp, both, none):
            layer.startService()
        assert asked == [300 + reserve, both.limits.max_connections + 300 + reserve]
    finally:
        for layer in (udp, both, none):
            await layer.stopService()


def test_raise_fd_limit_lifts_the_soft_limit_to_what_is_needed(monkeypatch):
    from libon_tsilo.sip import connlimits

    limits = {"soft": 1024}
    monkeypatch.setattr(connlimits.resource, "getrlimit", lambda _: (limits["soft"], 1 << 20))
    monkeypatch.setattr(connlimits.resource, "setrlimit", lambda _, v: limits.update(soft=v[0]))
    connlimits.raise_fd_limit(5000)
    assert limits["soft"] == 5000 + connlimits._FD_RESERVE


def test_two_workers_pinning_one_device_the_newest_pin_gets_its_datagrams_and_the_older_one_next(workers):
    """What Linux (6.18, IPv4 and IPv6 alike) does with two connected sockets of one 4-tuple in a
    group: the one connected last is served, the other gets nothing until it is the last one left.
    Two workers that each forked a call to one device (each pinned it) lose nothing by it: the
    served one passes the other's answers on by their Via's mark (cluster/relay.py, as without
    pins), and when its pin closes, the kernel serves the older pin again."""
    a, b, _ = workers()
    device_sock = _peers(1)[0]
    try:
        device = device_sock.getsockname()
        assert a.layer.pin_udp(a.local, device)
        assert _round(a, b, [device_sock], "one-")[0] == "a"
        assert b.layer.pin_udp(b.local, device)
        assert [_round(a, b, [device_sock], f"two{i}-")[0] for i in range(3)] == ["b"] * 3
        # what the older pin sends still leaves from the shared address and port
        assert a.layer.forward_data(b"from a", Target("udp", *device)) is True
        assert device_sock.recvfrom(100) == (b"from a", a.local)
        assert [_round(a, b, [device_sock], f"still{i}-")[0] for i in range(3)] == ["b"] * 3
        b.layer.pins.unpin(device)  # idled out, or its worker stopped: the older pin is served again
        assert [_round(a, b, [device_sock], f"back{i}-")[0] for i in range(3)] == ["a"] * 3
        assert b.layer.pin_udp(b.local, device)  # pinned anew: the newest again
        assert _round(a, b, [device_sock], "again-")[0] == "b"
    finally:
        device_sock.close()


def test_a_pin_whose_device_moved_idles_out_and_churn_stays_within_max_udp_pins(workers):
    """A device behind a NAT that rebound (it registers again from a new port) leaves its pin on
    the old address: nothing comes from there any more and, once the call's transactions end,
    nothing is sent there: the sweep closes it 32-64 s after its last datagram. Until then it
    takes only what comes from that very address (nobody's, or a new NAT user's, handled as on the
    shared socket). Devices moving faster than that fill the pins to ``max_udp_pins`` at most: new
    ones are refused (counted), and the sweep makes room."""
    a, _b, clock = workers(max_pins=3)
    old, new, *others = _peers(5)

    def pin_and_send(sock: socket.socket) -> bool:
        made = a.layer.pin_udp(a.local, sock.getsockname())
        a.layer.forward_data(b"INVITE", Target("udp", *sock.getsockname()))  # pinned, then sent
        return made

    try:
        assert pin_and_send(old)
        # the device moved: the next call pins its new address, the old pin lingers
        assert pin_and_send(new)
        clock.advance(PIN_IDLE)  # the first sweep: both were used
        assert len(a.layer.pins) == 2
        a.layer.forward_data(b"BYE", Target("udp", *new.getsockname()))  # the new one's call goes on
        # other devices that moved come and go within the bound
        assert [pin_and_send(p) for p in others] == [True, False, False]
        assert a.layer.pins.stats()["refused_full"] == 2
        clock.advance(PIN_IDLE)  # the old address saw nothing for a whole period: closed
        assert old.getsockname() not in a.layer.pins.endpoints
        assert set(a.layer.pins.endpoints) == {new.getsockname(), others[0].getsockname()}
        assert a.layer.pins.stats()["closed_idle"] == 1
        assert pin_and_send(others[1])  # room again
        assert len(a.readers.readers) == len(a.layer.pins) == 3
        clock.advance(PIN_IDLE)  # nothing sent or received any more: every pin closes
        clock.advance(PIN_IDLE)
        assert len(a.layer.pins) == 0 and a.readers.readers == [] and not _sweeps(clock)
        assert a.layer.pins.stats()["closed_idle"] == 4
    finally:
        for p in (old, new, *others):
            p.close()
