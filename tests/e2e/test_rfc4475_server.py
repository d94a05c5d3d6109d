"""RFC 4475 torture messages sent over UDP to the real `twistd -n libon-tsilo` process.

Each message's Via sent-by is first rewritten to the test's own socket (never the example.com or
192.0.2.x addresses inside the corpus). The server must answer as RFC 4475 describes for a
UAS/registrar, drop what cannot be answered, and stay up: after every message an OPTIONS must still
get its 200. Fake used: none, a plain UDP socket.
"""

from __future__ import annotations

import re
import socket

import pytest

from tests.e2e.proc import HOST, admin_rpc, free_port, options_request
from tests.sip import rfc4475
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(not rfc4475.available(), reason="RFC 4475 corpus missing")

_SENT_BY = re.compile(
    rb"(SIP\s*/\s*\d\.\d\s*/\s*[A-Za-z]+\s+)(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+)(\s*:\s*\d+)?"
)
_VIA_LINE = re.compile(rb"^(via|v)[ \t]*:", re.IGNORECASE)

# What a UAS/registrar answers (None: no answer can be formed, or the message is a response).
EXPECTED: dict[str, int | None] = {
    # 3.1.2 invalid
    "badinv01": 400, "clerr": 400, "ncl": 400, "scalar02": 400, "quotbal": 400, "ltgtruri": 400,
    "lwsruri": 400, "lwsstart": 400, "trws": 400, "escruri": 400, "baddate": 400, "regbadct": 400,
    "badaspec": 400, "baddn": 400, "badvers": 505, "mismatch01": 400, "mismatch02": 400,
    "scalarlg": None, "bigcode": None,
    # 3.3 application layer
    "insuf": 400,  # no From, To nor Call-ID: §3.3.1 asks for a 400, matched by its Via and CSeq
    "unkscm": 416, "novelsc": 416, "bext01": 420, "invut": 415, "multi01": 400, "mcl01": 400,
    "zeromf": 483, "cparam01": 200, "cparam02": 200, "regescrt": 200, "sdp01": 406,
    "bcast": None,
    # valid ones with a definite answer: unknown methods
    "intmeth": 501, "esc02": 501,
    # 3.2: an OPTIONS with a bare magic cookie as its branch is still a request to answer
    "badbranch": 200,
}
# unksm2: a REGISTER whose To is an isbn: URI. Which refusal a registrar picks is its choice.
REFUSED = {"unksm2": (400, 404, 416)}
# Responses that parse but answer nothing we sent: dropped without a datagram (RFC 3261 §18.1.2;
# bcast's 200 OK names a broadcast Via and a Contact the server would otherwise ACK and BYE).
STRAYS = ("bcast", "unreason", "noreason")


def rewrite_via(data: bytes, port: int) -> bytes:
    """Point every Via sent-by at 127.0.0.1:port, folded Via lines included."""
    end = data.find(b"\r\n\r\n")
    head, body = data[:end], data[end:]
    lines = head.split(b"\r\n")
    out: list[bytes] = []
    in_via = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if in_via:
                out[-1] += b" " + line.strip()
                continue
        else:
            in_via = bool(_VIA_LINE.match(line))
        out.append(line)
    rewritten = [
        _SENT_BY.sub(lambda m: m.group(1) + HOST.encode() + b":%d" % port, line)
        if _VIA_LINE.match(line) else line
        for line in out
    ]
    return b"\r\n".join(rewritten) + body


_CALL_ID = re.compile(rb"^(?:call-id|i)[ \t]*:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)


def exchange(sock: socket.socket, server: tuple[str, int], data: bytes, wait: float,
             late: list[bytes] | None = None) -> list[bytes]:
    """Send ``data``; return the replies that carry its Call-ID. Late answers to earlier messages are
    skipped, or collected in ``late`` when given."""
    match = _CALL_ID.search(data)
    call_id = match.group(1) if match else None
    sock.sendto(data, server)
    replies = []
    sock.settimeout(wait)
    try:
        while True:
            reply, _ = sock.recvfrom(65535)
            found = _CALL_ID.search(reply)
            if call_id is None or (found and found.group(1) == call_id):
                replies.append(reply)
                if final_status(replies) is not None:
                    sock.settimeout(0.1)
            elif late is not None:
                late.append(reply)
    except TimeoutError:
        pass
    return replies


def final_status(replies: list[bytes]) -> int | None:
    for reply in replies:
        if not reply.startswith(b"SIP/2.0 "):
            continue  # a request (e.g. the ACK and BYE that end a stray 2xx's dialog)
        status = int(reply.split(b" ", 2)[1])
        if status >= 200:
            return status
    return None


@pytest.fixture(scope="module")
def udp_socket():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    yield sock
    sock.close()


def _server_extra(auth: bool) -> dict:
    return {
        "sip": {"domains": ["example.com", "localhost", HOST]},
        "auth": {"enabled": auth},
        "location": {"backend": "memory"},
        "admin": {"listen": f"tcp:{free_port(udp_too=False)}:interface={HOST}"},
    }


def _strays_dropped(server) -> int:
    return admin_rpc(server, "stats")["transactions"]["strays_dropped"]


def _counted(check, timeout: float = 5.0) -> bool:
    """The problem list collects every failure, so a counter that never moves is False, not a raise."""
    try:
        wait_until(check, timeout, "the stray to be counted")
    except AssertionError:
        return False
    return True


def test_torture_messages_get_the_rfc_answers(start_sip_server) -> None:
    server = start_sip_server(extra=_server_extra(auth=False), tls=False)
    address = (server.host, server.sip_port)
    problems = []
    for name in rfc4475.ALL:
        if name == "regaut01":
            continue  # needs authentication on: see the next test
        # A socket per message: the corpus reuses branch z9hG4bKkdjuw, so with one sent-by the server
        # would rightly take each message for a retransmission of the previous one.
        udp_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp_socket.bind((HOST, 0))
        port = udp_socket.getsockname()[1]
        data = rewrite_via(rfc4475.load(name), port)
        expected = EXPECTED.get(name, "handled")
        is_response = name in rfc4475.RESPONSES
        strays = _strays_dropped(server) if name in STRAYS else 0
        replies = exchange(udp_socket, address, data, 0.3 if expected is None or is_response else 2.0)
        status = final_status(replies)
        if name in STRAYS:
            if replies:
                problems.append(f"{name}: a stray response was answered with {len(replies)} datagrams")
            if not _counted(lambda: _strays_dropped(server) == strays + 1):
                problems.append(f"{name}: not counted as a dropped stray")
        if name in REFUSED:
            ok = status in REFUSED[name]
        elif expected == "handled":
            # valid requests are handled normally: a final answer that is not a rejection of the syntax
            # (an INVITE to a local AOR with no device is parked: its 100 Trying is the answer)
            answered = [int(r.split(b" ", 2)[1]) for r in replies if r.startswith(b"SIP/2.0 ")]
            ok = not answered if is_response else bool(answered) and not {400, 500} & set(answered)
        else:
            ok = status == expected and (expected is not None or status is None)
        if not ok:
            wanted = REFUSED.get(name, expected)
            problems.append(f"{name}: expected {wanted}, got {status} ({len(replies)} replies)")
        # the server must still be up and answering after every message; its answer to this OPTIONS
        # also proves it has handled the message, so a final answer to a message that must get none
        # (or to a response) would have come before it: the negative checks above cannot pass by luck
        late: list[bytes] = []
        alive = exchange(udp_socket, address, options_request(HOST, server.sip_port, port), 2.0, late)
        udp_socket.close()
        if (expected is None or is_response) and final_status(late) is not None:
            problems.append(f"{name}: got a final answer late, where it must get none")
        if final_status(alive) != 200:
            problems.append(f"{name}: server no longer answers OPTIONS")
            break
    assert not problems, "\n".join(problems) + "\n" + server.output()[-4000:]


def test_regaut01_is_challenged(start_sip_server, udp_socket) -> None:
    server = start_sip_server(extra=_server_extra(auth=True), tls=False)
    data = rewrite_via(rfc4475.load("regaut01"), udp_socket.getsockname()[1])
    replies = exchange(udp_socket, (server.host, server.sip_port), data, 2.0)
    assert final_status(replies) == 401, replies
    assert b"WWW-Authenticate: Digest" in replies[-1]
