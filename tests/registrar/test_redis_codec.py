"""registrar/redis_codec.py: the bindings' JSON in Redis and the change messages, by orjson.

What an earlier version wrote (``json.dumps``: spaces, ``\\uXXXX`` escapes) and what this one writes
(compact, UTF-8) must each be readable by the other: a rolling upgrade runs both on one Redis.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import redis

from libon_tsilo.registrar import redis_codec
from libon_tsilo.registrar.binding import Binding
from libon_tsilo.registrar.redis_store import binding_redis_key
from tests.redis_server import RedisServer
from tests.registrar.helpers import make_binding
from tests.registrar.test_redis_store import Node, _node, nodes, until  # noqa: F401  (fixture)


def _full() -> Binding:
    return make_binding(
        aor="sip:zoë@example.com", uri="sip:zoë@192.0.2.1:5062", expires_at=300.0, q=0.5,
        instance="<urn:uuid:1>", reg_id=1, flow_id="tcp#7", flow_live=True, received=("tcp", "192.0.2.1", 4000),
        path=["<sip:p;lr>"], user_agent="Phöne/1 \"quoted\"", pn_provider="apns", pn_prid="tok",
        pn_param="t.b.voip", pnsreg=True, node="a",
    )


def test_a_binding_is_compact_utf8_json_that_the_stdlib_reads_too() -> None:
    data = _full().to_dict()
    value = redis_codec.dumps(data)
    assert b'", "' not in value and b'": ' not in value  # compact: json.dumps wrote ", " and ": "
    assert "zoë".encode() in value  # UTF-8, not \u00eb
    assert json.loads(value) == data  # what an earlier version's json.loads makes of it
    assert redis_codec.loads(value) == data


def test_what_an_earlier_version_wrote_is_read() -> None:
    data = _full().to_dict()
    assert redis_codec.loads(json.dumps(data).encode("ascii")) == data


def test_lone_surrogates_go_through_json_both_ways() -> None:
    # non-UTF-8 bytes of a SIP header, decoded with surrogateescape: orjson refuses them
    odd = b"sip:m\xff@h".decode("utf-8", "surrogateescape")
    value = redis_codec.dumps({"contact_uri": odd, "user_agent": "ë"})
    assert value.isascii() and b"\\udcff" in value
    assert redis_codec.loads(value) == {"contact_uri": odd, "user_agent": "ë"}


def test_what_is_not_json_raises_value_error() -> None:
    with pytest.raises(ValueError):
        redis_codec.loads(b"x {not json")


@pytest_twisted.ensureDeferred
async def test_the_value_in_redis_and_the_change_message_are_the_compact_form(
        redis_server: RedisServer, nodes: list[Node]) -> None:  # noqa: F811  (the fixture)
    a, b = _node(nodes, redis_server, "a"), _node(nodes, redis_server, "b")
    await a.start()
    await b.start()
    odd = make_binding(aor="sip:\udcffodd@example.com", uri="sip:o@192.0.2.9", expires_at=300.0)
    full = _full()
    await a.write(full)
    await a.write(odd)
    value = redis.Redis.from_url(redis_server.url).get(binding_redis_key(b"test:", full.aor, full.key))
    assert value is not None and "zoë".encode() in value and b'", "' not in value
    # the other replica got both from the change messages, the surrogate one through json
    await until(lambda: b.store.get(full.aor, full.key) and b.store.get(odd.aor, odd.key), "both applied")
    assert b.store.get(full.aor, full.key).to_dict() == full.to_dict()  # type: ignore[union-attr]
    assert b.store.get(odd.aor, odd.key).to_dict() == odd.to_dict()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_the_value_and_the_message_leave_out_the_fields_at_their_defaults(
        redis_server: RedisServer, nodes: list[Node]) -> None:  # noqa: F811  (the fixture)
    # a device without push, instance or Path: about half its fields at their defaults, which
    # every node would otherwise decode (Binding.to_compact_dict; an earlier version reads it too)
    a, b = _node(nodes, redis_server, "a"), _node(nodes, redis_server, "b")
    await a.start()
    await b.start()
    plain = make_binding(aor="sip:plain@example.com", uri="sip:p@192.0.2.8", expires_at=300.0, node="a")
    await a.write(plain)
    value = redis.Redis.from_url(redis_server.url).get(binding_redis_key(b"test:", plain.aor, plain.key))
    assert value is not None and b"null" not in value and b"pn_provider" not in value
    assert json.loads(value) == plain.to_compact_dict()
    await until(lambda: b.store.get(plain.aor, plain.key), "applied")
    assert b.store.get(plain.aor, plain.key).to_dict() == plain.to_dict()  # type: ignore[union-attr]
