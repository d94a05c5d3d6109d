"""ul.dump / ts.dump never fail on bytes that are not UTF-8: the parser keeps them as surrogates
(surrogateescape), and the admin API answers them as \\xNN over its real resource (DummyRequest)."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry

from libon_tsilo.ops.admin import AdminResource
from libon_tsilo.ops.rpc import Rpc, jsonable, printable
from tests.ops.test_admin import dummy
from tests.fakes.calls import FakeCall
from tests.ops.test_rpc import binding, build

ODD_URI = b"sip:m\xff@127.0.0.1:5062".decode("utf-8", "surrogateescape")  # from "Contact: <sip:m\xff@...>"
ODD_AOR = "b\udcff"  # from "To: <sip:b%FF@...>" (aor keys are unescaped)


def _get(res: AdminResource, path: bytes) -> tuple[int, dict]:
    req = dummy(path, "127.0.0.1")
    body = res.render(req)
    return req.responseCode, json.loads(body)


def test_dumps_answer_200_with_odd_bytes_shown_as_escapes(tmp_path):
    root, clock = build(tmp_path=tmp_path)
    parts = root.parts
    parts.location.add_or_update(binding("alice", ODD_URI, clock, user_agent="Ph\udce9ne"))
    parts.location.add_or_update(binding(ODD_AOR, "sip:b@127.0.0.1", clock))
    parts.silo.store(FakeCall("c\udcff1", ODD_AOR))
    res = AdminResource(Rpc(parts, root), CollectorRegistry(auto_describe=False), token="")

    status, body = _get(res, b"/rpc/ul.dump")
    assert status == 200, body
    aors = body["result"]["aors"]
    assert set(aors) == {"alice", "b\\xff"}
    [alice] = aors["alice"]
    assert alice["contact_uri"] == "sip:m\\xff@127.0.0.1:5062" and alice["user_agent"] == "Ph\\xe9ne"
    assert alice["key"] == "uri:sip:m\\xff@127.0.0.1:5062"

    status, body = _get(res, b"/rpc/ts.dump")
    assert status == 200, body
    assert body["result"]["aors"] == {"b\\xff": [{"call_id": "c\\xff1", "aor": "b\\xff", "state": "parked",
                                                  "branches": 0}]}


def test_ul_rm_takes_the_key_as_ul_dump_shows_it(tmp_path):
    root, clock = build(tmp_path=tmp_path)
    parts = root.parts
    parts.location.add_or_update(binding("alice", ODD_URI, clock))
    rpc = Rpc(parts, root)
    shown = rpc.call("ul.dump")["aors"]["alice"][0]["key"]
    assert rpc.call("ul.rm", {"aor": "alice", "key": shown})["removed"] == ["uri:sip:m\\xff@127.0.0.1:5062"]
    assert parts.location.all_count() == 0


def test_printable_keeps_valid_text_and_escapes_the_rest():
    assert printable("Zoë ☎") == "Zoë ☎"
    assert printable("a\udcffb") == "a\\xffb"
    assert printable("\ud800") == "\\ud800"  # a lone surrogate that stands for no byte
    assert jsonable({"k\udcff": ["v\udcfe", ("t\udcfd",)]}) == {"k\\xff": ["v\\xfe", ["t\\xfd"]]}
