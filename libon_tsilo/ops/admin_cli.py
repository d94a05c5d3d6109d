"""``libon-tsilo-admin``: manage the digest users database named by the config file.

    libon-tsilo-admin [--config FILE] user add NAME [--password PW]
    libon-tsilo-admin [--config FILE] user passwd NAME [--password PW]
    libon-tsilo-admin [--config FILE] user del NAME
    libon-tsilo-admin [--config FILE] user list

Without --password the password is prompted twice (getpass) on a terminal, or read as one line from
stdin otherwise (scripts: ``echo secret | libon-tsilo-admin user add alice``). Passing it on the
command line is allowed but leaks into the shell history and ``ps``.

Exit status: 0 done, 1 the operation failed (unknown/duplicate user, bad config), 2 bad usage.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TextIO

from libon_tsilo.registrar.users import UserError, UsersDB

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="libon-tsilo-admin", description="Manage libon-tsilo users.")
    parser.add_argument(
        "--config", metavar="FILE", help="the server's TOML config (default: built-in defaults)"
    )
    groups = parser.add_subparsers(dest="group", metavar="user", required=True)
    user = groups.add_parser("user", help="digest users (SQLite, HA1 hashes only)")
    actions = user.add_subparsers(dest="action", metavar="add|del|list|passwd", required=True)
    for name, text in (("add", "create a user"), ("passwd", "set a user's password")):
        p = actions.add_parser(name, help=text)
        p.add_argument("name", metavar="NAME")
        p.add_argument("--password", help="the password (else prompted, or read from stdin)")
    p = actions.add_parser("del", help="delete a user")
    p.add_argument("name", metavar="NAME")
    actions.add_parser("list", help="list users")
    return parser


def _read_password(stdin: TextIO, stderr: TextIO) -> str | None:
    if stdin.isatty():
        first = getpass.getpass("Password: ")
        second = getpass.getpass("Password (again): ")
        if first != second:
            print("libon-tsilo-admin: passwords do not match", file=stderr)
            return None
        return first
    line = stdin.readline()
    return line.rstrip("\r\n")


def main(
    argv: list[str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage line and the error
        return int(exc.code or 0)

    from libon_tsilo.ops.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"libon-tsilo-admin: {exc}", file=stderr)
        return 1
    realm = config.auth.realm
    try:
        db = UsersDB(config.auth.users_db)
    except Exception as exc:  # sqlite3 errors, permissions: one clear line, no traceback
        print(f"libon-tsilo-admin: cannot open users db {config.auth.users_db}: {exc}", file=stderr)
        return 1
    try:
        if args.action == "list":
            for record in db.list():
                note = "" if record.realm == realm else f"  (realm {record.realm!r}: reset its password)"
                print(f"{record.username}{note}", file=stdout)
            return 0
        if args.action == "del":
            db.delete(args.name)
            print(f"deleted {args.name}", file=stdout)
            return 0
        password = args.password if args.password is not None else _read_password(stdin, stderr)
        if password is None:
            return 1
        if args.action == "add":
            db.add(args.name, password, realm)
            print(f"added {args.name} (realm {realm})", file=stdout)
        else:
            db.set_password(args.name, password, realm)
            print(f"password set for {args.name} (realm {realm})", file=stdout)
        return 0
    except UserError as exc:
        print(f"libon-tsilo-admin: {exc}", file=stderr)
        return 1
    except Exception as exc:
        print(f"libon-tsilo-admin: users db {config.auth.users_db}: {exc}", file=stderr)
        return 1
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main())
