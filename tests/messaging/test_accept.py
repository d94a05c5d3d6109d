"""The MESSAGE a user sends (messaging/accept.py): who may, the limits, 202 only once stored."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from libon_tsilo.messaging.accept import MessageAcceptor
from libon_tsilo.messaging.delivery import MessageDelivery
from libon_tsilo.messaging.outbox import Outbox
from libon_tsilo.messaging.store import MemoryMessageStore, NotStored, StoredMessage
from libon_tsilo.registrar.auth import AuthPolicy
from libon_tsilo.registrar.registrar import aor_key
from libon_tsilo.sip import digest
from libon_tsilo.sip.message import Request, parse_message
from tests.fakes.calls import FakeLocation
from tests.fakes.sip import FakeFlow, FakeStx
from tests.messaging.helpers import AOR, FakeNotifier, FakeSender, phone
from tests.registrar.helpers import digest_authorization

REALM = "example.com"
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}
TRUSTED = "203.0.113.5"


class Users:
    def get_ha1(self, username: str, realm: str, algorithm: str) -> str | None:
        pw = PASSWORDS.get(username)
        return digest.ha1(username, realm, pw, algorithm) if pw is not None else None

    def exists(self, username: str) -> bool:
        return username in PASSWORDS


class SlowStore(MemoryMessageStore):
    """A store whose commits the test completes (``commit()``), like SQLite's group commit."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[StoredMessage, defer.Deferred[None]]] = []

    def add(self, msg: StoredMessage) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((msg, d))
        return d

    def commit(self) -> None:
        for msg, d in self.waiting:
            self.rows[msg.id] = msg.to_dict()
            d.callback(None)
        self.waiting = []

    def fail(self) -> None:
        for _, d in self.waiting:
            d.errback(NotStored("disk full"))
        self.waiting = []


def message(body: str = "hi", sender: str = "sip:alice@example.com", ruri: str = "sip:bob@example.com",
            extra: list[str] | None = None, content_type: str | None = "text/plain", cseq: int = 1) -> Request:
    lines = [
        f"MESSAGE {ruri} SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-m1",
        "Max-Forwards: 70",
        f'From: "Alice" <{sender}>;tag=a1',
        f"To: <{ruri}>",
        "Call-ID: im-1@192.0.2.1",
        f"CSeq: {cseq} MESSAGE",
    ]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines += extra or []
    raw = "\r\n".join(lines) + f"\r\nContent-Length: {len(body.encode())}\r\n\r\n" + body
    req = parse_message(raw.encode())
    assert isinstance(req, Request)
    return req


class Server:
    def __init__(self, auth: bool = True, store: MemoryMessageStore | None = None, clock: Clock | None = None,
                 **limits: Any) -> None:
        self.clock = clock or Clock()
        self.clock.advance(1_800_000_000)
        self.store = store or MemoryMessageStore()
        self.location = FakeLocation()
        self.location.add(phone())  # bob's desk phone: reachable
        self.sender = FakeSender()
        self.outbox = Outbox(self.clock, self.store, ttl=3600)
        self.delivery = MessageDelivery(self.clock, self.outbox, self.location, self.sender, FakeNotifier())
        self.auth = AuthPolicy(self.clock, Users(), realm=REALM, secret="s3cret", trusted_sources=[TRUSTED],
                               local_domains=["example.com"]) if auth else None
        self.acceptor = MessageAcceptor(
            self.clock, self.outbox, self.delivery, is_local=lambda uri: uri.host == "example.com",
            aor_key=lambda uri: aor_key(uri, True), auth=self.auth,
            user_exists=Users().exists if auth else None, **limits,
        )

    def handle(self, req: Request, flow: Any = None) -> FakeStx:
        stx = FakeStx(req)
        self.acceptor.handle_message(req, stx, flow or FakeFlow(remote=("192.0.2.1", 5060)))
        return stx

    def authenticated(self, user: str = "alice", **kw: Any) -> FakeStx:
        """Send as ``user``: once to get the 407, then with credentials."""
        kw.setdefault("sender", f"sip:{user}@example.com")
        first = self.handle(message(**kw))
        assert first.statuses == [407]
        challenge = first.last.header("Proxy-Authenticate")
        ruri = kw.get("ruri", "sip:bob@example.com")
        creds = digest_authorization(challenge, user, PASSWORDS[user], "MESSAGE", ruri)
        extra = list(kw.pop("extra", None) or []) + [f"Proxy-Authorization: {creds}"]
        return self.handle(message(extra=extra, cseq=2, **kw))


def test_an_unauthenticated_message_is_challenged_with_407():
    s = Server()
    stx = s.handle(message())
    assert stx.statuses == [407]
    assert len(s.outbox) == 0


def test_an_authenticated_local_user_gets_202_and_the_message_is_delivered():
    s = Server()
    stx = s.authenticated()
    assert stx.statuses == [202]
    assert stx.last.to.tag
    [(binding, msg, _)] = s.sender.sent
    assert msg.sender == "sip:alice@example.com" and msg.sender_name == "Alice"
    assert msg.body == b"hi" and msg.content_type == "text/plain" and msg.aor == AOR
    assert s.acceptor.counters["accepted"] == 1


def test_the_202_waits_for_the_commit():
    store = SlowStore()
    s = Server(store=store)
    stx = s.authenticated()
    assert stx.statuses == [] and s.sender.sent == []  # not durable yet: no answer, no delivery
    store.commit()
    assert stx.statuses == [202] and len(s.sender.sent) == 1


def test_a_failed_commit_is_a_500_with_retry_after_and_nothing_is_kept():
    store = SlowStore()
    s = Server(store=store)
    stx = s.authenticated()
    store.fail()
    assert stx.statuses == [500] and stx.last.header("Retry-After") == "5"
    assert len(s.outbox) == 0 and s.outbox.count(AOR) == 0 and s.sender.sent == []


def test_a_trusted_source_is_not_challenged_and_its_from_is_the_sender():
    s = Server()
    stx = s.handle(message(sender="sip:+33123456789@gw.example.net"), FakeFlow(remote=(TRUSTED, 5060)))
    assert stx.statuses == [202]
    assert s.sender.sent[0][1].sender == "sip:+33123456789@gw.example.net"


def test_a_foreign_sender_from_the_internet_is_refused():
    s = Server()
    stx = s.handle(message(sender="sip:mallory@evil.example"))
    assert stx.statuses == [403]
    assert len(s.outbox) == 0


def test_a_user_cannot_send_in_someone_elses_name():
    s = Server()
    first = s.handle(message(sender="sip:carol@example.com"))
    creds = digest_authorization(first.last.header("Proxy-Authenticate"), "alice", PASSWORDS["alice"],
                                 "MESSAGE", "sip:bob@example.com")
    stx = s.handle(message(sender="sip:carol@example.com", extra=[f"Proxy-Authorization: {creds}"], cseq=2))
    assert stx.statuses == [403]


def test_unknown_user_and_foreign_domain_get_404():
    s = Server()
    assert s.authenticated(ruri="sip:nobody@example.com").statuses == [404]
    assert s.handle(message(ruri="sip:bob@elsewhere.example")).statuses == [404]  # before any challenge


def test_without_auth_a_user_exists_while_it_has_a_device():
    s = Server(auth=False)
    assert s.handle(message()).statuses == [202]
    assert s.handle(message(ruri="sip:nobody@example.com")).statuses == [404]


def test_size_limit_is_413():
    s = Server(max_size=10)
    assert s.authenticated(body="x" * 10).statuses == [202]
    stx = s.authenticated(body="x" * 11)
    assert stx.statuses == [413]
    assert s.acceptor.limit_hits()["message_size"] == 1


def test_per_user_limit_is_480_mailbox_full():
    s = Server(max_per_user=2, auth=False)
    s.location.bindings.clear()
    s.location.add(phone(push=True))  # asleep: the messages pile up
    assert [s.handle(message()).statuses for _ in range(2)] == [[202], [202]]
    stx = s.handle(message())
    assert stx.statuses == [480] and stx.last.reason == "Mailbox Full"
    assert s.acceptor.limit_hits()["messages_per_user"] == 1
    assert len(s.outbox) == 2


def test_per_user_limit_counts_messages_being_stored():
    store = SlowStore()
    s = Server(max_per_user=1, auth=False, store=store)
    first, second = s.handle(message()), s.handle(message())
    assert second.statuses == [480]
    store.commit()
    assert first.statuses == [202]


def test_total_limit_is_503_with_retry_after():
    store = SlowStore()
    s = Server(max_total=2, auth=False, store=store)
    first, second = s.handle(message()), s.handle(message(ruri="sip:bob@example.com"))
    third = s.handle(message())
    assert third.statuses == [503] and third.last.header("Retry-After") == "60"  # counts those being stored
    assert s.acceptor.limit_hits()["messages_total"] == 1
    store.commit()
    assert first.statuses == [202] and second.statuses == [202]


def test_per_sender_rate_is_503_with_retry_after():
    s = Server(per_sender_per_minute=2, auth=False)
    assert [s.handle(message()).statuses for _ in range(2)] == [[202], [202]]
    stx = s.handle(message())
    assert stx.statuses == [503] and stx.last.header("Retry-After") == "60"
    assert s.acceptor.limit_hits()["messages_per_sender"] == 1
    s.clock.advance(61)
    assert s.handle(message()).statuses == [202]


@pytest.mark.parametrize("kw, status", [
    ({"body": ""}, 400),
    ({"content_type": None}, 400),
    ({"extra": ["Content-Encoding: gzip"]}, 415),
])
def test_bad_bodies(kw, status):
    s = Server(auth=False)
    assert s.handle(message(**kw)).statuses == [status]


def test_the_date_of_the_sender_is_kept_else_ours():
    s = Server(auth=False)
    s.handle(message(extra=["Date: Sat, 13 Nov 2010 23:29:00 GMT"]))
    s.handle(message())
    assert s.outbox.pending(AOR)[0].date == "Sat, 13 Nov 2010 23:29:00 GMT"
    assert s.outbox.pending(AOR)[1].date.endswith("GMT")


def test_bytes_that_are_not_utf8_are_stored_and_sent_on_as_they_came(tmp_path):
    """A display name and a body that are not UTF-8 (the parser keeps the name's bytes as surrogates)
    survive the SQLite row and come out byte for byte in the MESSAGE we send."""
    from twisted.internet import defer as _defer

    from libon_tsilo.messaging.sqlite_store import SqliteMessageStore
    from libon_tsilo.messaging.uac import build_message

    raw = (b"MESSAGE sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK-x\r\n"
           b'From: "Al\xe9" <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\nCall-ID: c\r\n'
           b"CSeq: 1 MESSAGE\r\nContent-Type: text/plain;charset=latin-1\r\nContent-Length: 3\r\n\r\n\xe9t\xe9")
    req = parse_message(raw)
    path = str(tmp_path / "m.sqlite")
    clock = Clock()  # the server's and the group commit's timer
    s = Server(auth=False, store=SqliteMessageStore(path, clock, run_in_thread=_defer.maybeDeferred), clock=clock)
    stx = s.handle(req)
    s.clock.advance(1)
    assert stx.statuses == [202]
    [(binding, msg, _)] = s.sender.sent
    restored = SqliteMessageStore(path, Clock(), run_in_thread=_defer.maybeDeferred).load(s.clock.seconds())
    out = build_message(binding, restored[0])
    out.add_header("Via", "SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK-y", first=True)
    wire = out.to_bytes()
    assert wire.endswith(b"\r\n\r\n\xe9t\xe9") and b'"Al\xe9"' in wire


# -- a MESSAGE to a user's phone number (issue 13: the calls' mapping, routing/numbers.py) ----------

BOBS_NUMBER = "+33123456789"


class NumberedUsers(Users):
    """The users database with bob's number (registrar/users.py: by_number)."""

    def by_number(self, e164: str) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(username="bob") if e164 == BOBS_NUMBER else None


def numbered_server(**limits: Any) -> Server:
    from libon_tsilo.dialplan import DialPlan
    from libon_tsilo.routing.numbers import e164_of, owner_of

    users, plan = NumberedUsers(), DialPlan(country_code="33")

    def user_of_number(uri: Any) -> str | None:
        record = owner_of(e164_of(uri, plan), users)
        return record.username if record is not None else None

    return Server(user_of_number=user_of_number, home_domain="example.com", **limits)


@pytest.mark.parametrize("ruri", ["tel:+33123456789", "sip:+33123456789@example.com",
                                  "sip:0123456789@example.com;user=phone"])
def test_a_message_to_a_users_number_is_stored_for_that_user(ruri):
    s = numbered_server()
    stx = s.authenticated(ruri=ruri)
    assert stx.statuses == [202]
    [(_, msg, _)] = s.sender.sent
    assert msg.aor == AOR and msg.to_uri == "sip:bob@example.com"
    assert s.outbox.count(AOR) == 1


def test_a_trusted_peer_may_message_a_number():
    s = numbered_server()
    stx = s.handle(message(sender="sip:+33999@gw.example.net", ruri="tel:+33123456789"),
                   FakeFlow(remote=(TRUSTED, 5060)))
    assert stx.statuses == [202] and s.outbox.count(AOR) == 1


def test_an_outsider_cannot_probe_numbers():
    s = numbered_server()
    for ruri in ("tel:+33123456789", "tel:+33100000000", "sip:+33123456789@example.com"):
        stx = s.handle(message(sender="sip:mallory@evil.example", ruri=ruri))
        assert stx.statuses == [403], ruri
    assert len(s.outbox) == 0


def test_an_unknown_number_is_404():
    s = numbered_server()
    assert s.authenticated(ruri="tel:+33100000000").statuses == [404]
    assert s.authenticated(ruri="sip:+33100000000@example.com").statuses == [404]
    assert len(s.outbox) == 0


# -- one sender cannot fill another user's mailbox --------------------------------------------------


def asleep(s: Server) -> None:
    s.location.bindings.clear()
    s.location.add(phone(push=True))  # the messages pile up


def test_per_sender_per_user_limit_is_480_and_leaves_room_for_others():
    s = Server(max_per_sender_per_user=2, auth=False)
    asleep(s)
    assert [s.handle(message()).statuses for _ in range(2)] == [[202], [202]]
    stx = s.handle(message())
    assert stx.statuses == [480] and stx.last.reason == "Mailbox Full For This Sender"
    assert s.acceptor.limit_hits()["messages_per_sender_per_user"] == 1
    assert s.acceptor.limit_hits()["messages_per_user"] == 0
    assert s.handle(message(sender="sip:carol@example.com")).statuses == [202]  # another sender
    assert s.outbox.count(AOR) == 3


def test_per_sender_per_user_limit_frees_as_messages_expire():
    s = Server(max_per_sender_per_user=1, auth=False)
    asleep(s)
    assert s.handle(message()).statuses == [202]
    assert s.handle(message()).statuses == [480]
    s.clock.advance(3601)  # the outbox's ttl: the waiting message is gone
    assert s.outbox.count(AOR) == 0
    assert s.handle(message()).statuses == [202]


def test_per_sender_per_user_limit_counts_messages_being_stored_and_failed_ones_free_it():
    store = SlowStore()
    s = Server(max_per_sender_per_user=1, auth=False, store=store)
    first, second = s.handle(message()), s.handle(message())
    assert second.statuses == [480]
    store.fail()
    assert first.statuses == [500]
    third = s.handle(message())
    store.commit()
    assert third.statuses == [202]


def test_per_sender_per_user_limit_zero_is_off():
    s = Server(max_per_sender_per_user=0, auth=False)
    asleep(s)
    assert all(s.handle(message()).statuses == [202] for _ in range(60))


def test_per_sender_per_user_limit_counts_the_messages_restored_after_a_restart():
    s = Server(max_per_sender_per_user=1, auth=False)
    asleep(s)
    assert s.handle(message()).statuses == [202]
    restarted = Outbox(s.clock, s.store, ttl=3600)
    assert restarted.start() == 1
    assert restarted.count_from(AOR, "sip:alice@example.com") == 1
    assert restarted.count_from(AOR, "sip:carol@example.com") == 0
