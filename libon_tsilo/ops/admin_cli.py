"""``libon-tsilo-admin``: manage the digest users database named by the config file.

    libon-tsilo-admin [--config FILE] user add NAME [--password PW] [--number NUMBER]
    libon-tsilo-admin [--config FILE] user passwd NAME [--password PW]
    libon-tsilo-admin [--config FILE] user set NAME [--number NUMBER | --no-number]
                      [--voicemail on|off] [--max-calls-out N|none] [--allow-prefixes +33,+44|any]
    libon-tsilo-admin [--config FILE] user show NAME
    libon-tsilo-admin [--config FILE] user del NAME
    libon-tsilo-admin [--config FILE] user list

A NUMBER is normalised to E.164 with the config's ``[dialplan]`` ("01 23 45 67 89" with country code
33 is stored as +33123456789); calls to it from gateways reach the user.

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

from libon_tsilo.dialplan import DialPlan
from libon_tsilo.registrar.users import UserError, UserRecord, UsersDB

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="libon-tsilo-admin", description="Manage libon-tsilo users.")
    parser.add_argument(
        "--config", metavar="FILE", help="the server's TOML config (default: built-in defaults)"
    )
    groups = parser.add_subparsers(dest="group", metavar="user", required=True)
    user = groups.add_parser("user", help="digest users (SQLite, HA1 hashes only)")
    actions = user.add_subparsers(dest="action", metavar="add|del|list|passwd|set|show", required=True)
    for name, text in (("add", "create a user"), ("passwd", "set a user's password")):
        p = actions.add_parser(name, help=text)
        p.add_argument("name", metavar="NAME")
        p.add_argument("--password", help="the password (else prompted, or read from stdin)")
        if name == "add":
            p.add_argument("--number", help="the user's phone number (E.164 after the dial plan)")
    p = actions.add_parser("set", help="set a user's number and call options")
    p.add_argument("name", metavar="NAME")
    number = p.add_mutually_exclusive_group()
    number.add_argument("--number", help="the user's phone number (E.164 after the dial plan)")
    number.add_argument("--no-number", action="store_true", help="take the user's number away")
    p.add_argument("--voicemail", choices=("on", "off"), help="forward unanswered calls to voicemail")
    p.add_argument("--max-calls-out", metavar="N|none", help="concurrent calls out (none = default)")
    p.add_argument("--allow-prefixes", metavar="+33,+44|any", help="numbers the user may call out to")
    for name, text in (("del", "delete a user"), ("show", "show a user's record")):
        p = actions.add_parser(name, help=text)
        p.add_argument("name", metavar="NAME")
    actions.add_parser("list", help="list users")
    return parser


def _e164(text: str, plan: DialPlan) -> str:
    number = plan.to_e164(text)
    if number is None:
        raise UserError(f"{text!r} is not a phone number under [dialplan] (try +<country><number>)")
    return number


def _describe(record: UserRecord) -> str:
    limit = "default" if record.max_calls_out is None else str(record.max_calls_out)
    prefixes = ",".join(record.allowed_prefixes) or "any"
    return (
        f"{record.username}  number={record.number or '-'}  voicemail={'on' if record.voicemail else 'off'}"
        f"  max_calls_out={limit}  allow_prefixes={prefixes}"
    )


def _set(db: UsersDB, args: argparse.Namespace, plan: DialPlan) -> None:
    if args.number is not None:
        db.set_number(args.name, _e164(args.number, plan))
    elif args.no_number:
        db.set_number(args.name, None)
    options: dict[str, object] = {}
    if args.voicemail is not None:
        options["voicemail"] = args.voicemail == "on"
    if args.max_calls_out is not None:
        if args.max_calls_out == "none":
            options["max_calls_out"] = None
        elif args.max_calls_out.isdigit():
            options["max_calls_out"] = int(args.max_calls_out)
        else:
            raise UserError(f"--max-calls-out: expected a number or none, got {args.max_calls_out!r}")
    if args.allow_prefixes is not None:
        text = args.allow_prefixes.strip()
        options["allowed_prefixes"] = () if text == "any" else tuple(
            p.strip() for p in text.split(",") if p.strip()
        )
    db.set_options(args.name, **options)  # type: ignore[arg-type]


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
        plan = config.dial_plan()
        if args.action == "list":
            for record in db.list():
                note = "" if record.realm == realm else f"  (realm {record.realm!r}: reset its password)"
                shown_number = f"  {record.number}" if record.number else ""
                print(f"{record.username}{shown_number}{note}", file=stdout)
            return 0
        if args.action == "show":
            found = db.get(args.name)
            if found is None:
                raise UserError(f"no such user {args.name!r}")
            print(_describe(found), file=stdout)
            return 0
        if args.action == "set":
            _set(db, args, plan)
            print(f"updated {args.name}", file=stdout)
            return 0
        if args.action == "del":
            db.delete(args.name)
            print(f"deleted {args.name}", file=stdout)
            return 0
        password = args.password if args.password is not None else _read_password(stdin, stderr)
        if password is None:
            return 1
        if args.action == "add":
            number = _e164(args.number, plan) if args.number is not None else None
            db.add(args.name, password, realm)
            if number is not None:
                try:
                    db.set_number(args.name, number)
                except UserError:
                    db.delete(args.name)  # all or nothing: no user left without the number asked for
                    raise
            shown = f", number {number}" if number else ""
            print(f"added {args.name} (realm {realm}{shown})", file=stdout)
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
