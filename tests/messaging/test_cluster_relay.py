"""A MESSAGE accepted by node A for a device whose TCP connection ends on node B (issue 14's Path relay):
A sends it to B's internal listener with the Path as Route set, B relays it over the device's flow,
and the device's 200 comes back the same way. Two nodes in one process on loopback, sharing one
LocationStore (tests/cluster/test_relay_two_nodes.py's Pair); OS-picked ports; waits on messages
and counters, never on a sleep."""

from __future__ import annotations

import pytest_twisted

from tests.cluster.test_relay_two_nodes import Pair, _public, register
from tests.cluster.ua import response_to, tag, wait_for


def message(sender: object, a_port: int, text: str) -> str:
    return (
        f"MESSAGE sip:bob@127.0.0.1:{a_port} SIP/2.0\r\nVia: {sender.via}\r\nMax-Forwards: 70\r\n"  # type: ignore[attr-defined]
        f"From: <sip:carol@127.0.0.1>;tag={tag()}\r\nTo: <sip:bob@127.0.0.1>\r\nCall-ID: {tag()}@im\r\n"
        f"CSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: {len(text)}\r\n\r\n{text}"
    )


@pytest_twisted.ensureDeferred
async def test_a_message_accepted_on_a_reaches_a_tcp_device_on_b_through_b():
    pair = Pair()
    pair.start()
    try:
        a, b = pair.a, pair.b
        device = await pair.ua(b, "tcp")
        device.send(register(device, "Supported: path\r\n"))
        await device.response(200, "REGISTER")
        sender = await pair.ua(a)
        sender.send(message(sender, _public(a, "udp")[1], "over the relay"))
        await sender.response(202, "MESSAGE")
        got = await device.request("MESSAGE")
        assert got.body == b"over the relay"
        assert got.header_values("route") == []  # B took its own entry off
        assert f":{_public(b, 'tcp')[1]};" in got.header_values("via")[0]  # relayed by B
        device.send(response_to(got, 200, "OK", tag()))
        acceptor = a.parts.extra["messages"]
        await wait_for(lambda: acceptor.stats()["delivered"] == 1, "the 200 back on A")
        assert len(acceptor.outbox) == 0
        assert b.parts.extra["cluster_relay"].counters["to_device"] == 1
        assert len(b.parts.extra["messages"].outbox) == 0  # B only relayed it
    finally:
        await pair.stop()
