"""HTTP Digest math for SIP (RFC 2617, RFC 7616, RFC 8760): hashes, nonces, header text.

Pure functions, no state and no I/O: the policy (who is challenged, replay tables, users) lives in
``registrar/auth.py``. Only ``qop=auth`` is offered; ``auth-int`` and the ``-sess`` variants are
not, so a client cannot steer us towards them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

__all__ = [
    "ALGORITHMS",
    "DigestError",
    "normalize_algorithm",
    "hash_hex",
    "ha1",
    "make_nonce",
    "check_nonce",
    "challenge_header",
    "parse_authorization",
    "expected_response",
]

# canonical name -> hashlib constructor name
ALGORITHMS: dict[str, str] = {"MD5": "md5", "SHA-256": "sha256"}

# an epoch is a short token: it sits between dots in a nonce, inside a quoted-string
_EPOCH = re.compile(r"^[A-Za-z0-9_-]{1,32}$")

# A nonce issued "in the future" by more than this is forged or from a badly skewed peer.
_FUTURE_SKEW = 5.0


class DigestError(ValueError):
    """An Authorization/Proxy-Authorization value that cannot be read as Digest credentials."""


def normalize_algorithm(name: str | None) -> str:
    """Return the canonical algorithm name; a missing one means MD5 (RFC 2617 §3.2.1)."""
    if name is None or name == "":
        return "MD5"
    upper = name.strip().upper()
    if upper not in ALGORITHMS:
        raise DigestError(f"unsupported digest algorithm {name!r}")
    return upper


def hash_hex(algorithm: str, data: str) -> str:
    """Hex digest of ``data`` (UTF-8) with the named algorithm."""
    h = hashlib.new(ALGORITHMS[normalize_algorithm(algorithm)])
    h.update(data.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def ha1(user: str, realm: str, password: str, algorithm: str = "MD5") -> str:
    """H(user:realm:password): what the users database stores instead of the password."""
    return hash_hex(algorithm, f"{user}:{realm}:{password}")


def _nonce_mac(secret: str, body: str) -> str:
    mac = hmac.new(secret.encode("utf-8"), body.encode("ascii"), hashlib.sha256)
    return mac.hexdigest()[:32]


def make_nonce(secret: str, now: float, epoch: str = "0", salt: str | None = None,
               bound_to: str | None = None) -> str:
    """A nonce that carries its issue time and epoch and proves we issued it:
    ``<ts hex>.<epoch>.<salt>.<hmac>``.

    ``bound_to`` (the challenged request's Request-URI) ties the nonce to that request: the salt
    ends with a MAC of it (``nonce_bound_to`` checks it), so credentials answering it cannot be
    replayed on a request for another destination, whatever digest-uri the client wrote.

    The random salt makes every challenge unique, so the replay table (per nonce) never mixes two
    clients that were challenged in the same second. The epoch names the replay table that will
    see the nonce's counts (see registrar/nonce_counts.py): a nonce of another epoch was issued
    before a restart or by another node, and no table here knows what it already accepted.
    Nothing is stored server-side to check a nonce.
    """
    if not _EPOCH.match(epoch):
        raise ValueError(f"bad nonce epoch {epoch!r}")
    ts = format(int(now), "x")
    salt = salt if salt is not None else secrets.token_hex(6)
    if bound_to is not None:
        salt = f"{salt}-{_binding_tag(secret, salt, bound_to)}"
    body = f"{ts}.{epoch}.{salt}"
    return f"{body}.{_nonce_mac(secret, body)}"


def nonce_bound_to(secret: str, nonce: str, value: str) -> bool:
    """Whether ``nonce`` (one ``check_nonce`` found ours) was issued bound to ``value``."""
    parts = nonce.split(".")
    salt = parts[2] if len(parts) == 4 else ""
    random, sep, tag = salt.partition("-")
    return bool(sep) and hmac.compare_digest(tag, _binding_tag(secret, random, value))


def _binding_tag(secret: str, salt: str, value: str) -> str:
    mac = hmac.new(secret.encode("utf-8"), f"bind\n{salt}\n{value}".encode("utf-8", "surrogateescape"),
                   hashlib.sha256)
    return mac.hexdigest()[:16]


def nonce_time(nonce: str) -> float | None:
    """The issue time carried by a nonce of ours, or None when it does not look like one."""
    parts = nonce.split(".")
    if len(parts) != 4:
        return None
    try:
        return float(int(parts[0], 16))
    except ValueError:
        return None


def check_nonce(secret: str, nonce: str, now: float, lifetime: float, epoch: str | None = None) -> str:
    """``"ok"``, ``"stale"`` (ours, but older than ``lifetime`` or of another ``epoch`` when one is
    given) or ``"bad"`` (not ours)."""
    parts = nonce.split(".")
    if len(parts) != 4 or len(nonce) > 128 or not nonce.isascii():  # ours are ASCII; the MAC encodes so
        return "bad"
    issued = nonce_time(nonce)
    if issued is None:
        return "bad"
    expected = _nonce_mac(secret, ".".join(parts[:3]))
    if not hmac.compare_digest(expected, parts[3]):
        return "bad"
    if issued > now + _FUTURE_SKEW:
        return "bad"
    if now - issued > lifetime or (epoch is not None and parts[1] != epoch):
        return "stale"
    return "ok"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def challenge_header(
    realm: str, nonce: str, algorithm: str = "MD5", stale: bool = False, opaque: str | None = None
) -> str:
    """The value of a WWW-Authenticate / Proxy-Authenticate header offering ``qop="auth"``."""
    parts = [
        f"realm={_quote(realm)}",
        f"nonce={_quote(nonce)}",
    ]
    if opaque is not None:
        parts.append(f"opaque={_quote(opaque)}")
    parts.append(f"algorithm={normalize_algorithm(algorithm)}")
    parts.append('qop="auth"')
    if stale:
        parts.append("stale=true")
    return "Digest " + ", ".join(parts)


# name = token | quoted-string, separated by commas with optional whitespace
_PARAM = re.compile(
    r'\s*([A-Za-z0-9_.!%*+`\'~-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*(?:,|$)',
    re.DOTALL,
)


def parse_authorization(value: str) -> dict[str, str]:
    """Parse ``Digest k=v, k="v", ...`` into a dict with lower-case keys and unquoted values.

    Raises DigestError for another scheme or malformed text, so that the caller can treat the
    header as absent (RFC 4475 regaut01: an unknown scheme gets a fresh challenge).
    """
    if value is None:
        raise DigestError("no credentials")
    text = value.strip()
    scheme, _, rest = text.partition(" ")
    if scheme.lower() != "digest":
        raise DigestError(f"unsupported authorization scheme {scheme!r}")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if m is None or m.end() == pos:
            raise DigestError("malformed digest credentials")
        name = m.group(1).lower()
        if m.group(2) is not None:
            val = re.sub(r"\\(.)", r"\1", m.group(2))
        else:
            val = m.group(3)
        if name in params:
            raise DigestError(f"duplicate digest parameter {name!r}")
        params[name] = val
        pos = m.end()
    if not params:
        raise DigestError("empty digest credentials")
    return params


def expected_response(
    ha1: str,
    method: str,
    uri: str,
    nonce: str,
    nc: str | None,
    cnonce: str | None,
    qop: str | None,
    algorithm: str = "MD5",
) -> str:
    """The request-digest the client must send (RFC 2617 §3.2.2.1, RFC 7616 §3.4.1).

    With ``qop`` None this is the RFC 2069 form, kept for completeness; the policy refuses it.
    """
    ha2 = hash_hex(algorithm, f"{method}:{uri}")
    if qop:
        data = f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}"
    else:
        data = f"{ha1}:{nonce}:{ha2}"
    return hash_hex(algorithm, data)
