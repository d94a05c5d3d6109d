"""A dialog built from header text (the A-leg's From and To) parses them only when first read."""

from __future__ import annotations

from libon_tsilo.b2bua.dialog import Dialog
from libon_tsilo.b2bua.ports import Hop
from libon_tsilo.sip.headers import NameAddr

TO = '"Bob" <sip:bob@example.com;user=phone>;x=1'
FROM = "<sip:alice@example.com>;tag=a1"


def _dialog() -> Dialog:
    return Dialog("c1", f"{TO};tag=t1", FROM, "sip:alice@10.0.0.1", Hop("udp", "10.0.0.1", 5060),
                  "<sip:b2bua@10.0.0.2>", remote_seq=1, local_tag="t1")


def test_text_dialog_keys_without_parsing_and_parses_like_a_copy() -> None:
    d = _dialog()
    assert d.key == ("c1", "t1")
    assert isinstance(d._local, str) and isinstance(d._remote, str)  # nothing parsed yet
    expected_local = NameAddr.parse(TO).copy()
    expected_local.tag = "t1"
    bye = d.request("BYE")
    assert bye.header("From") == str(expected_local)
    assert bye.header("To") == str(NameAddr.parse(FROM))
    assert d.local.tag == "t1" and d.remote.tag == "a1" and d.local_tag == "t1"
    assert d.describe()["remote_tag"] == "a1"


def test_from_and_to_are_written_once_and_follow_a_new_peer_tag() -> None:
    from libon_tsilo.sip.message import make_response

    d = Dialog("c2", NameAddr.parse("<sip:alice@example.com>;tag=l1"), NameAddr.parse("<sip:bob@10.0.0.2>"),
               "sip:bob@10.0.0.2", Hop("udp", "10.0.0.2", 5060), "<sip:b2bua@10.0.0.1>")
    ack, bye = d.request("ACK", seq=1), d.request("BYE")
    # serialized once for the dialog, not once per request
    assert ack.header("From") is bye.header("From") is d.local_text
    assert ack.header("To") is bye.header("To") is d.remote_text
    assert bye.header("To") == "<sip:bob@10.0.0.2>"
    invite = d.request("INVITE")
    invite.add_header("Via", "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1")
    d.set_remote_from(make_response(invite, 200, to_tag="r9"))
    assert d.request("BYE").header("To") == "<sip:bob@10.0.0.2>;tag=r9"  # the text follows the tag
    d.local = NameAddr.parse("<sip:carol@example.com>;tag=l2")
    assert d.request("BYE").header("From") == "<sip:carol@example.com>;tag=l2"
