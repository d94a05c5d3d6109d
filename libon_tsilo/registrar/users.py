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
from typing import Any

from twisted.logger import Logger

from libon_tsilo.sip.digest import ALGORITHMS, ha1, normalize_algorithm

__all__ = ["UserError", "UserRecord", "UsersDB", "valid_username", "valid_number"]

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

# Columns added after the first release, with their definitions: an older file gains them in place
# when it is opened (ALTER TABLE ... ADD COLUMN keeps every existing row).
_ADDED_COLUMNS = (
    ("number", "TEXT"),  # E.164, unique when set (index below)
    ("voicemail", "INTEGER NOT NULL DEFAULT 1"),
    ("max_calls_out", "INTEGER"),  # NULL = the server's default
    ("allowed_prefixes", "TEXT NOT NULL DEFAULT ''"),  # comma-separated E.164 prefixes; "" = any
)
_NUMBER_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS users_number ON users (number)"
_RECORD_COLUMNS = "username, realm, number, voicemail, max_calls_out, allowed_prefixes"
_E164 = re.compile(r"^\+[1-9][0-9]{2,14}$")
_PREFIX = re.compile(r"^\+[0-9]{0,15}$")
# a value that set_options() leaves as it is (None is a value there: "the server's default")
_KEEP: Any = object()


class UserError(ValueError):
    """A users-database operation that cannot be done (bad name, unknown or duplicate user)."""


@dataclass(frozen=True)
class UserRecord:
    username: str
    realm: str
    number: str | None = None  # E.164 ("+33123456789"): calls to it from gateways reach this user
    voicemail: bool = True  # unanswered calls go to [voicemail] (when configured)
    max_calls_out: int | None = None  # concurrent calls out; None = the server's default
    allowed_prefixes: tuple[str, ...] = ()  # E.164 prefixes the user may call out to; () = any

    def may_call(self, e164: str) -> bool:
        """Whether the per-user destination list lets this user call ``e164``."""
        return not self.allowed_prefixes or any(e164.startswith(p) for p in self.allowed_prefixes)


def valid_username(name: str) -> bool:
    return bool(_USERNAME.match(name))


def valid_number(number: str) -> bool:
    """An E.164 number as stored: "+", a country code not starting with 0, 3 to 15 digits."""
    return bool(_E164.match(number))


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
        self._migrate()

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        present = {row[1] for row in self._db.execute("PRAGMA table_info(users)")}
        for name, definition in _ADDED_COLUMNS:
            if name not in present:
                self._db.execute(f"ALTER TABLE users ADD COLUMN {name} {definition}")
        self._db.execute(_NUMBER_INDEX)

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

    def set_number(self, username: str, number: str | None) -> None:
        """Give the user an E.164 number (None takes it away); a number belongs to one user."""
        if number is not None and not valid_number(number):
            raise UserError(f"invalid number {number!r} (E.164: + and 3 to 15 digits, e.g. +33123456789)")
        try:
            cur = self._db.execute("UPDATE users SET number = ? WHERE username = ?", (number, username))
        except sqlite3.IntegrityError:
            owner = self.by_number(number) if number else None
            raise UserError(
                f"number {number} already belongs to {owner.username if owner else 'another user'!r}"
            ) from None
        if cur.rowcount == 0:
            raise UserError(f"no such user {username!r}")

    def set_options(
        self,
        username: str,
        *,
        voicemail: bool | None = None,
        max_calls_out: int | None = _KEEP,
        allowed_prefixes: tuple[str, ...] | None = None,
    ) -> None:
        """Change the per-user call options given (the others stay as they are)."""
        changes: list[tuple[str, object]] = []
        if voicemail is not None:
            changes.append(("voicemail", int(voicemail)))
        if max_calls_out is not _KEEP:
            if max_calls_out is not None and max_calls_out < 0:
                raise UserError(f"max calls out must be >= 0, got {max_calls_out}")
            changes.append(("max_calls_out", max_calls_out))
        if allowed_prefixes is not None:
            for prefix in allowed_prefixes:
                if not _PREFIX.match(prefix):
                    raise UserError(f"invalid prefix {prefix!r} (E.164: + and digits, e.g. +33)")
            changes.append(("allowed_prefixes", ",".join(allowed_prefixes)))
        if not changes:
            if not self.exists(username):
                raise UserError(f"no such user {username!r}")
            return
        assignments = ", ".join(f"{name} = ?" for name, _ in changes)
        cur = self._db.execute(
            f"UPDATE users SET {assignments} WHERE username = ?",
            (*(value for _, value in changes), username),
        )
        if cur.rowcount == 0:
            raise UserError(f"no such user {username!r}")

    def delete(self, username: str) -> None:
        cur = self._db.execute("DELETE FROM users WHERE username = ?", (username,))
        if cur.rowcount == 0:
            raise UserError(f"no such user {username!r}")

    # -- reads ----------------------------------------------------------------------------------

    def list(self) -> list[UserRecord]:
        rows = self._db.execute(f"SELECT {_RECORD_COLUMNS} FROM users ORDER BY username").fetchall()
        return [_record(row) for row in rows]

    def get(self, username: str) -> UserRecord | None:
        """The user's record, or None (unknown user, or a read that failed: logged)."""
        if not username.isascii() and not _encodable(username):
            return None
        return self._one(f"SELECT {_RECORD_COLUMNS} FROM users WHERE username = ?", username)

    def by_number(self, number: str) -> UserRecord | None:
        """The user whose E.164 number is ``number``, or None."""
        return self._one(f"SELECT {_RECORD_COLUMNS} FROM users WHERE number = ?", number)

    def _one(self, query: str, value: str) -> UserRecord | None:
        try:
            row = self._db.execute(query, (value,)).fetchone()
        except sqlite3.Error as exc:
            # a locked or damaged file must not crash request handling; the caller treats it as unknown
            log.error("users db {path}: read failed: {err}", path=self.path, err=exc)
            return None
        return _record(row) if row is not None else None

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


def _record(row: tuple[Any, ...]) -> UserRecord:
    username, realm, number, voicemail, max_calls_out, prefixes = row
    return UserRecord(
        username=username,
        realm=realm,
        number=number,
        voicemail=bool(voicemail),
        max_calls_out=max_calls_out,
        allowed_prefixes=tuple(p for p in prefixes.split(",") if p),
    )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
