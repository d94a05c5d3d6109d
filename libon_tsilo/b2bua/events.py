"""Typed call-control events (after Sippy's CCEvent*): what the legs and timers tell a call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "Event", "Provisional", "Answered", "Failed", "CallerCancel", "RingTimeout", "BindingAppeared",
    "WakeDone",
]


class Event:
    """Base class: a state handles an event with its `on_<ClassName>` method, else ignores it."""


@dataclass
class Provisional(Event):
    branch: Any
    response: Any
    reliable: bool = False  # the device sent it reliably (RFC 3262)


@dataclass
class Answered(Event):
    branch: Any
    response: Any


@dataclass
class Failed(Event):
    branch: Any
    response: Any


@dataclass
class CallerCancel(Event):
    reason: str | None = None  # the CANCEL's Reason header, passed on to the B-legs


@dataclass
class RingTimeout(Event):
    pass


@dataclass
class BindingAppeared(Event):
    binding: Any


@dataclass
class WakeDone(Event):
    result: Any
