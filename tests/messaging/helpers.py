"""Fakes for the messaging tests: a sender that records and is answered by the test, a notifier."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from libon_tsilo.messaging.store import StoredMessage
from libon_tsilo.registrar.binding import Binding
from libon_tsilo.sip.message import Response

AOR = "sip:bob@example.com"


class FakeSender:
    """Records each MESSAGE sent; the test answers it with ``answer(i, status)``."""

    def __init__(self) -> None:
        self.sent: list[tuple[Binding, StoredMessage, defer.Deferred[Response]]] = []
        self.live_flows: set[str] = set()

    def send(self, binding: Binding, msg: StoredMessage) -> defer.Deferred[Response]:
        d: defer.Deferred[Response] = defer.Deferred()
        self.sent.append((binding, msg, d))
        return d

    def flow_live(self, flow_id: str | None) -> bool:
        return flow_id in self.live_flows

    def answer(self, i: int, status: int = 200) -> None:
        self.sent[i][2].callback(Response(status))

    def bodies(self, contact: str | None = None) -> list[bytes]:
        return [m.body for b, m, _ in self.sent if contact is None or b.contact_uri == contact]


class FakeNotifier:
    def __init__(self) -> None:
        self.pushes: list[tuple[Binding, StoredMessage, str | None]] = []

    def notify_message(self, binding: Binding, msg: StoredMessage, preview: str | None) -> defer.Deferred[Any]:
        self.pushes.append((binding, msg, preview))
        return defer.succeed(None)


def phone(uri: str = "sip:bob@192.0.2.20:5060", registered_at: float = 0.0, push: bool = False,
          aor: str = AOR, **kw: Any) -> Binding:
    """A binding of bob's; ``push``: with an RFC 8599 token (a phone that sleeps)."""
    if push:
        kw.setdefault("pn_provider", "webhook")
        kw.setdefault("pn_prid", "tok-" + uri.rsplit("@", 1)[-1])
    kw.setdefault("expires_at", 1e9)
    return Binding(aor=aor, contact_uri=uri, contact=f"<{uri}>", registered_at=registered_at,
                   call_id="reg", cseq=1, **kw)
