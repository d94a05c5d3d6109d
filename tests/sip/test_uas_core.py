"""UASCore: RFC 3261 §8.2 checks, OPTIONS / 405 / 501, and the RFC 4475 application-layer answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from libon_tsilo.sip.message import Request, Response, parse_message
from libon_tsilo.sip.uas_core import ALLOWED_METHODS, UASCore, sdp_in_multipart
from tests.sip.fakes import request_text

RFC4475 = Path("/work/shared/testdata/rfc4475")
SDP = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"

core = UASCore()


def _req(method: str = "INVITE", **kw) -> Request:
    msg = parse_message(request_text(method, **kw).encode())
    assert isinstance(msg, Request)
    return msg


def _check(method: str = "INVITE", **kw) -> Response | None:
    return core.check_request(_req(method, **kw))


def _load(name: str) -> Request:
    msg = parse_message((RFC4475 / f"{name}.dat").read_bytes())
    assert isinstance(msg, Request)
    return msg


def _allow(resp: Response) -> list[str]:
    return resp.header_values("Allow")


# -- method answers -----------------------------------------------------------------------------


def test_options_gets_200_with_allow_accept_supported():
    resp = core.answer(_req("OPTIONS"))
    assert resp is not None and resp.status == 200
    assert _allow(resp) == list(ALLOWED_METHODS)
    assert resp.header_values("Accept") == ["application/sdp"]
    assert resp.header_values("Supported") == ["path", "100rel", "norefersub"]
    assert resp.to.tag  # a UAS adds a To tag to its final responses
    assert resp.cseq.method == "OPTIONS" and resp.call_id == "call-1@example.net"


@pytest.mark.parametrize("method", ["SUBSCRIBE", "NOTIFY", "PUBLISH"])
def test_known_unsupported_method_gets_405_with_allow(method):
    resp = core.answer(_req(method))
    assert resp is not None and resp.status == 405
    assert _allow(resp) == list(ALLOWED_METHODS)


def test_prack_outside_a_dialog_gets_481():
    """RFC 3262 §3: a PRACK that matches no reliable provisional is a 481 (was 405: PRACK unknown)."""
    resp = core.answer(_req("PRACK"))
    assert resp is not None and resp.status == 481


def test_refer_outside_a_dialog_gets_403():
    """In-dialog REFER is a transfer (b2bua/transfer.py); outside a dialog it is refused, not 405."""
    resp = core.answer(_req("REFER"))
    assert resp is not None and resp.status == 403
    assert "REFER" in _allow(core.options_response(_req("OPTIONS")))


def test_require_norefersub_passes():
    """RFC 4488: a REFER may require that we honour Refer-Sub: false (b2bua/transfer.py does)."""
    assert _check("REFER", extra=("Require: norefersub",)) is None


def test_require_100rel_passes():
    """RFC 3262: we do reliable provisionals, so Require: 100rel is no longer a 420."""
    assert _check("BYE", extra=("Require: 100rel",)) is None


def test_unknown_method_gets_501():
    resp = core.answer(_req("FOOBAR"))
    assert resp is not None and resp.status == 501


@pytest.mark.parametrize("method", ["INVITE", "BYE", "REGISTER", "INFO", "UPDATE", "CANCEL"])
def test_routable_methods_pass(method):
    assert core.answer(_req(method)) is None


def test_server_header_when_configured():
    resp = UASCore(server="libon-tsilo/0.1").answer(_req("OPTIONS"))
    assert resp.header("Server") == "libon-tsilo/0.1"


# -- §8.2 checks, in order ----------------------------------------------------------------------


def test_well_formed_invite_passes():
    assert _check(body=SDP, extra=("Content-Type: application/sdp",)) is None


def test_cseq_method_mismatch_is_400():
    resp = _check("INVITE", cseq_method="OPTIONS")
    assert resp.status == 400 and "CSeq" in resp.reason


def test_unsupported_uri_scheme_is_416():
    assert _check(ruri="mailto:bob@example.com").status == 416


def test_tel_and_sips_uris_pass():
    assert _check(ruri="tel:+33123456789") is None
    assert _check(ruri="sips:bob@example.com") is None


def _with_max_forwards(value: str, method: str = "OPTIONS", **kw) -> Response | None:
    text = request_text(method, **kw).replace("Max-Forwards: 70", f"Max-Forwards: {value}")
    return core.check_request(parse_message(text.encode()))


def test_max_forwards_zero_is_483_and_comes_before_require():
    assert _with_max_forwards("0", extra=("Require: foo",)).status == 483
    assert _with_max_forwards("1") is None


def test_unsupported_scheme_comes_before_max_forwards():
    assert _with_max_forwards("0", ruri="im:bob@example.com").status == 416


def test_duplicate_max_forwards_is_400():
    assert _check(extra=("Max-Forwards: 0",)).status == 400


def test_unknown_require_is_420_with_unsupported():
    resp = _check("BYE", extra=("Require: path, foo", "Require: Bar"))
    assert resp.status == 420
    assert resp.header_values("Unsupported") == ["foo", "Bar"]


def test_require_path_is_supported():
    assert _check("REGISTER", extra=("Require: path",)) is None


def test_require_ignored_on_cancel_and_ack():
    assert _check("CANCEL", extra=("Require: foo",)) is None
    assert _check("ACK", extra=("Require: foo",)) is None


def test_invite_with_unknown_body_type_is_415_with_accept():
    resp = _check(body="hello", extra=("Content-Type: text/plain",))
    assert resp.status == 415 and resp.header_values("Accept") == ["application/sdp"]


def test_non_invite_body_type_is_not_checked():
    assert _check("MESSAGE", body="hello", extra=("Content-Type: text/plain",)) is None


def test_invite_with_content_encoding_is_415_with_accept_encoding():
    resp = _check(body=SDP, extra=("Content-Type: application/sdp", "Content-Encoding: gzip"))
    assert resp.status == 415 and resp.header("Accept-Encoding") == "identity"
    assert _check(body=SDP, extra=("Content-Type: application/sdp", "Content-Encoding: identity")) is None


def test_invite_body_without_content_type_is_400():
    assert _check(body=SDP).status == 400


def _multipart(inner_type: str) -> tuple[str, str]:
    body = (
        "--xyz\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        f"--xyz\r\nContent-Type: {inner_type}\r\n\r\n{SDP}\r\n--xyz--\r\n"
    )
    return body, 'Content-Type: multipart/mixed; boundary="xyz"'


def test_multipart_mixed_with_sdp_part_is_taken():
    body, ctype = _multipart("application/sdp")
    assert _check(body=body, extra=(ctype,)) is None
    assert sdp_in_multipart('multipart/mixed;boundary="xyz"', body.encode())


def test_multipart_mixed_without_sdp_part_is_415():
    body, ctype = _multipart("application/isup")
    assert _check(body=body, extra=(ctype,)).status == 415
    assert not sdp_in_multipart("multipart/mixed", body.encode())  # no boundary


def test_invite_whose_accept_excludes_sdp_is_406():
    assert _check(extra=("Accept: text/html",)).status == 406
    assert _check(extra=("Accept: text/html, application/*",)) is None


def test_missing_and_duplicate_mandatory_headers_are_400():
    text = request_text("OPTIONS").replace("Call-ID: call-1@example.net\r\n", "")
    resp = core.check_request(parse_message(text.encode()))
    assert resp.status == 400 and "Call-ID" in resp.reason
    resp = _check("OPTIONS", extra=("Call-ID: second@x",))
    assert resp.status == 400 and "duplicate Call-ID" in resp.reason


def test_unparseable_header_is_400_naming_it():
    text = request_text("OPTIONS").replace("CSeq: 1 OPTIONS", "CSeq: x OPTIONS")
    resp = core.check_request(parse_message(text.encode()))
    assert resp.status == 400 and "\n" not in resp.reason


# -- RFC 4475 §3.3 application-layer messages ----------------------------------------------------


@pytest.mark.parametrize(
    "name, status",
    [
        ("insuf", 400),  # 3.3.1 missing To, From, Call-ID (and Max-Forwards)
        ("unkscm", 416),  # 3.3.2 unknown Request-URI scheme
        ("novelsc", 416),  # 3.3.3 novel scheme soap.beep
        ("bext01", 420),  # 3.3.5 unknown Require
        ("invut", 415),  # 3.3.6 unknown body type
        ("mcl01", 400),  # 3.3.8 several Content-Length
        ("multi01", 400),  # 3.3.9 several To, From, Call-ID, CSeq
        ("zeromf", 483),  # 3.3.12 Max-Forwards 0 (we act as a proxy towards the callee)
        ("sdp01", 406),  # 3.3.15 Accept excludes the SDP our answer would carry
    ],
)
def test_rfc4475_application_layer_answers(name, status):
    resp = core.answer(_load(name))
    assert resp is not None and resp.status == status, resp and resp.reason
    assert parse_message(resp.to_bytes()).status == status  # and it serializes


def test_rfc4475_bext01_lists_both_unknown_tags():
    resp = core.check_request(_load("bext01"))
    assert resp.header_values("Unsupported") == ["nothingSupportsThis", "nothingSupportsThisEither"]


def test_rfc4475_invut_415_carries_accept():
    assert core.check_request(_load("invut")).header_values("Accept") == ["application/sdp"]


@pytest.mark.parametrize(
    "name",
    # registrations: the generic checks pass, the registrar decides (401 regaut01, 400 unksm2 ...)
    ["unksm2", "regaut01", "cparam01", "cparam02", "regescrt", "inv2543", "wsinv", "esc01", "escnull",
     "esc02", "lwsdisp", "longreq", "dblreq", "semiuri", "transports"],
)
def test_rfc4475_messages_the_generic_checks_let_through(name):
    assert core.check_request(_load(name)) is None


def test_rfc4475_intmeth_unknown_method_is_501():
    assert core.answer(_load("intmeth")).status == 501


def test_rfc4475_mpart01_message_with_multipart_body_passes_the_checks():
    assert core.check_request(_load("mpart01")) is None


def test_message_outside_a_dialog_is_405_and_never_in_allow():
    """Issue 12 item 12: MESSAGE has no handler outside a call yet; Allow must not promise it."""
    refused = core.answer(_req("MESSAGE"))
    assert refused is not None and refused.status == 405
    assert "MESSAGE" not in _allow(refused)
    assert "MESSAGE" not in _allow(core.answer(_req("OPTIONS")))


def test_require_of_a_handlers_extension_passes_for_that_method_only() -> None:
    from libon_tsilo.sip.router import Router

    uas = UASCore()
    Router(uas).route("REGISTER", lambda *a: None, extensions=("outbound", "path"))
    register = _req("REGISTER", extra=("Require: outbound",))
    assert uas.check_request(register) is None
    options = uas.check_request(_req("OPTIONS", extra=("Require: outbound",)))
    assert options is not None and options.status == 420
