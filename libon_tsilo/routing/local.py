"""Is a URI for one of our domains? The ``is_local`` check the call, routing and messaging layers are
given, as a compiled callable (setup.py): a lambda built in ops/service.py was an interpreted frame on
every late-fork call (issue 15)."""

from __future__ import annotations

from libon_tsilo.sip.hostnames import HostSet
from libon_tsilo.sip.uri import URI

__all__ = ["LocalDomains"]


class LocalDomains:
    """``LocalDomains(hosts)(uri)``: True when ``uri``'s host is one of ``hosts`` (canonical compare)."""

    def __init__(self, hosts: HostSet) -> None:
        self.hosts = hosts

    def __call__(self, uri: URI) -> bool:
        return uri.host in self.hosts
