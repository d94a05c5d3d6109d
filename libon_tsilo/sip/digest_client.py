"""The client side of SIP digest (RFC 2617 §3.2.2, RFC 8760): answering a 401/407 from a peer.

Pure functions over the challenge text; who may be answered (which realm, how often) is the
caller's policy. ``qop=auth`` is used when offered, the RFC 2069 form when no qop is offered;
``auth-int`` alone and the ``-sess`` algorithms are not supported (``DigestError``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from libon_tsilo.sip.digest import DigestError, ha1, hash_hex, normalize_algorithm, parse_authorization

__all__ = ["Challenge", "parse_challenge", "pick_challenge", "authorization"]


@dataclass(frozen=True)
class Challenge:
    realm: str
    nonce: str
    algorithm: str  # canonical name (MD5, SHA-256)
    qop_auth: bool  # the server offered qop "auth"
    opaque: str | None = None
    stale: bool = False


def parse_challenge(value: str) -> Challenge:
    """A WWW-Authenticate / Proxy-Authenticate value we can answer, else DigestError."""
    params = parse_authorization(value)  # the same "Digest k=v, ..." syntax
    realm, nonce = params.get("realm"), params.get("nonce")
    if realm is None or not nonce:
        raise DigestError("challenge without realm or nonce")
    algorithm = normalize_algorithm(params.get("algorithm"))
    qops = [q.strip().lower() for q in params.get("qop", "").split(",") if q.strip()]
    if qops and "auth" not in qops:
        raise DigestError("challenge offers no qop we support")
    return Challenge(realm, nonce, algorithm, bool(qops), params.get("opaque"),
                     params.get("stale", "").lower() == "true")


def pick_challenge(values: list[str], realm: str | None = None) -> Challenge | None:
    """The first challenge we can answer (in `realm` when one is required), preferring SHA-256
    (RFC 8760 §2.4: the server lists its preferred algorithm first, but MD5 is the weaker)."""
    usable: list[Challenge] = []
    for value in values:
        try:
            challenge = parse_challenge(value)
        except DigestError:
            continue
        if realm is None or challenge.realm == realm:
            usable.append(challenge)
    for challenge in usable:
        if challenge.algorithm == "SHA-256":
            return challenge
    return usable[0] if usable else None


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def authorization(challenge: Challenge, method: str, uri: str, username: str, password: str,
                  nc: int = 1, cnonce: str | None = None) -> str:
    """The Authorization / Proxy-Authorization value answering `challenge` for one request."""
    key = ha1(username, challenge.realm, password, challenge.algorithm)
    ha2 = hash_hex(challenge.algorithm, f"{method}:{uri}")
    parts = [f"username={_quote(username)}", f"realm={_quote(challenge.realm)}",
             f"nonce={_quote(challenge.nonce)}", f"uri={_quote(uri)}"]
    if challenge.qop_auth:
        cnonce = cnonce or secrets.token_hex(8)
        nc_text = f"{nc:08x}"
        response = hash_hex(challenge.algorithm, f"{key}:{challenge.nonce}:{nc_text}:{cnonce}:auth:{ha2}")
        parts += [f"response={_quote(response)}", "qop=auth", f"nc={nc_text}", f"cnonce={_quote(cnonce)}"]
    else:
        response = hash_hex(challenge.algorithm, f"{key}:{challenge.nonce}:{ha2}")
        parts.append(f"response={_quote(response)}")
    parts.append(f"algorithm={challenge.algorithm}")
    if challenge.opaque is not None:
        parts.append(f"opaque={_quote(challenge.opaque)}")
    return "Digest " + ", ".join(parts)
