"""No acknowledged binding is ever lost: the real twistd process with the SQLite location store.

- kill -9 in the middle of a REGISTER flood (tests/e2e/regload.py: one UDP socket, a distinct AOR
  per REGISTER, no retransmissions): after a restart on the same database, every REGISTER that got
  a 200 has its binding (ul.dump over the admin API);
- a REGISTER whose Contact holds a byte that is not UTF-8 (``sip:m\\xff@...``, as in issue 11), and
  one whose AOR is ``%FF``-escaped, followed by good REGISTERs: everything acknowledged survives a
  kill -9 and a SIGTERM restart, and ul.dump answers 200 with the odd bytes shown as ``\\xNN``;
- the late-forked INVITE reaches a pushed device after the 200 OK of its REGISTER (APNs fake,
  tests/e2e/pushdevice.py; the SQLite store makes the 200 wait for its commit).
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests.e2e.proc import HOST, admin_rpc, free_port
from tests.e2e.regload import RegisterLoad, contact_users, exchange, register_bytes
from tests.e2e import test_push_e2e as push_e2e
from tests.e2e import test_registrar_e2e as registrar_e2e
from tests.e2e.test_registrar_e2e import Servers

# the fixtures of those suites, used here as they are
servers = registrar_e2e.servers
fakes = push_e2e.fakes
devices = push_e2e.devices


def _config() -> dict[str, dict[str, Any]]:
    return {
        "auth": {"enabled": False},
        "location": {"backend": "sqlite"},
        "log": {"level": "info"},
        "registrar": {"max_expires": 3600, "default_expires": 3600},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
    }


def test_kill9_during_a_register_flood_loses_no_acknowledged_binding(servers: Servers) -> None:
    server = servers.start(_config())
    load = RegisterLoad(server.sip_port, count=6000, rate=1000).start()
    try:
        load.wait_acked(1000, timeout=30)  # about one second in, at full speed
        servers.kill9(server)
    finally:
        acked = load.finish()
    assert len(acked) >= 1000 and load.sent > len(acked)
    again = servers.restart(server)
    stored = contact_users(admin_rpc(again, "ul.dump"))
    lost = sorted(acked - stored)
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged bindings lost, e.g. {lost[:5]}"


@pytest.mark.parametrize("stop", ["kill9", "sigterm"])
def test_bytes_that_are_not_utf8_block_nothing_and_survive(servers: Servers, stop: str) -> None:
    server = servers.start(_config())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    try:
        # the Contact of issue 11: stored as it came, or refused with 400 (never a 200 then lost)
        odd_contact, _ = exchange(server.sip_port, register_bytes(
            server.sip_port, port, "m", "odd-contact", contact_user=b"m\xff"), sock)
        assert odd_contact in (200, 400)
        # an escaped byte is grammatical (RFC 3261 escaped): the AOR key holds it unescaped
        odd_aor, _ = exchange(server.sip_port, register_bytes(
            server.sip_port, port, "e", "odd-aor", to_user=b"e%FF", contact_user=b"e"), sock)
        assert odd_aor == 200
        good = {f"g{i}" for i in range(50)}
        for user in sorted(good):
            status, answer = exchange(server.sip_port, register_bytes(server.sip_port, port, user, f"good-{user}"), sock)
            assert status == 200, answer
    finally:
        sock.close()
    dump = admin_rpc(server, "ul.dump")  # it answered 500 once such a binding existed
    expected = good | {"e"} | ({"m\\xff"} if odd_contact == 200 else set())
    assert contact_users(dump) == expected
    assert "sip:e\\xff@127.0.0.1" in dump["aors"] or "e\\xff" in dump["aors"], list(dump["aors"])
    if stop == "kill9":
        servers.kill9(server)
    else:
        servers.stop(server)
    again = servers.restart(server)
    assert contact_users(admin_rpc(again, "ul.dump")) == expected
    assert "location db" not in server.output()  # no batch failed, no row was skipped


def test_forked_invite_follows_the_200_of_the_waking_register(fakes: Any, start_sip_server: Any,
                                                             devices: list) -> None:
    fake = fakes("apns")
    server = push_e2e.server_for(start_sip_server, fake)  # location backend: sqlite (the default)
    dev = push_e2e.device(server, fake, devices)
    caller = push_e2e.call(server)
    assert caller.wait_final(10).status == 200
    kinds = [kind for _, kind, _ in dev.events]
    woke = kinds.index("register_sent")  # the REGISTER the push woke the app for
    assert "invite" in kinds[woke:] and "register_ok" in kinds[woke:], kinds
    assert kinds.index("register_ok", woke) < kinds.index("invite", woke), kinds
    caller.bye()
