"""Digest replay state: the highest nonce-count accepted per nonce, behind a small interface.

Nonces are stateless (sip/digest.py), so replay protection is the only state digest needs. Every
nonce carries the ``epoch`` of the table that will see its counts; a nonce of another epoch is
answered ``stale=true`` because no table here knows which counts it already accepted. The
in-memory table below gets a random epoch per process: a restart makes every earlier nonce stale,
and an Authorization captured on one node is stale on another node sharing ``[auth] secret``. A
shared table (e.g. Redis, for a cluster) keeps one epoch for as long as its state lives, so that
every node accepts every node's nonces and a replay is refused everywhere.
"""

from __future__ import annotations

import secrets
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["MemoryNonceCounts", "NonceCounts"]


class NonceCounts(Protocol):
    epoch: str  # a short token (letters, digits, "-", "_"); digest.make_nonce embeds it

    def advance(self, nonce: str, nc: int, until: float) -> bool:
        """Record ``nc`` for ``nonce`` if it is higher than any count accepted before (True);
        False means a replay. The entry may be forgotten after clock time ``until`` (the nonce
        is stale by then)."""
        ...

    def __len__(self) -> int: ...

    def stop(self) -> None: ...


class MemoryNonceCounts:
    """One process's table: a dict swept by one timer every ``sweep_interval`` seconds while
    it holds entries. Entries are only added after a valid response, so it grows with real
    logins, not with an attacker's guesses."""

    def __init__(self, clock: IReactorTime, sweep_interval: float, epoch: str | None = None) -> None:
        self.clock = clock
        self.sweep_interval = sweep_interval
        self.epoch = epoch if epoch is not None else secrets.token_hex(4)
        self._nc: dict[str, tuple[int, float]] = {}  # nonce -> (highest nc, drop after)
        self._sweeper: IDelayedCall | None = None

    def advance(self, nonce: str, nc: int, until: float) -> bool:
        last = self._nc.get(nonce)
        if last is not None and nc <= last[0]:
            return False
        self._nc[nonce] = (nc, until)
        if self._sweeper is None or not self._sweeper.active():
            self._sweeper = self.clock.callLater(self.sweep_interval, self._sweep)
        return True

    def __len__(self) -> int:
        return len(self._nc)

    def stop(self) -> None:
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        self._nc.clear()

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.clock.seconds()
        for nonce in [n for n, (_, until) in self._nc.items() if until < now]:
            del self._nc[nonce]
        if self._nc:
            self._sweeper = self.clock.callLater(self.sweep_interval, self._sweep)
