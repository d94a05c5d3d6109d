"""A fake APNs provider API: HTTP/2 (h2) over Twisted TLS, strict where Apple is strict.

What it checks, in Apple's order of precedence as far as we can tell:
- method POST (405 MethodNotAllowed), path ``/3/device/<token>`` (404 BadPath / 400 MissingDeviceToken);
- auth: a TLS client certificate signed by the test CA, or ``authorization: bearer <ES256 JWT>`` whose
  header ``kid`` is a known key, claims ``iss`` (that key's team) and ``iat`` (not older than an hour:
  403 ExpiredProviderToken), signature checked with the public key (403 Invalid/MissingProviderToken);
  changing the JWT on a connection within 20 minutes of an accepted one -> 429 TooManyProviderTokenUpdates;
- headers: ``apns-topic`` (400 MissingTopic), ``apns-push-type`` present and paired with the topic
  (``voip`` <-> ``.voip`` suffix, else 400 BadTopic), priority/expiration/apns-id/collapse-id syntax;
- payload: non-empty JSON (400 PayloadEmpty), at most 4096 bytes, 5120 for voip (413 PayloadTooLarge).

Then each device token follows its script (``Step``s consumed in order, the last one repeating):
a status with its reason (410 carries a ms timestamp), an optional Retry-After, a delay, ``hang``
(never answer) or ``goaway``. Every response echoes ``apns-id``; errors carry their JSON in one
DATA frame, or in two with ``split`` (a client must not parse frame by frame). Every request is
recorded.

Quirk kept on purpose: like APNs, a token-auth connection starts with SETTINGS_MAX_CONCURRENT_STREAMS=1
and raises it after the first push accepted with a valid JWT.

Run standalone for end-to-end tests::

    python -m tests.fakes.apns_fake --port 0 --cert server.pem --key server.key --ca ca.pem \
        --team-key-pub AuthKey.pub.pem [--team-id T --key-id K] [--script FILE] [--record FILE]

prints ``PORT <n>`` once listening and appends one JSON line per request to ``--record``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import jwt
from cryptography.x509.oid import NameOID
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, DataReceived, RequestReceived, StreamEnded, StreamReset
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Factory, Protocol

from tests.fakes.keys import Pki, TeamKey, make_pki, make_team_key
from tests.fakes.spawn import spawn_fake

__all__ = [
    "Step", "parse_step", "RecordedRequest", "FakeAPNs", "FakeEnv", "start_fake", "tls_options",
    "spawn", "spawn_with_keys", "main",
]

VOIP_LIMIT = 5120
DEFAULT_LIMIT = 4096
JWT_MAX_AGE = 3600.0
TOKEN_UPDATE_MIN_INTERVAL = 20 * 60.0
PUSH_TYPES = {
    "alert", "background", "voip", "complication", "fileprovider", "mdm", "location",
    "liveactivity", "pushtotalk",
}
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
DEFAULT_REASONS = {
    400: "BadDeviceToken",
    403: "ExpiredProviderToken",
    410: "Unregistered",
    413: "PayloadTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}


@dataclass(frozen=True)
class Step:
    """One scripted answer. ``action`` "hang" never answers; "goaway" closes the connection."""

    status: int = 200
    reason: str | None = None
    retry_after: str | None = None
    delay: float = 0.0
    action: str | None = None
    split: bool = False  # the error JSON in two DATA frames


def parse_step(text: str) -> Step:
    """Parse "200", "410", "400:DeviceTokenNotForTopic", "503 retry-after=30", "delay=0.5 200",
    "hang", "goaway", "410 split" (words in any order)."""
    status, reason, retry_after, delay, action, split = 200, None, None, 0.0, None, False
    for word in text.split():
        if word == "split":
            split = True
        elif word in ("hang", "goaway"):
            action = word
        elif word.startswith("delay="):
            delay = float(word[6:])
        elif word.startswith("retry-after="):
            retry_after = word[12:]
        else:
            code, _, why = word.partition(":")
            status = int(code)
            reason = why or None
    if reason is None and status != 200:
        reason = DEFAULT_REASONS.get(status, "InternalServerError")
    return Step(status, reason, retry_after, delay, action, split)


@dataclass
class RecordedRequest:
    time: float
    connection: int
    method: str
    path: str
    token: str
    headers: dict[str, str]
    body: str
    json: Any
    jwt_header: dict[str, Any] | None
    jwt_claims: dict[str, Any] | None
    client_cert_uid: str | None
    status: int | None = None
    reason: str | None = None

    def as_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


class _Reject(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass
class _ConnAuth:
    """Per-connection JWT memory, to emulate TooManyProviderTokenUpdates."""

    token: str | None = None
    accepted_at: float | None = None
    rejected: bool = False


@dataclass
class FakeAPNs:
    """The fake server. ``team_keys`` maps key id -> (team id, public key PEM)."""

    team_keys: dict[str, tuple[str, bytes]]
    clock: IReactorTime
    bundles: set[str] | None = None  # if set, topics outside these bundles get 400 TopicDisallowed
    default_step: Step = field(default_factory=Step)
    initial_max_streams: int = 1
    requests: list[RecordedRequest] = field(default_factory=list)
    on_request: Callable[[RecordedRequest], None] | None = None
    connections_made: int = 0
    _scripts: dict[str, list[Step]] = field(default_factory=dict)
    _port: IListeningPort | None = None
    _protocols: set[_APNsServerProtocol] = field(default_factory=set)
    _ids: itertools.count = field(default_factory=itertools.count)

    def script(self, token: str, *steps: str | Step) -> None:
        """Answer ``token``'s next pushes with ``steps`` in order; the last one repeats."""
        self._scripts[token] = [parse_step(s) if isinstance(s, str) else s for s in steps]

    def next_step(self, token: str) -> Step:
        steps = self._scripts.get(token)
        if not steps:
            return self.default_step
        return steps.pop(0) if len(steps) > 1 else steps[0]

    def listen(self, options: ssl.CertificateOptions, reactor: Any = None, port: int = 0) -> int:
        """Listen on 127.0.0.1 (``port`` 0 = OS-picked); returns the port number."""
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        factory = Factory.forProtocol(lambda: _APNsServerProtocol(self))
        self._port = reactor.listenSSL(port, factory, options, interface="127.0.0.1")
        return self._port.getHost().port

    def stop(self):  # -> Deferred[None]
        """Stop listening and drop every open connection (so tests leave no sockets behind)."""
        for p in list(self._protocols):
            if p.transport is not None:
                p.transport.abortConnection()
        assert self._port is not None
        return self._port.stopListening()

    def tokens_pushed(self) -> list[str]:
        return [r.token for r in self.requests]

    # -- request evaluation ---------------------------------------------------------------

    def check(self, rec: RecordedRequest, auth: _ConnAuth) -> None:
        """Raise _Reject for anything Apple would refuse before looking at the device token."""
        h = rec.headers
        if rec.method != "POST":
            raise _Reject(405, "MethodNotAllowed")
        if not rec.path.startswith("/3/device/"):
            raise _Reject(404, "BadPath")
        if not rec.token:
            raise _Reject(400, "MissingDeviceToken")
        self._check_auth(rec, auth)
        topic = h.get("apns-topic") or rec.client_cert_uid
        if not topic:
            raise _Reject(400, "MissingTopic")
        push_type = h.get("apns-push-type")
        if push_type not in PUSH_TYPES:
            raise _Reject(400, "InvalidPushType")
        if (push_type == "voip") != topic.endswith(".voip"):
            raise _Reject(400, "BadTopic")
        bundle = topic.removesuffix(".voip")
        if rec.client_cert_uid is not None and bundle != rec.client_cert_uid:
            raise _Reject(400, "BadTopic")
        if self.bundles is not None and bundle not in self.bundles:
            raise _Reject(400, "TopicDisallowed")
        prio = h.get("apns-priority")
        if prio is not None and (prio not in ("1", "5", "10") or (push_type == "background" and prio == "10")):
            raise _Reject(400, "BadPriority")
        exp = h.get("apns-expiration")
        if exp is not None and not exp.isdigit():
            raise _Reject(400, "BadExpirationDate")
        apns_id = h.get("apns-id")
        if apns_id is not None and not _UUID_RE.match(apns_id):
            raise _Reject(400, "BadMessageId")
        if len(h.get("apns-collapse-id", "").encode()) > 64:
            raise _Reject(400, "BadCollapseId")
        if not rec.body:
            raise _Reject(400, "PayloadEmpty")
        limit = VOIP_LIMIT if push_type == "voip" else DEFAULT_LIMIT
        if len(rec.body.encode()) > limit:
            raise _Reject(413, "PayloadTooLarge")
        if not isinstance(rec.json, dict):
            raise _Reject(400, "PayloadEmpty")

    def _check_auth(self, rec: RecordedRequest, auth: _ConnAuth) -> None:
        value = rec.headers.get("authorization")
        if value is None:
            if rec.client_cert_uid is None:
                raise _Reject(403, "MissingProviderToken")
            return
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _Reject(403, "MissingProviderToken")
        now = self.clock.seconds()
        if auth.token is not None and token != auth.token and not auth.rejected:
            if auth.accepted_at is not None and now - auth.accepted_at < TOKEN_UPDATE_MIN_INTERVAL:
                raise _Reject(429, "TooManyProviderTokenUpdates")
        auth.token, auth.rejected = token, True  # cleared below once it verifies
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _Reject(403, "InvalidProviderToken") from None
        rec.jwt_header = header
        known = self.team_keys.get(header.get("kid", ""))
        if header.get("alg") != "ES256" or known is None:
            raise _Reject(403, "InvalidProviderToken")
        team_id, public_pem = known
        try:
            claims = jwt.decode(
                token,
                public_pem,
                algorithms=["ES256"],
                options={"verify_iat": False, "verify_exp": False, "require": ["iss", "iat"]},
            )
        except jwt.PyJWTError:
            raise _Reject(403, "InvalidProviderToken") from None
        rec.jwt_claims = claims
        if claims.get("iss") != team_id or not isinstance(claims.get("iat"), int):
            raise _Reject(403, "InvalidProviderToken")
        if claims["iat"] < now - JWT_MAX_AGE:
            raise _Reject(403, "ExpiredProviderToken")
        if claims["iat"] > now + 60:  # a clock that far ahead is a provider bug, Apple refuses too
            raise _Reject(403, "InvalidProviderToken")
        if auth.accepted_at is None or auth.rejected:
            auth.accepted_at = now
        auth.rejected = False

    def record(self, rec: RecordedRequest) -> None:
        self.requests.append(rec)
        if self.on_request is not None:
            self.on_request(rec)


class _APNsServerProtocol(Protocol):
    """One client connection: h2 server side. Speaks h2 with or without ALPN."""

    def __init__(self, fake: FakeAPNs) -> None:
        self.fake = fake
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.auth = _ConnAuth()
        self.id = next(fake._ids)
        self.raised_streams = False
        self.closed = False

    def connectionMade(self) -> None:
        self.fake.connections_made += 1
        self.fake._protocols.add(self)
        self.conn.initiate_connection()
        self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.fake.initial_max_streams})
        self.flush()

    def connectionLost(self, reason: object = None) -> None:
        self.closed = True
        self.fake._protocols.discard(self)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            self.flush()
            self.transport.loseConnection()
            return
        for ev in events:
            if isinstance(ev, RequestReceived):
                self.streams[ev.stream_id] = (dict(ev.headers), bytearray())
            elif isinstance(ev, DataReceived):
                if ev.stream_id in self.streams:
                    self.streams[ev.stream_id][1].extend(ev.data)
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, StreamEnded):
                if ev.stream_id in self.streams:
                    self.handle(ev.stream_id, *self.streams.pop(ev.stream_id))
            elif isinstance(ev, StreamReset):
                self.streams.pop(ev.stream_id, None)
            elif isinstance(ev, ConnectionTerminated):
                self.transport.loseConnection()
        self.flush()

    def _client_cert_uid(self) -> str | None:
        cert = self.transport.getPeerCertificate() if hasattr(self.transport, "getPeerCertificate") else None
        if cert is None:
            return None
        uids = cert.to_cryptography().subject.get_attributes_for_oid(NameOID.USER_ID)
        return str(uids[0].value) if uids else None

    def handle(self, stream_id: int, headers: dict[str, str], body: bytearray) -> None:
        path = headers.get(":path", "")
        text = body.decode("utf-8", "replace")
        try:
            parsed: Any = json.loads(text) if text else None
        except ValueError:
            parsed = None
        rec = RecordedRequest(
            time=self.fake.clock.seconds(),
            connection=self.id,
            method=headers.get(":method", ""),
            path=path,
            token=path[len("/3/device/"):] if path.startswith("/3/device/") else "",
            headers={k: v for k, v in headers.items() if not k.startswith(":")},
            body=text,
            json=parsed,
            jwt_header=None,
            jwt_claims=None,
            client_cert_uid=self._client_cert_uid(),
        )
        apns_id = headers.get("apns-id") or str(uuid.uuid4())
        try:
            self.fake.check(rec, self.auth)
        except _Reject as r:
            rec.status, rec.reason = r.status, r.reason
            self.fake.record(rec)
            self.respond(stream_id, apns_id, Step(r.status, r.reason))
            return
        step = self.fake.next_step(rec.token)
        if step.status == 403 and step.reason == "ExpiredProviderToken":
            self.auth.rejected = True  # the provider is entitled to a new JWT now
        rec.status, rec.reason = (None, step.action) if step.action else (step.status, step.reason)
        self.fake.record(rec)
        if step.action == "goaway":
            self.goaway()
        elif step.action == "hang":
            return
        elif step.delay > 0:
            self.fake.clock.callLater(step.delay, self.respond, stream_id, apns_id, step)
        else:
            self.respond(stream_id, apns_id, step)

    def respond(self, stream_id: int, apns_id: str, step: Step) -> None:
        if self.closed:
            return
        headers = [(":status", str(step.status)), ("apns-id", apns_id)]
        if step.retry_after is not None:
            headers.append(("retry-after", step.retry_after))
        try:
            if step.status == 200:
                if not self.raised_streams and self.auth.token is not None and not self.auth.rejected:
                    # before the answer, so a client seeing its first success may already fan out
                    self.raised_streams = True
                    self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
                self.conn.send_headers(stream_id, headers, end_stream=True)
            else:
                err: dict[str, Any] = {"reason": step.reason}
                if step.status == 410:
                    err["timestamp"] = int(self.fake.clock.seconds() * 1000)
                payload = json.dumps(err).encode()
                headers.append(("content-type", "application/json"))
                self.conn.send_headers(stream_id, headers)
                if step.split:
                    self.conn.send_data(stream_id, payload[:7])
                    self.flush()
                    payload = payload[7:]
                self.conn.send_data(stream_id, payload, end_stream=True)
        except ProtocolError:  # the client reset the stream (timed out) meanwhile
            return
        self.flush()

    def goaway(self) -> None:
        self.conn.close_connection(
            error_code=ErrorCodes.NO_ERROR, additional_data=json.dumps({"reason": "Shutdown"}).encode()
        )
        self.flush()
        self.transport.loseConnection()


def tls_options(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> ssl.CertificateOptions:
    """Server TLS: offers ALPN h2, asks for (but does not require) a client certificate."""
    ca = crypto.load_certificate(crypto.FILETYPE_PEM, ca_pem)
    return ssl.CertificateOptions(
        privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem),
        certificate=crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem),
        verify=True,
        caCerts=[ca],
        requireCertificate=False,
        acceptableProtocols=[b"h2"],
    )


@dataclass
class FakeEnv:
    """An in-process fake with its keys and their files (paths: ca, server_cert, server_key,
    client, p8, pub)."""

    fake: FakeAPNs
    port: int
    team_key: TeamKey
    pki: Pki
    paths: dict[str, Path]

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The form [[push.apns]] server takes in the config file."""
        return f"https://127.0.0.1:{self.port}"


def start_fake(directory: Path, reactor: Any = None, bundle_id: str = "com.example.app", **kw: Any) -> FakeEnv:
    """Generate a team key and a test PKI into ``directory`` and start a fake on 127.0.0.1:0."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    team_key = make_team_key()
    pki = make_pki(bundle_id)
    paths = pki.write(directory)
    paths["p8"], paths["pub"] = team_key.write(directory)
    fake = FakeAPNs(team_keys={team_key.key_id: (team_key.team_id, team_key.public_pem)}, clock=reactor, **kw)
    port = fake.listen(tls_options(pki.server_cert_pem, pki.server_key_pem, pki.ca_pem), reactor)
    return FakeEnv(fake, port, team_key, pki, paths)


def spawn(args: list[str], cwd: str | None = None, timeout: float = 10.0) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``python -m tests.fakes.apns_fake *args`` and wait for its ``PORT`` line (at most ``timeout`` s).

    Returns the process and its port; the caller terminates it. ``cwd`` defaults to the repo root.
    """
    return spawn_fake("tests.fakes.apns_fake", args, "fake APNs", cwd, timeout)


def spawn_with_keys(
    directory: Path, script: dict[str, Any] | None = None, record: Path | None = None,
    bundle_id: str = "com.example.app",
) -> tuple[subprocess.Popen[bytes], int, dict[str, Path], TeamKey]:
    """Generate keys/PKI into ``directory`` and spawn the fake on them (for e2e tests).

    ``paths`` has ca, server_cert, server_key, client, p8, pub (+ script if given)."""
    team_key, pki = make_team_key(), make_pki(bundle_id)
    paths = pki.write(directory)
    paths["p8"], paths["pub"] = team_key.write(directory)
    args = [
        "--port", "0", "--cert", str(paths["server_cert"]), "--key", str(paths["server_key"]),
        "--ca", str(paths["ca"]), "--team-key-pub", str(paths["pub"]),
        "--team-id", team_key.team_id, "--key-id", team_key.key_id,
    ]
    if script is not None:
        paths["script"] = directory / "apns_script.json"
        paths["script"].write_text(json.dumps(script), encoding="utf-8")
        args += ["--script", str(paths["script"])]
    if record is not None:
        args += ["--record", str(record)]
    proc, port = spawn(args)
    return proc, port, paths, team_key


def _load_script(fake: FakeAPNs, path: str) -> None:
    """Script file: {"default": "200", "tokens": {"<tok>": ["429", "200"]}, "bundles": ["com.x"]}."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    if "default" in spec:
        fake.default_step = parse_step(spec["default"])
    for token, steps in spec.get("tokens", {}).items():
        fake.script(token, *(steps if isinstance(steps, list) else [steps]))
    if "bundles" in spec:
        fake.bundles = set(spec["bundles"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.apns_fake", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", required=True, help="server certificate PEM (SAN localhost/127.0.0.1)")
    parser.add_argument("--key", required=True, help="server private key PEM")
    parser.add_argument("--ca", required=True, help="CA PEM that signed client certificates")
    parser.add_argument("--team-key-pub", required=True, help="public key PEM of the team's .p8 key")
    parser.add_argument("--team-id", default="TEAM123456")
    parser.add_argument("--key-id", default="KEY1234567")
    parser.add_argument("--script", help="JSON script file (see _load_script)")
    parser.add_argument("--record", help="append every request as a JSON line to this file")
    args = parser.parse_args(argv)

    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import reactor

    with open(args.team_key_pub, "rb") as f:
        pub = f.read()
    fake = FakeAPNs(team_keys={args.key_id: (args.team_id, pub)}, clock=reactor)
    if args.script:
        _load_script(fake, args.script)
    if args.record:
        record_path = args.record

        def append(rec: RecordedRequest) -> None:
            with open(record_path, "a", encoding="utf-8") as out:
                out.write(rec.as_json() + "\n")

        fake.on_request = append
    with open(args.cert, "rb") as c, open(args.key, "rb") as k, open(args.ca, "rb") as a:
        options = tls_options(c.read(), k.read(), a.read())
    port = fake.listen(options, reactor, args.port)
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    reactor.addSystemEventTrigger("before", "shutdown", fake.stop)
    reactor.run()


if __name__ == "__main__":
    main()
