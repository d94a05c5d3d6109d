"""registrar/redis_writes.py on a fake connection (no Redis, no real time): what a batch sends,
byte for byte as RESP commands, and when; the real Redis runs in test_redis_store.py and the
other test_redis_*.py."""

from __future__ import annotations

import hashlib
from typing import Any

import hiredis
from twisted.internet.task import Clock

from libon_tsilo.registrar import redis_codec
from libon_tsilo.registrar.location import NotStored
from libon_tsilo.registrar.redis_writes import WRITE_BATCH, RedisWrites, binding_redis_key
from tests.registrar.helpers import make_binding
from tests.registrar.test_redis_wire_timer import connect

SHA = hashlib.sha1(WRITE_BATCH.encode()).hexdigest().encode()
CHANNEL = b"test:bindings:7"


class Answer:
    """A waiter: what a REGISTER's answer is to the store."""

    def __init__(self) -> None:
        self.outcome: list[Any] = []

    def callback(self, result: None) -> None:
        self.outcome.append("stored")

    def errback(self, reason: BaseException) -> None:
        self.outcome.append(reason)


def commands(data: bytes) -> list[list[bytes]]:
    """The RESP commands in ``data``, each as its arguments."""
    reader = hiredis.Reader()
    reader.feed(data)
    out = []
    while (command := reader.gets()) is not False:
        out.append(command)
    return out


class Env:
    def __init__(self, publish_after_answer: bool = True, skip_replies: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.rollbacks: list[tuple[int, int, str]] = []
        self.writes = RedisWrites(self.clock, b"test:", "b", b"tok ", lambda *a: self.rollbacks.append(a),
                                  publish_after_answer)
        self.soon: list[Any] = []
        self.writes.commit.soon = self.soon.append  # the loop's next turn: run by the test
        _, self.conn, self.transport = connect()
        self.writes.conn = self.conn
        self.writes.state = "up"
        self.writes.skip_replies = skip_replies
        self.writes.use_channel(CHANNEL)

    def register(self, user: str) -> tuple[Any, Answer]:
        binding = make_binding(aor=f"sip:{user}@example.com", uri=f"sip:{user}@192.0.2.1", expires_at=1060.0,
                               node="b")
        self.writes.save(binding)
        answer = Answer()
        assert self.writes.notify_committed(binding.aor, answer)
        return binding, answer

    def next_turn(self) -> None:
        turn, self.soon[:] = list(self.soon), []
        for f in turn:
            f()

    def sent(self) -> list[list[list[bytes]]]:
        """Each write to the connection, as its commands."""
        return [commands(data) for data in self.transport.written]


def _script_call(how: bytes, binding: Any, message: bytes | None = None) -> list[bytes]:
    value = redis_codec.dumps(binding.to_compact_dict())
    call = [how, WRITE_BATCH.encode() if how == b"EVAL" else SHA, b"2",
            binding_redis_key(b"test:", binding.aor, binding.key), b"test:seq:b", CHANNEL, b"1", value, b"60000"]
    return call + ([message] if message is not None else [])


def _message(binding: Any) -> bytes:
    return b'tok {"n":"b","ops":[["s",' + redis_codec.dumps(binding.to_compact_dict()) + b"]]}"


def test_a_batch_is_the_script_call_redis_py_would_send_and_the_answer_waits_for_its_reply() -> None:
    env = Env(publish_after_answer=False)
    binding, answer = env.register("alice")
    assert env.transport.written == []  # the loop's next turn
    env.next_turn()
    # EVAL the first time on a connection, then EVALSHA; the message published inside the script
    assert env.sent() == [[_script_call(b"EVAL", binding, _message(binding))]]
    assert answer.outcome == []
    env.conn.data_received(b":1\r\n")  # the write counter
    assert answer.outcome == ["stored"] and env.writes.acked_seq == 1
    again, answer = env.register("bob")
    env.next_turn()
    assert env.sent()[1] == [_script_call(b"EVALSHA", again, _message(again))]
    env.conn.data_received(b":2\r\n")
    assert answer.outcome == ["stored"] and env.writes.commits == 2 and env.rollbacks == []


def test_the_publish_after_the_answer_rides_with_the_next_batch_when_one_is_waiting() -> None:
    """Under load (a REGISTER queued while the last batch was in flight) the PUBLISH of the batch
    just answered and the next script call are one send; alone, the PUBLISH is a send of its own.
    Either way the PUBLISH follows the 200s, and Redis answers nothing to it."""
    env = Env()
    first, first_answer = env.register("alice")
    env.next_turn()
    second, second_answer = env.register("bob")  # queued: the first is in flight
    env.next_turn()  # nothing to start yet
    assert len(env.transport.written) == 1
    env.conn.data_received(b":1\r\n")
    assert first_answer.outcome == ["stored"] and second_answer.outcome == []
    skip = [b"CLIENT", b"REPLY", b"SKIP"]
    assert env.sent()[1] == [skip, [b"PUBLISH", CHANNEL, _message(first)], _script_call(b"EVALSHA", second)]
    env.conn.data_received(b":2\r\n")  # the script call's reply: the PUBLISH had none
    assert second_answer.outcome == ["stored"]
    assert env.sent()[2] == [skip, [b"PUBLISH", CHANNEL, _message(second)]]
    assert len(env.transport.written) == 3


def test_without_client_reply_skip_the_publish_is_a_command_of_its_own_whose_reply_is_read() -> None:
    env = Env(skip_replies=False)
    binding, answer = env.register("alice")
    env.next_turn()
    env.conn.data_received(b":1\r\n")
    assert answer.outcome == ["stored"]
    assert env.sent()[1] == [[b"PUBLISH", CHANNEL, _message(binding)]]
    env.conn.data_received(b":0\r\n")  # its reply (no subscriber) goes to nobody
    again, answer = env.register("bob")
    env.next_turn()
    env.conn.data_received(b":2\r\n")
    assert answer.outcome == ["stored"] and env.rollbacks == []


def test_a_refused_batch_fails_its_waiters_and_a_flushed_script_cache_costs_none() -> None:
    env = Env()
    binding, answer = env.register("alice")
    env.next_turn()
    env.conn.data_received(b":1\r\n")
    env.register("bob")
    env.next_turn()
    env.conn.data_received(b"-NOSCRIPT No matching script.\r\n")  # SCRIPT FLUSH: the same batch by EVAL
    assert [c[0] for c in env.sent()[-1]] == [b"EVAL"]
    env.conn.data_received(b":2\r\n")
    _, refused = env.register("carol")
    env.next_turn()
    env.conn.data_received(b"-NOPERM this user has no permissions to run the 'evalsha' command\r\n")
    [error] = refused.outcome
    assert isinstance(error, NotStored) and "NOPERM" in str(error)
    assert env.writes.failed_batches == 1 and env.writes.rows_skipped == 1


def test_a_write_counter_that_went_back_is_reported() -> None:
    env = Env()
    env.register("alice")
    env.next_turn()
    env.conn.data_received(b":5\r\n")
    env.register("bob")
    env.next_turn()
    env.conn.data_received(b":3\r\n")  # Redis restarted from an older snapshot, the feed connected
    assert env.rollbacks == [(3, 5, "a write")]


def test_a_registers_changes_are_sent_once_all_are_in_without_a_loop_turn() -> None:
    """The registrar holds the store's writes while it applies a REGISTER (LocationStore.hold_events):
    its changes go in one script call sent at release, not on a loop turn asked for by the first
    change (a turn of its own per REGISTER, ~10k instructions on node B of bench/live_icount.py
    --case e)."""
    env = Env(publish_after_answer=False)
    env.writes.commit.hold()
    alice = make_binding(aor="sip:alice@example.com", uri="sip:alice@192.0.2.1", expires_at=1060.0, node="b")
    env.writes.save(alice)
    env.writes.delete(make_binding(aor="sip:alice@example.com", uri="sip:alice@192.0.2.9", expires_at=1060.0,
                                   node="b"), "replaced")
    assert env.transport.written == [] and env.soon == []  # held: nothing sent, no turn asked for
    env.writes.commit.release()
    answer = Answer()
    assert env.writes.notify_committed(alice.aor, answer)  # joins the batch in flight
    assert env.soon == []
    [[call]] = env.sent()
    assert call[0] == b"EVAL" and call[3] == binding_redis_key(b"test:", alice.aor, alice.key)
    env.conn.data_received(b":1\r\n")
    assert answer.outcome == ["stored"]


def test_a_keys_ttl_is_the_bindings_time_left_rounded_up_and_a_spent_one_is_deleted() -> None:
    env = Env(publish_after_answer=False)
    env.writes.commit.hold()
    env.writes.save(make_binding(aor="sip:a@example.com", uri="sip:a@192.0.2.1", expires_at=1060.0004, node="b"))
    env.writes.save(make_binding(aor="sip:b@example.com", uri="sip:b@192.0.2.1", expires_at=999.9996, node="b"))
    env.writes.commit.release()
    [[call]] = env.sent()
    # numkeys 3 (a's key, b's key to delete, the counter), then channel, one set, a's value and TTL
    assert call[2] == b"3" and call[6] == CHANNEL and call[7] == b"1" and call[9] == b"60001"
    assert call[4] == binding_redis_key(b"test:", "sip:b@example.com", "uri:sip:b@192.0.2.1")
    assert call[10].endswith(b',["d","sip:b@example.com","uri:sip:b@192.0.2.1","expired"]]}')
