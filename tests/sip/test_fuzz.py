"""Seeded mutation fuzzing (issue 11): the RFC 4475 corpus and our own messages, mutated, through the
parser and the stream framer, then through the whole server below its sockets (transport,
transaction layer, router and UAS core, registrar and digest auth, calls) on a Clock. Nothing but ParseError may
come out of the parser, and the server may log no traceback. A fixed budget of a few seconds;
bench/fuzz.py runs the same with any count. A failure prints the seed and index to replay."""

from __future__ import annotations


import pytest

from tests.sip.fuzzing import Mutator, Stack, fuzz_parser, run_stack

SEED = 4475
PARSER_BUDGET = 10000
STACK_BUDGET = 2000


def test_parser_and_framer_raise_only_parse_errors() -> None:
    problems = fuzz_parser(PARSER_BUDGET, SEED)
    assert not problems, f"{len(problems)} inputs raised:\n" + "\n".join(problems[:3])


@pytest.mark.parametrize("auth", [False, True], ids=["auth-off", "auth-on"])
def test_server_logs_no_traceback_on_mutated_traffic(auth: bool) -> None:
    with Stack(auth=auth) as stack:
        fed = run_stack(stack, Mutator(SEED + 1), STACK_BUDGET)
        assert fed == STACK_BUDGET
        assert not stack.failures, f"{len(stack.failures)} tracebacks:\n" + "\n".join(stack.failures[:3])
        # the server still works: an OPTIONS gets its 200
        stack.sent()
        stack.datagram(b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:16000;branch=z9hG4bKok\r\n"
                       b"Max-Forwards: 70\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1>\r\n"
                       b"Call-ID: alive@fuzz\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        assert any(d.startswith(b"SIP/2.0 200 ") for d in stack.sent())
