"""The SSH manhole: a Python shell inside the running server, for operators (twisted.conch).

Off unless ``[manhole] listen`` is set (a Twisted endpoint string, e.g.
``tcp:2222:interface=127.0.0.1``); config refuses a listener without credentials. Two ways in,
either or both:

* ``[manhole] authorized_keys``: an OpenSSH ``authorized_keys`` file (one public key per line,
  ``#`` comments; options before the key are not supported). Any user name is accepted with a
  listed key; the name and key fingerprint are logged.
* ``[manhole] passwords``: a file of ``user:hash`` lines, where the hash is
  ``scrypt$<n>$<r>$<p>$<salt, base64>$<key, base64>`` (hashlib.scrypt, 32-byte key). Make a line with
  ``python -m libon_tsilo.ops.manhole hash USER`` (prompts for the password).

Both files are re-read at every login, so editing them needs no restart or SIGHUP. The host key is
kept in ``manhole_host_key`` (ed25519, OpenSSH format, mode 0600) in the state directory (the one
holding ``[location] path``), created on first start.

Password guessing is limited per source address ([limits] login_max_failures within
login_ban_time seconds, ``ratelimit.LoginGuard``): a source at the limit is disconnected before any
password is checked (no scrypt spent on it), and its new connections are closed at once, until its
oldest failure is login_ban_time old. Failed public keys do not count: a client offers each key of
its agent in turn, and keys cannot be guessed.

The shell's namespace: ``service`` (the root service), ``parts``, ``config``, ``registrar``,
``location``, ``silo``, ``calls`` (the CallManager), ``push`` (the push waker, if any), ``rpc``,
``push_senders()`` (the senders in use), and the helpers ``ts_dump()``, ``ts_lookup(aor)``,
``ul_dump()``, ``ul_lookup(aor)``, ``ul_rm(aor, contact=None, key=None)``, ``stats()``,
``health()`` (the admin API's RPC functions;
an RPC error comes back as ``{"error": ...}``). The shell runs in the reactor thread: a long loop
in it stalls the whole server.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import os
import secrets
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.interfaces import IConchUser
from twisted.conch.insults import insults
from twisted.conch.ssh import keys, userauth
from twisted.conch.ssh.transport import DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE
from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from libon_tsilo.ops.listener import EndpointListener
from libon_tsilo.ops.rpc import Rpc, RpcError
from libon_tsilo.ratelimit import LoginGuard

__all__ = [
    "ManholeService",
    "PasswordFileChecker",
    "AuthorizedKeysFile",
    "hash_password",
    "verify_password",
    "make_namespace",
    "load_host_key",
]

log = Logger()

SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32
HOST_KEY_NAME = "manhole_host_key"


# ---------------------------------------------------------------------------------------------
# password hashes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(
    password: str, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> str:
    """``scrypt$n$r$p$salt$key`` for ``password`` (a fresh 16-byte salt unless given)."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=SCRYPT_LEN, maxmem=2**26)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches an encoded hash; False for a wrong one or a malformed hash."""
    try:
        scheme, n, r, p, salt, expected = encoded.split("$")
        if scheme != "scrypt":
            return False
        n_, r_, p_ = int(n), int(r), int(p)
        if not (2 <= n_ <= 2**20 and n_ & (n_ - 1) == 0 and 1 <= r_ <= 32 and 1 <= p_ <= 16):
            return False
        want = base64.b64decode(expected, validate=True)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt, validate=True),
            n=n_,
            r=r_,
            p=p_,
            dklen=len(want),
            maxmem=2**27,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


_DUMMY_HASH = hash_password("dummy password", salt=b"0123456789abcdef")


def read_password_file(path: str) -> dict[str, str]:
    """``user:hash`` lines (``#`` comments and blank lines skipped; malformed lines logged)."""
    users: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, encoded = line.partition(":")
            if not sep or not user or not encoded.startswith("scrypt$"):
                log.warn(
                    "manhole: {path}:{line}: not a user:scrypt$... line, ignored", path=path, line=number
                )
                continue
            users[user] = encoded
    return users


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """IUsernamePassword against the password file; scrypt runs in a thread (it takes ~50 ms)."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, path: str, run: Callable[..., Deferred[Any]] | None = None) -> None:
        self.path = path
        self._run = run

    def requestAvatarId(self, creds: Any) -> Deferred[bytes | tuple[()]]:
        username = creds.username.decode("utf-8", "replace")
        try:
            password = creds.password.decode("utf-8")
        except UnicodeDecodeError:
            password = None
        try:
            users = read_password_file(self.path)
        except OSError as exc:
            log.error("manhole: cannot read {path}: {error}", path=self.path, error=str(exc))
            return defer.fail(error.UnauthorizedLogin())
        encoded = users.get(username)
        run: Callable[..., Deferred[Any]]
        if self._run is not None:
            run = self._run
        else:
            from twisted.internet.threads import deferToThread

            run = deferToThread
        # an unknown user costs the same scrypt as a known one: no user enumeration by timing
        d = run(verify_password, password or "", encoded or _DUMMY_HASH)

        def checked(ok: bool) -> bytes | tuple[()]:
            if ok and encoded is not None and password is not None:
                log.info("manhole: {user} logged in with a password", user=username)
                return creds.username
            log.warn("manhole: password login refused for {user}", user=username)
            raise error.UnauthorizedLogin()

        return d.addCallback(checked)


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """IAuthorizedKeysDB over one authorized_keys file, re-read at every login; any user name."""

    def __init__(self, path: str) -> None:
        self.path = path

    def getAuthorizedKeys(self, username: bytes) -> list[keys.Key]:
        found = []
        try:
            with open(self.path, "rb") as fh:
                for number, line in enumerate(fh, 1):
                    line = line.strip()
                    if not line or line.startswith(b"#"):
                        continue
                    try:
                        found.append(keys.Key.fromString(line))
                    except (keys.BadKeyError, ValueError, IndexError):
                        log.warn(
                            "manhole: {path}:{line}: not a public key, ignored", path=self.path, line=number
                        )
        except OSError as exc:
            log.error("manhole: cannot read {path}: {error}", path=self.path, error=str(exc))
        return found


class _LoggingKeyChecker(SSHPublicKeyChecker):
    def requestAvatarId(self, creds: Any) -> Deferred[bytes]:
        d = super().requestAvatarId(creds)

        def ok(avatar: bytes) -> bytes:
            try:
                fingerprint = keys.Key.fromString(creds.blob).fingerprint(
                    keys.FingerprintFormats.SHA256_BASE64
                )
            except Exception:
                fingerprint = "?"
            log.info(
                "manhole: {user} logged in with key {fingerprint}",
                user=avatar.decode("utf-8", "replace"),
                fingerprint=fingerprint,
            )
            return avatar

        return d.addCallback(ok)


# ---------------------------------------------------------------------------------------------
# failed logins per source


def _peer_host(transport: Any) -> str:
    peer = transport.getPeer() if transport is not None else None
    return str(getattr(peer, "host", "") or "?")


class _GuardedUserAuth(userauth.SSHUserAuthServer):
    """conch's userauth, with the LoginGuard checked before each attempt and told of each failure."""

    guard: LoginGuard  # set on a per-service subclass

    def ssh_USERAUTH_REQUEST(self, packet: bytes) -> Any:
        transport = self.transport
        if transport is None:  # only between a connection's end and our teardown
            return None
        host = _peer_host(transport.transport)
        if self.guard.blocked(host):
            self.guard.refuse(host)
            transport.sendDisconnect(DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"too many failures")
            return None
        return super().ssh_USERAUTH_REQUEST(packet)

    def _ebBadAuth(self, reason: Any) -> None:
        if self.method == b"password" and reason.check(error.UnauthorizedLogin):
            self.guard.failed(_peer_host(self.transport.transport if self.transport else None))
        super()._ebBadAuth(reason)


class _GuardedConchFactory(manhole_ssh.ConchFactory):
    guard: LoginGuard

    def buildProtocol(self, addr: Any) -> Any:
        host = str(getattr(addr, "host", "") or "?")
        if self.guard.blocked(host):
            self.guard.refuse(host)
            return None  # the connection is closed before the key exchange costs anything
        return super().buildProtocol(addr)


# ---------------------------------------------------------------------------------------------
# host key


def load_host_key(path: Path) -> keys.Key:
    """The manhole host key at ``path``, created (ed25519, mode 0600) when missing."""
    if path.exists():
        return keys.Key.fromFile(str(path))
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = keys.Key(ed25519.Ed25519PrivateKey.generate())
    data = key.toString("openssh")
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    log.info(
        "manhole: new host key {fingerprint} in {path}",
        fingerprint=key.fingerprint(keys.FingerprintFormats.SHA256_BASE64),
        path=str(path),
    )
    return key


# ---------------------------------------------------------------------------------------------
# namespace


def _rpc_helper(rpc: Rpc, name: str) -> Callable[..., Any]:
    def helper(*args: Any, **kwargs: Any) -> Any:
        method = rpc.methods[name]
        params = dict(zip(method.params, args, strict=False))
        params.update(kwargs)
        try:
            return rpc.call(name, {k: v for k, v in params.items() if v is not None})
        except RpcError as err:
            return {"error": err.message, "status": err.status}

    helper.__name__ = name.replace(".", "_")
    helper.__doc__ = rpc.methods[name].doc
    return helper


def make_namespace(root: Any, parts: Any, rpc: Rpc) -> dict[str, Any]:
    """What the manhole shell starts with (see the module doc)."""
    ns: dict[str, Any] = {
        "service": root,
        "parts": parts,
        "config": parts.config,
        "registrar": parts.registrar,
        "location": parts.location,
        "silo": parts.silo,
        "calls": parts.b2bua,
        "b2bua": parts.b2bua,
        "transactions": parts.transactions,
        "transport": parts.transport,
        "push": parts.extra.get("push"),
        "rpc": rpc,
    }
    for name in rpc.methods:
        ns[name.replace(".", "_")] = _rpc_helper(rpc, name)

    def push_senders() -> list[Any]:
        """The push senders in use now (a SIGHUP reload replaces them)."""
        router = getattr(parts.extra.get("push"), "router", None)
        return list(getattr(router, "senders", []) or [])

    ns["push_senders"] = push_senders
    return ns


# ---------------------------------------------------------------------------------------------
# the service


class _Session(manhole_ssh.TerminalSession):
    """conch's TerminalSession raises NotImplementedError on EOF and on a window resize (a
    traceback in the log for every ``ssh ... < script`` or resized terminal): handle both."""

    width, height = 80, 24

    def getPty(self, term: bytes, windowSize: Any, attrs: Any) -> None:
        height, width = windowSize[:2]
        self.height, self.width = height or 24, width or 80

    def openShell(self, proto: Any) -> None:
        self._proto = proto
        self._terminal = self.transportFactory(
            proto, self.chainedProtocolFactory(), IConchUser(self.original), self.width, self.height
        )

    def windowChanged(self, newWindowSize: Any) -> None:
        height, width = newWindowSize[:2]
        terminal = getattr(self, "_terminal", None)
        if terminal is not None and width and height:
            terminal.chainedProtocol.terminalProtocol.terminalSize(width, height)

    def eofReceived(self) -> None:
        proto = getattr(self, "_proto", None)
        if proto is None:
            return
        try:  # a clean "exit 0" for `ssh ... < script`
            proto.session.conn.sendRequest(proto.session, b"exit-status", struct.pack(">L", 0))
        except Exception:
            pass
        proto.loseConnection()


@implementer(portal.IRealm)
class _Realm(manhole_ssh.TerminalRealm):
    """TerminalRealm is an IRealm that Twisted does not declare as one (Portal wants it declared)."""


class ManholeService(EndpointListener):
    """Listens on ``[manhole] listen`` with a conch SSH server running a Python manhole."""

    what = "manhole"

    def __init__(
        self,
        endpoint: str,
        namespace: dict[str, Any],
        host_key: keys.Key,
        authorized_keys: str = "",
        passwords: str = "",
        reactor: Any = None,
        max_failures: int = 5,
        ban_time: float = 300.0,
    ) -> None:
        if not authorized_keys and not passwords:
            raise ValueError("the manhole needs authorized_keys or passwords")  # config checks this too
        super().__init__(endpoint, reactor)
        self.setName("manhole")
        self.namespace = namespace
        checkers: list[Any] = []
        if authorized_keys:
            checkers.append(_LoggingKeyChecker(AuthorizedKeysFile(authorized_keys)))
        if passwords:
            checkers.append(PasswordFileChecker(passwords))
        realm = _Realm()
        realm.sessionFactory = _Session

        def terminal() -> insults.ServerProtocol:
            return insults.ServerProtocol(manhole.Manhole, self.namespace)

        # Twisted types chainedProtocolFactory as type[ServerProtocol]; it is any zero-argument factory
        realm.chainedProtocolFactory = terminal  # type: ignore[assignment]
        if reactor is None:
            from twisted.internet import reactor as clock
        else:
            clock = reactor
        self.guard = LoginGuard(clock, "manhole_login", max_failures, ban_time)
        self.factory = _GuardedConchFactory(portal.Portal(realm, checkers))
        self.factory.guard = self.guard

        class _UserAuth(_GuardedUserAuth):
            pass

        _UserAuth.guard = self.guard
        self.factory.services = {**self.factory.services, b"ssh-userauth": _UserAuth}
        key_type = host_key.sshType()
        # instance dicts: ConchFactory's class-level ones would be shared by every factory.
        self.factory.publicKeys = {key_type: host_key.public()}
        # ConchFactory types privateKeys with bytes values; SSHFactory uses Key objects, as we do
        self.factory.privateKeys = {key_type: host_key}  # type: ignore[dict-item]
        self.factory.noisy = False

    def listen_factory(self) -> Any:
        return self.factory


# ---------------------------------------------------------------------------------------------
# command line: make a password line


def main(argv: list[str] | None = None) -> int:
    """``python -m libon_tsilo.ops.manhole hash USER``: print a ``user:hash`` line for the passwords file.

    The password is prompted twice on a terminal, else read as one line from stdin.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "hash" or ":" in args[1] or not args[1]:
        print("usage: python -m libon_tsilo.ops.manhole hash USER", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Password (again): "):
            print("passwords do not match", file=sys.stderr)
            return 1
    else:
        first = sys.stdin.readline().rstrip("\r\n")
    if not first:
        print("empty password refused", file=sys.stderr)
        return 1
    print(f"{args[1]}:{hash_password(first)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
