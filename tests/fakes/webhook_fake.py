"""A fake push webhook endpoint (twisted.web, plain HTTP on 127.0.0.1, port 0).

Replies per ``pn_prid`` are scriptable: an HTTP status, optionally with ``Retry-After``, or
``None`` for a request that never gets an answer. Every request is recorded with its JSON body.

End-to-end tests run it as a process (`spawn`)::

    python -m tests.fakes.webhook_fake --port 0 [--script FILE] [--record FILE]

prints ``PORT <n>`` once listening and appends one JSON line per request (``{"path", "status",
"body"}``) to ``--record``; the script file is ``{"<prid>": [500, 200], ...}`` (see `script`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.web import resource, server
from tests.fakes.spawn import spawn_fake

__all__ = ["FakeWebhook", "HookReply", "HookRequest", "spawn", "read_records"]


@dataclass(frozen=True)
class HookReply:
    status: int | None = 200  # None: hang (never answer)
    retry_after: int | None = None


@dataclass
class HookRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw text if it was not JSON
    status: int | None


class FakeWebhook(resource.Resource):
    isLeaf = True

    def __init__(self, reactor: Any = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.requests: list[HookRequest] = []
        self._scripts: dict[str, deque[HookReply]] = {}
        self._port: IListeningPort | None = None
        self._hanging: list[server.Request] = []
        self._waiters: list[tuple[int, defer.Deferred[None]]] = []
        self.on_request: Callable[[HookRequest], None] | None = None

    def wait_for_requests(self, n: int) -> defer.Deferred[None]:
        """Fires once ``n`` requests have arrived (answered or not)."""
        d: defer.Deferred[None] = defer.Deferred()
        if len(self.requests) >= n:
            d.callback(None)
        else:
            self._waiters.append((n, d))
        return d

    def script(self, prid: str, *replies: HookReply | int | None) -> None:
        """Queue replies for pushes to ``prid``; the last one repeats. An int is a status."""
        self._scripts[prid] = deque(r if isinstance(r, HookReply) else HookReply(r) for r in replies)

    def listen(self, port: int = 0) -> int:
        site = server.Site(self)
        site.log = lambda request: None  # type: ignore[method-assign]
        self._port = self.reactor.listenTCP(port, site, interface="127.0.0.1")
        return self._port.getHost().port

    @property
    def url(self) -> str:
        assert self._port is not None
        return f"http://127.0.0.1:{self._port.getHost().port}/push"

    def stop(self) -> defer.Deferred[None]:
        for request in self._hanging:
            transport = getattr(request.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        self._hanging.clear()
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)

    def render(self, request: server.Request) -> bytes | int:
        raw = request.content.read() if request.content is not None else b""
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        prid = body.get("pn_prid", "") if isinstance(body, dict) else ""
        queue = self._scripts.get(prid)
        reply = (queue.popleft() if len(queue) > 1 else queue[0]) if queue else HookReply()
        headers = {k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        hook = HookRequest(request.method.decode(), request.path.decode(), headers, body, reply.status)
        self.requests.append(hook)
        if self.on_request is not None:
            self.on_request(hook)
        for item in [w for w in self._waiters if len(self.requests) >= w[0]]:
            self._waiters.remove(item)
            item[1].callback(None)
        if reply.status is None:
            self._hanging.append(request)
            return server.NOT_DONE_YET
        request.setResponseCode(reply.status)
        if reply.retry_after is not None:
            request.setHeader(b"retry-after", str(reply.retry_after).encode())
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"status": reply.status}).encode()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The ``--record`` file of a spawned fake: one dict per request, in arrival order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            break
    return out


def spawn(args: list[str], timeout: float = 10.0) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``python -m tests.fakes.webhook_fake *args``; returns the process and its port."""
    return spawn_fake("tests.fakes.webhook_fake", args, "fake webhook", timeout=timeout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.webhook_fake", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--script", help='JSON file: {"<prid>": [status, ...]} (null: never answer)')
    parser.add_argument("--record", help="append every request as a JSON line to this file")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    fake = FakeWebhook(reactor)
    if args.script:
        with open(args.script, encoding="utf-8") as f:
            for prid, replies in json.load(f).items():
                fake.script(prid, *replies)
    if args.record:
        record_path = args.record

        def append(hook: HookRequest) -> None:
            with open(record_path, "a", encoding="utf-8") as out:
                out.write(json.dumps({"path": hook.path, "status": hook.status, "body": hook.body}) + "\n")

        fake.on_request = append
    port = fake.listen(args.port)
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    reactor.addSystemEventTrigger("before", "shutdown", fake.stop)
    reactor.run()


if __name__ == "__main__":
    main()
