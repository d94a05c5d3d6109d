"""The observer protocol for binding events (the location store publishes, the other layers listen).

A module of its own, left interpreted: setup.py compiles binding.py with mypyc, and a Protocol in a
compiled module becomes a compiled trait, which the observers (interpreted classes in silo/, push/,
messaging/, ops/) could no longer subclass. ``registrar.binding`` re-exports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from libon_tsilo.registrar.binding import Binding
    from libon_tsilo.sip.flow import Flow

__all__ = ["LocationObserver"]


class LocationObserver(Protocol):
    """Receives binding events from the LocationStore: the silo (late fork), the push waker, and
    ops' flow release. Each implements all three methods, explicitly."""

    def binding_added(self, binding: Binding, flow: Flow | None) -> None:
        """A new registration; ``flow`` is the connection its REGISTER came over (None: restored)."""

    def binding_refreshed(self, binding: Binding, flow: Flow | None) -> None:
        """A re-REGISTER of a known binding (same key, or one it replaces)."""

    def binding_removed(self, binding: Binding, reason: str) -> None:
        """Gone: "expired", "unregistered", "replaced", "max_contacts", a push error..."""
