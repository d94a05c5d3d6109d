"""The HTTP admin API (twisted.web): ``/rpc/<name>`` JSON and ``/metrics`` for Prometheus.

Off unless ``[admin] listen`` is set (a Twisted endpoint string, e.g. ``tcp:8080:interface=127.0.0.1``).

* ``GET /rpc`` lists the RPC methods; ``GET|POST /rpc/<name>`` runs one (see ops/rpc.py). Parameters
  come from the query string or a JSON object body (``Content-Type: application/json``). Mutating
  methods (``ul.rm``) need POST. A success answers ``200 {"result": ...}``; a failure answers the
  RPC's status with ``{"error": {"code": 404, "message": "RURI not found in tsilo table"}}``; never
  a traceback.
* ``GET /metrics``: the Prometheus text format.

Authentication: ``Authorization: Bearer <[admin] token>``. Without a configured token the RPCs are
only served to loopback clients. ``/metrics`` needs no token from loopback clients, nor from anyone
with ``[admin] metrics_public = true``; other clients need the token there too. A client that sent
``[limits] login_max_failures`` wrong tokens within ``login_ban_time`` seconds gets 429 (with
Retry-After) until the oldest of them is that old, whatever it sends.

Cross-site requests: a browser on the operator's machine is a loopback client, so without a token
any web page it visits could POST to ``/rpc/ul.rm``. Every ``/rpc`` request is therefore refused
(403) when the browser says it is cross-site: an ``Origin`` whose host and port differ from ``Host``
(or ``Origin: null``), or ``Sec-Fetch-Site`` other than ``same-origin``/``none``. Bodies must be JSON:
the content types an HTML form or a CORS "simple" request can send (form-urlencoded, multipart,
text/plain) get 415, and JSON needs a CORS preflight, which this API never grants. Without a token,
``Host`` must also be ``localhost`` or an IP address: a DNS-rebinding page (evil.example resolving
to 127.0.0.1) is same-origin for the browser, but its Host is its own name. Tools like curl send
no Origin and stay unaffected.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any
from urllib.parse import parse_qsl

from twisted.logger import Logger
from twisted.python import runtime
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from libon_tsilo.ops.listener import EndpointListener
from libon_tsilo.ops.metrics import CONTENT_TYPE, render
from libon_tsilo.ops.rpc import Rpc, RpcError
from libon_tsilo.ratelimit import LoginGuard, ThrottledLog

__all__ = ["AdminResource", "AdminService", "is_loopback"]

log = Logger()

MAX_BODY = 64 * 1024
JSON_TYPE = b"application/json; charset=utf-8"


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def _client_host(request: http.Request) -> str | None:
    addr = request.getClientAddress()
    return getattr(addr, "host", None)


class _WallClock:
    seconds = staticmethod(runtime.seconds)


class _HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class AdminResource(Resource):
    """The whole admin API as one leaf resource (the paths are few and fixed)."""

    isLeaf = True

    def __init__(
        self, rpc: Rpc, registry: Any, token: str = "", metrics_public: bool = False, clock: Any = None,
        max_failures: int = 5, ban_time: float = 300.0,
    ) -> None:
        super().__init__()
        self.rpc = rpc
        self.registry = registry
        self.token = token
        self.metrics_public = metrics_public
        self._refused_cross_site = 0
        clock = clock if clock is not None else _WallClock()
        self._cross_site_log = ThrottledLog(clock)
        self.guard = LoginGuard(clock, "admin_token", max_failures, ban_time)  # wrong bearer tokens

    # -- twisted.web entry point ---------------------------------------------------------------

    def render(self, request: Request) -> bytes:
        try:
            return self._route(request)
        except _HttpError as err:
            for name, value in err.headers.items():
                request.setHeader(name, value)
            return self._json(request, err.status, {"error": {"code": err.status, "message": err.message}})
        except RpcError as err:
            return self._json(request, err.status, {"error": {"code": err.status, "message": err.message}})
        except Exception:
            log.failure(
                "admin API: {method} {path} failed", method=_text(request.method), path=_text(request.path)
            )
            return self._json(
                request, 500, {"error": {"code": 500, "message": "internal error (see the server log)"}}
            )

    def _route(self, request: Request) -> bytes:
        method = _text(request.method).upper()
        segments = [s for s in _text(request.path).split("/") if s]
        if segments == ["metrics"]:
            self._allow(method, ("GET", "HEAD"))
            self._check_metrics_auth(request)
            request.setResponseCode(200)
            request.setHeader(b"content-type", CONTENT_TYPE.encode())
            return render(self.registry)
        if segments and segments[0] == "rpc" and len(segments) <= 2:
            self._check_auth(request)
            self._check_same_origin(request)
            if len(segments) == 1:
                self._allow(method, ("GET", "HEAD"))
                methods = {
                    m.name: {"params": list(m.params), "doc": m.doc, "http": "POST" if m.mutating else "GET"}
                    for m in self.rpc.methods.values()
                }
                return self._json(request, 200, {"result": methods})
            name = segments[1]
            rpc_method = self.rpc.methods.get(name)
            if rpc_method is None:
                raise _HttpError(404, f"unknown RPC method {name!r}")
            self._allow(method, ("POST",) if rpc_method.mutating else ("GET", "HEAD", "POST"))
            params = self._params(request)
            result = self.rpc.call(name, params)
            status = 200
            if name == "health" and isinstance(result, dict) and result.get("status") != "ok":
                status = 503  # load balancers: take a draining server out of rotation
            return self._json(request, status, {"result": result})
        raise _HttpError(404, "not found: use /rpc/<name> or /metrics")

    # -- checks ----------------------------------------------------------------------------------

    @staticmethod
    def _allow(method: str, allowed: tuple[str, ...]) -> None:
        if method not in allowed:
            raise _HttpError(405, f"method {method} not allowed", {b"allow": ", ".join(allowed).encode()})

    def _bearer_ok(self, request: Request) -> bool:
        if not self.token:
            return False
        header = _text(request.getHeader(b"authorization") or b"")
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        host = _client_host(request) or "?"
        if self.guard.blocked(host):
            self.guard.refuse(host)
            window = int(self.guard.failures.window)
            raise _HttpError(429, "too many wrong tokens", {b"retry-after": str(window).encode()})
        if hmac.compare_digest(value.strip().encode(), self.token.encode()):
            return True
        self.guard.failed(host)  # a guess (a missing token is not: scrapers without one retry forever)
        return False

    def _check_auth(self, request: Request) -> None:
        if self._bearer_ok(request):
            return
        if not self.token and is_loopback(_client_host(request)):
            return  # no token configured: loopback clients only
        raise _HttpError(
            401, "a valid bearer token is required", {b"www-authenticate": b'Bearer realm="libon-tsilo"'}
        )

    def _check_same_origin(self, request: Request) -> None:
        """403 for what a browser marks as cross-site, and (no token) for a Host that is a DNS name."""
        host = _text(request.getHeader(b"host") or b"").strip().lower()
        fetch_site = _text(request.getHeader(b"sec-fetch-site") or b"").strip().lower()
        origin = request.getHeader(b"origin")
        why = None
        if fetch_site and fetch_site not in ("same-origin", "none"):
            why = f"Sec-Fetch-Site: {fetch_site}"
        elif origin is not None and _origin_authority(_text(origin)) != _authority(host, request):
            why = f"Origin {_text(origin)[:80]!r} is not {host!r}"
        elif not self.token and host and not _is_local_name(host):
            why = f"Host {host[:80]!r} is not localhost or an IP address (DNS rebinding?)"
        if why is not None:
            self._refused_cross_site += 1
            self._cross_site_log.emit(
                log.warn, "admin API: cross-site request from {client} refused: {why}",
                client=_client_host(request) or "?", why=why,
            )
            raise _HttpError(403, "cross-site request refused")

    def limit_hits(self) -> dict[str, int]:
        return {"admin_cross_site": self._refused_cross_site, **self.guard.limit_hits()}

    def _check_metrics_auth(self, request: Request) -> None:
        if self.metrics_public or is_loopback(_client_host(request)) or self._bearer_ok(request):
            return
        raise _HttpError(
            401, "a valid bearer token is required", {b"www-authenticate": b'Bearer realm="libon-tsilo"'}
        )

    # -- parameters & output ---------------------------------------------------------------------

    def _params(self, request: Request) -> dict[str, str]:
        params: dict[str, str] = {}
        query = _text(request.uri).partition("?")[2]
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise _HttpError(400, "bad query string") from None
        params.update(pairs)
        if _text(request.method).upper() == "POST":
            params.update(self._body_params(request))
        return params

    def _body_params(self, request: Request) -> dict[str, str]:
        content = request.content
        if content is None:
            return {}
        content.seek(0)
        body = content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise _HttpError(413, "request body too large")
        ctype = _text(request.getHeader(b"content-type") or b"").split(";")[0].strip().lower()
        if ctype in _FORM_TYPES:
            # what a cross-site HTML form or a CORS "simple" request can send without a preflight
            raise _HttpError(415, f"{ctype} bodies are refused: send application/json")
        if not body.strip():
            return {}
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _HttpError(400, "request body is not UTF-8") from None
        if ctype == "application/json" or (not ctype and text.lstrip().startswith("{")):
            try:
                data = json.loads(text)
            except ValueError:
                raise _HttpError(400, "request body is not valid JSON") from None
            if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                raise _HttpError(400, "JSON body must be an object of string values")
            return data
        raise _HttpError(415, f"unsupported content type {ctype!r}: send application/json")

    @staticmethod
    def _json(request: Request, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", JSON_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return (json.dumps(body, ensure_ascii=False, default=str, indent=None) + "\n").encode()


_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")


def _authority(host: str, request: Request) -> str:
    """``host[:port]`` as an Origin would spell it: lower-case, the default port left out."""
    if not host:
        return ""
    secure = request.isSecure()
    default = ":443" if secure else ":80"
    return host[: -len(default)] if host.endswith(default) else host


def _origin_authority(origin: str) -> str | None:
    """The ``host[:port]`` of an Origin header; None for ``null`` or anything malformed."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
        return None
    default = ":443" if scheme == "https" else ":80"
    return rest[: -len(default)] if rest.endswith(default) else rest


def _is_local_name(host: str) -> bool:
    """``localhost`` or an IP literal (with an optional port; IPv6 in brackets)."""
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if host.count(":") == 1 else host
    if name in ("localhost", "localhost."):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


class _QuietSite(Site):
    """Access log through our logger: /rpc calls at info (an audit trail of operator actions),
    /metrics scrapes at debug (every 15 s from Prometheus)."""

    noisy = False

    def log(self, request: http.Request) -> None:
        path = _text(request.uri)
        emit = log.debug if path.startswith("/metrics") else log.info
        emit(
            "admin API: {client} {method} {path} -> {status}",
            client=_client_host(request) or "?",
            method=_text(request.method),
            path=path,
            status=request.code,
        )


class AdminService(EndpointListener):
    """Listens on ``[admin] listen`` with the admin Site."""

    what = "admin API"

    def __init__(self, endpoint: str, resource: AdminResource, reactor: Any = None) -> None:
        super().__init__(endpoint, reactor)
        self.setName("admin")
        self.resource = resource
        self.site = _QuietSite(resource)

    def listen_factory(self) -> Any:
        return self.site
