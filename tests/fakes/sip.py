"""The one fake of each sip/ seam the layers above it are tested against: a flow and a server transaction."""

from __future__ import annotations

from typing import Any

from libon_tsilo.sip.flow import FlowKey
from libon_tsilo.sip.message import Request, Response, parse_message


class FakeFlow:
    """What the transaction layer, the registrar and the call layer read of a Flow: ``key``, ``id``
    and ``live``. The id defaults to one derived from the transport and remote address."""

    def __init__(self, transport: str = "udp", remote: tuple[str, int] = ("192.0.2.1", 5060), *,
                 id: str | None = None, local: tuple[str, int] = ("127.0.0.1", 5060), live: bool = True) -> None:
        self.key = FlowKey(transport, local, remote)
        self.id = id if id is not None else f"{transport}:{remote[0]}:{remote[1]}"
        self.live = live

    def __repr__(self) -> str:
        return f"<FakeFlow {self.id}>"


class FakeStx:
    """A server transaction that records what it is asked to answer.

    Each response is round-tripped through bytes, so a response the real transport could not
    serialize fails here."""

    def __init__(self, request: Request | None = None, reliable: bool = True) -> None:
        self.request = request
        self.reliable = reliable
        self.responses: list[Response] = []

    def respond(self, resp: Response) -> None:
        self.responses.append(parse_message(resp.to_bytes()))  # type: ignore[arg-type]

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    @property
    def final(self) -> Response | None:
        finals = [r for r in self.responses if r.status >= 200]
        return finals[0] if finals else None

    @property
    def last(self) -> Any:
        assert self.responses, "no response sent"
        return self.responses[-1]
