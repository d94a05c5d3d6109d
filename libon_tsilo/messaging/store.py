"""The stored message and the seam its persistence sits behind.

The outbox (outbox.py) keeps every waiting message in memory and answers every question from
there; a ``MessageStore`` is the copy that survives a restart. ``add`` is the one write a sender
waits for (its 202 goes only once the message is durable); the delivery marks and deletions are
written behind, in the next commit: losing one to a crash means a device may get a message twice,
never that a message is lost.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer

__all__ = ["StoredMessage", "MessageStore", "MemoryMessageStore", "NotStored"]


class NotStored(Exception):
    """A message could not be made durable (the reason is the message)."""


@dataclass
class StoredMessage:
    """One MESSAGE accepted for a local user, as delivered later to each of the user's devices."""

    id: str  # ours, unique: the database key, and what the push payload names
    aor: str  # the recipient's location key (registrar.aor_key)
    to_uri: str  # the Request-URI it was sent to (the To of what we deliver)
    sender: str  # the verified identity: the From URI of what we deliver
    sender_name: str | None
    content_type: str
    body: bytes
    date: str  # the sender's Date header, else the time we accepted it (RFC 1123)
    created_at: float
    expires_at: float
    seq: int = 0  # acceptance order: delivery order per device
    delivered: set[str] = field(default_factory=set)  # device keys that answered 2xx
    call_id: str | None = None  # the sender's Call-ID, for the log lines of this message

    def to_dict(self) -> dict[str, Any]:
        """The row's JSON (without ``delivered``, which the stores keep apart)."""
        return {
            "id": self.id, "aor": self.aor, "to_uri": self.to_uri, "sender": self.sender,
            "sender_name": self.sender_name, "content_type": self.content_type,
            "body": base64.b64encode(self.body).decode("ascii"), "date": self.date,
            "created_at": self.created_at, "expires_at": self.expires_at, "seq": self.seq,
            "call_id": self.call_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], delivered: set[str] | None = None) -> StoredMessage:
        return cls(
            id=str(data["id"]), aor=str(data["aor"]), to_uri=str(data["to_uri"]), sender=str(data["sender"]),
            sender_name=data.get("sender_name"), content_type=str(data["content_type"]),
            body=base64.b64decode(data["body"]), date=str(data["date"]),
            created_at=float(data["created_at"]), expires_at=float(data["expires_at"]), seq=int(data["seq"]),
            delivered=set(delivered or ()), call_id=data.get("call_id"),
        )


class MessageStore(Protocol):
    """Persistence of the outbox (SQLite by default; Redis with a Redis location backend)."""

    def load(self, now: float) -> list[StoredMessage]:
        """Every stored message alive at ``now`` with its delivered devices; expired ones are
        deleted. Called once at start, before traffic."""

    def add(self, msg: StoredMessage) -> defer.Deferred[None]:
        """Fires once ``msg`` is durable; fails with NotStored when it could not be made so."""

    def delivered(self, msg: StoredMessage, device: str) -> None:
        """Record that ``device`` got the message (written behind)."""

    def delete(self, msg: StoredMessage) -> None:
        """Forget the message and its delivery marks (written behind)."""

    def flush(self) -> defer.Deferred[None]:
        """Fires once everything queued so far is written. Never errbacks."""

    def stop(self) -> defer.Deferred[None]:
        """Final flush, then release the file or connection."""


class MemoryMessageStore:
    """For unit tests: a dict; hand the same instance to a new outbox to play a restart."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.marks: dict[str, set[str]] = {}
        self.fail_next_add: str | None = None  # the reason of the next add's NotStored (tests)

    def load(self, now: float) -> list[StoredMessage]:
        for msg_id in [i for i, row in self.rows.items() if row["expires_at"] <= now]:
            self.rows.pop(msg_id, None)
            self.marks.pop(msg_id, None)
        return [StoredMessage.from_dict(row, self.marks.get(i)) for i, row in self.rows.items()]

    def add(self, msg: StoredMessage) -> defer.Deferred[None]:
        if self.fail_next_add is not None:
            reason, self.fail_next_add = self.fail_next_add, None
            return defer.fail(NotStored(reason))
        self.rows[msg.id] = msg.to_dict()
        return defer.succeed(None)

    def delivered(self, msg: StoredMessage, device: str) -> None:
        if msg.id in self.rows:
            self.marks.setdefault(msg.id, set()).add(device)

    def delete(self, msg: StoredMessage) -> None:
        self.rows.pop(msg.id, None)
        self.marks.pop(msg.id, None)

    def flush(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)
