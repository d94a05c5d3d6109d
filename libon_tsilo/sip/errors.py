"""Errors raised by the SIP message layer."""

from __future__ import annotations


class ParseError(ValueError):
    """A SIP message, header or URI could not be parsed.

    ``reason`` is short human text; the server puts it in the 400 reason phrase, so it must stay on one
    line. ``status`` is the response code a server should answer with (400, or 505 for a bad version).
    """

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason.replace("\r", " ").replace("\n", " ")
        self.status = status
