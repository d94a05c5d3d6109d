"""One registered Contact of an AOR (the observer protocol for its events: observer.py).

A binding is a plain record: the location store owns its indexes, the registrar decides when it is
created, refreshed or removed. ``key`` is the identity used for replacement within an AOR (RFC 5626
instance + reg-id, else the RFC 8599 pn triple, else the Contact URI); it never changes for the life
of a binding, so it is also the primary key of the persistent copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

# the observers subclass it: kept in an interpreted module (see observer.py), re-exported here
from libon_tsilo.registrar.observer import LocationObserver

__all__ = ["Binding", "LocationObserver", "binding_key"]


def binding_key(
    contact_uri: str,
    instance: str | None,
    reg_id: int | None,
    pn_provider: str | None,
    pn_prid: str | None,
    pn_param: str | None,
) -> str:
    """The replacement identity of a binding (see the module doc)."""
    if instance:
        return f"instance:{instance}" + (f";reg-id={reg_id}" if reg_id is not None else "")
    if pn_provider and pn_prid:
        return f"pn:{pn_provider}|{pn_prid}|{pn_param or ''}"
    return f"uri:{contact_uri}"


# init=False and a written-out __init__: compiled with mypyc, a dataclass's generated __init__ stays
# interpreted Python (called through tp_init with a keyword dict); this one is native, a REGISTER
# makes one Binding. The dataclass still gives __eq__, __repr__ and fields(); the signature is the
# one @dataclass would generate, in field order.
@dataclass(init=False)
class Binding:
    aor: str
    contact_uri: str  # the Contact URI as text: the Request-URI of a branch to this device
    contact: str  # the whole Contact value as registered (name-addr + params), without ;expires
    expires_at: float
    registered_at: float
    call_id: str
    cseq: int
    q: float = 1.0
    instance: str | None = None  # +sip.instance value without quotes, e.g. "<urn:uuid:...>"
    reg_id: int | None = None
    flow_id: str | None = None
    flow_live: bool = False
    received: tuple[str, str, int] | None = None  # (transport, host, port) the REGISTER came from
    path: list[str] = field(default_factory=list)
    user_agent: str | None = None
    pn_provider: str | None = None
    pn_prid: str | None = None
    pn_param: str | None = None
    pnsreg: bool = False
    key: str = ""  # "" when built: computed from the fields above (binding_key)
    # the cluster node ([cluster] node_id) whose connection table holds flow_id; "" = single node
    node: str = ""

    def __init__(
        self,
        aor: str,
        contact_uri: str,
        contact: str,
        expires_at: float,
        registered_at: float,
        call_id: str,
        cseq: int,
        q: float = 1.0,
        instance: str | None = None,
        reg_id: int | None = None,
        flow_id: str | None = None,
        flow_live: bool = False,
        received: tuple[str, str, int] | None = None,
        path: list[str] | None = None,
        user_agent: str | None = None,
        pn_provider: str | None = None,
        pn_prid: str | None = None,
        pn_param: str | None = None,
        pnsreg: bool = False,
        key: str = "",
        node: str = "",
    ) -> None:
        self.aor = aor
        self.contact_uri = contact_uri
        self.contact = contact
        self.expires_at = expires_at
        self.registered_at = registered_at
        self.call_id = call_id
        self.cseq = cseq
        self.q = q
        self.instance = instance
        self.reg_id = reg_id
        self.flow_id = flow_id
        self.flow_live = flow_live
        self.received = received
        self.path = [] if path is None else path
        self.user_agent = user_agent
        self.pn_provider = pn_provider
        self.pn_prid = pn_prid
        self.pn_param = pn_param
        self.pnsreg = pnsreg
        self.key = key or binding_key(contact_uri, instance, reg_id, pn_provider, pn_prid, pn_param)
        self.node = node

    @property
    def push_capable(self) -> bool:
        """True when a push can wake this device (RFC 8599 provider and token both known)."""
        return bool(self.pn_provider and self.pn_prid)

    def remaining(self, now: float) -> int:
        """Seconds left, rounded up so a live binding never advertises 0 (which means "removed")."""
        return max(0, math.ceil(self.expires_at - now))

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def contact_header(self, now: float) -> str:
        """The Contact value of this binding in a REGISTER 200 OK."""
        return f"{self.contact};expires={self.remaining(now)}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (persistence, admin API), the fields in their order."""
        # not dataclasses.asdict: its deep copy was the largest cost of a REGISTER's persistence,
        # and every field is immutable but path (copied here) and received (a tuple, listed here);
        # written out, not a getattr per field name: compiled, ~8k instructions less per REGISTER on
        # the Redis store (test_binding.py's test_to_dict_is_a_snapshot_like_asdict: every field, in order)
        return {
            "aor": self.aor,
            "contact_uri": self.contact_uri,
            "contact": self.contact,
            "expires_at": self.expires_at,
            "registered_at": self.registered_at,
            "call_id": self.call_id,
            "cseq": self.cseq,
            "q": self.q,
            "instance": self.instance,
            "reg_id": self.reg_id,
            "flow_id": self.flow_id,
            "flow_live": self.flow_live,
            "received": list(self.received) if self.received else None,
            "path": list(self.path),
            "user_agent": self.user_agent,
            "pn_provider": self.pn_provider,
            "pn_prid": self.pn_prid,
            "pn_param": self.pn_param,
            "pnsreg": self.pnsreg,
            "key": self.key,
            "node": self.node,
        }

    def to_compact_dict(self) -> dict[str, Any]:
        """``to_dict`` without the optional fields that hold their defaults: what the Redis store
        writes, for every node to decode (a binding of a device without push, instance or Path has
        about half its fields at their defaults). ``from_dict`` restores them, and has since the
        first version that wrote bindings to Redis (it passed the keys found to the dataclass's
        own defaults): a node of an earlier version reads this form too. ``key`` stays: a reader
        would otherwise compute it again."""
        # one test (test_binding.py) checks that every field with a default is either here or left
        # out only when it holds that default
        data: dict[str, Any] = {
            "aor": self.aor,
            "contact_uri": self.contact_uri,
            "contact": self.contact,
            "expires_at": self.expires_at,
            "registered_at": self.registered_at,
            "call_id": self.call_id,
            "cseq": self.cseq,
            "key": self.key,
        }
        if self.q != 1.0:
            data["q"] = self.q
        if self.instance is not None:
            data["instance"] = self.instance
        if self.reg_id is not None:
            data["reg_id"] = self.reg_id
        if self.flow_id is not None:
            data["flow_id"] = self.flow_id
        if self.flow_live:
            data["flow_live"] = True
        if self.received:
            data["received"] = list(self.received)
        if self.path:
            data["path"] = list(self.path)
        if self.user_agent is not None:
            data["user_agent"] = self.user_agent
        if self.pn_provider is not None:
            data["pn_provider"] = self.pn_provider
        if self.pn_prid is not None:
            data["pn_prid"] = self.pn_prid
        if self.pn_param is not None:
            data["pn_param"] = self.pn_param
        if self.pnsreg:
            data["pnsreg"] = True
        if self.node:
            data["node"] = self.node
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Binding:
        """Inverse of to_dict; unknown keys (from a newer version) are ignored, missing optional ones
        (from an older version) take their defaults, a missing required one raises KeyError."""
        # every change of another node comes through here: positional arguments make a native call,
        # where ``cls(**kwargs)`` parsed 21 keywords by name (~30k of the ~105k instructions to apply
        # a change, bench/redis_cost.py --stages apply-redis)
        # ``data.get(...)`` written out each time: compiled, each is a native dict lookup, where a
        # bound ``get`` held in a local was a generic call per field (~3k instructions a change)
        received = data.get("received")
        if received is not None:
            transport, host, port = received
            received = (str(transport), str(host), int(port))
        return Binding(
            data["aor"], data["contact_uri"], data["contact"], data["expires_at"], data["registered_at"],
            data["call_id"], data["cseq"], data.get("q", 1.0), data.get("instance"), data.get("reg_id"),
            data.get("flow_id"), data.get("flow_live", False), received, list(data.get("path") or []),
            data.get("user_agent"), data.get("pn_provider"), data.get("pn_prid"), data.get("pn_param"),
            data.get("pnsreg", False), data.get("key", ""), data.get("node", ""),
        )


_FIELD_NAMES = tuple(f.name for f in fields(Binding))
