"""APNsClient (our HTTP/2 client) against the in-process fake APNs (tests/fakes/apns_fake.py):
real loopback TLS + HTTP/2; timers that matter on a Clock."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.task import Clock

from libon_tsilo.push.apns_http2 import MAX_BODY, APNsClient, APNsConnectionError, _parse_body
from tests.fakes.apns_fake import FakeEnv
from tests.push.test_apns import BUNDLE, TOKEN, _req, _send, _sender


def _client(env: FakeEnv, clock: Clock | None = None, **kw) -> APNsClient:
    """A certificate-auth client: the fake then keeps its initial limit of one stream."""
    from twisted.internet import reactor
    from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS, trustRootFromCertificates

    p = env.paths
    tls = optionsForClientTLS(
        "127.0.0.1",
        trustRoot=trustRootFromCertificates([Certificate.loadPEM(p["ca"].read_bytes())]),
        clientCertificate=PrivateCertificate.loadPEM(p["client"].read_bytes()),
        acceptableProtocols=[b"h2"],
    )
    return APNsClient(reactor, clock or reactor, "127.0.0.1", env.port, tls, **kw)


def _headers(token: str = TOKEN) -> list[tuple[str, str]]:
    return [
        (":method", "POST"), (":scheme", "https"), (":authority", "127.0.0.1"),
        (":path", f"/3/device/{token}"), ("apns-topic", BUNDLE + ".voip"), ("apns-push-type", "voip"),
    ]


async def _until(check, what: str) -> None:
    from twisted.internet import reactor

    for _ in range(500):  # a condition, polled for at most 5 s
        if check():
            return
        await task.deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_error_json_split_over_two_data_frames_keeps_its_reason(env, senders) -> None:
    # aioapns parsed each DATA frame as JSON: a split body raised inside its protocol
    env.fake.script(TOKEN, "410 split")
    res = await _send(_sender(env, senders), _req())
    assert (res.outcome, res.status, res.reason) == ("dead_token", 410, "Unregistered")


@pytest_twisted.ensureDeferred
async def test_410_answer_carries_its_timestamp(env) -> None:
    env.fake.script(TOKEN, "410")
    client = _client(env)
    try:
        res = await client.post(_headers(), b'{"aps": {}}')
    finally:
        client.close()
    assert (res.status, res.reason) == (410, "Unregistered")
    sent_ms = env.fake.requests[0].time * 1000
    assert isinstance(res.timestamp, int) and sent_ms - 1 <= res.timestamp < sent_ms + 5000


@pytest_twisted.ensureDeferred
async def test_requests_beyond_the_stream_limit_wait_in_line_on_one_connection(env) -> None:
    client = _client(env, max_connections=1)
    try:
        results = await defer.gatherResults(
            [client.post(_headers(f"{i:064x}"), b'{"aps": {}}') for i in range(4)]
        )
    finally:
        client.close()
    assert [r.status for r in results] == [200] * 4
    assert env.fake.connections_made == 1
    assert env.fake.tokens_pushed() == [f"{i:064x}" for i in range(4)]  # FIFO


@pytest_twisted.ensureDeferred
async def test_cancelling_a_queued_request_never_sends_it(env) -> None:
    env.fake.script(TOKEN, "hang")
    client = _client(env, max_connections=1)
    try:
        hung = client.post(_headers(), b'{"aps": {}}')
        queued = client.post(_headers("ab" * 32), b'{"aps": {}}')
        await _until(lambda: env.fake.requests, "the first request")
        queued.cancel()
        hung.cancel()
        for d in (queued, hung):
            with pytest.raises(defer.CancelledError):
                await d
        res = await client.post(_headers("cd" * 32), b'{"aps": {}}')
    finally:
        client.close()
    assert res.status == 200 and env.fake.tokens_pushed() == [TOKEN, "cd" * 32]


@pytest_twisted.ensureDeferred
async def test_idle_connection_is_closed_after_idle_timeout(env) -> None:
    clock = Clock()
    client = _client(env, clock, idle_timeout=60.0)
    try:
        assert (await client.post(_headers(), b'{"aps": {}}')).status == 200
        assert client.connection_count == 1
        clock.advance(59)
        assert client.connection_count == 1
        clock.advance(1)
        await _until(lambda: client.connection_count == 0, "the idle connection to close")
        assert (await client.post(_headers(), b'{"aps": {}}')).status == 200
        assert env.fake.connections_made == 2
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_connection_dialed_for_a_cancelled_request_still_closes_when_idle(env) -> None:
    clock = Clock()
    client = _client(env, clock, idle_timeout=60.0)
    try:
        d = client.post(_headers(), b'{"aps": {}}')
        d.cancel()  # before the connection is even up
        with pytest.raises(defer.CancelledError):
            await d
        await _until(lambda: any(c.ready for c in client._connections), "the connection's settings")
        clock.advance(60)
        await _until(lambda: client.connection_count == 0, "the idle connection to close")
    finally:
        client.close()
    assert env.fake.requests == []


@pytest_twisted.ensureDeferred
async def test_refused_connection_fails_queued_requests_at_once(env) -> None:
    await env.fake.stop()
    clock = Clock()  # no timer may be needed for the failure to arrive
    client = _client(env, clock)
    try:
        with pytest.raises(APNsConnectionError, match="cannot connect"):
            await client.post(_headers(), b'{"aps": {}}')
    finally:
        client.close()
        env.fake._port.startListening()  # so the fixture's stop() has something to stop


@pytest_twisted.ensureDeferred
async def test_closed_client_refuses_new_requests(env) -> None:
    client = _client(env)
    client.close()
    with pytest.raises(APNsConnectionError, match="closed"):
        await client.post(_headers(), b"{}")


def test_error_body_parsing_is_bounded_and_tolerant() -> None:
    assert _parse_body(b'{"reason": "Unregistered", "timestamp": 1700000000000}') == ("Unregistered", 1700000000000)
    assert _parse_body(b"") == ("", None)
    assert _parse_body(b"not json") == ("", None)
    assert _parse_body(b"[1, 2]") == ("", None)
    assert _parse_body(json.dumps({"reason": 3, "timestamp": True}).encode()) == ("", None)
    assert MAX_BODY <= 16384  # one frame's worth at most is kept per stream
