"""Kamailio-style RPC functions, shared by the admin HTTP API and the manhole.

Names follow Kamailio where there is one (``ts.dump``, ``ts.lookup``, ``ul.dump``, ``ul.lookup``,
``ul.rm``) so that operators find what they know; ``stats`` and ``health`` are ours. Every function
takes keyword string parameters (query-string style) and returns JSON-able data, or raises
:class:`RpcError` with the HTTP status the admin API answers (400, 404, ...).

An AOR parameter may be given as the location key itself (``alice`` or ``sip:alice@example.com``,
depending on ``[registrar] use_domain``) or as any SIP URI of the user (``sip:alice@example.com;
transport=tcp``): URIs are reduced to the key the registrar uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

__all__ = ["RpcError", "Rpc", "RpcMethod", "jsonable", "printable"]

log = Logger()


class RpcError(Exception):
    """A failed RPC: ``status`` is the HTTP status (400 bad params, 404 not found, 503 unavailable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RpcMethod:
    name: str
    func: Callable[..., Any]
    params: tuple[str, ...]  # accepted parameter names
    doc: str
    mutating: bool = False  # needs POST over HTTP


def jsonable(value: Any) -> Any:
    """Plain JSON types out of dataclasses, tuples, sets and objects with ``to_dict``; every string
    is valid Unicode (see :func:`printable`)."""
    if isinstance(value, str):
        return value if value.isascii() else printable(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, Mapping):
        return {jsonable(str(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return jsonable(to_dict())
    as_dict = getattr(value, "as_dict", None)
    if callable(as_dict):
        return jsonable(as_dict())
    return jsonable(str(value))


def printable(text: str) -> str:
    """``text`` as valid Unicode. The parser keeps bytes that are not UTF-8 as surrogates
    (surrogateescape), which no UTF-8 encoder takes: they are shown as ``\\xNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class Rpc:
    """The RPC functions over the live objects of a service tree (``Parts``)."""

    def __init__(self, parts: Any, root: Any = None) -> None:
        self.parts = parts
        self.root = root
        self.started_at = parts.clock.seconds()
        self.methods: dict[str, RpcMethod] = {}
        for m in (
            RpcMethod(
                "ts.dump", self.ts_dump, (), "pending (parked/forking) calls per AOR and the silo statistics"
            ),
            RpcMethod("ts.lookup", self.ts_lookup, ("aor",), "pending calls of one AOR (404 when none)"),
            RpcMethod(
                "ts.append_to", self.ts_append_to, ("call_id", "aor"),
                "fork one pending call (caller's Call-ID) to the bindings of an AOR (default: its own)",
                mutating=True,
            ),
            RpcMethod("ul.dump", self.ul_dump, (), "every live binding per AOR"),
            RpcMethod("ul.lookup", self.ul_lookup, ("aor",), "the live bindings of one AOR (404 when none)"),
            RpcMethod(
                "ul.rm",
                self.ul_rm,
                ("aor", "contact", "key"),
                "remove bindings of an AOR: the one with this contact URI or binding key, or all of them",
                mutating=True,
            ),
            RpcMethod("stats", self.stats, (), "counters and gauges of every layer"),
            RpcMethod("health", self.health, (), "ok, or draining during a graceful shutdown"),
        ):
            self.methods[m.name] = m
        # [messages]: SIP MESSAGE store-and-forward
        for m in (
            RpcMethod("msg.dump", self.msg_dump, ("aor",), "waiting instant messages (no bodies)"),
            RpcMethod("msg.stats", self.msg_stats, (), "instant message counters"),
        ):
            self.methods[m.name] = m

    # -- dispatch --------------------------------------------------------------------------------

    def call(self, name: str, params: Mapping[str, str] | None = None) -> Any:
        """Run RPC ``name`` with string parameters; raises RpcError (404 for an unknown name)."""
        method = self.methods.get(name)
        if method is None:
            raise RpcError(404, f"unknown RPC method {name!r}")
        params = dict(params or {})
        unknown = sorted(set(params) - set(method.params))
        if unknown:
            raise RpcError(400, f"{name}: unknown parameter(s): {', '.join(unknown)}")
        result = method.func(**params)
        node = getattr(self.parts, "node_id", "")
        if node and isinstance(result, dict):  # in a cluster, which node answers (issue 14)
            result = {"node": node, **result}
        return jsonable(result)

    # -- helpers ---------------------------------------------------------------------------------

    def _aor(self, aor: str | None) -> str:
        if not aor or not aor.strip():
            raise RpcError(400, "missing parameter: aor")
        aor = aor.strip()
        if aor.lower().startswith(("sip:", "sips:")):
            from libon_tsilo.registrar.registrar import aor_key
            from libon_tsilo.sip.uri import URI

            try:
                uri = URI.parse(aor)
            except Exception:
                raise RpcError(400, f"aor: not a valid SIP URI: {aor!r}") from None
            if not getattr(uri, "user", None):
                raise RpcError(400, f"aor: a SIP URI needs a user part: {aor!r}")
            return aor_key(uri, self._use_domain())
        return aor

    def _use_domain(self) -> bool:
        return bool(self.parts.config.registrar.use_domain)

    def _need(self, what: str) -> Any:
        obj = getattr(self.parts, what)
        if obj is None:
            raise RpcError(503, f"{what} is not running")
        return obj

    def _binding(self, binding: Any) -> dict[str, Any]:
        data = jsonable(binding)
        if not isinstance(data, dict):
            return {"binding": data}
        expires_at = getattr(binding, "expires_at", None)
        if isinstance(expires_at, (int, float)):
            data["expires"] = max(0, round(expires_at - self.parts.clock.seconds()))
        return data

    # -- tsilo -----------------------------------------------------------------------------------

    def ts_dump(self) -> dict[str, Any]:
        """Kamailio ``ts.dump``: every stored R-URI (AOR) with its transactions (calls)."""
        return self._need("silo").dump()

    def ts_lookup(self, aor: str | None = None) -> dict[str, Any]:
        """Kamailio ``ts.lookup``: the transactions stored for one R-URI."""
        key = self._aor(aor)
        calls = self._need("silo").lookup(key)
        if not calls:
            raise RpcError(404, "RURI not found in tsilo table")
        return {"aor": key, "calls": calls}

    def ts_append_to(self, call_id: str | None = None, aor: str | None = None) -> dict[str, Any]:
        """Kamailio ``ts_append_to``: add branches to one stored call, by its Call-ID."""
        from libon_tsilo.silo.silo import CANNOT_APPEND, NOT_FOUND

        if not call_id or not call_id.strip():
            raise RpcError(400, "missing parameter: call_id")
        silo = self._need("silo")
        call = silo.get(call_id.strip())
        if call is None:
            raise RpcError(404, "transaction not found in tsilo table")
        key = self._aor(aor) if aor else call.aor
        added = silo.append_to(call.call_id, key)
        if added == NOT_FOUND:  # it ended between the lookup and the append
            raise RpcError(404, "transaction not found in tsilo table")
        if added == CANNOT_APPEND:
            raise RpcError(409, "the call was answered or cancelled: no branch can be added")
        log.info("ts.append_to: {n} branch(es) added for {aor} by an operator", n=added, aor=key,
                 call_id=call.call_id)
        return {"call_id": call.call_id, "aor": key, "added": added}

    # -- usrloc ----------------------------------------------------------------------------------

    def ul_dump(self) -> dict[str, Any]:
        location = self._need("location")
        aors = {
            aor: [self._binding(b) for b in bindings] for aor, bindings in location.dump().items() if bindings
        }
        out = {"aor_count": len(aors), "binding_count": sum(len(b) for b in aors.values()), "aors": aors}
        if getattr(self.parts, "node_id", ""):
            # a cluster node's replica holds every node's bindings: how many each node's flows carry
            nodes: dict[str, int] = {}
            for bindings in aors.values():
                for b in bindings:
                    nodes[b["node"]] = nodes.get(b["node"], 0) + 1
            out["nodes"] = dict(sorted(nodes.items()))
        redis = location.redis_stats() if hasattr(location, "redis_stats") else None
        if redis is not None:  # a cluster: which node answers, and whether its copy is current
            out["redis"] = redis
        return out

    def ul_lookup(self, aor: str | None = None) -> dict[str, Any]:
        key = self._aor(aor)
        bindings = self._need("location").lookup(key)
        if not bindings:
            raise RpcError(404, "AOR not found in location table")
        return {"aor": key, "bindings": [self._binding(b) for b in bindings]}

    def ul_rm(
        self, aor: str | None = None, contact: str | None = None, key: str | None = None
    ) -> dict[str, Any]:
        """Remove the binding of ``aor`` whose contact URI is ``contact`` or whose key is ``key``;
        with neither, every binding of the AOR (Kamailio's ``ul.rm``)."""
        aor_key = self._aor(aor)
        if contact and key:
            raise RpcError(400, "give contact or key, not both")
        location = self._need("location")
        bindings = location.lookup(aor_key)
        if not bindings:
            raise RpcError(404, "AOR not found in location table")
        if contact:
            chosen = [b for b in bindings if _same_contact(b.contact_uri, contact)]
            if not chosen:
                raise RpcError(404, "contact not found for this AOR")
        elif key:
            # ul.dump shows a key with odd bytes as printable(): that spelling removes it too
            chosen = [b for b in bindings if b.key == key or printable(b.key) == key]
            if not chosen:
                raise RpcError(404, "binding key not found for this AOR")
        else:
            chosen = list(bindings)
        remover = self.parts.registrar if self.parts.registrar is not None else location
        removed = [b.key for b in chosen if remover.remove(b, "admin")]
        log.info("ul.rm: {n} binding(s) of {aor} removed by an operator", n=len(removed), aor=aor_key)
        return {"aor": aor_key, "removed": removed}

    # -- stats & health --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        p = self.parts
        out: dict[str, Any] = {"uptime": round(p.clock.seconds() - self.started_at, 3)}
        if p.silo is not None:
            out["tsilo"] = p.silo.stats()
        if p.b2bua is not None:
            calls = dict(p.b2bua.stats())
            calls.pop("silo", None)
            out["calls"] = calls
        if p.location is not None:
            out["usrloc"] = {"registered_aors": p.location.aor_count(), "bindings": p.location.all_count()}
            redis = p.location.redis_stats() if hasattr(p.location, "redis_stats") else None
            if redis is not None:
                out["usrloc"]["redis"] = redis
        if p.transactions is not None:
            t = p.transactions
            out["transactions"] = {"live": len(t), "server": t.server_count, "client": t.client_count,
                                   "strays_dropped": t.strays_dropped}
        if p.transport is not None:
            out["flows"] = {"live": p.transport.flows.live_count()}
            out["connections"] = p.transport.connection_stats()
        sip: dict[str, Any] = {}
        if p.router is not None:
            sip["requests_in"] = dict(p.router.counters)
        messages = p.extra.get("message_counters")
        if messages is not None:
            sip["messages"] = messages.as_dict()
        if sip:
            out["sip"] = sip
        push = push_stats(p)
        if push is not None:
            out["push"] = push
        if p.extra.get("overload") is not None:
            out["overload"] = p.extra["overload"].stats()
        if p.extra.get("cluster_relay") is not None:  # [cluster] node_address
            out["cluster_relay"] = p.extra["cluster_relay"].stats()
        if p.extra.get("cluster_liveness") is not None:  # which peer nodes beat in Redis
            out["cluster_peers"] = p.extra["cluster_liveness"].stats()
        return out

    def msg_dump(self, aor: str | None = None) -> list[dict[str, Any]]:
        acceptor = self.parts.extra.get("messages")
        if acceptor is None:
            raise RpcError(503, "messages are not enabled")
        key = self._aor(aor) if aor is not None else None
        return [m for m in acceptor.outbox.dump() if key is None or m["aor"] == key]

    def msg_stats(self) -> dict[str, Any]:
        acceptor = self.parts.extra.get("messages")
        if acceptor is None:
            raise RpcError(503, "messages are not enabled")
        return dict(acceptor.stats())

    def health(self) -> dict[str, Any]:
        p = self.parts
        draining = bool(getattr(p.b2bua, "shutting_down", False)) or bool(
            getattr(self.root, "draining", False)
        )
        out: dict[str, Any] = {
            "status": "draining" if draining else "ok",
            "uptime": round(p.clock.seconds() - self.started_at, 3),
        }
        if p.transport is not None:
            out["listening"] = [str(b) for b in getattr(p.transport, "bound", [])]
        if p.b2bua is not None:
            out["calls"] = len(p.b2bua.calls)
        if p.extra.get("overload") is not None:
            out["overload"] = p.extra["overload"].stats()["state"]
        return out


def push_stats(parts: Any) -> Any:
    """Per-provider push statistics from whatever the push layer put into ``parts.extra["push"]``:
    an object with ``stats()``, a callable, a dict of senders (each with ``stats.as_dict()``) or a
    plain dict. None when there is no push layer."""
    push = parts.extra.get("push")
    if push is None:
        return None
    try:
        if callable(getattr(push, "stats", None)):
            return push.stats()
        if callable(push):
            return push()
        if isinstance(push, Mapping):
            out = {}
            for name, value in push.items():
                stats = getattr(value, "stats", None)
                if callable(stats):
                    out[name] = stats()
                elif stats is not None and callable(getattr(stats, "as_dict", None)):
                    out[name] = stats.as_dict()
                else:
                    out[name] = value
            return out
    except Exception:
        log.failure("push statistics failed")
        return {"error": "push statistics failed"}
    return None


def _same_contact(registered: str, given: str) -> bool:
    registered, given = registered.strip(), given.strip().strip("<>")
    if registered == given:
        return True
    try:
        from libon_tsilo.sip.uri import URI

        return bool(URI.parse(registered) == URI.parse(given))
    except Exception:
        return False
