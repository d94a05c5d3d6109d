"""Overload control: notice that the server falls behind, and refuse new INVITEs cheaply until it catches up.

Why INVITEs only: a new call is the dearest work the server takes on (a parked INVITE, a push, a
fork, a dialog: ~15 messages), and refusing one early costs one parse and one 503. What is already
accepted must finish, or the work spent on it is wasted and the peers retransmit: REGISTER (a
woken phone's REGISTER is what completes a parked call), OPTIONS (health probes), ACK, CANCEL,
BYE, every in-dialog request (To tag) and every response keep going through.

Two signals, sampled by one timer on the injected clock every ``interval`` seconds while messages
come (the timer parks on an idle server, see "Parked" below):

- lag: how long a message waits before it is handled. Two measures of it, the larger counts: how
  late the timer itself fires (while the reactor works through a burst nothing else runs), and how
  long the oldest datagram of each UDP wake-up waited in the kernel (``observe_delay``, fed by the
  transport from the kernel's arrival stamps; the least of a tick, as CoDel takes it, so that a
  burst absorbed within the tick is not a backlog). The second matters most: the reactor reads at
  most 256 KiB per wake-up and then runs its timers, so under a flood the timer is only one read
  batch late while seconds of datagrams queue in the socket buffer, where SIP peers retransmit.
  Each sample is capped at 3 * ``enter_lag`` and the samples are smoothed (EWMA, weight 0.3): one
  isolated stall (a full garbage collection, a VM pause, a wall-clock step) never trips the
  detector, two late ticks in a row do.
- work-queue depth: the live transactions, against ``max_transactions`` (0 = no bound). It bounds
  the memory a flood can pin when the lag alone does not show it (the transactions of parked calls
  wait for long without costing CPU).

The decision is a fraction of new INVITEs admitted, not all-or-nothing, so that the server keeps
completing about its capacity of calls during an overload instead of swinging between accepting
everything and nothing. It is an AIMD loop around ``enter_lag``: each tick under pressure (lag >=
``enter_lag``, or the queue at its bound) multiplies the fraction by ``_DECREASE``, or by
``enter_lag / lag`` when that is less (the further over, the harder the cut); each tick under
``enter_lag`` adds up to ``_INCREASE``, the whole of it at or under ``leave_lag`` and less the nearer
the lag is to ``enter_lag``, so the lag settles near ``enter_lag`` with as many calls admitted as
that allows. (Holding the fraction while the lag
is between the two thresholds would stick it at 0 when the work that is never refused, REGISTERs
and the calls already accepted, keeps the lag there on its own.) The hysteresis is in the state:
"overloaded" from the first tick under pressure until the fraction is back at 1 with the lag at or
under ``leave_lag``. Which INVITEs pass is decided by a credit counter (no random draw), so a
fraction of 0.25 admits exactly every 4th INVITE.

Parked: a tick that finds no message read since the previous one (on any transport and listener,
the cluster's internal one included: the transport's one-shot ``on_read``), with the detector not
overloaded and the smoothed lag back under ``_IDLE_LAG``, does not re-arm the timer; the first
message read after that arms it again, due ``interval`` later. Why: ten ticks a second were most
of an idle node's CPU (~40k instructions a tick on the asyncio reactor: ~0.4M a second, and ten
wake-ups), and an operator runs a worker per core, most of them idle most of the day. What it
costs: nothing per message while the timer ticks (the hook is set once a tick and consumed by the
first read, one ``is None`` test for every other one), and a burst that starts on a parked
detector is sampled first ``interval`` after its first message, where a ticking one would sample it
0 to ``interval`` after: the detector sees the burst as if it had begun at most one interval
later. That first tick measures its lateness from its own arming, never from the park, and it
counts the queue delay the first UDP wake-up reported before the hook re-armed it. (When the
reactor is held longer than ``interval`` at a time, ticks come only between those stalls: the
first sample after a park, up to one interval smaller, can then cost one such tick.) Without
``install`` (nothing tells it of messages) the detector never parks. ``parks`` counts the parks.

Exempt sources (``install(exempt=...)``): a request that arrives on a given local address from a
given source is never refused. ops exempts the cluster's internal listener for its trusted peers:
an INVITE a peer node relays there was admitted by the node that forked it, and refusing it here
would fail a call already accepted (and waste its work), which is what overload control is for.

A refused INVITE gets a 503 with ``Retry-After`` from :func:`stateless_503`, sent without a
transaction (RFC 3261 §8.2.7, stateless UAS): a retransmitted INVITE gets the same answer again (the
To tag is a hash of the request's identity, as §8.2.7 asks), and its ACK is dropped (at once by the
early path on UDP, else by the call layer as a stray ACK). :func:`install` wires it all. The start
of an overload episode is logged (at most one per ``_LOG_EVERY`` seconds while the state flaps; the
next line counts the episodes left out), and so is the end of every episode whose start was logged.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from libon_tsilo.sip.errors import ParseError
from libon_tsilo.sip.message import Request, Response, make_response, parse_message

__all__ = ["OverloadDetector", "OverloadGate", "EarlyShedder", "install", "stateless_503"]

log = Logger()

_SMOOTHING = 0.3  # EWMA weight of the newest lag sample: ~3 ticks to follow a change
_DECREASE = 0.7  # admitted fraction kept per tick under pressure (0.1 s ticks: halved in 0.2 s)
_INCREASE = 0.1  # admitted fraction added per calm tick: from nothing back to all in 1 s
_FLOOR = 0.02  # a fraction under this is 0: the multiplicative decrease would never reach it
_CAP = 3.0  # a lag sample counts as at most this many enter_lags (see the module docstring)
_TAG_PREFIX = "ovl"  # our stateless 503s' To tags; dialog tags are hex (message.new_tag)
_LOG_EVERY = 10.0  # seconds: at most one episode start logged per this, while the state flaps
# seconds: a smoothed lag under this is no lag left to decay (the timer may park). Not ~0: on uvloop
# an idle timer fires up to 2 ms late (ops/lean_asyncio.py), and the lag settles there
_IDLE_LAG = 0.005


class OverloadDetector(Service):
    """Samples the reactor lag and the work-queue depth; ``admit()`` says whether a new call may start.

    ``depth`` returns the current queue depth (the live transactions); it is read once per tick.
    As a service, it samples from startService to stopService.
    """

    def __init__(
        self,
        clock: IReactorTime,
        enter_lag: float = 0.2,
        leave_lag: float = 0.05,
        interval: float = 0.1,
        depth: Callable[[], int] | None = None,
        max_depth: int = 0,
    ) -> None:
        if not 0 <= leave_lag < enter_lag:
            raise ValueError("need 0 <= leave_lag < enter_lag")
        self.clock = clock
        self.enter_lag = enter_lag
        self.leave_lag = leave_lag
        self.interval = interval
        self.depth = depth
        self.max_depth = max_depth
        self.lag = 0.0  # smoothed, seconds
        self.max_lag = 0.0  # the worst raw sample since start
        self.fraction = 1.0  # of new calls admitted
        self.overloaded = False
        self.episodes = 0  # times the overloaded state was entered
        self.admitted = 0  # new calls admitted while overloaded
        self.shed = 0  # new calls refused
        self._credit = 0.0
        self._queue_delay: float | None = None  # the least observe_delay() since the last tick
        self._due = 0.0
        self._timer: IDelayedCall | None = None
        self._since = 0.0  # when the current state began
        self._logged_at: float | None = None  # when an episode's start was last logged
        self._episode_logged = False
        self._unlogged = 0  # episodes whose start and end were not logged (rate limit)
        self.on_change: Callable[[bool], None] | None = None  # told when overload begins and ends
        self.parks = 0  # times the timer stopped for want of messages
        self._parked = False
        self._heard = False  # a message was read since the last tick (the read hook was consumed)
        self._watch: Callable[[Callable[[], None] | None], None] | None = None

    # -- the timer ---------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> None:
        super().stopService()
        self.stop()

    def start(self) -> None:
        if self._timer is None and not self._parked:
            self._since = self.clock.seconds()
            self._heard = True  # the first tick ticks on, and sets the read hook
            self._schedule()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._parked = False
        if self._watch is not None:
            self._watch(None)

    def watch_reads(self, watch: Callable[[Callable[[], None] | None], None]) -> None:
        """Let the timer park while no message comes: ``watch(hook)`` must have ``hook`` called once,
        for the next message read on any transport (``watch(None)``: no more). :func:`install`
        gives it the transport's ``on_read``."""
        self._watch = watch
        self._heard = True  # the next tick sets the hook

    def _schedule(self) -> None:
        self._due = self.clock.seconds() + self.interval
        self._timer = self.clock.callLater(self.interval, self._tick)

    def _message_read(self) -> None:
        self._heard = True
        if self._parked:
            self._parked = False
            self._schedule()  # the next sample measures from now: the park is not lateness

    def _tick(self) -> None:
        self._timer = None
        try:
            self._sample()
        finally:
            heard, self._heard = self._heard, False
            if heard or self._watch is None:
                self._schedule()
                if self._watch is not None:
                    self._watch(self._message_read)
            elif not self.overloaded and self.lag < _IDLE_LAG:
                self._parked = True  # the hook set at an earlier tick is still in place
                self.parks += 1
            else:
                self._schedule()  # lag to decay, a fraction to raise: no message needed for that

    def _sample(self) -> None:
        now = self.clock.seconds()
        sample = max(now - self._due, self._queue_delay or 0.0, 0.0)
        self._queue_delay = None
        self.max_lag = max(self.max_lag, sample)
        self.lag += _SMOOTHING * (min(sample, _CAP * self.enter_lag) - self.lag)
        deep = self.max_depth > 0 and self.depth is not None and self.depth() >= self.max_depth
        if self.lag >= self.enter_lag or deep:
            # the further over, the harder: at 3 * enter_lag a third is kept per tick
            self.fraction *= min(_DECREASE, self.enter_lag / self.lag) if self.lag > 0 else _DECREASE
            if self.fraction < _FLOOR:
                self.fraction = 0.0
            if not self.overloaded:
                cause = "reactor lag" if self.lag >= self.enter_lag else "queue depth"
                self._change(True, now, cause)
        elif self.overloaded:
            calm = self.lag <= self.leave_lag
            # nearer enter_lag, smaller steps: the work of the calls admitted now shows in the lag
            # only a second later (their REGISTER, fork, answer), and big steps overshoot
            headroom = (self.enter_lag - self.lag) / (self.enter_lag - self.leave_lag)
            step = _INCREASE if calm else _INCREASE * headroom
            self.fraction = min(1.0, round(self.fraction + step, 6))  # ten steps make 1.0
            if calm and self.fraction >= 1.0:
                self._change(False, now, "")

    def _change(self, overloaded: bool, now: float, cause: str) -> None:
        lasted = now - self._since
        self.overloaded = overloaded
        self._since = now
        if self.on_change is not None:
            self.on_change(overloaded)
        if not overloaded:
            if self._episode_logged:
                log.warn(
                    "overload over after {lasted:.1f} s: {shed} new INVITEs refused so far",
                    lasted=lasted, shed=self.shed,
                )
            return
        self.episodes += 1
        self._credit = 0.0
        self._episode_logged = self._logged_at is None or now - self._logged_at >= _LOG_EVERY
        if not self._episode_logged:
            self._unlogged += 1
            return
        skipped, self._unlogged, self._logged_at = self._unlogged, 0, now
        log.warn(
            "overload: {cause} (lag {lag_ms:.0f} ms): refusing new INVITEs with 503{also}",
            cause=cause, lag_ms=self.lag * 1000,
            also=f" (+{skipped} short episode(s) not logged)" if skipped else "",
        )

    def observe_delay(self, seconds: float) -> None:
        """The oldest queued message waited ``seconds`` before the server read it (the transport's
        ``on_queue_delay``, once per wake-up). The least value of a tick counts: a queue that
        empties at least once per tick is a burst, not a backlog (CoDel's standing-queue test)."""
        if self._queue_delay is None or seconds < self._queue_delay:
            self._queue_delay = seconds

    # -- the decision ------------------------------------------------------------------------------

    def would_admit(self) -> bool:
        """What ``admit()`` would answer now, without counting it."""
        return not self.overloaded or self._credit + self.fraction >= 1.0

    def admit(self) -> bool:
        """May one more new call start now? Counts the answer."""
        if not self.overloaded:
            return True
        self._credit += self.fraction
        if self._credit >= 1.0:
            self._credit -= 1.0
            self.admitted += 1
            return True
        self.shed += 1
        return False

    def stats(self) -> dict[str, Any]:
        return {
            "state": "overloaded" if self.overloaded else "normal",
            "admitted_fraction": round(self.fraction, 4),
            "lag_ms": round(self.lag * 1000, 3),
            "max_lag_ms": round(self.max_lag * 1000, 3),
            "episodes": self.episodes,
            "shed": self.shed,
            "admitted_while_overloaded": self.admitted,
            "parks": self.parks,
        }


# (local address, remote address) of a message -> never refused (see the module doc)
Exempt = Callable[[tuple[str, int], tuple[str, int]], bool]


def install(
    detector: OverloadDetector, transport: Any, transactions: Any, retry_after: int,
    exempt: Exempt | None = None,
) -> None:
    """Wire overload control into the SIP stack (a TransportLayer and its TransactionLayer).

    The transport reports its queueing delays to the detector, and the first read after each tick
    (its one-shot ``on_read``: the timer parks while none comes). The two refusal hooks, the
    transport's ``early`` and the transaction layer's ``gate``, are in place only while the
    detector says overloaded: a server that is not pays one ``is None`` test per message for them.
    """
    gate = OverloadGate(detector, retry_after, exempt)
    early = EarlyShedder(detector, retry_after, transactions.has_server_transaction, exempt)

    def switch(overloaded: bool) -> None:
        transactions.gate = gate if overloaded else None
        transport.early = early if overloaded else None

    def watch(hook: Callable[[], None] | None) -> None:
        transport.on_read = hook

    transport.on_queue_delay = detector.observe_delay
    detector.watch_reads(watch)
    detector.on_change = switch
    switch(detector.overloaded)


class OverloadGate:
    """The transaction layer's ``gate``: a 503 for a new INVITE the detector does not admit, else None."""

    def __init__(self, detector: OverloadDetector, retry_after: int, exempt: Exempt | None = None) -> None:
        self.detector = detector
        self.retry_after = retry_after
        self.exempt = exempt

    def __call__(self, request: Request, flow: Any = None) -> Response | None:
        detector = self.detector
        if not detector.overloaded or request.method != "INVITE" or request.to.tag is not None:
            return None
        if self.exempt is not None and flow is not None and self.exempt(flow.key.local, flow.key.remote):
            return None
        if detector.admit():
            return None
        return stateless_503(request, self.retry_after)


class EarlyShedder:
    """The UDP transport's ``early`` hook: the cheapest refusal, before the full parse and checks.

    While overloaded, a datagram that starts with ``INVITE`` is parsed lazily (start line, header
    split, then only the To tag and the top Via); a new INVITE the detector refuses gets the 503's
    bytes back, to send to the datagram's source, as the transport answers unparseable input.
    A retransmission of an INVITE accepted earlier (``accepted(request)``: its transaction exists)
    goes on to that transaction. An ACK whose To tag is one of our stateless 503s' is dropped at
    once (b""): nothing would match it anyway. Anything else, or anything that does not parse
    cleanly, gets None and takes the normal path (where OverloadGate decides, and a 400 is formed).
    This is the path of almost every refusal under a UDP flood, so it is kept short: shedding an
    INVITE costs about a tenth of what the full path costs.
    """

    def __init__(
        self, detector: OverloadDetector, retry_after: int, accepted: Callable[[Request], bool],
        exempt: Exempt | None = None,
    ) -> None:
        self.detector = detector
        self.retry_after = retry_after
        self.accepted = accepted
        self.exempt = exempt

    def __call__(
        self, data: bytes, local: tuple[str, int] | None = None, remote: tuple[str, int] | None = None
    ) -> bytes | None:
        detector = self.detector
        if not detector.overloaded:
            return None
        if data.startswith(b"ACK "):
            return self._our_ack(data)
        if not data.startswith(b"INVITE ") or detector.would_admit():
            return None
        exempt = self.exempt
        if exempt is not None and local is not None and remote is not None and exempt(local, remote):
            return None
        try:
            request = parse_message(data)
            if not isinstance(request, Request) or request.to.tag is not None or self.accepted(request):
                return None
            answer = stateless_503(request, self.retry_after).to_bytes()
        except ParseError:
            return None
        detector.admit()  # counts the refusal
        return answer

    @staticmethod
    def _our_ack(data: bytes) -> bytes | None:
        if b"tag=" + _TAG_PREFIX.encode() not in data:
            return None
        try:
            tag = parse_message(data).to.tag
        except ParseError:
            return None
        return b"" if tag is not None and tag.startswith(_TAG_PREFIX) else None


def stateless_503(request: Request, retry_after: int) -> Response:
    """503 Service Unavailable with Retry-After, for a request answered without a transaction.

    The To tag is derived from the request (RFC 3261 §8.2.7), so a retransmission gets the same one.
    """
    resp = make_response(request, 503, "Service Unavailable", to_tag=_stateless_tag(request))
    resp.set_header("Retry-After", str(retry_after))
    return resp


def _stateless_tag(request: Request) -> str:
    try:
        identity = f"{request.call_id}\0{request.from_.tag}\0{request.branch}\0{request.cseq.seq}"
    except ParseError:  # validate() read these already; a tag must still come out
        identity = request.raw_uri
    digest = hashlib.blake2s(identity.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
    return _TAG_PREFIX + digest
