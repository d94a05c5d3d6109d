"""One side of a call as an RFC 3261 §12 dialog: identifiers, CSeq counters, route set, next hop."""

from __future__ import annotations

from typing import Any

from libon_tsilo.b2bua.ports import Hop
from libon_tsilo.sip.headers import NameAddr
from libon_tsilo.sip.message import Request, Response

__all__ = ["Dialog"]


class Dialog:
    """Enough dialog state for a B2BUA leg to send and check in-dialog requests."""

    def __init__(
        self,
        call_id: str,
        local: NameAddr,
        remote: NameAddr,
        remote_target: str,
        hop: Hop,
        contact: str,
        local_seq: int = 1,
        remote_seq: int | None = None,
        route_set: list[str] | None = None,
    ) -> None:
        self.call_id = call_id
        self.local = local  # carries our tag
        self.remote = remote  # carries the peer's tag (None while we wait for it)
        self.remote_target = remote_target
        self.hop = hop
        self.contact = contact
        self.local_seq = local_seq
        self.remote_seq = remote_seq
        self.route_set = route_set or []

    @property
    def local_tag(self) -> str:
        return self.local.tag or ""

    @property
    def key(self) -> tuple[str, str]:
        """How in-dialog requests are routed to us: (Call-ID, our tag)."""
        return (self.call_id, self.local_tag)

    def set_remote_from(self, resp: Response) -> None:
        """Learn the peer's tag, target and route set from a response that creates the dialog."""
        tag = resp.to.tag
        if tag:
            self.remote = self.remote.copy()
            self.remote.tag = tag
        contacts = resp.contacts
        if contacts:
            self.remote_target = str(contacts[0].uri)
        # a UAC takes the Record-Route of the response reversed (§12.1.2)
        self.route_set = list(reversed(resp.header_values("Record-Route")))

    def request(self, method: str, body: bytes = b"", content_type: str | None = None,
                seq: int | None = None) -> Request:
        """A new in-dialog request (without Via: the port stamps it)."""
        if seq is None:
            self.local_seq += 1
            seq = self.local_seq
        req = Request(method, self.remote_target)
        for route in self.route_set:
            req.add_header("Route", route)
        req.add_header("Max-Forwards", "70")
        req.add_header("From", str(self.local))
        req.add_header("To", str(self.remote))
        req.add_header("Call-ID", self.call_id)
        req.add_header("CSeq", f"{seq} {method}")
        if method in ("INVITE", "UPDATE"):
            req.add_header("Contact", self.contact)
        if body:
            req.add_header("Content-Type", content_type or "application/sdp")
            req.body = body
        return req

    def check_remote_seq(self, req: Request) -> bool:
        """§12.2.2: a CSeq lower than the last one is out of order (ACK/CANCEL reuse theirs)."""
        seq = req.cseq.seq
        if self.remote_seq is not None and seq <= self.remote_seq:
            return False
        self.remote_seq = seq
        return True

    def describe(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "local_tag": self.local_tag, "remote_tag": self.remote.tag,
                "target": self.remote_target}
