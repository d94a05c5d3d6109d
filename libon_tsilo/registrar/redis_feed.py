"""The other nodes' changes applied to this node's replica: the Redis store's per-message feed path.

Each pub/sub message the feed's connection reads (redis_wire.py) comes to ``ChangeFeed.on_message``:
held in ``backlog`` while the feed loads (redis_store.py applies them after the load, in order),
else decoded (redis_codec.py) and applied to the replica (``LocationStore.apply_remote`` and
``apply_remote_removal``: the same events a local REGISTER emits). A message of this process
(its instance token first) is skipped. The message format is redis_writes.py's.

Compiled by mypyc (setup.py): interpreted, the store's two methods that did this were two Python
frames, with their attribute and global look-ups, for every change of another node
(bench/redis_cost.py --stages apply-redis). Trust: Redis is trusted like the config file, still a
message that does not parse is logged and skipped, never fatal.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from libon_tsilo.registrar import redis_codec
from libon_tsilo.registrar.binding import Binding
from libon_tsilo.registrar.location import LocationStore

__all__ = ["ChangeFeed"]

log = Logger(namespace=__name__)  # compiled (mypyc): Logger() would name the importer


class ChangeFeed:
    """Applies the change messages of other processes to ``replica`` (None: not started, dropped).
    ``own`` is this process's token and a space, the start of each message it publishes;
    ``applied`` counts the changes applied (``/metrics``)."""

    def __init__(self, own: bytes) -> None:
        self.own = own
        self.replica: LocationStore | None = None
        self.backlog: list[bytes] | None = None  # set while the feed loads: messages held, in order
        self.applied = 0

    def on_message(self, data: bytes) -> None:
        """A message read from the feed's connection."""
        backlog = self.backlog
        if backlog is not None:
            backlog.append(data)
        else:
            self.apply(data)

    def apply(self, data: bytes) -> None:
        """Apply one change message now."""
        replica = self.replica
        try:
            if replica is None or data.startswith(self.own):
                return
            # typed: compiled, a dict's and a list's own look-ups, not the generic ones (and a
            # message of another shape raises TypeError here, skipped as unreadable below)
            msg: dict[str, Any] = redis_codec.loads(data.partition(b" ")[2])
            ops: list[list[Any]] = msg["ops"]
            for op in ops:
                if op[0] == "s":
                    replica.apply_remote(Binding.from_dict(op[1]))
                else:
                    replica.apply_remote_removal(op[1], op[2], op[3])
                self.applied += 1
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:  # not the format
            log.warn("location redis: skipping an unreadable change message: {err}", err=exc)
        except Exception:
            log.failure("location redis: applying a change of another node failed")
