"""Twisted's epoll reactor, minus the per-event wrapping for the server's own UDP listeners (issue 15).

For every descriptor event, Twisted's ``EPollReactor.doPoll`` calls ``log.callWithLogger`` (the
selectable's ``logPrefix()`` pushed as the legacy log context, "system", around the call), which
calls ``_doReadOrWrite`` (a ``fileno()`` check, the event bits), which calls ``doRead``: some 1.4 us
of interpreted Python per wake-up, before a datagram is read. Our UDP port's ``doRead``
(sip/twisted_io.py) hands the whole read loop to compiled code, logs through ``twisted.logger``
(which never reads the legacy context) and reports its own failures, so for a plain "readable"
event on one of the ``lean_readers`` types this reactor calls ``doRead`` directly. Anything else
(writes, hang-ups, errors, every other descriptor) takes Twisted's path unchanged, and a
``doRead`` that raises or returns a reason is handled as Twisted does: logged, then disconnected.
"""

from __future__ import annotations

import errno
import select
import sys
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.main import installReactor
from twisted.python import log

__all__ = ["LeanEPollReactor", "install"]

_READABLE = select.EPOLLIN


class LeanEPollReactor(epollreactor.EPollReactor):
    """``[ops] reactor = "epoll"`` (and "auto" without Redis): ops/reactor.py installs it and names the
    types whose readable events skip the wrapping (the SIP UDP port)."""

    lean_readers: frozenset[type] = frozenset()

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait until an event
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        lean = self.lean_readers
        for fd, event in events:
            selectable: Any = selectables.get(fd)
            if selectable is None:
                continue
            if event == _READABLE and type(selectable) in lean:
                try:
                    why = selectable.doRead()
                except BaseException:
                    why = sys.exc_info()[1]
                    log.err()  # as _doReadOrWrite does: logged, then the port is disconnected
                if why:
                    self._disconnectSelectable(selectable, why, True)
            else:
                log.callWithLogger(selectable, self._doReadOrWrite, selectable, fd, event)

    doIteration = doPoll  # the base class binds its own doPoll under this name


def install() -> LeanEPollReactor:
    reactor = LeanEPollReactor()
    installReactor(reactor)
    return reactor
