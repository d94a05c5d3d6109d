"""In-process cost of a REGISTER with digest auth and the SQLite location store (issue 15).

    .venv/bin/python bench/inproc_auth.py [--n 200]            # instructions, under callgrind
    .venv/bin/python bench/inproc_auth.py --code DIR [--n 200]  # the libon_tsilo of another checkout

Each registration is what SIPp's register_bench_auth.xml does, in process: a REGISTER, its 401
(AuthPolicy over a users db, MD5), the REGISTER again with Authorization, its 200 once the binding
is committed. One AOR for all (as that scenario), each registration with a new Call-ID; the SQLite
store's batches are written inline, 8 registrations per commit, so the count is deterministic (the
worker thread's hand-off is not counted). The figure is callgrind's instruction count with N
registrations minus the count with none, divided by N: instructions per registration (2 REGISTERs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(n: int) -> None:
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from libon_tsilo.registrar.auth import AuthPolicy
    from libon_tsilo.registrar.location import LocationStore
    from libon_tsilo.registrar.registrar import Registrar
    from libon_tsilo.registrar.sqlite_store import SqliteBindingStore
    from libon_tsilo.registrar.users import UsersDB
    from libon_tsilo.sip.message import Response, parse_message
    from tests.fakes.sip import FakeFlow
    from tests.registrar.helpers import digest_authorization, register_text

    clock = Clock()
    clock.advance(1_000_000)
    tmp = tempfile.mkdtemp()
    users = UsersDB(os.path.join(tmp, "users.sqlite"))
    users.add("alice", "wonderland", "example.com")
    inline = SqliteBindingStore(os.path.join(tmp, "loc.sqlite"), clock,
                                run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    store = LocationStore(clock, persistence=inline)
    store.start()
    policy = AuthPolicy(clock, users, "example.com", "bench-secret", nonce_lifetime=300,
                        local_domains=["example.com"], algorithms=("MD5",))
    registrar = Registrar(clock, store, domains=["example.com"], auth=policy)
    flow = FakeFlow()
    answers: list[Response] = []

    class Stx:
        def respond(self, resp: Response) -> None:
            answers.append(resp)

    contact = ["<sip:alice@192.0.2.10:40000>"]
    for i in range(n):
        registrar.handle_register(parse_message(register_text(contact, call_id=f"c{i}")), Stx(), flow)
        challenge = next(r for r in reversed(answers) if r.status == 401).header("WWW-Authenticate") or ""
        auth = digest_authorization(challenge, "alice", "wonderland", "REGISTER", "sip:example.com")
        again = register_text(contact, call_id=f"c{i}", cseq=2, extra=[f"Authorization: {auth}"])
        registrar.handle_register(parse_message(again), Stx(), flow)
        if i % 8 == 7:
            store.flush()
        clock.advance(0.001)
    store.flush()
    statuses = sorted(r.status for r in answers)  # a 200 waits for its commit: not in request order
    if statuses != [200] * n + [401] * n:
        raise SystemExit(f"unexpected answers: {statuses[:6]}...")


def count(code: Path, n: int) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import callgrind

    return callgrind.count([sys.executable, __file__, "--child", str(n), "--code", str(code)],
                           extra_env={"PYTHONPATH": str(code)}, cwd=code)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="registrations (2 REGISTERs each)")
    p.add_argument("--code", type=Path, default=ROOT, help="the checkout whose libon_tsilo runs")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        sys.path.insert(0, str(args.code))
        run(args.child)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    per = (count(args.code, args.n) - count(args.code, 0)) / args.n
    print(f"REGISTER with digest auth, SQLite store: {per:,.0f} instructions per registration "
          f"(2 REGISTERs) [{args.code}]")


if __name__ == "__main__":
    main()
