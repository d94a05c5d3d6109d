"""Per-source request limits at the edge, in the spirit of Kamailio's pike module.

Every request (not ACK, not responses) is charged to its source before a transaction exists for
it: a token bucket per source refills at ``rate`` requests per second up to ``burst``. A source that
finds its bucket empty is banned for ``ban_time`` seconds:

- the request that tipped it over gets one stateless ``503 Service Unavailable`` with
  ``Retry-After: <ban_time>`` (RFC 3261 §21.5.4), so a well-behaved client or proxy backs off;
- every further request during the ban is dropped silently, as pike does: a flood costs us no
  transaction and no response, and a spoofed source cannot turn us into a reflector (one 503 per
  ban at most). A source that keeps flooding while banned still drains its bucket, so it is banned
  again, with one more 503, as soon as the ban ends.

ACKs and responses are never charged nor refused: they belong to transactions and calls already
under way. The source is the IP address; IPv6 sources are grouped by /64 (one host usually owns a
whole /64, and rotating through it would otherwise dodge the limit); IPv4-mapped IPv6 counts as the
IPv4 address. Exempt networks (trusted peers, loopback) are never limited; exemption is decided
per address, so a trusted host exempts nothing else in its /64.

Memory is bounded: the table is in least-recently-used order; a new source first drops entries idle
long enough to have refilled and served their ban, and when the table is still at ``max_sources``
the least recently used source is evicted (its state forgotten: counted, never silent).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any, Literal

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from libon_tsilo.ratelimit import ThrottledLog
from libon_tsilo.sip.message import Request, Response, make_response, new_tag

__all__ = ["SourceFilter", "SourceLimiter", "source_key", "ALLOW", "REFUSE", "DROP"]

log = Logger(namespace=__name__)  # compiled (mypyc): Logger() would name the importer

ALLOW, REFUSE, DROP = 0, 1, 2

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=4096)
def _v6_key(host: str) -> str:
    try:
        ip = ipaddress.IPv6Address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


def source_key(host: str) -> str:
    """The key a source is counted under: the IPv4 address, or the IPv6 /64 (``"2001:db8::/64"``)."""
    return host if ":" not in host else _v6_key(host)


class SourceFilter:
    """Is a source address in one of the exempt networks? (remembered per address, bounded)."""

    def __init__(self, networks: Iterable[str | Network] = ()) -> None:
        self.networks: list[Network] = [
            n if not isinstance(n, str) else ipaddress.ip_network(n, strict=False) for n in networks
        ]
        self._known: dict[str, bool] = {}

    def __contains__(self, host: str) -> bool:
        found = self._known.get(host)
        if found is None:
            found = self._lookup(host)
            if len(self._known) < 4096:
                self._known[host] = found
        return found

    def _lookup(self, host: str) -> bool:
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(ip, "ipv4_mapped", None)
        return any(ip in net or (mapped is not None and mapped in net) for net in self.networks)


class _Bucket:
    __slots__ = ("tokens", "stamp", "banned_until")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.banned_until = 0.0


class SourceLimiter:
    """Token bucket + ban per source; ``admit`` is the transaction layer's entry hook."""

    def __init__(
        self,
        clock: IReactorTime,
        rate: float,
        burst: int,
        ban_time: float,
        exempt: SourceFilter | None = None,
        max_sources: int = 50_000,
        respond: Callable[[Response, Any], None] | None = None,
    ) -> None:
        if rate <= 0 or burst < 1 or ban_time <= 0 or max_sources < 1:
            raise ValueError("SourceLimiter: rate, burst, ban_time and max_sources must be positive")
        self.clock = clock
        self.rate = float(rate)
        self.burst = float(burst)
        self.ban_time = float(ban_time)
        self.exempt = exempt if exempt is not None else SourceFilter()
        self.max_sources = max_sources
        self.respond = respond
        # after this long without a request, an entry has refilled and served any ban: forgettable
        self.hold = max(self.ban_time, self.burst / self.rate)
        self._buckets: OrderedDict[str, _Bucket | None] = OrderedDict()  # None: an exempt IPv4 source
        self.counters = {"refused": 0, "dropped": 0, "evicted": 0}
        self._log = ThrottledLog(clock)
        self._full_log = ThrottledLog(clock)

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, host: str) -> int:
        """Charge one request to ``host``: ALLOW, REFUSE (just banned: answer 503) or DROP (banned)."""
        if ":" not in host:
            key = host  # an IPv4 key is the address: its entry can remember that it is exempt
        elif self.exempt.networks and host in self.exempt:
            # an IPv6 key is a /64: exemption is per address, or a trusted host (an SBC) would
            # exempt its whole /64 when seen first, or be limited with it when a neighbour was
            return ALLOW
        else:
            key = _v6_key(host)
        buckets = self._buckets
        bucket: _Bucket | None | Literal[False] = buckets.get(key, False)
        now = self.clock.seconds()
        if bucket is False:
            bucket = self._new(key, host, now)
        else:
            buckets.move_to_end(key)
        if bucket is None:
            return ALLOW
        tokens = bucket.tokens + (now - bucket.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket.stamp = now
        if now < bucket.banned_until:
            bucket.tokens = tokens - 1.0 if tokens >= 1.0 else 0.0
            return DROP
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            return ALLOW
        bucket.tokens = 0.0
        bucket.banned_until = now + self.ban_time
        return REFUSE

    def _new(self, key: str, host: str, now: float) -> _Bucket | None:
        buckets = self._buckets
        horizon = now - self.hold
        while buckets:
            first = next(iter(buckets))
            old = buckets[first]
            if old is not None and old.stamp > horizon:
                break
            del buckets[first]  # idle for `hold` (or exempt: cheap to look up again)
        if len(buckets) >= self.max_sources:
            buckets.popitem(last=False)
            self.counters["evicted"] += 1
            self._full_log.emit(
                log.warn, "source limits: table full ({n} sources), forgetting the least recent",
                n=self.max_sources,
            )
        # only an IPv4 host gets here exempt (see check): its key is its address
        bucket = None if host in self.exempt else _Bucket(self.burst, now)
        buckets[key] = bucket
        return bucket

    def admit(self, request: Request, flow: Any) -> bool:
        """False when the request must go no further (it was answered 503, or dropped)."""
        verdict = self.check(flow.key.remote[0])
        if verdict == ALLOW:
            return True
        if verdict == DROP:
            self.counters["dropped"] += 1
            return False
        self.counters["refused"] += 1
        source = source_key(flow.key.remote[0])
        self._log.emit(
            log.warn, "source {source} over {rate:g} requests/s (burst {burst:g}): 503, then its requests are"
            " dropped for {ban:g}s", source=source, rate=self.rate, burst=self.burst, ban=self.ban_time,
        )
        if self.respond is not None:
            try:
                resp = make_response(request, 503, "Service Unavailable", to_tag=new_tag())
                resp.add_header("Retry-After", str(int(self.ban_time)))
                self.respond(resp, flow)
            except Exception:
                log.failure("source limits: cannot send 503 to {source}", source=source)
        return False

    def banned(self) -> list[str]:
        """Sources banned now (admin and tests)."""
        now = self.clock.seconds()
        return [k for k, b in self._buckets.items() if b is not None and b.banned_until > now]

    def limit_hits(self) -> dict[str, int]:
        return {
            "source_rate_refused": self.counters["refused"],
            "source_rate_dropped": self.counters["dropped"],
            "source_table_evicted": self.counters["evicted"],
        }
