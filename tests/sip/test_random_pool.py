"""Tags and Call-IDs come from os.urandom read 4 KiB at a time, not one syscall each (issue 15)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from libon_tsilo.sip import message
from libon_tsilo.sip.message import new_call_id, new_tag


def test_tags_and_call_ids_share_few_urandom_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        reads.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", counting)
    message._empty_pool()
    tags = {new_tag() for _ in range(300)}
    call_ids = {new_call_id("h") for _ in range(100)}
    assert len(tags) == 300 and len(call_ids) == 100  # every one different
    assert {len(t) for t in tags} == {12} and {len(c) for c in call_ids} == {len("@h") + 24}
    assert len(reads) == 1  # 300 * 6 + 100 * 12 bytes: one read of the pool


def test_a_forked_child_does_not_repeat_the_parent_bytes() -> None:
    new_tag()  # the pool is filled in this process
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(w, new_tag().encode())
        finally:
            os._exit(0)
    os.close(w)
    child: Any = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert len(child) == 12 and child != new_tag()
