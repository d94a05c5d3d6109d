"""Build hook: the hot, typed modules compiled with mypyc when possible, pure Python otherwise.

Everything else about the package is in setup.cfg. mypyc (part of mypy, a build requirement in
pyproject.toml) turns the modules below into C extensions that run the same code several times
faster (issue 15: the SIP parser and message model are ~40 % of a call's CPU). The .py files stay
next to the extensions and are what runs when the build could not compile: no C compiler or Python
headers, mypy missing, or LIBON_TSILO_PURE=1 in the environment. An extension that fails to
compile is skipped with a warning (optional), never a failed install.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# typed modules on the per-message path; each must keep passing mypy as mypyc compiles it. The build
# environment may or may not have Twisted: mypyc never reads it (--no-site-packages; without the
# project's zope plugin its interfaces do not type-check) and its types are Any. The transaction
# classes are compiled together with their base class in timers.py: an interpreted class cannot
# subclass a compiled one
COMPILED = [
    "libon_tsilo/sip/message.py",
    "libon_tsilo/sip/headers.py",
    "libon_tsilo/sip/uri.py",
    "libon_tsilo/sip/timers.py",
    "libon_tsilo/sip/transaction.py",
    "libon_tsilo/sip/transaction_client.py",
    "libon_tsilo/sip/transaction_server.py",
    # the call layer on a late fork's path (issue 15, round 3): a call's branches, dialogs and
    # states; OutboundCall subclasses Call, so it is compiled with it
    "libon_tsilo/b2bua/call.py",
    "libon_tsilo/b2bua/outbound.py",
    "libon_tsilo/b2bua/legs.py",
    "libon_tsilo/b2bua/dialog.py",
    "libon_tsilo/b2bua/forking.py",
    "libon_tsilo/b2bua/states.py",
    "libon_tsilo/b2bua/ports.py",
    "libon_tsilo/b2bua/relay.py",
    "libon_tsilo/b2bua/session_timer.py",
    # the helpers a late fork calls on its way (issue 15, round 6): interpreted, each call into them
    # cost an interpreter frame, ~25 per call
    "libon_tsilo/b2bua/reliable.py",
    "libon_tsilo/b2bua/capabilities.py",
    "libon_tsilo/b2bua/targets.py",
    "libon_tsilo/b2bua/admission.py",
    "libon_tsilo/b2bua/identity.py",
    # and what hands a request to it: the call manager, the router and the UAS core's checks
    "libon_tsilo/b2bua/manager.py",
    "libon_tsilo/sip/router.py",
    "libon_tsilo/sip/uas_core.py",
    # the REGISTER path (issue 15, round 3): the router and UAS core's checks (above), the domain
    # check, and registrar/ (LocationObserver, which the observers subclass, is in observer.py, left
    # interpreted)
    "libon_tsilo/sip/hostnames.py",
    "libon_tsilo/registrar/binding.py",
    "libon_tsilo/registrar/push_params.py",
    "libon_tsilo/registrar/location.py",
    "libon_tsilo/registrar/registrar.py",
    # the datagram path (issue 15, round 4): the transport's per-message work; the Twisted port,
    # protocol and factory classes it uses stay interpreted (sip/twisted_io.py: a compiled class
    # cannot subclass Twisted's), and so does sip/flow.py's Flow (compiled, it would refuse the tests'
    # FakeFlow in every compiled module typed with it)
    "libon_tsilo/sip/transport.py",
    "libon_tsilo/sip/udp_send.py",
    # issue 15, the call path: the flow table the transport reads and touches per datagram (Flow
    # itself stays interpreted: sip/flow.py says why)
    "libon_tsilo/sip/flow_table.py",
    # issue 15, round 4 (per-message Python): the message counters' hooks, run on every message
    "libon_tsilo/ops/message_counters.py",
    # and the silo, which late-forks a parked call when its device registers
    "libon_tsilo/silo/silo.py",
    # the cluster relay (issue 14, round 4): what an edge node does with each message of a call it
    # relays, a relayed response cut as bytes, and the keyed branch that proves its next hop
    "libon_tsilo/cluster/relay.py",
    "libon_tsilo/sip/wire_edit.py",
    "libon_tsilo/cluster/relay_branch.py",
    # the Redis store's per-REGISTER path (issue 14, round 7): the batch writes, their schedule, the
    # connection they go over and the JSON; the rest of the store (feed, claims, write-backs) stays
    # interpreted (tests replace its methods), and so do the SQLite stores' batches
    "libon_tsilo/group_commit.py",
    "libon_tsilo/registrar/redis_codec.py",
    "libon_tsilo/registrar/redis_wire.py",
    "libon_tsilo/registrar/redis_writes.py",
    # issue 14, round 8: the feed's per-message path (each change of another node applied), and the
    # REGISTERs waiting for their commit (two calls per REGISTER on the Redis store)
    "libon_tsilo/registrar/redis_feed.py",
    "libon_tsilo/registrar/pending_answers.py",
    # issue 15, the interpreted calls left on a late fork: the per-source limiter every request
    # passes, the branch ids every request we send carries, and what classifies the callee (Flow
    # stays interpreted: sip/flow.py says why)
    "libon_tsilo/sip/limits.py",
    "libon_tsilo/sip/branch.py",
    "libon_tsilo/dialplan.py",
    "libon_tsilo/routing/local.py",
    "libon_tsilo/routing/destinations.py",
    "libon_tsilo/routing/policy.py",
]


def drop_built_in_place() -> None:
    """Remove extensions an earlier editable install built next to the sources: Python would import
    them instead of the .py files."""
    for path in COMPILED:
        for so in (ROOT / path).parent.glob(f"{Path(path).stem}.*.so"):
            so.unlink()
    # mypyc's shared library: next to the package when one module is compiled, at the root for several
    for so in [*ROOT.glob("*__mypyc.*.so"), *(ROOT / "libon_tsilo").rglob("*__mypyc.*.so")]:
        so.unlink()


def ext_modules() -> list:
    if os.environ.get("LIBON_TSILO_PURE", "") not in ("", "0"):
        drop_built_in_place()
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("libon-tsilo: mypyc not found, installing pure Python", file=sys.stderr)
        drop_built_in_place()
        return []
    try:
        # the project's [mypy] section loads a plugin the build environment does not have:
        # mypyc type-checks with mypy's defaults instead (`scripts/test` runs the strict check)
        flags = ["--config-file=", "--no-site-packages", "--ignore-missing-imports"]
        extensions = mypycify([*flags, *COMPILED], opt_level="3")
    except BaseException as e:  # noqa: BLE001 - mypy exits on a type error: fall back, do not fail
        print(f"libon-tsilo: mypyc failed ({e!r}), installing pure Python", file=sys.stderr)
        drop_built_in_place()
        return []
    for ext in extensions:
        ext.optional = True  # no compiler or headers: build_ext warns and the .py files are used
    return extensions


os.chdir(ROOT)  # mypycify takes the paths relative to the project
setup(ext_modules=ext_modules())
