"""The users database: one SQLite file of digest credentials, stored as HA1 hashes only.

A password is hashed with the realm into H(user:realm:password) for every algorithm we offer
(MD5 and SHA-256) and then forgotten; the plaintext is never written anywhere. The realm is stored
with the hashes because they are worthless under another realm: a user whose realm differs from the
server's is treated as unknown (and logged), not silently accepted.

Reads happen on the reactor thread. They are single indexed lookups on a small local file (well
under a millisecond), and WAL mode means the admin CLI writing at the same time never blocks them.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass

from twisted.logger import Logger

from libon_tsilo.sip.digest import ALGORITHMS, ha1, normalize_algorithm

__all__ = ["UserError", "UserRecord", "UsersDB", "valid_username"]

log = Logger()

# The SIP user part chars we allow in an account name (RFC 3261 unreserved + user-unreserved),
# without escapes: names end up in AORs, logs and admin output.
_USERNAME = re.compile(r"^[A-Za-z0-9\-_.!~*'()&=+$,;?/]{1,64}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    username   TEXT PRIMARY KEY,
    realm      TEXT NOT NULL,
    ha1_md5    TEXT NOT NULL,
    ha1_sha256 TEXT NOT NULL
)
"""

_COLUMNS = {"MD5": "ha1_md5", "SHA-256": "ha1_sha256"}


class UserError(ValueError):
    """A users-database operation that cannot be done (bad name, unknown or duplicate user)."""


@dataclass(frozen=True)
class UserRecord:
    username: str
    realm: str


def valid_username(name: str) -> bool:
    return bool(_USERNAME.match(name))


class UsersDB:
    """Credentials keyed by user name. ``path`` may be ":memory:" (tests)."""

    def __init__(self, path: str) -> None:
        self.path = path
        # the server reads on the reactor thread only; the CLI is single-threaded
        self._db = sqlite3.connect(path, isolation_level=None)
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=2000")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # -- writes (admin CLI) ---------------------------------------------------------------------

    def add(self, username: str, password: str, realm: str) -> None:
        self._check(username, password)
        try:
            self._db.execute(
                "INSERT INTO users (username, realm, ha1_md5, ha1_sha256) VALUES (?, ?, ?, ?)",
                (username, realm, *self._hashes(username, realm, password)),
            )
        except sqlite3.IntegrityError:
            raise UserError(f"user {username!r} already exists") from None

    def set_password(self, username: str, password: str, realm: str) -> None:
        self._check(username, password)
        cur = self._db.execute(
            "UPDATE users SET realm = ?, ha1_md5 = ?, ha1_sha256 = ? WHERE username = ?",
            (realm, *self._hashes(username, realm, password), username),
        )
        if cur.rowcount == 0:
            raise UserError(f"no such user {username!r}")

    def delete(self, username: str) -> None:
        cur = self._db.execute("DELETE FROM users WHERE username = ?", (username,))
        if cur.rowcount == 0:
            raise UserError(f"no such user {username!r}")

    # -- reads ----------------------------------------------------------------------------------

    def list(self) -> list[UserRecord]:
        rows = self._db.execute("SELECT username, realm FROM users ORDER BY username").fetchall()
        return [UserRecord(u, r) for u, r in rows]

    def exists(self, username: str) -> bool:
        row = self._db.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone()
        return row is not None

    def get_ha1(self, username: str, realm: str, algorithm: str) -> str | None:
        """The stored HA1 for ``algorithm`` under ``realm``, or None (unknown user, other realm)."""
        column = _COLUMNS[normalize_algorithm(algorithm)]
        if not username.isascii() and not _encodable(username):
            return None  # the request's bytes were not UTF-8 (surrogates): sqlite3 could not bind them
        try:
            row = self._db.execute(
                f"SELECT realm, {column} FROM users WHERE username = ?", (username,)
            ).fetchone()
        except sqlite3.Error as exc:
            # a locked or damaged file refuses the login; it must not crash request handling
            log.error("users db {path}: read failed: {err}", path=self.path, err=exc)
            return None
        if row is None:
            return None
        stored_realm, value = row
        if stored_realm != realm:
            log.warn(
                "user {user} has credentials for realm {stored!r}, not {realm!r}: reset the password",
                user=username,
                stored=stored_realm,
                realm=realm,
            )
            return None
        return value

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _check(username: str, password: str) -> None:
        if not valid_username(username):
            raise UserError(
                f"invalid user name {username!r} (1-64 chars: letters, digits, -_.!~*'()&=+$,;?/)"
            )
        if not password:
            raise UserError("empty password")
        if any(c in password for c in "\r\n\0"):
            raise UserError("password contains a line break or NUL")

    @staticmethod
    def _hashes(username: str, realm: str, password: str) -> tuple[str, str]:
        assert set(_COLUMNS) == set(ALGORITHMS)
        return ha1(username, realm, password, "MD5"), ha1(username, realm, password, "SHA-256")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
