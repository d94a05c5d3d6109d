"""The HTTP admin API (ops/admin.py): real HTTP over loopback on an OS-picked port, plus a few
DummyRequest cases for what a loopback socket cannot show (a non-loopback client)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.logger import capturedLogs
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyRequest

from libon_tsilo.ops.admin import AdminResource, AdminService, is_loopback
from libon_tsilo.ops.metrics import make_registry
from libon_tsilo.ops.rpc import Rpc
from tests.fakes.calls import FakeCall
from tests.ops.test_rpc import binding, build

TOKEN = "s3cret-token-value"

# readBody over the asyncio reactor's TCP transport warns about abortConnection; not our concern
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")


@pytest.fixture
def admin(tmp_path):
    root, clock = build(tmp_path=tmp_path)
    parts = root.parts
    rpc = Rpc(parts, root)
    resource = AdminResource(rpc, make_registry(parts, None), token=TOKEN)
    svc = AdminService("tcp:0:interface=127.0.0.1", resource, reactor=reactor)
    svc.startService()
    pytest_twisted.blockon(svc.listening)
    yield svc, parts, clock
    pytest_twisted.blockon(svc.stopService())


async def http(
    svc: AdminService,
    method: str,
    path: str,
    token: str | None = TOKEN,
    body: bytes | None = None,
    ctype: str | None = None,
) -> tuple[int, dict[str, list[str]], bytes]:
    port = svc.port.getHost().port
    headers = Headers()
    if token is not None:
        headers.addRawHeader(b"authorization", f"Bearer {token}".encode())
    if ctype is not None:
        headers.addRawHeader(b"content-type", ctype.encode())
    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    resp = await Agent(reactor).request(
        method.encode(), f"http://127.0.0.1:{port}{path}".encode(), headers, producer
    )
    data = await readBody(resp)
    raw = {k.decode().lower(): [v.decode() for v in vs] for k, vs in resp.headers.getAllRawHeaders()}
    return resp.code, raw, data


def js(data: bytes) -> Any:
    return json.loads(data)


@pytest_twisted.ensureDeferred
async def test_ts_dump_and_lookup_over_http(admin):
    svc, parts, _clock = admin
    parts.silo.store(FakeCall("c1@x", "alice"))
    code, headers, body = await http(svc, "GET", "/rpc/ts.dump")
    assert code == 200
    assert headers["content-type"][0].startswith("application/json")
    assert js(body)["result"]["aors"]["alice"][0]["call_id"] == "c1@x"
    code, _, body = await http(svc, "GET", "/rpc/ts.lookup?aor=sip%3Aalice%40127.0.0.1")
    assert code == 200 and js(body)["result"]["aor"] == "alice"
    code, _, body = await http(svc, "GET", "/rpc/ts.lookup?aor=bob")
    assert code == 404
    assert js(body) == {"error": {"code": 404, "message": "RURI not found in tsilo table"}}


@pytest_twisted.ensureDeferred
async def test_ts_append_to_over_http_needs_post(admin):
    svc, parts, clock = admin
    call = FakeCall("c1@x", "alice")
    parts.silo.store(call)
    parts.location.add_or_update(binding("bob", "sip:bob@10.0.0.2:5060", clock))
    code, headers, _ = await http(svc, "GET", "/rpc/ts.append_to?call_id=c1%40x&aor=bob")
    assert code == 405 and headers["allow"] == ["POST"]
    code, _, body = await http(svc, "POST", "/rpc/ts.append_to", body=b'{"call_id": "c1@x", "aor": "bob"}',
                               ctype="application/json")
    assert code == 200, body
    assert js(body)["result"] == {"call_id": "c1@x", "aor": "bob", "added": 1}
    assert [b.contact_uri for b in call.branches] == ["sip:bob@10.0.0.2:5060"]


@pytest_twisted.ensureDeferred
async def test_rpc_list_stats_health(admin):
    svc, _parts, _clock = admin
    code, _, body = await http(svc, "GET", "/rpc")
    assert code == 200 and js(body)["result"]["ul.rm"]["http"] == "POST"
    code, _, body = await http(svc, "GET", "/rpc/stats")
    assert code == 200 and "tsilo" in js(body)["result"]
    code, _, body = await http(svc, "GET", "/rpc/health")
    assert code == 200 and js(body)["result"]["status"] == "ok"


@pytest_twisted.ensureDeferred
async def test_health_is_503_while_draining(admin):
    svc, parts, _clock = admin
    parts.b2bua.shutdown_parked(480)
    code, _, body = await http(svc, "GET", "/rpc/health")
    assert code == 503 and js(body)["result"]["status"] == "draining"


@pytest_twisted.ensureDeferred
async def test_auth_is_required_for_rpc(admin):
    svc, _parts, _clock = admin
    for token in (None, "wrong", TOKEN + "x", ""):
        code, headers, body = await http(svc, "GET", "/rpc/ts.dump", token=token)
        assert code == 401, token
        assert headers["www-authenticate"] == ['Bearer realm="libon-tsilo"']
        assert js(body)["error"]["code"] == 401
        assert b"Traceback" not in body


@pytest_twisted.ensureDeferred
async def test_ul_rm_needs_post_and_takes_json_or_the_query_string(admin):
    svc, parts, clock = admin
    parts.location.add_or_update(binding("alice", "sip:alice@10.0.0.1:5060", clock))
    parts.location.add_or_update(binding("alice", "sip:alice@10.0.0.2:5060", clock))
    code, headers, body = await http(svc, "GET", "/rpc/ul.rm?aor=alice")
    assert code == 405 and headers["allow"] == ["POST"]
    assert parts.location.all_count() == 2
    code, _, body = await http(svc, "POST", "/rpc/ul.rm?aor=alice&contact=sip%3Aalice%4010.0.0.1%3A5060")
    assert code == 200, body
    assert js(body)["result"]["removed"] == ["uri:sip:alice@10.0.0.1:5060"]
    code, _, body = await http(
        svc,
        "POST",
        "/rpc/ul.rm",
        body=json.dumps({"aor": "alice", "key": "uri:sip:alice@10.0.0.2:5060"}).encode(),
        ctype="application/json",
    )
    assert code == 200, body
    assert parts.location.all_count() == 0
    code, _, body = await http(svc, "GET", "/rpc/ul.lookup?aor=alice")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_bad_requests_get_json_errors(admin):
    svc, _parts, _clock = admin
    cases = [
        ("GET", "/nope", None, None, 404),
        ("GET", "/rpc/ts.nope", None, None, 404),
        ("GET", "/rpc/ts.dump/extra", None, None, 404),
        ("GET", "/rpc/ts.lookup", None, None, 400),
        ("GET", "/rpc/ts.dump?x=1", None, None, 400),
        ("DELETE", "/rpc/ts.dump", None, None, 405),
        ("POST", "/metrics", None, None, 405),
        ("POST", "/rpc/ul.rm", b"{not json", "application/json", 400),
        ("POST", "/rpc/ul.rm", b"[1, 2]", "application/json", 400),
        ("POST", "/rpc/ul.rm", b"\xff\xfe", "application/json", 400),
        ("POST", "/rpc/ul.rm", b"\xff\xfe", "application/x-www-form-urlencoded", 415),
        ("POST", "/rpc/ul.rm", b"aor=x", "text/xml", 415),
        ("POST", "/rpc/ul.rm", b"a" * (70 * 1024), "application/x-www-form-urlencoded", 413),
    ]
    for method, path, body, ctype, status in cases:
        code, headers, data = await http(svc, method, path, body=body, ctype=ctype)
        assert code == status, (method, path, data)
        assert headers["content-type"][0].startswith("application/json"), path
        err = js(data)["error"]
        assert err["code"] == status and err["message"]
        assert b"Traceback" not in data


@pytest_twisted.ensureDeferred
async def test_a_crashing_rpc_is_a_500_without_traceback(admin):
    svc, parts, _clock = admin

    class Broken:
        def dump(self):
            raise RuntimeError("secret internals")

    parts.silo = Broken()
    with capturedLogs() as events:
        code, _, data = await http(svc, "GET", "/rpc/ts.dump")
    assert code == 500
    assert js(data)["error"]["code"] == 500
    assert b"secret internals" not in data and b"Traceback" not in data
    # the failure is logged for the operator, not swallowed
    assert any(e.get("log_failure") is not None and "admin API" in e.get("log_format", "") for e in events)


@pytest_twisted.ensureDeferred
async def test_metrics_from_loopback_need_no_token(admin):
    svc, parts, clock = admin
    parts.location.add_or_update(binding("alice", "sip:alice@10.0.0.1:5060", clock))
    code, headers, body = await http(svc, "GET", "/metrics", token=None)
    assert code == 200
    assert headers["content-type"][0].startswith("text/plain; version=0.0.4")
    assert b"libon_tsilo_bindings 1.0" in body
    assert b"libon_tsilo_tsilo_stored_ruris" in body


def dummy(path: bytes, client: str, token: str | None = None, method: bytes = b"GET") -> DummyRequest:
    req = DummyRequest(path.lstrip(b"/").split(b"/"))
    req.method = method
    req.path = path
    req.uri = path
    req.client = IPv4Address("TCP", client, 40000)
    if token is not None:
        req.requestHeaders.addRawHeader(b"authorization", f"Bearer {token}".encode())
    return req


def resource(tmp_path, token: str = TOKEN, metrics_public: bool = False) -> AdminResource:
    root, _clock = build(tmp_path=tmp_path)
    return AdminResource(
        Rpc(root.parts, root),
        make_registry(root.parts, None),
        token=token,
        metrics_public=metrics_public,
    )


def test_metrics_from_elsewhere_need_the_token_unless_public(tmp_path):
    res = resource(tmp_path)
    req = dummy(b"/metrics", "10.1.2.3")
    res.render(req)
    assert req.responseCode == 401
    req = dummy(b"/metrics", "10.1.2.3", token=TOKEN)
    body = res.render(req)
    assert req.responseCode == 200 and b"libon_tsilo_bindings" in body
    public = resource(tmp_path, metrics_public=True)
    req = dummy(b"/metrics", "10.1.2.3")
    public.render(req)
    assert req.responseCode == 200


def test_without_a_token_rpc_is_loopback_only(tmp_path):
    res = resource(tmp_path, token="")
    req = dummy(b"/rpc/health", "10.1.2.3")
    res.render(req)
    assert req.responseCode == 401
    req = dummy(b"/rpc/health", "10.1.2.3", token="")
    res.render(req)
    assert req.responseCode == 401  # an empty bearer never matches an unset token
    req = dummy(b"/rpc/health", "127.0.0.1")
    res.render(req)
    assert req.responseCode == 200


def test_token_from_elsewhere_works(tmp_path):
    res = resource(tmp_path)
    req = dummy(b"/rpc/stats", "192.0.2.7", token=TOKEN)
    body = res.render(req)
    assert req.responseCode == 200 and js(body)["result"]["uptime"] == 0


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("127.9.9.9") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1") and not is_loopback("::ffff:10.0.0.1")
    assert not is_loopback(None) and not is_loopback("localhost") and not is_loopback("")


@pytest_twisted.ensureDeferred
async def test_access_log_rpc_at_info_metrics_at_debug(admin):
    svc, _parts, _clock = admin
    with capturedLogs() as events:
        await http(svc, "GET", "/rpc/health")
        await http(svc, "GET", "/metrics", token=None)
    access = [e for e in events if e.get("log_format", "").startswith("admin API: {client}")]
    assert [(e["path"], e["status"], e["log_level"].name) for e in access] == [
        ("/rpc/health", 200, "info"),
        ("/metrics", 200, "debug"),
    ]
    assert not any(e.get("log_namespace") == "twisted.python.log" for e in events)
    assert not any(TOKEN in str(e) for e in events)  # the bearer token is never logged


# --- cross-site requests (CSRF, DNS rebinding) ---------------------------------------------------


@pytest.fixture
def open_admin(tmp_path):
    """No [admin] token: /rpc answers loopback clients only, as in the issue's reproducer."""
    root, clock = build(tmp_path=tmp_path)
    parts = root.parts
    resource = AdminResource(Rpc(parts, root), make_registry(parts, None), token="")
    svc = AdminService("tcp:0:interface=127.0.0.1", resource, reactor=reactor)
    svc.startService()
    pytest_twisted.blockon(svc.listening)
    parts.location.add_or_update(binding("alice", "sip:alice@10.0.0.1:5060", clock))
    yield svc, parts, resource
    pytest_twisted.blockon(svc.stopService())


async def raw_http(svc: AdminService, method: str, path: str, headers: dict[str, str],
                   body: bytes | None = None) -> tuple[int, bytes]:
    hdrs = Headers()
    for name, value in headers.items():
        hdrs.addRawHeader(name.encode(), value.encode())
    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    port = svc.port.getHost().port
    resp = await Agent(reactor).request(method.encode(), f"http://127.0.0.1:{port}{path}".encode(), hdrs, producer)
    return resp.code, await readBody(resp)


FORM = b"aor=alice&contact=sip%3Aalice%4010.0.0.1%3A5060"


@pytest_twisted.ensureDeferred
async def test_cross_site_form_post_no_longer_removes_the_binding(open_admin):
    svc, parts, resource = open_admin
    form = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"}
    code, body = await raw_http(svc, "POST", "/rpc/ul.rm", form, FORM)
    assert code == 403 and js(body)["error"]["message"] == "cross-site request refused"
    # the same form with its Origin stripped (an old browser, a privacy proxy): a form body is refused
    code, _ = await raw_http(svc, "POST", "/rpc/ul.rm", {"Content-Type": "application/x-www-form-urlencoded"}, FORM)
    assert code == 415
    # JSON smuggled as text/plain (no CORS preflight needed for it) is refused too
    code, _ = await raw_http(svc, "POST", "/rpc/ul.rm", {"Content-Type": "text/plain"}, b'{"aor": "alice"}')
    assert code == 415
    # a query-string-only form POST with an empty body
    code, _ = await raw_http(svc, "POST", "/rpc/ul.rm?aor=alice",
                             {"Content-Type": "application/x-www-form-urlencoded"}, b"")
    assert code == 415
    # a no-cors fetch: no body, no content type, but the browser says where it comes from
    code, _ = await raw_http(svc, "POST", "/rpc/ul.rm?aor=alice", {"Sec-Fetch-Site": "cross-site"})
    assert code == 403
    code, _ = await raw_http(svc, "POST", "/rpc/ul.rm?aor=alice", {"Origin": "null"})
    assert code == 403
    assert parts.location.all_count() == 1
    assert resource.limit_hits()["admin_cross_site"] == 3


@pytest_twisted.ensureDeferred
async def test_dns_rebinding_host_is_refused_without_a_token(open_admin):
    svc, parts, _resource = open_admin
    port = svc.port.getHost().port
    # evil.example resolved to 127.0.0.1: same origin for the browser, but Host is its name
    same_origin = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}",
                   "Content-Type": "application/json"}
    code, _ = await raw_http(svc, "POST", "/rpc/ul.rm", same_origin, b'{"aor": "alice"}')
    assert code == 403
    code, _ = await raw_http(svc, "GET", "/rpc/ul.dump", {"Host": f"evil.example:{port}"})
    assert code == 403  # reading the bindings through a rebinding page too
    assert parts.location.all_count() == 1


@pytest_twisted.ensureDeferred
async def test_same_origin_and_tools_still_work(open_admin):
    svc, parts, _resource = open_admin
    port = svc.port.getHost().port
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        code, _ = await raw_http(svc, "GET", "/rpc/ul.dump", {"Host": host, "Origin": f"http://{host}",
                                                               "Sec-Fetch-Site": "same-origin"})
        assert code == 200, host
    code, body = await raw_http(svc, "POST", "/rpc/ul.rm", {"Content-Type": "application/json",
                                                             "Origin": f"http://127.0.0.1:{port}"},
                                json.dumps({"aor": "alice"}).encode())
    assert code == 200, body
    assert parts.location.all_count() == 0


@pytest_twisted.ensureDeferred
async def test_with_a_token_any_host_name_but_still_no_cross_site_origin(admin):
    svc, parts, clock = admin
    parts.location.add_or_update(binding("alice", "sip:alice@10.0.0.1:5060", clock))
    auth = {"Authorization": f"Bearer {TOKEN}", "Host": "admin.example.net:8080"}
    code, _ = await raw_http(svc, "GET", "/rpc/ul.dump", auth)
    assert code == 200
    code, _ = await raw_http(svc, "POST", "/rpc/ul.rm?aor=alice", {**auth, "Origin": "https://evil.example"})
    assert code == 403
    code, _ = await raw_http(svc, "POST", "/rpc/ul.rm?aor=alice", {**auth, "Origin": "http://admin.example.net:8080"})
    assert code == 200 and parts.location.all_count() == 0


def test_origin_and_host_spellings():
    from libon_tsilo.ops.admin import _is_local_name, _origin_authority

    assert _origin_authority("http://127.0.0.1:8080") == "127.0.0.1:8080"
    assert _origin_authority("HTTP://Admin.Example:80") == "admin.example"
    assert _origin_authority("https://a.example:443") == "a.example"
    assert _origin_authority("null") is None and _origin_authority("http://a/b") is None
    assert all(_is_local_name(h) for h in ("localhost", "localhost:8080", "127.0.0.1:1", "[::1]:8080", "::1"))
    assert not any(_is_local_name(h) for h in ("evil.example", "evil.example:8080", "127.0.0.1.nip.io:80"))


@pytest_twisted.ensureDeferred
async def test_token_guessing_gets_429_after_the_limit(admin):
    svc, _parts, _clock = admin
    resource = svc.resource
    for n in range(5):  # the default login_max_failures
        code, _, _ = await http(svc, "GET", "/rpc/stats", token=f"guess-{n}")
        assert code == 401
    code, headers, body = await http(svc, "GET", "/rpc/stats")  # even the right token, from this address
    assert code == 429 and headers["retry-after"] == ["300"]
    assert js(body)["error"]["message"] == "too many wrong tokens"
    assert resource.limit_hits()["admin_token"] == 1
    # a missing token is not a guess
    code, _, _ = await http(svc, "GET", "/metrics", token=None)
    assert code == 200  # loopback


def test_token_guard_lets_a_source_back_when_its_failures_age_out():
    from types import SimpleNamespace

    from twisted.internet.task import Clock

    clock = Clock()
    rpc = SimpleNamespace(methods={})
    resource = AdminResource(rpc, None, token=TOKEN, clock=clock, max_failures=2, ban_time=60)  # type: ignore[arg-type]

    def ask(token: str) -> int:
        request = DummyRequest([b"rpc"])
        request.client = IPv4Address("TCP", "192.0.2.1", 1234)
        request.requestHeaders.addRawHeader(b"authorization", f"Bearer {token}".encode())
        request.requestHeaders.addRawHeader(b"host", b"admin.example")
        request.method = b"GET"
        request.path = b"/rpc/nope"
        resource.render(request)
        return request.responseCode

    assert [ask("a"), ask("b"), ask(TOKEN)] == [401, 401, 429]
    clock.advance(60)
    assert ask(TOKEN) == 404  # let back in: the token is good, the method is unknown
