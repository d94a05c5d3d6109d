"""The table of live flows (sip/flow.py's ``Flow``): ids, lookups, idle expiry, the UDP cap.

Compiled with mypyc (setup.py, issue 15): the transport looks a flow up and touches it for every
datagram in and out, ~25 calls a late-fork call, which cost more as interpreted frames than the dict
operations inside them. Flow itself stays interpreted (sip/flow.py says why).

Choices:
- Stream flow ids carry a per-table counter (``"tcp:10.0.0.1:5060-10.0.0.2:34567#7"``) because the
  same 5-tuple can be reused by a later, different connection. UDP pseudo-flows have no counter: a
  pseudo-flow that expired and is recreated by the next datagram from the same address is the same
  path through the NAT, so a binding that stored its id finds it again.
- Idle timeout: one callLater per flow, armed at ``last_activity + timeout``. Activity only updates
  ``last_activity`` (no timer reset per message); when the timer fires it re-arms for the remainder
  if there was activity meanwhile. A timeout <= 0 disables idle expiry.
- Two idle timeouts. A flow that something still needs (a binding was registered over it, a call
  runs over it: RFC 5626 flows must live as long as the registration) is kept for ``idle_timeout``
  since its last activity; any other flow for ``unbound_idle_timeout`` (short: a connection or a UDP
  source that never registered is not worth an hour of memory). Which flows are needed is asked of
  the ``keepers`` (``add_keeper(flow_id -> bool)``, given by the layers above, so this module knows
  nothing of registrations or calls) when a flow's timer fires, never per message. A needed flow then
  sleeps the long timeout (one wake-up an hour for a registered device with keep-alives, not one a
  minute); ``recheck(flow_id)``, called when a binding is removed, puts it back on the short one.
- UDP pseudo-flows are capped (``max_udp_flows``): the table holds one per source address, and
  sources cost an attacker nothing. At the cap, the oldest UDP flow no keeper needs is evicted
  before a new one is added; needed flows are never evicted (they may take the table past the cap).
- Close callbacks (per flow, then table-wide subscribers) run once; an exception in one is logged and
  does not stop the others.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from libon_tsilo import logflags
from libon_tsilo.sip.flow import CloseCallback, Flow, FlowKey, HostPort, Keeper, safe_close_call

__all__ = ["FlowTable"]

log = Logger(namespace=__name__)  # compiled: Logger() would name the importer (importlib)


class FlowTable:
    """Live flows by id and by key, with idle expiry on ``clock``."""

    def __init__(
        self,
        clock: IReactorTime,
        idle_timeout: float,
        unbound_idle_timeout: float | None = None,
        max_udp_flows: int = 0,
    ) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        # never longer than idle_timeout: a flow nobody needs does not outlive one that is needed
        if unbound_idle_timeout is None or unbound_idle_timeout <= 0:
            unbound_idle_timeout = idle_timeout
        elif idle_timeout > 0:
            unbound_idle_timeout = min(unbound_idle_timeout, idle_timeout)
        self.unbound_idle_timeout = unbound_idle_timeout
        self.max_udp_flows = max_udp_flows  # 0: no cap
        self.evicted = 0  # UDP flows evicted at the cap
        self._keepers: list[Keeper] = []
        self._udp: OrderedDict[str, Flow] = OrderedDict()  # UDP flows, oldest first (eviction order)
        self._by_id: dict[str, Flow] = {}
        # (transport, local, remote) -> flow: plain tuples, cheaper per datagram than a FlowKey
        self._by_key: dict[tuple[str, HostPort, HostPort], Flow] = {}
        # (transport, remote) -> flow, to reuse an existing connection to a destination (RFC 3261 §18.1.1)
        self._by_remote: dict[tuple[str, HostPort], Flow] = {}
        self._timers: dict[str, IDelayedCall] = {}
        self._subscribers: list[CloseCallback] = []
        self._seq = itertools.count(1)

    # -- lookups -----------------------------------------------------------------------------

    def get(self, flow_id: str) -> Flow | None:
        return self._by_id.get(flow_id)

    def by_key(self, key: FlowKey) -> Flow | None:
        return self._by_key.get(key.as_tuple())

    def lookup(self, transport: str, local: HostPort, remote: HostPort) -> Flow | None:
        """``by_key`` without building a FlowKey (the per-datagram UDP lookup)."""
        return self._by_key.get((transport, local, remote))

    def find_remote(self, transport: str, remote: HostPort) -> Flow | None:
        """The live flow of ``transport`` to ``remote``, whichever side opened it."""
        return self._by_remote.get((transport, remote))

    def live_count(self) -> int:
        return len(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._by_id.values()))

    def add_keeper(self, keeper: Keeper) -> None:
        """``keeper(flow_id)`` True keeps an idle flow for ``idle_timeout`` instead of the unbound one."""
        self._keepers.append(keeper)

    def needed(self, flow: Flow) -> bool:
        """Whether a keeper still needs ``flow`` (asked when it idles, and at the UDP cap)."""
        for keeper in self._keepers:
            try:
                if keeper(flow.id):
                    return True
            except Exception:
                log.failure("flow keeper failed for {flow_id}", flow_id=flow.id)
                return True  # when in doubt, keep: a wrongly closed flow loses a device
        return False

    def recheck(self, flow_id: str) -> None:
        """What needed the flow let go of it (a binding was removed): it idles out as an unbound one."""
        flow = self._by_id.get(flow_id)
        if flow is None or self.idle_timeout <= 0:
            return
        timer = self._timers.pop(flow_id, None)
        if timer is not None and timer.active():
            timer.cancel()
        idle = self.clock.seconds() - flow.last_activity
        self._arm(flow, max(self.unbound_idle_timeout - idle, 0.0))

    def udp_count(self) -> int:
        return len(self._udp)

    def subscribe_close(self, cb: CloseCallback) -> None:
        """Call ``cb(flow)`` for every flow that closes or expires from now on."""
        self._subscribers.append(cb)

    # -- lifecycle (called by the transport layer) ------------------------------------------

    def new_id(self, key: FlowKey) -> str:
        if key.transport == "udp":
            return str(key)
        return f"{key}#{next(self._seq)}"

    def add(self, flow: Flow) -> Flow:
        old = self._by_key.get(flow.key.as_tuple())
        if old is not None and old is not flow:
            # same 5-tuple: the old connection is gone even if its close was not reported yet
            self.closed(old)
        if flow.key.transport == "udp":
            if self.max_udp_flows and len(self._udp) >= self.max_udp_flows:
                self._evict_udp()
            self._udp[flow.id] = flow
        self._by_id[flow.id] = flow
        self._by_key[flow.key.as_tuple()] = flow
        self.alias_remote(flow, flow.key.remote)
        flow.last_activity = self.clock.seconds()
        self._arm(flow, self.unbound_idle_timeout)
        return flow

    def rekey(self, flow: Flow, key: FlowKey) -> None:
        """Give ``flow`` its real key once an outbound connection knows its local address."""
        if self._by_id.get(flow.id) is not flow:
            flow.key = key
            return
        if self._by_key.get(flow.key.as_tuple()) is flow:
            del self._by_key[flow.key.as_tuple()]
        flow.key = key
        self._by_key[key.as_tuple()] = flow
        self.alias_remote(flow, key.remote)

    def alias_remote(self, flow: Flow, remote: HostPort) -> None:
        """Also find ``flow`` under ``remote`` (an outbound connection's target name and port)."""
        rkey = (flow.key.transport, remote)
        self._by_remote[rkey] = flow
        if rkey not in flow._remote_keys:
            flow._remote_keys.append(rkey)

    def touch(self, flow: Flow) -> None:
        flow.last_activity = self.clock.seconds()

    def closed(self, flow: Flow) -> None:
        """The flow's connection is gone (or its UDP pseudo-flow expired): unindex and notify once."""
        self._unindex(flow)
        timer = self._timers.pop(flow.id, None)
        if timer is not None and timer.active():
            timer.cancel()
        if flow._closed:
            return
        cbs = flow._mark_closed()
        for cb in cbs + list(self._subscribers):
            safe_close_call(cb, flow)

    def close_all(self) -> None:
        """Cancel every idle timer and ask every flow to close (service shutdown)."""
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for flow in list(self._by_id.values()):
            if flow.reliable:
                flow.close()
            else:
                self.closed(flow)

    # -- internals ---------------------------------------------------------------------------

    def _unindex(self, flow: Flow) -> None:
        if self._by_id.get(flow.id) is flow:
            del self._by_id[flow.id]
            if flow.key.transport == "udp":
                self._udp.pop(flow.id, None)
        if self._by_key.get(flow.key.as_tuple()) is flow:
            del self._by_key[flow.key.as_tuple()]
        for rkey in flow._remote_keys:
            if self._by_remote.get(rkey) is flow:
                del self._by_remote[rkey]
        flow._remote_keys.clear()

    def _arm(self, flow: Flow, delay: float) -> None:
        if self.idle_timeout <= 0:
            return
        self._timers[flow.id] = self.clock.callLater(delay, self._check_idle, flow)

    def _check_idle(self, flow: Flow) -> None:
        self._timers.pop(flow.id, None)
        if self._by_id.get(flow.id) is not flow:
            return
        idle = self.clock.seconds() - flow.last_activity
        if idle < self.idle_timeout and self.needed(flow):
            # the long sleep (one wake-up per idle_timeout for a registered device, not one per
            # unbound timeout); recheck() cuts it short when what needed the flow lets go of it
            self._arm(flow, self.idle_timeout - idle)
            return
        if idle < self.unbound_idle_timeout:
            self._arm(flow, self.unbound_idle_timeout - idle)
            return
        if flow.reliable:
            log.info("flow {flow_id} idle for {idle:.0f}s; closing", flow_id=flow.id, idle=idle)
        elif logflags.debug_enabled:  # UDP: a flood of sources would flood the log too
            log.debug("flow {flow_id} idle for {idle:.0f}s; forgotten", flow_id=flow.id, idle=idle)
        self._expire(flow)

    def _expire(self, flow: Flow) -> None:
        if flow.reliable and flow._closer is not None:
            flow.close()
        else:
            self.closed(flow)

    def _evict_udp(self) -> None:
        """Make room for one UDP flow: drop the oldest that no keeper needs."""
        for _ in range(len(self._udp)):
            flow_id, flow = next(iter(self._udp.items()))
            if self.needed(flow):
                self._udp.move_to_end(flow_id)  # not asked again until the others were
                continue
            self.evicted += 1
            self.closed(flow)
            return
