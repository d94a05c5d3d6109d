#!/usr/bin/env python3
"""Message-layer throughput: parse + read the hot headers, and serialize (untouched and rebuilt).

Run: .venv/bin/python bench/parser.py [--seconds 1.0]
     .venv/bin/python bench/parser.py --icount [--rounds 2000]   # deterministic, under valgrind
Targets (one core): >= 50,000 parsed and >= 30,000 serialized messages per second. With ``--icount``
the script runs parse + read of the three messages ROUNDS times and 0 times under
``valgrind --tool=callgrind`` and prints the difference per message: the figure to compare changes by.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from libon_tsilo.sip.message import Message, make_response, parse_message  # noqa: E402
from bench import callgrind  # noqa: E402

PARSE_TARGET = 50_000
SERIALIZE_TARGET = 30_000

_SDP = (
    b"v=0\r\n"
    b"o=alice 2890844526 2890844526 IN IP4 198.51.100.23\r\n"
    b"s=-\r\n"
    b"c=IN IP4 198.51.100.23\r\n"
    b"t=0 0\r\n"
    b"m=audio 49170 RTP/AVP 0 8 97 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:97 opus/48000/2\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-15\r\n"
    b"a=sendrecv\r\n"
)

INVITE = (
    b"INVITE sip:bob@sip.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TLS 198.51.100.23:50611;branch=z9hG4bK.a8Fh3kQw9;rport;alias\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Alice Liddell" <sip:alice@sip.example.com>;tag=Jx8Yc4kP2\r\n'
    b"To: <sip:bob@sip.example.com>\r\n"
    b"Call-ID: 5fQz1nT8rW0kLm3v@198.51.100.23\r\n"
    b"CSeq: 20 INVITE\r\n"
    b"Contact: <sip:alice@198.51.100.23:50611;transport=tls;ob>;"
    b'+sip.instance="<urn:uuid:3b1b1f8e-6a3d-4f5e-9a44-0c2e4f1b9d10>"\r\n'
    b"User-Agent: Libon/5.2 (iOS 17.4)\r\n"
    b"Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY, MESSAGE, SUBSCRIBE, INFO, UPDATE\r\n"
    b"Supported: replaces, outbound, gruu, 100rel\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: " + str(len(_SDP)).encode() + b"\r\n"
    b"\r\n" + _SDP
)

REGISTER = (
    b"REGISTER sip:sip.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/TLS [2001:db8:4:1::17]:50712;branch=z9hG4bK.Qw7Ui2sNb;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:alice@sip.example.com>;tag=2kWm8Rt1x\r\n"
    b"To: <sip:alice@sip.example.com>\r\n"
    b"Call-ID: Kq9bW2pX7dYt0s1f\r\n"
    b"CSeq: 143 REGISTER\r\n"
    b"Contact: <sip:alice@[2001:db8:4:1::17]:50712;transport=tls;pn-provider=apns.voip;"
    b"pn-prid=7c2f0e1a9b3d4c5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6;"
    b"pn-param=ABCDE12345.com.example.libon.voip;ob>;+sip.instance=\"<urn:uuid:3b1b1f8e-6a3d-4f5e-9a44-0c2e4f1b9d10>\";"
    b"reg-id=1;expires=600\r\n"
    b"Expires: 600\r\n"
    b"Supported: outbound, path, gruu\r\n"
    b"User-Agent: Libon/5.2 (iOS 17.4)\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

OK_200 = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/TLS 203.0.113.10:5061;branch=z9hG4bK7e1c9a22f0b4d6a8\r\n"
    b"Via: SIP/2.0/TLS 198.51.100.23:50611;branch=z9hG4bK.a8Fh3kQw9;rport=50611;received=198.51.100.23\r\n"
    b'From: "Alice Liddell" <sip:alice@sip.example.com>;tag=Jx8Yc4kP2\r\n'
    b"To: <sip:bob@sip.example.com>;tag=a94c2e17\r\n"
    b"Call-ID: 5fQz1nT8rW0kLm3v@198.51.100.23\r\n"
    b"CSeq: 20 INVITE\r\n"
    b"Contact: <sip:bob@[2001:db8:9::2]:49822;transport=tls;ob>\r\n"
    b"Allow: INVITE, ACK, CANCEL, OPTIONS, BYE\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: " + str(len(_SDP)).encode() + b"\r\n"
    b"\r\n" + _SDP
)

CASES = [("INVITE+SDP", INVITE), ("REGISTER", REGISTER), ("200 OK", OK_200)]


def parse_and_read(data: bytes) -> Message:
    """What the server does with every inbound message: parse, then read the hot headers."""
    msg = parse_message(data)
    msg.top_via.branch
    msg.from_.tag
    msg.to.tag
    msg.call_id
    msg.cseq.seq
    msg.contacts[0].uri.host
    return msg


def rebuild(msg: Message) -> bytes:
    """Change the To tag and the top Via (as a server would), then serialize."""
    to = msg.to.copy()
    to.tag = "b2bua9f3a1c"
    msg.set_header("To", to)
    via = msg.top_via.copy()
    via.set_param("received", "192.0.2.201")
    via.set_param("rport", "40123")
    msg.set_top_via(via)
    return msg.to_bytes()


def measure(fn: Callable[[], object], seconds: float) -> float:
    """Operations per second of ``fn``, run in batches for at least ``seconds``."""
    for _ in range(200):  # warm the caches
        fn()
    batch = 1000
    count = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds:
        for _ in range(batch):
            fn()
        count += batch
        elapsed = time.perf_counter() - start
    return count / elapsed


def measure_pool(make: Callable[[], Message], op: Callable[[Message], object], seconds: float,
                 pool_size: int = 5000) -> float:
    """Operations per second of ``op`` on fresh objects from ``make`` (built outside the timing)."""
    for _ in range(200):
        op(make())
    count = 0
    elapsed = 0.0
    while elapsed < seconds:
        pool = [make() for _ in range(pool_size)]
        start = time.perf_counter()
        for obj in pool:
            op(obj)
        elapsed += time.perf_counter() - start
        count += pool_size
    return count / elapsed


def run(seconds: float) -> bool:
    # sanity: what we benchmark works and round-trips
    for name, data in CASES:
        msg = parse_and_read(data)
        assert msg.to_bytes() == data, name
        again = parse_and_read(rebuild(parse_message(data)))
        assert again.to.tag == "b2bua9f3a1c" and again.top_via.received == "192.0.2.201", name
        assert again.body == msg.body, name
    assert make_response(parse_message(INVITE), 180, to_tag="x").to_bytes()  # type: ignore[arg-type]

    rows = []
    parse_rates = []
    ser_rates = []
    for name, data in CASES:
        p = measure(lambda d=data: parse_and_read(d), seconds)
        untouched = parse_and_read(data)
        s_raw = measure(untouched.to_bytes, seconds)
        # rebuilt: the parse (and hot-header reads) are done untimed, on a pool of fresh messages
        s_rebuilt = measure_pool(lambda d=data: parse_and_read(d), rebuild, seconds)
        rows.append((name, len(data), p, s_raw, s_rebuilt))
        parse_rates.append(p)
        ser_rates.append(s_raw)
        ser_rates.append(s_rebuilt)

    print(f"python {sys.version.split()[0]}, {seconds:.1f} s per measurement\n")
    print(f"{'message':<12} {'bytes':>6} {'parse+read/s':>14} {'serialize/s':>14} {'modify+serialize/s':>20}")
    print(f"{'-' * 12} {'-' * 6} {'-' * 14} {'-' * 14} {'-' * 20}")
    for name, size, p, s_raw, s_reb in rows:
        print(f"{name:<12} {size:>6} {p:>14,.0f} {s_raw:>14,.0f} {s_reb:>20,.0f}")

    # overall rate of an even mix = harmonic mean of the per-case rates
    parse_all = len(parse_rates) / sum(1.0 / r for r in parse_rates)
    ser_all = len(ser_rates) / sum(1.0 / r for r in ser_rates)
    rebuilt_all = len(rows) / sum(1.0 / r[4] for r in rows)
    print()
    print(f"overall parse (+ hot headers):   {parse_all:>10,.0f} msg/s  (target {PARSE_TARGET:,})")
    print(f"overall serialize (mixed):       {ser_all:>10,.0f} msg/s  (target {SERIALIZE_TARGET:,})")
    print(f"overall serialize (rebuilt only):{rebuilt_all:>10,.0f} msg/s  (target {SERIALIZE_TARGET:,})")
    ok = parse_all >= PARSE_TARGET and rebuilt_all >= SERIALIZE_TARGET
    print("targets met" if ok else "TARGETS NOT MET")
    return ok


def icount(rounds: int) -> int:
    """Instructions callgrind counts in a process that parses and reads the messages ``rounds`` times."""
    return callgrind.count([sys.executable, __file__, "--child", str(rounds)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum time per measurement (default 1.0)")
    ap.add_argument("--icount", action="store_true", help="instructions per parse + read under callgrind")
    ap.add_argument("--rounds", type=int, default=2000, help="--icount: rounds of the three messages")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        for _ in range(args.child):
            for _, data in CASES:
                parse_and_read(data)
        return 0
    if args.icount:
        per = (icount(args.rounds) - icount(0)) / (args.rounds * len(CASES))
        print(f"parse + read: {per:,.0f} instructions per message (mean of {', '.join(n for n, _ in CASES)})")
        return 0
    return 0 if run(args.seconds) else 1


if __name__ == "__main__":
    sys.exit(main())
