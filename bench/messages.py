#!/usr/bin/env python3
"""MESSAGEs accepted and stored per second, with the SQLite message store (group commit, worker thread).

Run: .venv/bin/python bench/messages.py [--n 20000] [--users 100] [--window 200] [--store sqlite|redis]

The real service tree (``make_service``, epoll reactor, auth off, log level warn, location and
messages on SQLite files in a temporary directory, [messages] per_sender_per_minute = 0) runs in
this process; datagrams go straight into the transport's inbound path and what the server sends
lands in memory instead of a socket (as bench/inproc.py does), so the figure is the server's cost
plus SQLite's, free of SIPp and kernel noise. The SQLite writes run in the store's own worker
thread, as in the server: each 202 waits for the commit that holds its message.

``--users`` users each register one RFC 8599 binding first (sleeping phones): every MESSAGE is
stored and "pushed" through a notifier that only counts (the push providers' HTTP cost is not
part of this figure; bench/latefork.py and the push fakes cover pushes). ``--window`` MESSAGEs are
outstanding at any time (a new one goes in when a 202 goes out), like many senders at once.

``--store redis`` puts the messages in a redis-server this script starts on 127.0.0.1:23010 (the
bindings stay on SQLite: the bindings' Redis client needs the asyncio reactor; the message store's
client is the blocking one, in its worker thread, whatever the reactor), one MULTI/EXEC per batch.

Prints the rate (MESSAGEs answered 202 per second of wall time), the commits and the mean number
of messages per commit. Wall-clock figures: on a shared VM expect +-30 %.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SENDER = ("127.0.0.1", 16000)
PHONE = ("127.0.0.1", 17000)

REGISTER = (
    "REGISTER sip:127.0.0.1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:17000;branch=z9hG4bK-r{n};rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:user{n}@127.0.0.1>;tag=r{n}\r\n"
    "To: <sip:user{n}@127.0.0.1>\r\n"
    "Call-ID: reg-{n}\r\n"
    "CSeq: 1 REGISTER\r\n"
    "Contact: <sip:user{n}@127.0.0.1:17000;pn-provider=webhook;pn-prid=tok{n};pn-param=app>\r\n"
    "Expires: 3600\r\n"
    "Content-Length: 0\r\n\r\n"
)
MESSAGE = (
    "MESSAGE sip:user{u}@127.0.0.1 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:16000;branch=z9hG4bK-m{n};rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: \"Alice\" <sip:alice@127.0.0.1>;tag=m{n}\r\n"
    "To: <sip:user{u}@127.0.0.1>\r\n"
    "Call-ID: im-{n}\r\n"
    "CSeq: 1 MESSAGE\r\n"
    "Content-Type: text/plain;charset=UTF-8\r\n"
    "Content-Length: {size}\r\n\r\n{body}"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="MESSAGEs to send")
    ap.add_argument("--users", type=int, default=100, help="recipients (each with one sleeping phone)")
    ap.add_argument("--window", type=int, default=200, help="MESSAGEs outstanding at once")
    ap.add_argument("--store", choices=("sqlite", "redis"), default="sqlite", help="the message store")
    args = ap.parse_args()
    if args.n / args.users > 100_000:
        ap.error("too many messages per user")

    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import defer, reactor
    from twisted.logger import globalLogBeginner

    from libon_tsilo.ops.config import config_from_dict
    from libon_tsilo.ops.logging import make_observer
    from libon_tsilo.ops.service import make_service

    globalLogBeginner.beginLoggingTo([make_observer("warn", "text")], redirectStandardIO=False)
    tmp = tempfile.mkdtemp()
    cfg = config_from_dict({
        "sip": {"listen": ["udp:127.0.0.1:23000"], "domains": ["127.0.0.1"]},
        "auth": {"enabled": False},
        "location": {"backend": "sqlite", "path": os.path.join(tmp, "location.sqlite")},
        "messages": {"db": os.path.join(tmp, "messages.sqlite"), "per_sender_per_minute": 0,
                     "max_per_user": 100_000},
        "log": {"level": "warn", "format": "text"},
        # the phones' pn-provider must be one we serve (else 555); the notifier below replaces it
        "push": {"providers": ["webhook"], "webhook": [{"name": "webhook", "url": "http://127.0.0.1:23001/"}]},
    })
    root = make_service(cfg, clock=reactor)
    parts = root.parts
    acceptor = parts.extra["messages"]
    pushes = [0]

    class CountingNotifier:
        def notify_message(self, binding: Any, msg: Any, preview: str | None) -> Any:
            pushes[0] += 1
            return defer.succeed(None)

    acceptor.delivery.notifier = CountingNotifier()
    redis = None
    if args.store == "redis":
        from libon_tsilo.messaging.redis_store import RedisMessageStore, make_blocking_client
        from tests.redis_server import RedisServer

        redis = RedisServer(Path(tmp))
        redis.port = 23010  # this bench's port range
        redis.start()
        client = make_blocking_client(redis.url)
        acceptor.outbox.store = RedisMessageStore(client, reactor, key_prefix="bench:", reactor=reactor)
    state = {"sent": 0, "accepted": 0, "other": 0, "start": 0.0, "end": 0.0}

    class FakeSocket:
        local = ("127.0.0.1", 23000)
        v6 = False

        def send_to(self, data: bytes, addr: tuple[str, int]) -> None:
            if addr != SENDER or not data.startswith(b"SIP/2.0 "):
                return
            if data.startswith(b"SIP/2.0 202"):
                state["accepted"] += 1
            else:
                state["other"] += 1
            done = state["accepted"] + state["other"]
            if done == args.n:
                state["end"] = time.perf_counter()
                reactor.callLater(0, reactor.stop)
            elif state["sent"] < args.n:
                reactor.callLater(0, send_one)

    sock = FakeSocket()
    parts.transport.add_udp_endpoint(sock)
    body = "See you at eight? " * 3

    def send_one() -> None:
        n = state["sent"]
        state["sent"] += 1
        data = MESSAGE.format(n=n, u=n % args.users, size=len(body), body=body).encode()
        parts.transport.datagram_received(sock, data, SENDER)

    def start() -> None:
        parts.location.start()
        root.getServiceNamed("messages").startService()
        for u in range(args.users):
            parts.transport.datagram_received(sock, REGISTER.format(n=u).encode(), PHONE)
        parts.location.flush().addCallback(lambda _: begin())

    def begin() -> None:
        state["start"] = time.perf_counter()
        for _ in range(min(args.window, args.n)):
            send_one()

    reactor.callWhenRunning(start)
    reactor.run()
    elapsed = state["end"] - state["start"]
    store = acceptor.outbox.store
    print(f"command: .venv/bin/python bench/messages.py --n {args.n} --users {args.users}"
          f" --window {args.window} --store {args.store}")
    print(f"MESSAGEs: {args.n}, answered 202: {state['accepted']}, other answers: {state['other']}")
    print(f"stored: {len(acceptor.outbox)}, pushes (counted, not sent): {pushes[0]}")
    per_commit = state["accepted"] / max(1, store.commits)
    print(f"{args.store} commits: {store.commits}, messages per commit: {per_commit:.1f}")
    print(f"elapsed: {elapsed:.3f} s -> {state['accepted'] / elapsed:,.0f} MESSAGE/s accepted and stored")
    store._stop_pool()
    parts.location.persistence._stop_pool()
    if redis is not None:
        redis.stop()


if __name__ == "__main__":
    main()
