"""Hop: where a leg's next message goes; built for every leg, so its constructor is native when
the module is compiled (a dataclass's generated __init__ stays interpreted under mypyc)."""

from __future__ import annotations

import pytest

from libon_tsilo.b2bua import ports
from libon_tsilo.b2bua.ports import Hop


def test_a_hop_is_a_value() -> None:
    hop = Hop("udp", "10.0.0.1", 5060)
    assert (hop.transport, hop.host, hop.port, hop.flow_id, hop.local) == ("udp", "10.0.0.1", 5060, None, None)
    same = Hop("udp", "10.0.0.1", 5060, None, None)
    assert hop == same and hash(hop) == hash(same) and len({hop, same}) == 1
    assert Hop("tcp", "h", 5, "f#1", ("10.9.0.1", 5070)) != Hop("tcp", "h", 5, "f#1")
    assert repr(hop).startswith("Hop(transport='udp'")


def test_hop_is_built_natively_when_compiled() -> None:
    if not (ports.__file__ or "").endswith(".so"):
        pytest.skip("pure-Python install: nothing compiled")
    # the generated __init__ is a Python function (with a code object); a written-out one, compiled,
    # is not: two per late-fork call, ~7,000 instructions each when interpreted
    assert not hasattr(Hop.__init__, "__code__")
