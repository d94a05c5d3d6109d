"""One datagram to an IP literal, straight to ``sendto`` (compiled by mypyc, setup.py).

Twisted's ``udp.Port.write`` checks the address with three Python-level isIPAddress/isIPv6Address
calls per datagram (~9 % of the epoll reactor's work per datagram, cProfile of
bench/reactor_cost.py). One ``inet_pton`` in C keeps what matters of that check: a name never
reaches ``sendto`` (it would resolve it, blocking), nor an address of the socket's other family.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet import error

__all__ = ["udp_sendto"]


def udp_sendto(sock: Any, family: int, data: bytes, addr: Any) -> bool:
    """Send ``data`` to ``addr`` on ``sock``; False when the address is not a plain IP literal of
    ``family`` (the caller then takes Twisted's path, which says why). Errors as Twisted's write:
    MessageLengthError for EMSGSIZE, an ICMP refusal of an earlier datagram ignored, OSError else."""
    try:
        socket.inet_pton(family, addr[0])
    except (OSError, TypeError, ValueError, IndexError):
        return False
    refused = False
    while True:
        try:
            sock.sendto(data, addr)
            return True
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                raise error.MessageLengthError("message too long") from e
            if e.errno == errno.ECONNREFUSED:
                # an ICMP error of an earlier datagram, ignored as Twisted does; a connected socket
                # (a pin, sip/udp_pins.py) reports it instead of sending this one, and clears it:
                # send again, once
                if refused:
                    return True
                refused = True
                continue
            raise
