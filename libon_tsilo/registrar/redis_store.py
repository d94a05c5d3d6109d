"""Redis persistence of bindings: the cluster's source of truth and its change feed.

Every node keeps its LocationStore in memory as a *replica* (lookups stay synchronous and local);
this module writes the node's changes to Redis and applies the other nodes' changes to the replica:

* One key per binding, ``<prefix>b:<len(aor)>:<aor>/<key>`` (the length makes the split
  unambiguous whatever the AOR holds), whose value is the binding's JSON (redis_codec.py: orjson,
  lone surrogates from non-UTF-8 bytes escaped by json; ``Binding.to_compact_dict``: the optional
  fields at their defaults left out, which ``from_dict`` restores, as every version that wrote
  bindings to Redis did) and whose TTL is the binding's own
  remaining time, so Redis forgets a dead binding by itself. Keys are bytes (surrogateescape).
* Changes are written in batches (redis_writes.py, compiled: the per-REGISTER part), one at a
  time (a group commit, libon_tsilo/group_commit.py: a REGISTER's changes once all are in, other
  changes on the loop's next turn; what queues while one batch is in flight goes in the next, so
  changes of one key reach Redis, and every node, in order). A batch is
  one EVALSHA of a small Lua script (atomic like MULTI/EXEC, one reply to parse instead of four),
  sent on the feed's own connection (redis_wire.py: redis-py's per-command work cost more than
  the rest of a REGISTER; over RESP3 the subscribed connection runs commands too; a Redis before
  6 gets a second connection for the writes). It PUBLISHes, on this process's own change channel
  ``<prefix>bindings:<k>`` (see "Change channels" below), one message per batch: the instance
  token, a space, then JSON with the node id and the batch's changes in order (each binding's JSON
  is encoded once, for its key and the message). Each process subscribes to every change channel
  but its own: it never reads its own changes back.
  ``when_committed`` fires when Redis answered the script: a REGISTER's 200 promises the binding
  is in Redis. With ``publish_after_answer`` (ops sets it unless every node reaches a device
  through the node that took its REGISTER, whose relay holds the INVITE, cluster/ordering.py) the
  script only writes, and the message is PUBLISHed on the same connection right after the
  waiters fired, i.e. after the REGISTERs' 200s were sent: a node forking to the device directly
  hears of the binding after its 200 left (the one-node rule: events after the answer). It costs one
  more command per batch, sent with ``CLIENT REPLY SKIP``: Redis answers nothing to it, so this node
  reads nothing more and wakes up twice per REGISTER, as without it (and when the next batch starts
  at once, the PUBLISH goes in the same send as its script call); if this node dies between the
  two, or the connection breaks, the binding is in Redis but the other replicas miss it until their
  next load or the device's next refresh.
* Expiry is not written: Redis drops the key at its TTL and every replica removes the binding on
  its own timer at the same absolute time (``expires_at`` is wall-clock time in the JSON: the nodes'
  clocks must agree, as NTP keeps them, or a binding lives a little longer on one than another).
* A feed task (asyncio, on the reactor's loop) subscribes first (redis_wire.py: each message is one
  callback, parsed by hiredis), then loads every binding with
  SCAN (never KEYS) and hands them to ``LocationStore.resync``, then applies each message of other
  processes (redis_feed.py, compiled: ``apply_remote``/``apply_remote_removal``, the same
  BindingEvents a local REGISTER would emit, so a call parked here forks when the device registers
  on another node). Messages that arrive during the load are read after it and applied in order:
  the replica ends up current.
* Redis down (the feed's connection fails): the state goes "down" (logged once per change of
  state), writes fail fast (``when_committed`` errbacks NotStored: the REGISTER gets 500 with
  Retry-After), lookups keep serving the replica, and the task reconnects with backoff; once back
  it loads everything again and resyncs the replica (what changed meanwhile emits events). A write
  that failed is not retried: Redis stays the truth, and the replica's extra is dropped at resync.
  Unless Redis itself lost its data (restarted without persistence, or failed over to an empty
  replica: its ``<prefix>epoch`` key changed), or came back older than what it acknowledged
  (restarted from its last snapshot, failed over to a replica that lagged: this node's write
  counter ``<prefix>seq:<node_id>``, bumped by every batch, is lower than at our last batch): then
  each node writes back the bindings it owns (``Binding.node`` is its node id) that Redis lacks or
  holds older, and the bindings of nodes that are gone wait for their devices to register again.
  Those write-backs are acknowledged data: they are written in chunks (``write_back_chunk``
  bindings per Lua call and per change message, one chunk at a time) and a chunk that fails is
  retried with backoff on the reactor's clock until Redis has it (or the binding is gone from the
  replica, or the store stops); until the last chunk is in, a reload counts as a loss again.
* A loss the feed does not see (its connection survived: ``DEBUG RELOAD``, ``FLUSHALL``, a proxy
  in front of Redis that kept our connection) shows in the counter too: a batch whose ``INCR``
  answers no more than our last one, or a heartbeat (every second, ``heartbeat``) that reads it
  lower than a batch acknowledged before the beat was sent; either reloads the feed as a loss.

One process per node id: each process claims ``<prefix>node:<node_id>`` with its random instance
token (SET PX ``claim_ttl``, renewed every ``claim_ttl / 3``) before its first load, and deletes it on
a clean stop. A process that finds the claim held by another instance waits for it (an earlier
process of this node, killed: its claim ends ``claim_ttl`` after its last renewal, so a restarted node
joins after at most ``claim_ttl``, at once after a clean stop); one still held after ``claim_ttl``
plus a renewal is a second live process with the same node id (a config error that would mix two
flow tables and make each mark the other's connections dead): this one logs it, stays out of the
cluster (state "duplicate": it loads and writes nothing, REGISTERs get 500), and says so in
``redis_stats`` (ul.dump, ``/metrics``). A single server (node id "") claims no node id.

Change channels: Redis pub/sub has no "not my own messages", and reading its own change back cost a
node a read of Redis per REGISTER (a wake-up of its own when the change is published after the
200). So each process claims one of ``CHANGE_CHANNELS`` channels, ``<prefix>bindings:<k>``, with
``<prefix>channel:<k>`` (SET NX PX ``CHANNEL_TTL``, renewed with the node id's claim in one round
trip; its old one again after a reconnect if it still holds it; deleted on a clean stop), publishes
on it and subscribes to all the others (plain SUBSCRIBE: an ACL user's ``&<prefix>*`` allows them).
A renewal that finds the channel held by another process (Redis lost the claim) reloads the feed
on a new one: the two would not hear each other. What that other process published in the second
before the renewal is in the reload; what this one published then, the other misses (its replica
is short of it until its next load or the device's refresh): a Redis that lost our claim without
our feed noticing, and a process that joined in that second, both at once.

Trust: Redis is inside the operator's network and trusted like the config file; still, a message
or value that does not parse is logged and skipped, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import secrets
from itertools import islice
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from libon_tsilo.registrar.asyncio_bridge import as_deferred, reactor_loop
from libon_tsilo.registrar.binding import Binding
from libon_tsilo.registrar import redis_codec
from libon_tsilo.registrar.redis_feed import ChangeFeed
from libon_tsilo.registrar.redis_wire import OnReply, ReplyError, RespConnection, open_connection
from libon_tsilo.registrar.redis_writes import RedisWrites, binding_redis_key, change_channel

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from libon_tsilo.registrar.location import LocationStore

__all__ = ["RedisBindingStore", "binding_redis_key", "make_redis_client"]

log = Logger()

# a Redis that does not answer within this long is down for a write (a REGISTER waits on it)
COMMAND_TIMEOUT = 2.0
# an idle feed connection is PINGed this often, so a peer that vanished without a FIN is noticed
HEALTH_INTERVAL = 5.0
SCAN_COUNT = 500
# bindings per Lua call and per change message when a node writes its own back after a loss: a
# node with 100k bindings must not send one 50 MB script call and one message every node parses
WRITE_BACK_CHUNK = 500
CLAIM_TTL = 3.0  # seconds a process's claim on its node id outlives its last renewal (module doc)
# processes that can share one Redis: each holds one change channel (module doc); a node subscribes
# to all the others' (one SUBSCRIBE each at connect; a PUBLISH costs Redis one lookup whatever the
# number)
CHANGE_CHANNELS = 128
# a change channel's claim outlives its last renewal (once a second) this long: a process stalled
# for less keeps it (two processes on one channel would not hear each other); one killed holds it
# this long, and a restarted process takes another
CHANNEL_TTL = 30.0


def make_redis_client(
    url: str, username: str = "", password: str = "", sentinels: tuple[str, ...] = (), service_name: str = ""
) -> Redis:
    """A redis-py asyncio client for ``url`` (redis:// or rediss://), or for the master of
    ``service_name`` found through ``sentinels`` ("host:port"); ``username``/``password`` override
    the URL's. It connects lazily and never retries on its own (the feed task reconnects)."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    options: dict[str, Any] = {
        "socket_timeout": COMMAND_TIMEOUT,
        "socket_connect_timeout": COMMAND_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,  # redis_wire.py reads pub/sub messages as RESP2 arrays
    }
    if username:
        options["username"] = username
    if password:
        options["password"] = password
    if not sentinels:
        if username or password:  # redis-py lets the URL's credentials win over keyword ones
            url = _without_credentials(url)
        return Redis.from_url(url, **options)
    from redis.asyncio.sentinel import Sentinel

    parts = urlsplit(url)
    if parts.username and "username" not in options:
        options["username"] = unquote(parts.username)
    if parts.password and "password" not in options:
        options["password"] = unquote(parts.password)
    db = parts.path.strip("/")
    if db:
        options["db"] = int(db)
    if parts.scheme == "rediss":
        options["ssl"] = True
    hosts = [(host, int(port)) for host, _, port in (s.rpartition(":") for s in sentinels)]
    sentinel = Sentinel(hosts, socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=COMMAND_TIMEOUT)
    return sentinel.master_for(service_name, **options)


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=host).geturl()


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _ignored(reply: Any) -> None:
    """A reply nobody needs (a PEXPIRE's): its failure is the connection's, which the feed sees."""


def _glob_escape(raw: bytes) -> bytes:
    out = bytearray()
    for byte in raw:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


class _Reload(Exception):
    """Redis lost acknowledged writes while the feed stayed connected: load again, as a loss."""


class _DuplicateNode(Exception):
    """Another live process holds this node id."""


def _on_writes(name: str, settable: bool = False, doc: str | None = None) -> Any:
    """An attribute of the store that is its writer's (``self.writes``, compiled): the store's
    callers and tests read and set it where it always was."""

    def get(store: RedisBindingStore) -> Any:
        return getattr(store.writes, name)

    def put(store: RedisBindingStore, value: Any) -> None:
        setattr(store.writes, name, value)

    return property(get, put if settable else None, doc=doc)


class RedisBindingStore:
    """The persistence of a LocationStore replica (see the module doc). ``start(replica)`` starts
    the feed on the reactor's asyncio loop; ``loop`` may be injected."""

    feeds_replica = True  # LocationStore.start() hands itself over instead of loading synchronously

    def __init__(
        self,
        client: Redis,
        clock: IReactorTime,
        node_id: str = "",
        key_prefix: str = "libon-tsilo:",
        loop: asyncio.AbstractEventLoop | None = None,
        min_backoff: float = 0.1,
        max_backoff: float = 5.0,
        write_back_chunk: int = WRITE_BACK_CHUNK,
        claim_ttl: float = CLAIM_TTL,
        publish_after_answer: bool = False,
        stop_wait: float = 0.0,
    ) -> None:
        self.client = client
        self.clock = clock
        # how long a stop waits for write-backs still pending ([ops] drain_timeout): acknowledged data
        self.stop_wait = stop_wait
        self._written_back_waiters: list[defer.Deferred[None]] = []
        self.node_id = node_id
        self.prefix = _raw(key_prefix)
        # tells this process's own messages apart even if two nodes were given the same node_id
        self.instance = secrets.token_hex(8)
        self._own = self.instance.encode("ascii") + b" "
        # the batches (redis_writes.py, compiled): it holds the connection while up, the state, the
        # write counter and the write counters of /metrics; the properties below read them there
        self.writes = RedisWrites(clock, self.prefix, node_id, self._own, self._rollback_seen,
                                  publish_after_answer)
        # the calls made per REGISTER go straight to it, not through a method of this class
        self.save = self.writes.save
        self.delete = self.writes.delete
        self.notify_committed = self.writes.notify_committed
        self.when_committed = self.writes.when_committed
        # a REGISTER's changes (LocationStore.hold_writes/release_writes): written once all are in
        self.hold_writes = self.writes.commit.hold
        self.release_writes = self.writes.commit.release
        # the other processes' changes, applied to the replica (redis_feed.py, compiled): the feed's
        # connection hands each message straight to it
        self.feed = ChangeFeed(self._own)
        # each process publishes on a change channel of its own (claimed while it is up, see
        # _claim_channel) and subscribes to every other one: it never reads its own changes back
        self.slot: int | None = None
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._loop = loop
        self._replica: LocationStore | None = None
        self._feed_task: asyncio.Task[None] | None = None
        self._epoch: bytes | None = None  # Redis's epoch key when last connected
        # this node's write counter in Redis (<prefix>seq:<node_id>, bumped by every batch; its
        # value as of our last acknowledged batch is _acked_seq): Redis restarted from an older
        # snapshot, or a replica that lagged, has a lower one, and lacks writes it acknowledged
        # (its epoch key is the same)
        self._seq_key = self.writes.seq_key
        self.loads = 0  # full loads (start and every reconnect)
        self.rows_retried = 0  # written-back bindings sent again after their chunk failed
        # own bindings Redis lost, to write back (module doc): (aor, key) in order, current copy
        # read from the replica when sent; one chunk in flight at a time, retried on self.clock
        self.write_back_chunk = max(1, write_back_chunk)
        self._write_back: dict[tuple[str, str], None] = {}
        self._write_back_busy = False
        self._write_back_timer: IDelayedCall | None = None
        self._write_back_delay = min_backoff
        self._stopping = False
        self.rows_written_back = 0
        self._reload: asyncio.Future[None] | None = None  # set: the feed reloads as after a loss
        self._trouble: Exception | None = None  # why, when it is not a loss (a renewal failed)
        self._renew_timer: asyncio.TimerHandle | None = None  # the claims' renewal, while up
        self._rolled_back = False  # a loss seen without a reconnect (module doc), until the reload
        self._claim_key = self.prefix + b"node:" + _raw(node_id)
        self.claim_ttl = claim_ttl
        self.duplicate_of = ""  # the instance token of the other process holding our node id

    # -- what the batches hold (self.writes) ------------------------------------------------------

    state = _on_writes("state", settable=True, doc='"connecting", "up", "down", "reloading" (writes fail '
                       'fast meanwhile) or "duplicate".')
    _closed = _on_writes("closed", settable=True)
    _writer = _on_writes("conn", settable=True, doc="The connection the batches go over, while up "
                         "(the feed's own, over RESP3).")
    _acked_seq = _on_writes("acked_seq", settable=True)
    publish_after_answer = _on_writes("publish_after_answer", settable=True)
    commits = _on_writes("commits")
    rows_written = _on_writes("rows_written")
    rows_skipped = _on_writes("rows_skipped", doc="Changes refused while Redis was down, lost with a "
                              "failed write, or unreadable at a load.")
    failed_batches = _on_writes("failed_batches")

    @property
    def messages_applied(self) -> int:
        """Changes of other nodes applied to the replica (``self.feed``'s count)."""
        return self.feed.applied

    @property
    def up(self) -> bool:
        return self.writes.state == "up"

    @property
    def channel(self) -> bytes:
        return self.writes.channel

    @channel.setter
    def channel(self, channel: bytes) -> None:
        self.writes.use_channel(channel)

    def flush(self) -> defer.Deferred[None]:
        """Fires once everything queued so far is written or has failed; never errbacks."""
        return self.writes.flush()

    def pending(self) -> int:
        return self.writes.pending()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = reactor_loop()
        return self._loop

    # -- life cycle -----------------------------------------------------------------------------

    def start(self, replica: LocationStore) -> None:
        self._replica = self.feed.replica = replica
        self.writes.commit.soon = self.loop.call_soon  # the loop is known now
        if self._feed_task is None:
            self._feed_task = self.loop.create_task(self._feed())

    def stop(self) -> defer.Deferred[None]:
        """Wait up to ``stop_wait`` for the write-backs still pending, write what is queued, then
        stop the feed and close the connections."""
        if not self._write_back or self.stop_wait <= 0 or self._stopping:
            return self._stop_now()
        log.info("location redis: stopping once {n} bindings are written back (at most {s:g} s)",
                 n=len(self._write_back), s=self.stop_wait)
        timer = self._write_back_timer
        if timer is not None and timer.active() and timer.getTime() - self.clock.seconds() > self.min_backoff:
            timer.reset(self.min_backoff)  # a backoff grown long must not use up the wait
        done = self._when_written_back()
        bound = self.clock.callLater(self.stop_wait, self._all_written_back)  # or not: given up

        def stop_now(_: object) -> defer.Deferred[None]:
            if bound.active():
                bound.cancel()
            return self._stop_now()

        return done.addCallback(stop_now)

    def _when_written_back(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._written_back_waiters.append(d)
        return d

    def _all_written_back(self) -> None:
        waiters, self._written_back_waiters = self._written_back_waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    def _stop_now(self) -> defer.Deferred[None]:
        self._stopping = True  # no write-back is queued or retried from now on
        timer, self._write_back_timer = self._write_back_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if self._write_back:
            log.warn("location redis: stopping with {n} bindings not yet written back",
                     n=len(self._write_back))
        d = self.flush()

        def close(_: object) -> defer.Deferred[None]:
            self._closed = True
            return as_deferred(self._release_then_close(), self.loop)

        d.addCallback(close)
        return d

    async def _release_then_close(self) -> None:
        """A clean stop gives up the node id (this node's next process joins at once) and the
        change channel."""
        writer = self._writer
        claims = [self._claim_key] if self.node_id else []
        if self.slot is not None:
            claims.append(self._slot_key(self.slot))
        if writer is not None:
            for key in claims:
                with contextlib.suppress(Exception):
                    if await writer.command(b"GET", key) == self.instance.encode():
                        await writer.command(b"DEL", key)
        await self._close()

    async def _close(self) -> None:
        task, self._feed_task = self._feed_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await self.client.aclose()

    # -- the feed -------------------------------------------------------------------------------

    async def _feed(self) -> None:
        delay = self.min_backoff
        while not self._closed:
            conns: list[RespConnection] = []
            try:
                feed = await open_connection(self.client, self.loop, COMMAND_TIMEOUT, self.feed.on_message)
                conns.append(feed)
                # the writes share the feed's connection where Redis allows it (RESP3, Redis 6+): a
                # batch's reply and its own change message then come back in one read
                shared = await feed.use_resp3()
                self.feed.backlog = []  # what arrives during the load is applied after it, in order
                if shared:
                    writer = feed
                else:
                    writer = await open_connection(self.client, self.loop, COMMAND_TIMEOUT)
                    conns.append(writer)
                self.writes.skip_replies = await writer.skips_replies()
                await self._claim_node(writer)
                await self._claim_channel(writer)
                others = [change_channel(self.prefix, k) for k in range(CHANGE_CHANNELS) if k != self.slot]
                for done in [feed.command(b"SUBSCRIBE", channel) for channel in others]:
                    await done
                lost = await self._redis_lost_its_data()
                bindings = await self._load_all()
                self._writer = writer
                backlog, self.feed.backlog = self.feed.backlog or [], None
                self._went_up(bindings, lost)
                for data in backlog:
                    self.feed.apply(data)
                delay = self.min_backoff
                await self._watch(feed, writer)
            except asyncio.CancelledError:
                raise
            except _Reload:
                self.state = "reloading"  # writes fail fast until the reload, a few ms
                delay = 0.0
            except _DuplicateNode as exc:
                self.state, self.duplicate_of = "duplicate", str(exc)
                log.error(
                    "location redis: another live process (instance {other}) holds node id {node!r}: two "
                    "processes have the same [cluster] node_id; this one stays out of the cluster "
                    "(REGISTERs get 500) until it is restarted with its own", other=exc, node=self.node_id,
                )
                return
            except Exception as exc:
                self._went_down(exc)
            finally:
                self._writer = None
                self.feed.backlog = None
                for conn in conns:
                    conn.close()
            await asyncio.sleep(delay)
            delay = min(max(delay * 2, self.min_backoff), self.max_backoff)

    async def _watch(self, feed: RespConnection, writer: RespConnection) -> None:
        """Returns never; raises when either connection is gone, or when a renewal of our claims
        failed (_renew). An idle feed is PINGed, so a peer that vanished without a FIN is noticed
        (a PING unanswered in COMMAND_TIMEOUT closes it)."""
        seen = -1
        self._reload = reload = self.loop.create_future()
        self._trouble = None
        if self._rolled_back:
            reload.set_result(None)  # seen during the load itself
        self._renew_in(self._renew_period)
        checked = self.loop.time()
        try:
            while True:
                await asyncio.wait((feed.lost, writer.lost, reload), timeout=HEALTH_INTERVAL,
                                   return_when=asyncio.FIRST_COMPLETED)
                if reload.done():
                    raise self._trouble or _Reload()
                for conn in (feed, writer):
                    if conn.lost.done():
                        raise ConnectionError(conn.lost.result())
                if self.loop.time() - checked >= HEALTH_INTERVAL:
                    checked = self.loop.time()
                    if feed.received == seen:
                        await feed.command(b"PING")
                    seen = feed.received
        finally:
            timer, self._renew_timer = self._renew_timer, None
            if timer is not None:
                timer.cancel()

    # -- the claims' renewal: one timer, one round trip, or none of its own when a beat carries it --

    @property
    def _renew_period(self) -> float:
        return self.claim_ttl / 3 if self.node_id else HEALTH_INTERVAL

    def _renew_in(self, delay: float) -> None:
        if self._renew_timer is not None:
            self._renew_timer.cancel()
        self._renew_timer = self.loop.call_later(delay, self._renew_on_timer)

    def _renew_on_timer(self) -> None:
        self._renew_timer = None
        writer = self._writer
        if writer is not None:
            with contextlib.suppress(ConnectionError):  # the feed sees it
                self._renew(writer)
        self._renew_in(self._renew_period)

    def _renew(self, writer: RespConnection, first: tuple[tuple[OnReply, tuple[Any, ...]], ...] = ()) -> None:
        """Renew our claims, the node id's and the change channel's: four commands (after ``first``,
        a heartbeat's) sent at once, their replies read together. Another process holding the node
        id is a duplicate; one holding our channel (Redis lost our claim) would not hear us nor we
        it: reload on another one."""
        ours = self.instance.encode()

        def node_claim(owner: Any) -> None:
            if owner is None:  # lapsed in between (PEXPIRE missed it): take it again
                self.loop.create_task(self._retake_claim(writer))
            elif owner != ours:  # ours expired (Redis flushed?) and another took it
                self._renewal_failed(owner if isinstance(owner, Exception) else _DuplicateNode(_text(owner)))

        def channel_claim(owner: Any) -> None:
            if isinstance(owner, Exception):
                self._renewal_failed(owner)
            elif owner != ours:
                log.warn("location redis: this node's change channel {k} was lost; reloading", k=self.slot)
                self._renewal_failed(_Reload())

        calls = list(first)
        if self.node_id:
            calls.append((node_claim, (b"GET", self._claim_key)))
            calls.append((_ignored, (b"PEXPIRE", self._claim_key, math.ceil(self.claim_ttl * 1000))))
        if self.slot is not None:
            key = self._slot_key(self.slot)
            calls.append((channel_claim, (b"GET", key)))
            # a PEXPIRE of another's claim only makes it last a little longer
            calls.append((_ignored, (b"PEXPIRE", key, math.ceil(CHANNEL_TTL * 1000))))
        writer.call_all(calls)  # ConnectionError: the feed sees it too

    async def _retake_claim(self, writer: RespConnection) -> None:
        try:
            owner = await self._claim(writer)
        except Exception as exc:
            self._renewal_failed(exc)
            return
        if owner != self.instance.encode():
            self._renewal_failed(_DuplicateNode(_text(owner)))

    def _renewal_failed(self, trouble: Exception) -> None:
        """Make the feed's watch raise ``trouble`` (it reconnects, or stops as a duplicate)."""
        if self._trouble is None:
            self._trouble = trouble
        if self._reload is not None and not self._reload.done():
            self._reload.set_result(None)

    async def _claim(self, writer: RespConnection) -> Any:
        """Take or renew our node id's claim; returns its holder. Plain commands (no script): an
        ACL user without @scripting is refused its batches, logged there, not kept out here."""
        ttl_ms = math.ceil(self.claim_ttl * 1000)
        ours = self.instance.encode()
        owner = await writer.command(b"GET", self._claim_key)
        if owner == ours:  # the renewal, once a second: two commands
            # (if it lapsed in between, PEXPIRE misses and the next renewal takes it again)
            await writer.command(b"PEXPIRE", self._claim_key, ttl_ms)
            return ours
        if owner is not None:
            return owner
        if await writer.command(b"SET", self._claim_key, ours, b"NX", b"PX", ttl_ms) is not None:
            return ours
        return await writer.command(b"GET", self._claim_key)  # another took it between the two

    async def _claim_node(self, writer: RespConnection) -> None:
        """Hold ``<prefix>node:<node_id>`` before loading (module doc); raises _DuplicateNode."""
        if not self.node_id:
            return
        ours = self.instance.encode()
        waited = 0.0
        while True:
            owner = await self._claim(writer)
            if owner == ours:
                return
            if waited > self.claim_ttl:  # renewed past its TTL: a live process, not a dead one's leftover
                raise _DuplicateNode(_text(owner))
            if not waited:
                log.info("location redis: node id {node!r} is held by instance {other} (an earlier process "
                         "of this node, killed less than {ttl} s ago?): waiting for it",
                         node=self.node_id, other=_text(owner), ttl=self.claim_ttl)
            step = self.claim_ttl / 3
            await asyncio.sleep(step)
            waited += step

    def _slot_key(self, slot: int) -> bytes:
        return self.prefix + b"channel:%d" % slot

    async def _claim_channel(self, writer: RespConnection) -> None:
        """Hold one of the CHANGE_CHANNELS for this process: the one it had if it still has it,
        else the first free one from a random start. Raises ConnectionError when all are taken."""
        ours = self.instance.encode()
        ttl_ms = math.ceil(CHANNEL_TTL * 1000)
        if await self._still_our_channel(writer):  # a reconnect: the channel we had, if still ours
            return
        start = secrets.randbelow(CHANGE_CHANNELS)
        for i in range(CHANGE_CHANNELS):
            slot = (start + i) % CHANGE_CHANNELS
            if await writer.command(b"SET", self._slot_key(slot), ours, b"NX", b"PX", ttl_ms) is not None:
                self.slot, self.channel = slot, change_channel(self.prefix, slot)
                return
        raise ConnectionError(f"all {CHANGE_CHANNELS} change channels are held by other processes")

    async def _still_our_channel(self, writer: RespConnection) -> bool:
        key = self._slot_key(self.slot) if self.slot is not None else None
        if key is None or await writer.command(b"GET", key) != self.instance.encode():
            return False
        await writer.command(b"PEXPIRE", key, math.ceil(CHANNEL_TTL * 1000))
        return True

    async def _redis_lost_its_data(self) -> bool:
        """True when Redis is not the one this node last saw (restarted empty, or failed over to a
        replica that had no copy): an epoch key, set once by whichever node comes first."""
        key = self.prefix + b"epoch"
        acked = self._acked_seq  # before asking: a batch acknowledged later may count after our GET
        await self.client.set(key, secrets.token_hex(8), nx=True)
        epoch: Any = await self.client.get(key)
        lost = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        seq = int(await self.client.get(self._seq_key) or 0)
        if seq < acked or self._rolled_back:
            self._rolled_back = False
            log.warn("location redis: it came back without writes it acknowledged (write counter {seq} "
                     "< {acked}: an older snapshot or a lagging replica)", seq=seq, acked=acked)
            self._acked_seq = seq
            return True
        return lost

    async def _load_all(self) -> list[Binding]:
        out: list[Binding] = []
        keys: list[bytes] = []
        match = _glob_escape(self.prefix) + b"b:*"
        async for key in self.client.scan_iter(match=match, count=SCAN_COUNT):
            keys.append(key)
            if len(keys) >= SCAN_COUNT:
                out += self._parse_values(keys, await self.client.mget(keys))
                keys = []
        if keys:
            out += self._parse_values(keys, await self.client.mget(keys))
        return out

    def _parse_values(self, keys: list[bytes], values: list[Any]) -> list[Binding]:
        out = []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue  # expired between SCAN and MGET
            try:
                out.append(Binding.from_dict(redis_codec.loads(value)))
            except (ValueError, TypeError, KeyError) as exc:
                self.writes.rows_skipped += 1
                log.warn("location redis: skipping unreadable binding {key}: {err}",
                         key=key.decode("utf-8", "backslashreplace"), err=exc)
        return out

    def _went_up(self, bindings: list[Binding], lost: bool) -> None:
        announce = self.loads > 0  # a reconnect: what changed meanwhile matters to parked calls
        self.loads += 1
        previous, self.state = self.state, "up"
        log.info("location redis: {how}, {n} bindings loaded{lost}",
                 how="reconnected" if previous == "down" else "connected", n=len(bindings),
                 lost="; it had lost its data: writing back this node's bindings" if lost else "")
        if self._replica is None:
            return
        try:
            # a write-back not yet in is a loss not yet repaired: what Redis lacks of ours stays
            kept = self._replica.resync(bindings, announce=announce, keep_own=lost or bool(self._write_back))
        except Exception:
            log.failure("location redis: resync of the replica failed")
            return
        for binding in kept:
            self._write_back[(binding.aor, binding.key)] = None
        self._write_back_delay = self.min_backoff
        self._pump_write_back()

    # -- write-backs: acknowledged bindings Redis lost, until it has them again ------------------

    def write_back_pending(self) -> int:
        """Bindings of ours that Redis lost and does not have again yet."""
        return len(self._write_back)

    def _pump_write_back(self) -> None:
        """Queue the next chunk of write-backs, unless one is in flight or Redis is not up."""
        replica = self._replica
        if self._write_back_busy or self._stopping or not self.up or replica is None:
            return
        chunk: list[tuple[str, str]] = []
        while self._write_back and not chunk:
            for ident in list(islice(self._write_back, self.write_back_chunk)):
                binding = replica.get(*ident)
                if binding is None or binding.node != self.node_id:
                    del self._write_back[ident]  # gone since (removed, expired, taken by another node)
                    continue
                chunk.append(ident)
                self.save(binding)  # the replica's current copy, serialized when the batch starts
        if not chunk:
            self._all_written_back()  # the last ones were gone from the replica
            return
        d = self.when_committed("")  # an aor: errbacks when the batch fails
        if d is None:
            return
        self._write_back_busy = True
        d.addCallbacks(self._written_back, self._write_back_failed,
                       callbackArgs=(chunk,), errbackArgs=(chunk,))

    def _written_back(self, _: object, chunk: list[tuple[str, str]]) -> None:
        self._write_back_busy = False
        for ident in chunk:
            self._write_back.pop(ident, None)
        self.rows_written_back += len(chunk)
        self._write_back_delay = self.min_backoff
        if not self._write_back:
            log.info("location redis: this node's bindings are written back ({n} in all)",
                     n=self.rows_written_back)
            self._all_written_back()
        self._pump_write_back()

    def _write_back_failed(self, failure: Failure, chunk: list[tuple[str, str]]) -> None:
        self._write_back_busy = False
        self.rows_retried += len(chunk)
        delay = self._write_back_delay
        self._write_back_delay = min(delay * 2, self.max_backoff)
        log.warn("location redis: writing back {n} bindings failed ({err}); again in {delay:.1f} s",
                 n=len(self._write_back), err=failure.getErrorMessage(), delay=delay)
        if not self._stopping:
            self._write_back_timer = self.clock.callLater(delay, self._retry_write_back)

    def _retry_write_back(self) -> None:
        self._write_back_timer = None
        self._pump_write_back()  # Redis down: the reconnect's resync pumps again

    def _rollback_seen(self, seq: int, acked: int, how: str) -> None:
        """Redis answers with a write counter below what it acknowledged, the feed still connected."""
        if self._rolled_back:
            return
        log.warn("location redis: it lost writes it acknowledged ({how}: write counter {seq} <= {acked}); "
                 "reloading, this node writes its bindings back", how=how, seq=seq, acked=acked)
        self._rolled_back = True
        if self._reload is not None and not self._reload.done():
            self._reload.set_result(None)

    def _went_down(self, exc: Exception) -> None:
        if self.state != "down":
            log.warn(
                "location redis: unreachable ({err}); REGISTERs get 500 until it is back, lookups use "
                "this node's copy; reconnecting", err=f"{type(exc).__name__}: {exc}",
            )
        self.state = "down"

    # -- node liveness (cluster/liveness.py) ------------------------------------------------------

    _beat_script: Any = None  # _HEARTBEAT, registered on first use

    def heartbeat(self, member: str, ttl: float) -> defer.Deferred[set[str]]:
        """Say that ``member`` (a node's internal address) is alive for ``ttl`` seconds more, and
        get every member alive now. One script on a sorted set scored by expiry in Redis's own
        time: the nodes' clocks play no part, and a dead node drops out ``ttl`` after its last beat.

        While the feed is up the beat goes on its connection with the claims' renewal (one round
        trip for both, and the renewal's own timer is put off: it fires only if the beats stop);
        before that (start, Redis down) through redis-py, as a lone script."""
        writer = self._writer
        if writer is None or self.duplicate_of or not self.up:
            return as_deferred(self._heartbeat(member, ttl), self.loop)
        d: defer.Deferred[set[str]] = defer.Deferred()
        acked = self._acked_seq  # before asking: a batch acknowledged later may count after our read
        keys = (self.prefix + b"nodes", self._seq_key)
        args = (member, math.ceil(ttl * 1000))

        def beaten(reply: Any, evalsha: bool = True) -> None:
            if evalsha and isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                try:  # Redis's script cache was flushed: the script itself, once
                    writer.call(lambda r: beaten(r, False), b"EVAL", _HEARTBEAT, 2, *keys, *args)
                except ConnectionError as exc:
                    d.errback(exc)
                return
            if isinstance(reply, ConnectionError):
                # the feed's connection closed under the beat (a reload, e.g. a renewal that found
                # a claim gone): the beat once more, on redis-py's own connection
                as_deferred(self._heartbeat(member, ttl), self.loop).chainDeferred(d)
                return
            if isinstance(reply, Exception):
                d.errback(reply)
                return
            try:
                alive = self._beat_answered(reply, acked)
            except Exception as exc:
                d.errback(exc)
                return
            d.callback(alive)

        try:
            # the beat first: a renewal that finds a claim lost makes the feed reconnect, after the
            # beat's answer is read
            self._renew(writer, ((beaten, (b"EVALSHA", _HEARTBEAT_SHA, 2, *keys, *args)),))
        except ConnectionError as exc:
            return defer.fail(exc)
        if self._renew_timer is not None:  # the beats renew: the timer waits in case they stop
            self._renew_in(self._renew_period * 1.5)
        return d

    def leave(self, member: str) -> defer.Deferred[None]:
        """A clean stop: the peers see ``member`` gone at their next beat, not ``ttl`` later."""
        async def leave() -> None:
            await self.client.zrem(self.prefix + b"nodes", member)

        return as_deferred(leave(), self.loop)

    async def _heartbeat(self, member: str, ttl: float) -> set[str]:
        if self.duplicate_of:  # out of the cluster (module doc): the peers must not count on us
            raise ConnectionError("another process holds this node id")
        if self._beat_script is None:
            self._beat_script = self.client.register_script(_HEARTBEAT)
        acked = self._acked_seq  # before asking: a batch acknowledged later may count after our read
        reply = await self._beat_script(keys=[self.prefix + b"nodes", self._seq_key],
                                        args=[member, math.ceil(ttl * 1000)])
        return self._beat_answered(reply, acked)

    def _beat_answered(self, reply: Any, acked: int) -> set[str]:
        seq, alive = reply
        if int(seq or 0) < acked and self.up:
            self._rollback_seen(int(seq or 0), acked, "a heartbeat")
        return {m.decode("utf-8", "replace") if isinstance(m, bytes) else str(m) for m in alive}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# KEYS[1] = the live nodes, scored by when each expires (ms, Redis's clock), KEYS[2] = this node's
# write counter (a Redis that lost our writes shows it lower); ARGV = member, ttl ms
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ttl)
return {redis.call('GET', KEYS[2]) or 0, redis.call('ZRANGE', KEYS[1], 0, -1)}
"""
_HEARTBEAT_SHA = hashlib.sha1(_HEARTBEAT.encode()).hexdigest()
