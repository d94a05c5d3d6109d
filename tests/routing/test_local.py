"""routing/local.py: the compiled `is_local` check ops/service.py gives the call and routing layers
(issue 15: the lambda it replaces was an interpreted call on every late-fork call)."""

from __future__ import annotations

from twisted.internet.task import Clock

from libon_tsilo.ops.config import config_from_dict
from libon_tsilo.ops.service import make_service
from libon_tsilo.routing.local import LocalDomains
from libon_tsilo.sip.hostnames import HostSet
from libon_tsilo.sip.uri import URI


def test_a_uri_is_local_when_its_host_is_one_of_our_domains() -> None:
    is_local = LocalDomains(HostSet(["Example.COM", "192.0.2.10"]))
    assert is_local(URI.parse("sip:bob@example.com"))
    assert is_local(URI.parse("sip:bob@EXAMPLE.com.:5070"))  # canonical compare, as HostSet does
    assert is_local(URI.parse("sips:+33123456789@192.0.2.10;user=phone"))
    assert not is_local(URI.parse("sip:bob@example.org"))
    assert not is_local(URI.parse("sip:bob@192.0.2.11"))


def test_the_service_gives_the_call_and_routing_layers_the_compiled_check(tmp_path) -> None:
    cfg = config_from_dict({"location": {"backend": "memory"}, "sip": {"domains": ["example.com"]}},
                           base_dir=tmp_path)
    calls = make_service(cfg, clock=Clock()).parts.b2bua
    for is_local in (calls.is_local, calls.calls_out.destinations.is_local):
        assert isinstance(is_local, LocalDomains)
        assert is_local(URI.parse("sip:bob@example.com")) and not is_local(URI.parse("sip:bob@example.org"))
