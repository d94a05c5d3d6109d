"""The outbox on Redis, with ``[location] backend = "redis"`` (a cluster), with group commit.

Keys, under ``[location] key_prefix``: ``msg:<id>`` the message's JSON, ``msgd:<id>`` the set of
devices that got it, both expiring with the message (PXAT: Redis forgets an expired message by
itself), and ``msgs:<node>`` the ids this node accepted (its index, read at start; ids whose message
expired are dropped from it then). A batch is one MULTI/EXEC, so a sender's 202 means its message
is in Redis.

A message is delivered by the node that accepted it: every node hears of every binding change
through the location store's Redis feed, so that node learns when the recipient's device registers,
wherever it does. A node that restarts under the same ``[cluster] node_id`` takes its messages back;
the messages of a node that never comes back wait for it until their ttl. ``max_per_user`` is
counted per node.

The client is redis-py's blocking one, used only in the store's worker thread (and at start, before
traffic, to load): the message store does not need the asyncio reactor the bindings' feed needs.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from libon_tsilo.messaging.batch_writer import BatchWriter, Op, RunInThread
from libon_tsilo.messaging.store import StoredMessage

__all__ = ["RedisMessageStore", "make_blocking_client"]

log = Logger()

COMMAND_TIMEOUT = 2.0  # a sender's 202 waits on the commit: a Redis that hangs is a 500, not a hang
LOAD_CHUNK = 500


def make_blocking_client(
    url: str, username: str = "", password: str = "", sentinels: tuple[str, ...] = (), service_name: str = ""
) -> Any:
    """A redis-py blocking client for ``url``, or for the master of ``service_name`` through
    ``sentinels`` ("host:port"), as [location] configures the bindings' client."""
    import redis
    from redis.sentinel import Sentinel

    options: dict[str, Any] = {"socket_timeout": COMMAND_TIMEOUT, "socket_connect_timeout": COMMAND_TIMEOUT}
    if username:
        options["username"] = username
    if password:
        options["password"] = password
    if not sentinels:
        return redis.Redis.from_url(url, **options)
    parts = urlsplit(url)
    if parts.username and "username" not in options:
        options["username"] = unquote(parts.username)
    if parts.password and "password" not in options:
        options["password"] = unquote(parts.password)
    if parts.path.strip("/"):
        options["db"] = int(parts.path.strip("/"))
    if parts.scheme == "rediss":
        options["ssl"] = True
    hosts = [(host, int(port)) for host, _, port in (s.rpartition(":") for s in sentinels)]
    sentinel = Sentinel(hosts, socket_timeout=COMMAND_TIMEOUT, socket_connect_timeout=COMMAND_TIMEOUT)
    return sentinel.master_for(service_name, **options)


class RedisMessageStore(BatchWriter):
    name = "messages-redis"

    def __init__(
        self, client: Any, clock: IReactorTime, node_id: str = "", key_prefix: str = "libon-tsilo:",
        flush_interval: float = 0.002, reactor: Any = None, run_in_thread: RunInThread | None = None,
    ) -> None:
        super().__init__(clock, flush_interval, reactor, run_in_thread)
        self.client = client
        self.prefix = key_prefix
        self.index = f"{key_prefix}msgs:{node_id or '-'}"

    def _msg(self, msg_id: str) -> str:
        return f"{self.prefix}msg:{msg_id}"

    def _marks(self, msg_id: str) -> str:
        return f"{self.prefix}msgd:{msg_id}"

    def load(self, now: float) -> list[StoredMessage]:
        """This node's messages (blocking: at start, before traffic). A Redis that cannot be read
        stops the start-up: serving without them would lose them for good at their ttl."""
        self._start_pool()
        client = self.client
        ids = sorted(m.decode() if isinstance(m, bytes) else m for m in client.smembers(self.index))
        out: list[StoredMessage] = []
        gone: list[str] = []
        for start in range(0, len(ids), LOAD_CHUNK):
            chunk = ids[start:start + LOAD_CHUNK]
            pipe = client.pipeline(transaction=False)
            for msg_id in chunk:
                pipe.get(self._msg(msg_id))
                pipe.smembers(self._marks(msg_id))
            replies = pipe.execute()
            for i, msg_id in enumerate(chunk):
                data, marks = replies[2 * i], replies[2 * i + 1]
                if data is None:
                    gone.append(msg_id)  # expired in Redis
                    continue
                try:
                    msg = StoredMessage.from_dict(json.loads(data), {_text(m) for m in marks})
                except (ValueError, TypeError, KeyError) as exc:
                    log.warn("messages redis: dropping unreadable message {id}: {err}", id=msg_id, err=exc)
                    client.delete(self._msg(msg_id), self._marks(msg_id))
                    gone.append(msg_id)
                    continue
                if msg.expires_at <= now:
                    gone.append(msg_id)
                    continue
                out.append(msg)
        if gone:
            client.srem(self.index, *gone)
        return out

    def _write_sync(self, ops: list[Op]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for op in ops:
            kind, msg_id = op[0], op[1]
            if kind == "add":
                pipe.set(self._msg(msg_id), op[3], pxat=_ms(op[2]))
                pipe.sadd(self.index, msg_id)
            elif kind == "mark":
                pipe.sadd(self._marks(msg_id), op[2])
                pipe.pexpireat(self._marks(msg_id), _ms(op[3]))
            else:
                pipe.delete(self._msg(msg_id), self._marks(msg_id))
                pipe.srem(self.index, msg_id)
        pipe.execute()

    def _close(self) -> None:
        try:
            self.client.close()
        except Exception:
            log.failure("messages redis: closing the client failed")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)
