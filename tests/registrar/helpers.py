"""Fakes shared by the registrar tests: flows, server transactions, observers, sync thread runner."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer

from libon_tsilo.registrar.binding import Binding


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[tuple[str, Binding, Any]] = []

    def binding_added(self, binding: Binding, flow: Any) -> None:
        self.events.append(("added", binding, flow))

    def binding_refreshed(self, binding: Binding, flow: Any) -> None:
        self.events.append(("refreshed", binding, flow))

    def binding_removed(self, binding: Binding, reason: str) -> None:
        self.events.append(("removed", binding, reason))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]


class BrokenObserver:
    def binding_added(self, binding: Binding, flow: Any) -> None:
        raise RuntimeError("observer bug")

    binding_refreshed = binding_added

    def binding_removed(self, binding: Binding, reason: str) -> None:
        raise RuntimeError("observer bug")


def run_sync(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    """A run_in_thread that runs the batch inline: deterministic persistence tests."""
    return defer.maybeDeferred(f, *args)


def make_binding(
    aor: str = "sip:alice@example.com", uri: str = "sip:alice@192.0.2.10:5060", **kw: Any
) -> Binding:
    base: dict[str, Any] = dict(
        aor=aor,
        contact_uri=uri,
        contact=f"<{uri}>",
        expires_at=3600.0,
        registered_at=0.0,
        call_id="call-1",
        cseq=1,
    )
    base.update(kw)
    return Binding(**base)


# -- request builders ----------------------------------------------------------------------------

def register_text(
    contacts: list[str] | None = None,
    to: str = "sip:alice@example.com",
    call_id: str = "reg-1@192.0.2.10",
    cseq: int = 1,
    expires: int | None = None,
    extra: list[str] | None = None,
    via: str = "SIP/2.0/UDP 192.0.2.10:40000;branch=z9hG4bK-1;rport=40000;received=198.51.100.7",
    method: str = "REGISTER",
    ruri: str = "sip:example.com",
) -> bytes:
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: {via}",
        "Max-Forwards: 70",
        f"From: <{to}>;tag=f1",
        f"To: <{to}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
    ]
    for c in contacts or []:
        lines.append(f"Contact: {c}")
    if expires is not None:
        lines.append(f"Expires: {expires}")
    lines.extend(extra or [])
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def digest_authorization(
    challenge: str, user: str, password: str, method: str, uri: str, nc: int = 1, cnonce: str = "c0ffee"
) -> str:
    """What a UA answers to one WWW-/Proxy-Authenticate value (qop=auth)."""
    from libon_tsilo.sip import digest

    params = digest.parse_authorization(challenge)
    algorithm = params.get("algorithm", "MD5")
    h1 = digest.ha1(user, params["realm"], password, algorithm)
    nc_text = f"{nc:08x}"
    response = digest.expected_response(h1, method, uri, params["nonce"], nc_text, cnonce, "auth", algorithm)
    return (
        f'Digest username="{user}", realm="{params["realm"]}", nonce="{params["nonce"]}", uri="{uri}", '
        f'response="{response}", algorithm={algorithm}, qop=auth, nc={nc_text}, cnonce="{cnonce}"'
    )
