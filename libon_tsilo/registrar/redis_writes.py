"""This node's binding changes written to Redis: the batches of the Redis store (redis_store.py).

A batch is one EVALSHA of a small Lua script (atomic like MULTI/EXEC, one reply): a key per binding
set with its TTL, the removed ones deleted, this node's write counter bumped (its answer shows a
Redis that lost writes it acknowledged), and, unless ``publish_after_answer``, the batch's change
message PUBLISHed. The batches follow group_commit.py's schedule (one in flight; an idle store
writes a REGISTER's changes once all are in, ``commit.hold``/``release``, and other changes on the
loop's next turn through ``soon``). A waiter (a REGISTER's answer) is called once
Redis answered: a 200 promises the binding is in Redis.

With ``publish_after_answer`` the script only writes and the message is PUBLISHed after the
waiters ran, i.e. after the REGISTERs' 200s were sent, with ``CLIENT REPLY SKIP`` (nothing to read
back). When the next batch starts at once (changes queued while this one was in flight) the PUBLISH
goes in front of its script call, in one write: one send, not two, under load.

The redis store's per-REGISTER path, compiled by mypyc (setup.py), and packed without hiredis's
``pack_command``: only the keys, values and TTLs change from one batch to the next, the rest of the
script call (its SHA, the write counter's key, the channel) is packed once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from libon_tsilo.group_commit import GroupCommit, Waiter
from libon_tsilo.registrar import redis_codec
from libon_tsilo.registrar.binding import Binding
from libon_tsilo.registrar.location import NotStored, StoreClosed
from libon_tsilo.registrar.redis_wire import SKIP_NEXT_REPLY, ReplyError, RespConnection, bulk

__all__ = ["RedisWrites", "WRITE_BATCH", "binding_redis_key", "change_channel"]

log = Logger(namespace=__name__)  # compiled (mypyc): Logger() would name the importer

# one batch in one command, atomic like MULTI/EXEC: KEYS = the keys to set, then those to delete,
# then this node's write counter; ARGV = channel, number of sets, (value, ttl ms) per set, then the
# messages to publish. Returns the counter: a Redis that comes back with a lower one lost our writes.
WRITE_BATCH = """
local n = tonumber(ARGV[2])
for i = 1, n do redis.call('SET', KEYS[i], ARGV[1 + 2 * i], 'PX', ARGV[2 + 2 * i]) end
for i = n + 1, #KEYS - 1 do redis.call('DEL', KEYS[i]) end
for j = 3 + 2 * n, #ARGV do redis.call('PUBLISH', ARGV[1], ARGV[j]) end
return redis.call('INCR', KEYS[#KEYS])
"""
_BY_SHA = b"$7\r\nEVALSHA\r\n" + bulk(hashlib.sha1(WRITE_BATCH.encode()).hexdigest().encode())
_BY_TEXT = b"$4\r\nEVAL\r\n" + bulk(WRITE_BATCH.encode())


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def binding_redis_key(prefix: bytes, aor: str, key: str) -> bytes:
    """The Redis key of the binding ``key`` of ``aor``: ``<prefix>b:<len(aor)>:<aor>/<key>`` (the
    length makes the split unambiguous whatever the AOR holds), bytes (surrogateescape)."""
    raw_aor = _raw(aor)
    return b"%sb:%d:%s/%s" % (prefix, len(raw_aor), raw_aor, _raw(key))


def change_channel(prefix: bytes, slot: int) -> bytes:
    """The pub/sub channel of change channel ``slot`` (redis_store.py)."""
    return prefix + b"bindings:%d" % slot


# the counts of a batch's script call as arguments, packed once: a REGISTER's batch has 2 keys, 1 set
_COUNTS = tuple(bulk(b"%d" % n) for n in range(32))


def _count_arg(n: int) -> bytes:
    return _COUNTS[n] if n < 32 else bulk(b"%d" % n)


def _ignored(reply: Any) -> None:
    """A reply nobody needs: its failure is the connection's, which the feed sees."""


class _WriteBatch:
    """group_commit.Batch: (aor, key) -> the binding to write, or the reason of its removal, in the
    order of the changes."""

    def __init__(self) -> None:
        self.waiters: list[tuple[Any, Waiter]] = []
        self.changes: dict[tuple[str, str], Binding | str] = {}

    def __len__(self) -> int:
        return len(self.changes)


class _Packed:
    """A batch as sent: its script call without its first three parts (the command, the script, the
    array's length), ``nargs`` arguments in ``tail``, the same for EVALSHA and, after NOSCRIPT,
    EVAL; and, once sent, how and where (``by_sha``, ``conn``)."""

    def __init__(self, batch: _WriteBatch, nargs: int, tail: bytes, messages: list[bytes]) -> None:
        self.batch = batch
        self.nargs = nargs
        self.tail = tail
        self.messages = messages  # the change messages, when published after the answer
        self.by_sha = False
        self.conn: RespConnection | None = None

    def command(self) -> bytes:
        return b"*%d\r\n%s%s" % (self.nargs + 2, _BY_SHA if self.by_sha else _BY_TEXT, self.tail)


class RedisWrites:
    """The batch writer of one node's Redis store. The store owns the connection (``conn``, while up)
    and the state (``state``: "up" lets changes in), says which channel it publishes on
    (``use_channel``), whether the connection honours ``CLIENT REPLY SKIP`` (``skip_replies``), and
    gets ``rollback_seen(seq, acked, how)`` when a batch's answer shows Redis lost acknowledged
    writes."""

    def __init__(self, clock: IReactorTime, prefix: bytes, node_id: str, own: bytes,
                 rollback_seen: Callable[[int, int, str], None], publish_after_answer: bool = False) -> None:
        self.clock = clock
        self.prefix = prefix
        # every change message starts so: this process's token, then the JSON up to its changes
        self._message_head = own + b'{"n":' + redis_codec.dumps(node_id) + b',"ops":['
        self._rollback_seen = rollback_seen
        self.publish_after_answer = publish_after_answer
        self.state = "connecting"  # the store's: "up", "down", "reloading", "duplicate"
        self.closed = False
        self.conn: RespConnection | None = None
        self.skip_replies = False
        self.channel = b""
        self._channel_arg = bulk(b"")  # the channel as the script's first ARGV
        self._publish_head = b""  # PUBLISH <channel>, packed
        # this node's write counter in Redis, as of our last acknowledged batch: a batch answered
        # with no more than it means Redis lost writes (redis_store.py)
        self.seq_key = prefix + b"seq:" + _raw(node_id)
        self._seq_arg = bulk(self.seq_key)
        self.acked_seq = 0
        self._script_on: RespConnection | None = None  # the connection Redis cached the script for
        # the PUBLISH of the batch just answered, sent in front of the next batch's script call when
        # that one starts at once (_finish): (connection, packed commands)
        self._publish_due: tuple[RespConnection, bytes] | None = None
        # the batch in flight (GroupCommit: one at a time), for the reply's callback, bound once
        self._sending: _Packed | None = None
        self._on_reply = self._answered
        self.commits = 0
        self.rows_written = 0
        self.rows_skipped = 0  # changes refused while Redis was down, or lost with a failed write
        self.failed_batches = 0  # batches failed in a row (logged at the first)
        # no flush interval: an idle store writes a REGISTER's changes once all are in (the location
        # store holds them, ``commit.hold``/``release``), others on the loop's next turn
        # (``commit.soon``, set by the store once it knows its loop)
        self.commit: GroupCommit[_WriteBatch] = GroupCommit(clock, 0.0, _WriteBatch, self._write)

    @property
    def up(self) -> bool:
        return self.state == "up"

    def use_channel(self, channel: bytes) -> None:
        """Publish on ``channel`` from now on (the store claimed it)."""
        self.channel = channel
        self._channel_arg = bulk(channel)
        self._publish_head = SKIP_NEXT_REPLY + b"*3\r\n$7\r\nPUBLISH\r\n" + bulk(channel)

    # -- changes --------------------------------------------------------------------------------

    def save(self, binding: Binding) -> None:
        self._queue((binding.aor, binding.key), binding)

    def delete(self, binding: Binding, reason: str = "") -> None:
        if reason == "expired":
            return  # Redis drops the key at its TTL, every replica on its own timer
        self._queue((binding.aor, binding.key), reason or "removed")

    def _queue(self, ident: tuple[str, str], change: Binding | str) -> None:
        if self.closed:
            return
        if self.state != "up":
            self.rows_skipped += 1  # the waiter hears it; a resync repairs the rest
            return
        changes = self.commit.open.changes
        changes.pop(ident, None)  # re-inserted last: the batch keeps the order of the changes
        changes[ident] = change
        self.commit.changed()

    def notify_committed(self, aor: str, waiter: Waiter) -> bool:
        """``waiter.callback(None)`` once the changes queued so far are in Redis, ``errback``
        with NotStored when they could not be (Redis down or failing), StoreClosed once stopped;
        False, and ``waiter`` never called, when nothing is waiting to be written."""
        if self.closed:
            waiter.errback(StoreClosed("the location store is stopped"))
        elif self.state != "up":
            waiter.errback(NotStored(f"redis is {self.state}"))
        else:
            return self.commit.notify(aor, waiter)
        return True

    def when_committed(self, aor: str) -> defer.Deferred[None] | None:
        """``notify_committed`` as a Deferred."""
        d: defer.Deferred[None] = defer.Deferred()
        return d if self.notify_committed(aor, d) else None

    def flush(self) -> defer.Deferred[None]:
        """Fires once everything queued so far is written or has failed; never errbacks."""
        return self.commit.flush()

    def pending(self) -> int:
        return self.commit.pending()

    # -- the writer -----------------------------------------------------------------------------

    def _write(self, batch: _WriteBatch) -> None:
        try:
            packed = self._pack(batch)
        except Exception:
            log.failure("location redis: serializing a batch failed")
            self._finish(ValueError("a batch could not be serialized"), batch)
            return
        # EVAL once per connection (Redis caches the script), EVALSHA after: one round trip
        packed.by_sha = self._script_on is not None and self._script_on is self.conn
        self._send(packed)

    def _pack(self, batch: _WriteBatch) -> _Packed:
        """Serialized on the reactor thread, so each row is a snapshot of the binding as it was."""
        now: float = self.clock.seconds()  # typed: compiled, the arithmetic below is native
        keys: list[bytes] = []
        dels: list[bytes] = []
        args: list[bytes] = []  # (value, ttl ms) per binding set
        ops: list[bytes] = []  # the batch's changes in order, as JSON, for the other nodes
        for (aor, key), change in batch.changes.items():
            rkey = bulk(binding_redis_key(self.prefix, aor, key))
            if isinstance(change, Binding):
                left_ms = (change.expires_at - now) * 1000.0
                ttl_ms = int(left_ms)  # rounded up, as math.ceil (a generic call, compiled)
                if ttl_ms < left_ms:
                    ttl_ms += 1
                if ttl_ms > 0:
                    # encoded once, for the key and inside the message; without the fields at their
                    # defaults (Binding.to_compact_dict): less for every node to decode
                    value = redis_codec.dumps(change.to_compact_dict())
                    keys.append(rkey)
                    args.append(bulk(value))
                    args.append(bulk(b"%d" % ttl_ms))
                    ops.append(b'["s",' + value + b"]")
                    continue
                reason = "expired"
            else:
                reason = change
            dels.append(rkey)
            ops.append(redis_codec.dumps(["d", aor, key, reason]))
        message = self._message_head + b",".join(ops) + b"]}"
        nsets = len(keys)
        nkeys = nsets + len(dels) + 1
        # numkeys, the keys (sets, deletions, the write counter), channel, number of sets, the sets
        tail = [_count_arg(nkeys), *keys, *dels, self._seq_arg, self._channel_arg, _count_arg(nsets), *args]
        if self.publish_after_answer:
            return _Packed(batch, len(tail), b"".join(tail), [message])  # sent by _finish after the 200s
        tail.append(bulk(message))
        return _Packed(batch, len(tail), b"".join(tail), [])

    def _send(self, packed: _Packed) -> None:
        conn = self.conn
        if conn is None:
            self._finish(ConnectionError("redis is not connected"), packed.batch)
            return
        data = packed.command()
        due, self._publish_due = self._publish_due, None
        if due is not None and due[0] is conn:
            data = due[1] + data  # the last batch's PUBLISH first, as it would have gone alone
        packed.conn = conn
        self._sending = packed
        try:
            # answered straight from the connection's read, not a loop turn later (a Future would)
            conn.call_packed(self._on_reply, data)
        except Exception as exc:
            self._sending = None
            if not isinstance(exc, ConnectionError):
                log.failure("location redis: sending a batch failed")
            elif due is not None:
                log.warn("location redis: a change is stored but not announced to the other nodes: {err}",
                         err=exc)
            self._finish(exc, packed.batch)

    def _answered(self, reply: Any) -> None:
        """The reply to the batch in flight (its connection's read calls it)."""
        packed = self._sending
        if packed is None:
            return  # one batch in flight, answered once: never
        self._sending = None
        batch = packed.batch
        if type(reply) is int:  # the write counter, the usual reply: checked first
            self._stored(packed, reply)
            return
        if isinstance(reply, ReplyError):
            if packed.by_sha and str(reply).startswith("NOSCRIPT"):
                self._script_on = None  # Redis's script cache was flushed: the same batch, by EVAL
                packed.by_sha = False
                self._send(packed)
                return
            self._finish(reply, batch)
            return
        if isinstance(reply, Exception):
            self._finish(reply, batch)
            return
        self._stored(packed, int(reply))

    def _stored(self, packed: _Packed, seq: int) -> None:
        """Redis has the batch; ``seq`` is this node's write counter after it."""
        self._script_on = packed.conn
        if seq <= self.acked_seq:  # one writer per node: every batch adds one
            self._rollback_seen(seq, self.acked_seq, "a write")
        self.acked_seq = max(self.acked_seq, seq)
        self._finish(None, packed.batch, packed.conn, packed.messages)

    def _finish(self, error: BaseException | None, batch: _WriteBatch, conn: RespConnection | None = None,
                publish: list[bytes] | None = None) -> None:
        n = len(batch.changes)
        if error is None:
            self.commits += 1
            self.rows_written += n
            if self.failed_batches:
                log.info("location redis: writes work again, after {n} failed batches", n=self.failed_batches)
                self.failed_batches = 0
        else:
            self.rows_skipped += n
            # logged when writes start failing, not for every batch (a REGISTER flood against a
            # Redis that refuses our script would log thousands of lines); counted in rows_skipped
            if not self.failed_batches:
                log.warn("location redis: writes fail, REGISTERs get 500: {err}",
                         err=f"{type(error).__name__}: {error}")
            self.failed_batches += 1
        reason = f"redis: {str(error) or type(error).__name__}" if error is not None else ""
        for aor, waiter in batch.waiters:
            if error is not None and aor is not None:
                waiter.errback(NotStored(reason))
            else:
                waiter.callback(None)
        if conn is not None and publish:  # publish_after_answer: the waiters above sent their 200s
            self._publish(conn, publish)
        self.commit.finished()  # the next batch, if changes queued meanwhile: it takes the PUBLISH
        due, self._publish_due = self._publish_due, None
        if due is not None:
            try:
                due[0].write_unanswered(due[1])
            except ConnectionError as exc:  # the connection closed meanwhile: the feed reconnects
                log.warn("location redis: a change is stored but not announced to the other nodes: {err}",
                         err=exc)

    def _publish(self, conn: RespConnection, messages: list[bytes]) -> None:
        """PUBLISH ``messages`` on our channel, after the 200s: nothing is read back (no reply with
        ``CLIENT REPLY SKIP``, no echo on our own channel), so no wake-up."""
        if self.skip_replies:
            head = self._publish_head
            self._publish_due = (conn, b"".join([head + bulk(message) for message in messages]))
            return
        try:
            for message in messages:  # a server that does not honour the SKIP: answered, and read
                conn.call(_ignored, b"PUBLISH", self.channel, message)
        except ConnectionError as exc:
            log.warn("location redis: a change is stored but not announced to the other nodes: {err}",
                     err=exc)
