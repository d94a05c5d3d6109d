"""Fakes shared by the registrar tests: flows, server transactions, observers, sync thread runner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer

from libon_tsilo.registrar.binding import Binding


@dataclass(frozen=True)
class FakeFlowKey:
    transport: str = "udp"
    local: tuple[str, int] = ("127.0.0.1", 5060)
    remote: tuple[str, int] = ("192.0.2.10", 40000)


@dataclass
class FakeFlow:
    id: str = "udp:192.0.2.10:40000#1"
    key: FakeFlowKey = field(default_factory=FakeFlowKey)
    live: bool = True


class FakeStx:
    """Records what the registrar answers (the real ServerTransaction has .respond(resp))."""

    def __init__(self) -> None:
        self.responses: list[Any] = []

    def respond(self, resp: Any) -> None:
        self.responses.append(resp)

    @property
    def last(self) -> Any:
        assert self.responses, "no response sent"
        return self.responses[-1]


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple[str, Binding, Any]] = []

    def binding_added(self, binding: Binding, flow: Any) -> None:
        self.events.append(("added", binding, flow))

    def binding_refreshed(self, binding: Binding, flow: Any) -> None:
        self.events.append(("refreshed", binding, flow))

    def binding_removed(self, binding: Binding, reason: str) -> None:
        self.events.append(("removed", binding, reason))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


class BrokenObserver:
    def binding_added(self, binding: Binding, flow: Any) -> None:
        raise RuntimeError("observer bug")

    binding_refreshed = binding_added

    def binding_removed(self, binding: Binding, reason: str) -> None:
        raise RuntimeError("observer bug")


def run_sync(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """A run_in_thread that runs the batch inline: deterministic persistence tests."""
    return defer.maybeDeferred(f, *args)


def make_binding(
    aor: str = "sip:alice@example.com", uri: str = "sip:alice@192.0.2.10:5060", **kw: Any
) -> Binding:
    base: dict[str, Any] = dict(
        aor=aor,
        contact_uri=uri,
        contact=f"<{uri}>",
        expires_at=3600.0,
        registered_at=0.0,
        call_id="call-1",
        cseq=1,
    )
    base.update(kw)
    return Binding(**base)
