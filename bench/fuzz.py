"""The long fuzz run: N mutated messages through the parser (and framer), and N through the server.

    .venv/bin/python bench/fuzz.py [--n 1000000] [--seed 4475] [--only parser|stack]

The same seeded mutator as tests/sip/test_fuzz.py (tests/sip/fuzzing.py: the RFC 4475 corpus and
our own messages, one to four edits each). ``parser``: parse, validate, every accessor, the 400 and
the round trip through our serializer; anything but ParseError is a finding. ``stack``: the real
service tree (transport, transactions, router, UAS core, registrar, calls) on a Clock with a fake
reactor, fed datagrams and, one message in ten, TCP bytes in chunks; each traceback the server logs
is a finding. A fresh server every 50,000 messages (with the next seed, and digest auth on every
other one) keeps memory flat. Prints
messages, seconds and findings per part (the first three in full); exits 1 if any were found.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.sip.fuzzing import Mutator, Stack, fuzz_parser, run_stack  # noqa: E402

STACK_CHUNK = 50_000



def fuzz_stack(n: int, seed: int) -> list[str]:
    found: list[str] = []
    done = 0
    while done < n:
        count = min(STACK_CHUNK, n - done)
        auth = (done // STACK_CHUNK) % 2 == 1  # every other server has digest auth on
        with Stack(auth=auth) as stack:
            run_stack(stack, Mutator(seed + done), count)
            found += [f"seed {seed + done} auth {auth}: {f}" for f in stack.failures]
        done += count
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="messages per part")
    p.add_argument("--seed", type=int, default=4475)
    p.add_argument("--only", choices=("parser", "stack"))
    args = p.parse_args()
    total = 0
    print(f"{'part':<8} {'messages':>10} {'seconds':>9} {'msg/s':>9} {'findings':>9}")
    for part, run in (("parser", fuzz_parser), ("stack", fuzz_stack)):
        if args.only and args.only != part:
            continue
        start = time.perf_counter()
        found = run(args.n, args.seed)
        took = time.perf_counter() - start
        print(f"{part:<8} {args.n:>10,} {took:>9.1f} {args.n / took:>9,.0f} {len(found):>9}", flush=True)
        for finding in found[:3]:
            print(finding, file=sys.stderr)
        total += len(found)
    print("no exception other than ParseError, no traceback" if total == 0 else f"{total} FINDINGS")
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
