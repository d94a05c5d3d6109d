"""SIP messages in and out, counted on the transport's way: the hooks /metrics and the RPC read.

Compiled with mypyc (setup.py): the hooks run on every message a call exchanges (15 per late-fork
call), and as interpreted closures around the transport they cost ~6,000 instructions a message,
4 % of a call (issue 15). Compiled, each hook is a callable object whose call is native from the
transport's point of view, and the count reads the message's compiled attributes directly.
``ops/metrics.py`` re-exports both names; the Prometheus families are built there at scrape time.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from twisted.logger import Logger

from libon_tsilo.sip.message import Request, Response

__all__ = ["MessageCounters", "install_message_hooks"]

log = Logger(namespace=__name__)  # compiled: Logger() would read the importer's frame (importlib)


class MessageCounters:
    """SIP messages in and out: requests by method, responses by (CSeq method, status code).

    Plain dicts, not Counters: compiled code increments an exact dict in place, a dict subclass
    through the generic (and dearer) protocol."""

    def __init__(self) -> None:
        self.requests_in: dict[str, int] = {}
        self.responses_in: dict[tuple[str, int], int] = {}
        self.requests_out: dict[str, int] = {}
        self.responses_out: dict[tuple[str, int], int] = {}

    def inbound(self, msg: Any) -> None:
        tally(msg, self.requests_in, self.responses_in)

    def outbound(self, msg: Any) -> None:
        tally(msg, self.requests_out, self.responses_out)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {
            "requests_in": dict(self.requests_in),
            "responses_in": {f"{m} {c}": n for (m, c), n in self.responses_in.items()},
            "requests_out": dict(self.requests_out),
            "responses_out": {f"{m} {c}": n for (m, c), n in self.responses_out.items()},
        }


def tally(msg: object, requests: dict[str, int], responses: dict[tuple[str, int], int]) -> None:
    """Count ``msg`` in ``requests`` by method, or in ``responses`` by (CSeq method, status)."""
    if isinstance(msg, Request):
        method = msg.method
        requests[method] = requests.get(method, 0) + 1
    elif isinstance(msg, Response):
        try:
            cseq_method = msg.cseq.method
        except Exception:  # a response whose CSeq cannot be read still counts
            cseq_method = "unknown"
        key = (cseq_method, msg.status)
        responses[key] = responses.get(key, 0) + 1
    else:  # not a parsed message (a test double): read it by name
        _tally_other(msg, requests, responses)


def _tally_other(msg: object, requests: dict[str, int], responses: dict[tuple[str, int], int]) -> None:
    method = getattr(msg, "method", None)
    if method is not None:
        requests[method] = requests.get(method, 0) + 1
        return
    try:
        cseq_method = getattr(msg, "cseq").method
    except Exception:
        cseq_method = "unknown"
    key = (cseq_method, int(getattr(msg, "status", 0)))
    responses[key] = responses.get(key, 0) + 1


class _Guard:
    """Counting never breaks the message path: the first failure is logged, later ones are not."""

    def __init__(self) -> None:
        self.broken = False

    def failed(self) -> None:
        if not self.broken:
            self.broken = True
            log.failure("metrics: message counter failed (reported once)")


class _CountingSink:
    """In: counts, then hands the message on to the transaction layer."""

    def __init__(self, sink: Callable[[Any, Any], Any], counters: MessageCounters, guard: _Guard) -> None:
        self.sink = sink
        self.requests = counters.requests_in
        self.responses = counters.responses_in
        self.guard = guard

    def __call__(self, msg: Any, flow: Any) -> None:
        try:
            tally(msg, self.requests, self.responses)
        except Exception:
            self.guard.failed()
        self.sink(msg, flow)


class _CountingForward:
    """In, stateless: what the forwarder takes never reaches the sink, so it is counted here."""

    def __init__(self, forward: Callable[[Any, Any], bool], counters: MessageCounters, guard: _Guard) -> None:
        self.forward = forward
        self.requests = counters.requests_in
        self.responses = counters.responses_in
        self.guard = guard

    def __call__(self, msg: Any, flow: Any) -> bool:
        taken: bool = self.forward(msg, flow)
        if taken:
            try:
                tally(msg, self.requests, self.responses)
            except Exception:
                self.guard.failed()
        return taken


class _CountingSendRequest:
    """Out: a request is counted once the transport took it (a failed send raises, uncounted)."""

    def __init__(self, send: Callable[..., Any], counters: MessageCounters, guard: _Guard) -> None:
        self.send = send
        self.requests = counters.requests_out
        self.responses = counters.responses_out
        self.guard = guard

    def __call__(self, req: Any, target: Any, flow: Any = None) -> Any:
        result = self.send(req, target, flow)
        try:
            tally(req, self.requests, self.responses)
        except Exception:
            self.guard.failed()
        return result


class _CountingSendResponse:
    """Out: a response is counted once the transport took it."""

    def __init__(self, send: Callable[[Any, Any], Any], counters: MessageCounters, guard: _Guard) -> None:
        self.send = send
        self.requests = counters.requests_out
        self.responses = counters.responses_out
        self.guard = guard

    def __call__(self, resp: Any, flow: Any) -> None:
        self.send(resp, flow)
        try:
            tally(resp, self.requests, self.responses)
        except Exception:
            self.guard.failed()


# a message passed on as bytes: its CSeq method (a response's count is keyed by it), read in its
# Latin-1 text (one character per byte)
_CSEQ_METHOD = re.compile(r"\r\n[Cc][Ss][Ee][Qq][ \t]*:[ \t]*[0-9]+[ \t]+([!-~]+)")


def tally_bytes(data: bytes, counts: list[dict[Any, int]]) -> None:
    """``tally`` for a message a forwarder took and sent as bytes, unparsed: ``counts`` are the
    request counters when it is a request, else the response counters (one per direction)."""
    key: Any
    if data.startswith(b"SIP/2.0 "):
        # read as text: compiled, str methods run natively, bytes methods as generic calls (~2,000
        # instructions a response less, for the one copy the decoding makes)
        text = data.decode("latin-1")
        at = text.find("\r\nCSeq: ")  # as nearly everyone spells it; the pattern finds the others
        found = _CSEQ_METHOD.match(text, at) if at >= 0 else _CSEQ_METHOD.search(text)
        key = (found.group(1) if found is not None else "unknown", int(text[8:11]))
    else:
        key = data[:data.find(b" ")].decode("ascii", "replace")
    for counter in counts:
        counter[key] = counter.get(key, 0) + 1


class _CountingForwardBytes:
    """In and out at once: what the forwarder takes as bytes it passes on as they came, but for its
    Via, so each counts in and out like any other message."""

    def __init__(self, forward: Callable[[bytes, Any], bool], counters: MessageCounters,
                 guard: _Guard) -> None:
        self.forward = forward
        self.requests: list[dict[Any, int]] = [counters.requests_in, counters.requests_out]
        self.responses: list[dict[Any, int]] = [counters.responses_in, counters.responses_out]
        self.guard = guard

    def __call__(self, data: bytes, flow: Any) -> bool:
        taken: bool = self.forward(data, flow)
        if taken:
            try:
                tally_bytes(data, self.responses if data.startswith(b"SIP/2.0 ") else self.requests)
            except Exception:
                self.guard.failed()
        return taken


def install_message_hooks(transport: Any, counters: MessageCounters) -> None:
    """Count every message through ``transport``: wrap its sink and its stateless forwarder (in), its
    two send functions (out) and its bytes forwarder (both).

    Call it after the transaction layer has set ``transport.sink``. Counting never breaks sending:
    a failure in the counter is swallowed (and logged once).
    """
    guard = _Guard()
    transport.sink = _CountingSink(transport.sink, counters, guard)
    forward = getattr(transport, "forward", None)
    if forward is not None:
        transport.forward = _CountingForward(forward, counters, guard)
    transport.send_request = _CountingSendRequest(transport.send_request, counters, guard)
    transport.send_response = _CountingSendResponse(transport.send_response, counters, guard)
    forward_bytes = getattr(transport, "forward_bytes", None)
    if forward_bytes is not None:
        transport.forward_bytes = _CountingForwardBytes(forward_bytes, counters, guard)
