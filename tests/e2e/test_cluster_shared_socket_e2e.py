"""``[cluster] udp_via_path = "auto"`` (the default), two real twistd workers on one redis-server.

- Two workers bound to the same public UDP address and port with SO_REUSEPORT: a device registers on
  the one the kernel hashes its 5-tuple to (the "taker"), a caller reaches the other (the
  "forker"), which forks the INVITE straight to the device from the shared socket (no Record-Route,
  its own marked Via on top, nothing relayed by the taker). The forker pins the device (a socket
  connected to it on the shared port, sip/udp_pins.py), so the kernel hands the device's answers
  and its BYE to the forker itself; with pins off (``max_udp_pins = 0``) they reach the taker, which
  passes on what is marked for the forker.
- Two workers on different public ports (different sockets, SO_REUSEPORT on both): the INVITE goes
  through the taker's Path relay, with its two Record-Route entries.

The device and the caller are plain sockets driven step by step from the test thread
(tests/e2e/pushdevice.py's message helpers, written from RFC 3261, not with the server's parser).
Which worker took what is read from each worker's counters (admin RPC), never guessed from timing.
"""

from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.proc import HOST, ServerProcess, admin_rpc, free_port, options_request, start_server
from tests.e2e.pushdevice import SDP, Agent, Caller, Msg, build, response_to
from tests.redis_server import RedisServer
from tests.waiting import wait_until


class Device(Agent):
    """A UDP phone answering from the test thread."""

    def __init__(self, server: tuple[str, int], user: str = "bob") -> None:
        super().__init__(server)
        self.user = user
        self.tag = uuid.uuid4().hex[:10]

    def register(self) -> int:
        aor = f"sip:{self.user}@{HOST}"
        self.send(build(f"REGISTER sip:{HOST}:{self.server[1]} SIP/2.0", [
            ("Via", f"SIP/2.0/UDP {HOST}:{self.port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport"),
            ("Max-Forwards", "70"), ("From", f"<{aor}>;tag={self.tag}"), ("To", f"<{aor}>"),
            ("Call-ID", uuid.uuid4().hex), ("CSeq", "1 REGISTER"),
            ("Contact", f"<sip:{self.user}@{HOST}:{self.port}>"), ("Expires", "600"),
        ]))
        return self.expect_response("REGISTER").status

    def expect(self, method: str, timeout: float = 10.0) -> Msg:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.recv(deadline - time.monotonic())
            if got is not None and got[0].is_request and got[0].method == method:
                return got[0]
        raise AssertionError(f"no {method} reached the device")

    def expect_response(self, method: str, timeout: float = 10.0) -> Msg:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.recv(deadline - time.monotonic())
            if got is not None and not got[0].is_request and got[0].cseq_method == method \
                    and got[0].status >= 200:
                return got[0]
        raise AssertionError(f"no final answer to the device's {method}")

    def answer(self, invite: Msg) -> None:
        rr = [("Record-Route", r) for r in invite.all("record-route")]  # a UAS copies them (RFC 3261 §12.1.1)
        self.send(response_to(invite, 180, "Ringing", self.tag, rr))
        self.send(response_to(invite, 200, "OK", self.tag, [*rr, ("Contact", f"<sip:{self.user}@{HOST}:{self.port}>")],
                              SDP.format(port=40000)))

    def bye(self, invite: Msg) -> None:
        """Hang up the call ``invite`` opened (the device is its UAS: From and To swap)."""
        target = (invite.get("contact") or "").strip("<>").split(">")[0]
        routes = [("Route", r) for r in reversed(invite.all("record-route"))]
        self.send(build(f"BYE {target} SIP/2.0", [
            ("Via", f"SIP/2.0/UDP {HOST}:{self.port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport"),
            ("Max-Forwards", "70"), *routes,
            ("From", f"{invite.get('to')};tag={self.tag}"), ("To", invite.get("from") or ""),
            ("Call-ID", invite.get("call-id") or ""), ("CSeq", "1 BYE"),
        ]))


def _worker(tmp_path: Path, name: str, sip_port: int, internal: int, peer: int | list[int], redis: RedisServer,
            max_udp_pins: int = 4096) -> ServerProcess:
    directory = tmp_path / name
    directory.mkdir()
    extra: dict[str, Any] = {
        "sip": {"listen": [f"udp:{HOST}:{sip_port}"]},
        "auth": {"enabled": False},
        "location": {"backend": "redis", "url": redis.url, "key_prefix": f"{tmp_path.name}:"},
        "cluster": {"node_id": name, "reuse_port": True, "node_address": f"udp:{HOST}:{internal}",
                    "peers": [f"udp:{HOST}:{p}" for p in (peer if isinstance(peer, list) else [peer])],
                    "secret": "shared-by-the-workers",
                    "max_udp_pins": max_udp_pins},
        "calls": {"ring_timeout": 10, "invite_cancel_grace": 0},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
    }
    server = start_server(directory, extra, wait_ready=False)
    server.sip_port = sip_port
    deadline = time.monotonic() + 20
    while True:  # ready once its admin API answers (a SIP probe could land on the other worker)
        if not server.alive():
            raise RuntimeError(f"worker {name} exited with {server.proc.returncode}\n{server.output()}")
        try:
            admin_rpc(server, "health")
            break
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.05)  # polling for readiness, not a negative check
    wait_until(lambda: admin_rpc(server, "stats")["usrloc"]["redis"]["up"], 10, f"{name}'s redis store")
    return server


@pytest.fixture
def started() -> Any:
    servers: list[ServerProcess] = []
    yield servers
    for server in servers:
        code = server.stop()
        assert code == 0, server.output()[-3000:]
        assert not server.tracebacks(), server.output()[-3000:]


def _workers(tmp_path: Path, redis: RedisServer, started: list[ServerProcess], same_port: bool,
             max_udp_pins: int = 4096) -> list[ServerProcess]:
    ports = [free_port(), free_port()]
    internal = [free_port(), free_port()]
    for i, name in enumerate(("w1", "w2")):
        started.append(_worker(tmp_path, name, ports[0 if same_port else i], internal[i], internal[1 - i], redis,
                               max_udp_pins))
    return started


def _relay(server: ServerProcess) -> dict[str, int]:
    return admin_rpc(server, "stats")["cluster_relay"]


def _options_in(server: ServerProcess) -> int:
    return admin_rpc(server, "stats").get("sip", {}).get("requests_in", {}).get("OPTIONS", 0)


def _caller_reaching(target: ServerProcess, port: int) -> Caller:
    """A caller whose source port the kernel hashes to ``target`` (asked with an OPTIONS each)."""
    for _ in range(40):
        caller = Caller((HOST, port), target="bob")
        before = _options_in(target)
        caller.send(options_request(HOST, port, caller.port))
        answer = caller.recv(5)
        assert answer is not None and answer[0].status == 200
        if _options_in(target) > before:
            return caller
        caller.close()
    raise AssertionError("no source port hashed to the worker wanted")


def _taker(workers: list[ServerProcess]) -> ServerProcess:
    def node_of_bob() -> str | None:
        bindings = admin_rpc(workers[0], "ul.dump")["aors"].get(f"sip:bob@{HOST}") or []
        return bindings[0]["node"] if bindings else None

    node = wait_until(node_of_bob, 10, "bob's binding in the replicas")
    wait_until(lambda: admin_rpc(workers[1], "ul.dump")["aors"].get(f"sip:bob@{HOST}"), 10, "bob everywhere")
    return next(w for w in workers if admin_rpc(w, "stats")["node"] == node)


def _finish_call(caller: Caller, device: Device, invite: Msg, device_hangs_up: bool) -> None:
    final = caller.wait_final(10)
    assert final.status == 200, final.first
    device.expect("ACK")
    if device_hangs_up:
        device.bye(invite)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the forker ends the caller's leg too
            got = caller.recv(0.1)
            if got is not None and got[0].is_request and got[0].method == "BYE":
                caller.send(response_to(got[0], 200, "OK"), got[1])
                break
        else:
            raise AssertionError("the caller got no BYE")
        assert device.expect_response("BYE").status == 200
    else:
        bye = caller.bye()
        assert bye.status == 200
        device.send(response_to(device.expect("BYE"), 200, "OK"))


def _mark_names(via: str) -> str:
    mark = via.split(";nd=", 1)[1].split(";")[0]
    return base64.urlsafe_b64decode(mark + "=" * (-len(mark) % 4)).decode()


def _pins(server: ServerProcess) -> dict[str, int]:
    return admin_rpc(server, "stats")["connections"]["udp_pins"]


@pytest.mark.parametrize(("device_hangs_up", "pins"), [(False, True), (True, True), (True, False)],
                         ids=["caller-hangs-up", "device-hangs-up", "device-hangs-up-no-pins"])
def test_workers_sharing_the_public_socket_fork_straight_to_the_device(
    tmp_path: Path, redis_server: RedisServer, started: list[ServerProcess], device_hangs_up: bool, pins: bool
) -> None:
    workers = _workers(tmp_path, redis_server, started, same_port=True, max_udp_pins=4096 if pins else 0)
    port = workers[0].sip_port
    device = Device((HOST, port))
    try:
        assert device.register() == 200
        taker = _taker(workers)
        forker = next(w for w in workers if w is not taker)
        caller = _caller_reaching(forker, port)
        try:
            caller.invite()
            invite = device.expect("INVITE")
            # straight from the forker: its own Via, marked with its internal address; no relay hop
            assert not invite.all("record-route")
            vias = invite.all("via")
            assert len(vias) == 1 and f"{HOST}:{port}" in vias[0], vias
            forker_internal = forker.sections["cluster"]["node_address"]
            assert _mark_names(vias[0]) == forker_internal
            device.answer(invite)
            _finish_call(caller, device, invite, device_hangs_up)
        finally:
            caller.close()
        relay = _relay(taker)
        assert relay.get("to_device", 0) == 0, relay  # nothing went through the taker's Path relay
        assert _relay(forker).get("to_device", 0) == 0
        if pins:  # the device is pinned to the forker: the kernel gives it all the device sends
            assert _pins(forker)["made"] == 1 and _pins(forker)["open"] == 1, _pins(forker)
            assert relay.get("to_sibling_responses", 0) == 0 and relay.get("to_sibling", 0) == 0, relay
            assert _pins(taker)["made"] == 0
            return
        assert _pins(forker)["made"] == 0
        # the device's 180 and 200 (and the BYE's 200), which the kernel gave the taker
        assert relay.get("to_sibling_responses", 0) >= 2, relay
        if device_hangs_up:
            assert relay.get("to_sibling", 0) == 1, relay  # the device's BYE
    finally:
        device.close()


def test_workers_on_different_sockets_reach_the_device_through_the_path(
    tmp_path: Path, redis_server: RedisServer, started: list[ServerProcess]
) -> None:
    w1, w2 = _workers(tmp_path, redis_server, started, same_port=False)
    device = Device((HOST, w2.sip_port))
    try:
        assert device.register() == 200
        assert _taker([w1, w2]) is w2
        caller = Caller((HOST, w1.sip_port), target="bob")
        try:
            caller.invite()
            invite = device.expect("INVITE")
            # relayed by w2: its Via on top of w1's internal one, and its two Record-Route entries
            assert len(invite.all("record-route")) == 2 and len(invite.all("via")) == 2
            assert f":{w2.sip_port};" in invite.all("via")[0]
            device.answer(invite)
            _finish_call(caller, device, invite, device_hangs_up=False)
        finally:
            caller.close()
        assert _relay(w2)["to_device"] >= 3  # INVITE, ACK, BYE
        assert _relay(w2).get("to_sibling_responses", 0) == 0
    finally:
        device.close()



def test_a_device_pinned_by_one_worker_still_answers_what_its_taker_relays(
    tmp_path: Path, redis_server: RedisServer, started: list[ServerProcess]
) -> None:
    """Three workers: two share the public port (the taker, which took the device's REGISTER, and
    the forker), the third listens on another port. The forker forks a call straight to the device
    and pins it: the kernel gives the forker every datagram of the device, for 32-64 s after the
    last one. A call arriving on the third worker goes through the taker's Path relay; the device's
    answers to what the taker relays reach the forker's pin, and the forker passes them on to the
    taker by the mark of the taker's Via (not refused as a relay branch it did not give)."""
    shared, other = free_port(), free_port()
    internal = [free_port(), free_port(), free_port()]
    for i, (name, port) in enumerate((("w1", shared), ("w2", shared), ("w3", other))):
        started.append(_worker(tmp_path, name, port, internal[i], [p for p in internal if p != internal[i]],
                               redis_server))
    w1, w2, w3 = started
    device = Device((HOST, shared))
    try:
        assert device.register() == 200
        taker = _taker([w1, w2])
        forker = next(w for w in (w1, w2) if w is not taker)
        wait_until(lambda: admin_rpc(w3, "ul.dump")["aors"].get(f"sip:bob@{HOST}"), 10, "bob on w3")
        caller = _caller_reaching(forker, shared)
        try:
            caller.invite()
            invite = device.expect("INVITE")
            device.answer(invite)
            _finish_call(caller, device, invite, device_hangs_up=False)
        finally:
            caller.close()
        assert _pins(forker)["open"] == 1, _pins(forker)
        caller = Caller((HOST, other), target="bob")
        try:
            caller.invite()
            invite = device.expect("INVITE")
            vias = invite.all("via")
            # relayed by the taker from the shared port, its Via marked with its internal address
            assert len(vias) == 2 and f"{HOST}:{shared}" in vias[0], vias
            assert _mark_names(vias[0]) == taker.sections["cluster"]["node_address"]
            device.answer(invite)
            _finish_call(caller, device, invite, device_hangs_up=False)
        finally:
            caller.close()
        passed = _relay(forker)
        assert passed.get("to_sibling_responses", 0) >= 3, passed  # the 180, the 200, the BYE's 200
        assert passed.get("refused_bad_branch", 0) == 0, passed
        assert _relay(taker)["to_device"] >= 3  # INVITE, ACK, BYE
    finally:
        device.close()
