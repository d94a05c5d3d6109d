"""Which binding a branch goes to: one branch per device instance (RFC 5626 §5.3, §7).

A device that registers two flows (two reg-ids of one ``+sip.instance``, e.g. over two edge
connections) is one callee: it is rung once, over its most recently refreshed flow that is still
up; its other flows are where that same branch goes next when the flow fails. A binding without an
instance is its own target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from libon_tsilo.registrar.binding import Binding

__all__ = ["target_key", "best_flow", "is_outbound"]


def target_key(binding: Binding) -> str:
    """The identity of the callee a binding reaches: its instance, else its own binding key."""
    instance = binding.instance
    return f"instance:{instance}" if instance else binding.key


def is_outbound(binding: Binding) -> bool:
    """Registered with RFC 5626 outbound (an instance and a reg-id): reachable over its flow only."""
    return bool(binding.instance) and binding.reg_id is not None


def best_flow(
    bindings: Iterable[Binding], instance: str, live: Callable[[Binding], bool], exclude: Iterable[str] = ()
) -> Binding | None:
    """The most recently registered binding of ``instance`` whose flow is live, skipping the binding
    keys in ``exclude`` (flows that failed already); None when the instance has no flow left."""
    skip = set(exclude)
    best = None
    for b in bindings:
        if b.instance != instance or b.key in skip or not live(b):
            continue
        if best is None or b.registered_at > best.registered_at:
            best = b
    return best
