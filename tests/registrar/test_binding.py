"""Binding identity keys, remaining time, (de)serialization."""

from __future__ import annotations

import pytest

from libon_tsilo.registrar.binding import Binding, binding_key
from tests.registrar.helpers import make_binding


def test_key_precedence() -> None:
    assert binding_key("sip:a@h", "<urn:uuid:1>", 2, "apns", "t", None) == "instance:<urn:uuid:1>;reg-id=2"
    assert binding_key("sip:a@h", "<urn:uuid:1>", None, None, None, None) == "instance:<urn:uuid:1>"
    assert binding_key("sip:a@h", None, None, "apns", "t", "p") == "pn:apns|t|p"
    assert binding_key("sip:a@h", None, None, "apns", None, None) == "uri:sip:a@h"
    assert make_binding(uri="sip:x@y").key == "uri:sip:x@y"


def test_remaining_rounds_up_and_contact_header() -> None:
    b = make_binding(expires_at=100.0)
    assert b.remaining(99.2) == 1 and b.remaining(100.0) == 0 and b.remaining(150.0) == 0
    assert b.expired(100.0) and not b.expired(99.9)
    assert b.contact_header(40.0) == "<sip:alice@192.0.2.10:5060>;expires=60"


def test_dict_round_trip_ignores_unknown_keys() -> None:
    b = make_binding(received=("tcp", "h", 5), path=["<sip:p;lr>"], pn_provider="fcm", pn_prid="x")
    data = b.to_dict()
    data["from_the_future"] = 1
    assert Binding.from_dict(data) == b
    assert not make_binding().push_capable and b.push_capable


def test_from_dict_takes_every_field_and_the_defaults_of_an_older_version() -> None:
    # from_dict passes the fields by position (a native call): each must land in its own field
    full = make_binding(received=("tcp", "h", 5), path=["<sip:p;lr>"], instance='"<urn:x>"', reg_id=1,
                        pn_provider="fcm", pn_prid="x", pn_param="p", pnsreg=True, user_agent="UA",
                        flow_id="tcp#1", flow_live=True, q=0.5, node="n1")
    assert Binding.from_dict(full.to_dict()) == full
    assert Binding.from_dict(full.to_dict()).received == ("tcp", "h", 5)  # a tuple again, not JSON's list
    old = make_binding().to_dict()
    for name in ("node", "pnsreg", "key", "flow_live", "path", "q"):  # a writer of an earlier version
        del old[name]
    assert Binding.from_dict(old) == make_binding()
    del old["cseq"]
    with pytest.raises(KeyError):  # the stores skip such a row or change message and log it
        Binding.from_dict(old)


def test_to_dict_is_a_snapshot_like_asdict() -> None:
    from dataclasses import asdict

    b = make_binding(received=("udp", "h", 5), path=["<sip:p;lr>"], instance='"<urn:x>"', reg_id=1)
    data = b.to_dict()
    expected = asdict(b)
    expected["received"] = ["udp", "h", 5]
    assert data == expected and list(data) == list(expected)
    data["path"].append("<sip:q;lr>")
    assert b.path == ["<sip:p;lr>"]  # the snapshot shares no list with the binding


def test_written_out_init_is_the_dataclass_one() -> None:
    # Binding.__init__ is written out (a native one when compiled with mypyc): every field, in field
    # order, with the field's default, as @dataclass would generate it
    from dataclasses import MISSING, fields

    full = make_binding(received=("tcp", "h", 5), path=["<sip:p;lr>"], instance='"<urn:x>"', reg_id=1,
                        pn_provider="fcm", pn_prid="x", pn_param="p", pnsreg=True, user_agent="UA",
                        flow_id="tcp#1", flow_live=True, q=0.5, node="n1")
    assert Binding(*[getattr(full, f.name) for f in fields(Binding)]) == full
    minimal = Binding("sip:a@h", "sip:a@d", "<sip:a@d>", 10.0, 1.0, "c", 1)
    for f in fields(Binding):
        if f.name == "key":
            assert minimal.key == binding_key("sip:a@d", None, None, None, None, None)
        elif f.default is not MISSING:
            assert getattr(minimal, f.name) == f.default, f.name
        elif f.default_factory is not MISSING:
            assert getattr(minimal, f.name) == f.default_factory(), f.name


def _first_redis_reader(data: dict) -> Binding:
    """Binding.from_dict as the first version that wrote bindings to Redis had it (b1adeff): the
    keys it knows, passed to the dataclass with its own defaults for the rest."""
    from dataclasses import fields

    names = {f.name for f in fields(Binding)}
    kwargs = {k: v for k, v in data.items() if k in names}
    if kwargs.get("received") is not None:
        transport, host, port = kwargs["received"]
        kwargs["received"] = (str(transport), str(host), int(port))
    kwargs["path"] = list(kwargs.get("path") or [])
    return Binding(**kwargs)


def test_the_compact_dict_leaves_out_only_the_fields_at_their_defaults() -> None:
    # what the Redis store writes: every reader, this version's and the earlier ones', gets the
    # same binding back
    from dataclasses import MISSING, fields

    full = make_binding(received=("tcp", "h", 5), path=["<sip:p;lr>"], instance='"<urn:x>"', reg_id=1,
                        pn_provider="fcm", pn_prid="x", pn_param="p", pnsreg=True, user_agent="UA",
                        flow_id="tcp#1", flow_live=True, q=0.5, node="n1")
    assert full.to_compact_dict() == full.to_dict()
    minimal = make_binding()
    compact = minimal.to_compact_dict()
    assert set(compact) == {"aor", "contact_uri", "contact", "expires_at", "registered_at", "call_id", "cseq",
                            "key"}
    for f in fields(Binding):  # a field added later must be in the compact form, or have a default
        if f.name not in compact:
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            assert getattr(minimal, f.name) == default, f.name
    for binding in (full, minimal, make_binding(q=1.5, reg_id=0, received=("udp", "h", 9), node="b")):
        data = binding.to_compact_dict()
        assert Binding.from_dict(data) == binding
        assert _first_redis_reader(data) == binding
        if binding.path:
            data["path"].append("<sip:q;lr>")
            assert binding.path == ["<sip:p;lr>"]  # a snapshot, as to_dict
