"""One side of a call as an RFC 3261 §12 dialog: identifiers, CSeq counters, route set, next hop."""

from __future__ import annotations

from typing import Any

from libon_tsilo.b2bua.ports import Hop
from libon_tsilo.sip.headers import NameAddr
from libon_tsilo.sip.message import Request, Response

__all__ = ["Dialog"]


class Dialog:
    """Enough dialog state for a B2BUA leg to send and check in-dialog requests.

    `local` and `remote` may be given as header text (the caller's From and To, as the A-leg does):
    they are parsed on first read. A parked call may wait long and most calls never read them
    before their BYE, so the text (a few dozen bytes) stands for two NameAddr/URI trees (~1 KB).
    """

    __slots__ = ("call_id", "_local", "_remote", "_local_tag", "remote_target", "hop", "contact",
                 "local_seq", "remote_seq", "route_set", "_local_text", "_remote_text")

    def __init__(
        self,
        call_id: str,
        local: NameAddr | str,
        remote: NameAddr | str,
        remote_target: str,
        hop: Hop,
        contact: str,
        local_seq: int = 1,
        remote_seq: int | None = None,
        route_set: list[str] | None = None,
        local_tag: str | None = None,
    ) -> None:
        """`local_tag`: our tag, required when `local` is text (it keys the dialog table at once)."""
        self.call_id = call_id
        self._local = local  # carries our tag
        self._remote = remote  # carries the peer's tag (None while we wait for it)
        self._local_tag = local_tag if isinstance(local, str) else None
        self.remote_target = remote_target
        self.hop = hop
        self.contact = contact
        self.local_seq = local_seq
        self.remote_seq = remote_seq
        self.route_set = route_set or []
        # From and To as written on the requests we send, made once (each request wrote them anew)
        self._local_text: str | None = None
        self._remote_text: str | None = None

    @property
    def local(self) -> NameAddr:
        value = self._local
        if isinstance(value, str):
            value = self._local = NameAddr.parse(value)
        return value

    @local.setter
    def local(self, value: NameAddr) -> None:
        self._local = value
        self._local_text = None

    @property
    def remote(self) -> NameAddr:
        value = self._remote
        if isinstance(value, str):
            value = self._remote = NameAddr.parse(value)
        return value

    @remote.setter
    def remote(self, value: NameAddr) -> None:
        self._remote = value
        self._remote_text = None

    @property
    def local_text(self) -> str:
        """Our side as the From of the requests we send (serialized once, until `local` is set)."""
        text = self._local_text
        if text is None:
            text = self._local_text = str(self.local)
        return text

    @property
    def remote_text(self) -> str:
        """The peer as the To of the requests we send (serialized once, until `remote` is set)."""
        text = self._remote_text
        if text is None:
            text = self._remote_text = str(self.remote)
        return text

    @property
    def local_tag(self) -> str:
        if isinstance(self._local, str):
            return self._local_tag or ""
        return self._local.tag or ""

    @property
    def key(self) -> tuple[str, str]:
        """How in-dialog requests are routed to us: (Call-ID, our tag)."""
        return (self.call_id, self.local_tag)

    def set_remote_from(self, resp: Response) -> None:
        """Learn the peer's tag, target and route set from a response that creates the dialog."""
        tag = resp.to.tag
        if tag:
            remote = self.remote.copy()
            remote.tag = tag
            self.remote = remote  # after the change: the setter drops the text written before
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
        req.add_header("From", self.local_text)
        req.add_header("To", self.remote_text)
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
