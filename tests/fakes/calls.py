"""The one fake call and fake location store that the silo, the call layer and ops/ are tested against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock


@dataclass
class FakeState:
    name: str


@dataclass
class FakeCall:
    """What the silo, the RPC and the shutdown read of a Call: it can take branches, describes itself,
    and has a state with a name. ``refuse`` makes it turn branches down; ``send_delay`` advances
    ``clock`` per branch, standing for the time spent building and handing the INVITE over."""

    call_id: str
    aor: str
    state: FakeState = field(default_factory=lambda: FakeState("parked"))
    open: bool = True
    clock: Clock | None = None
    send_delay: float = 0.0
    branches: list[Any] = field(default_factory=list)
    late: list[Any] = field(default_factory=list)
    refuse: bool = False

    @classmethod
    def in_state(cls, call_id: str, state: str) -> FakeCall:
        return cls(call_id, "alice", FakeState(state))

    def can_append(self) -> bool:
        return self.open

    def add_branch(self, binding: Any) -> bool:
        if self.refuse:
            return False
        if self.clock is not None and self.send_delay:
            self.clock.advance(self.send_delay)
        self.branches.append(binding)
        return True

    def describe(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "aor": self.aor, "state": self.state.name, "branches": len(self.branches)}

    def late_binding_after_end(self, binding: Any) -> bool:
        self.late.append(binding)
        return True


class FakeLocation:
    """A location store holding bindings per AOR in a dict; counts its flushes."""

    def __init__(self) -> None:
        self.bindings: dict[str, list[Any]] = {}
        self.flushes = 0

    def lookup(self, aor: str) -> list[Any]:
        return list(self.bindings.get(aor, []))

    def add(self, binding: Any) -> None:
        self.bindings.setdefault(binding.aor, []).append(binding)

    def flush(self) -> Deferred[None]:
        self.flushes += 1
        return succeed(None)
