"""Issue 11 item 9 at the registrar: an Expires header, a Contact ;expires= or a reg-id of thousands of
digits is a 400, not a 500 with a traceback (int() refuses more than 4,300 digits)."""

from __future__ import annotations

import pytest

from tests.registrar.test_registrar import AOR, Env

HUGE = "9" * 5000


@pytest.mark.parametrize(("contact", "extra"), [
    ("<sip:a@h1>", [f"Expires: {HUGE}"]),
    (f"<sip:a@h1>;expires={HUGE}", []),
    (f'<sip:a@h1>;expires="{HUGE}"', []),
    (f'<sip:a@h1>;+sip.instance="<urn:uuid:1>";reg-id={HUGE}', []),
    ("<sip:a@h1>;expires=\u00b2", []),  # str.isdigit() is true, int() refuses it
])
def test_huge_numbers_get_400(contact: str, extra: list[str]) -> None:
    env = Env()
    assert env.register([contact], extra=extra).status == 400
    assert env.store.lookup(AOR) == []


def test_leading_zeros_are_a_small_number() -> None:
    env = Env()
    resp = env.register([f"<sip:a@h1>;expires={'0' * 5000}120;+sip.instance=\"<urn:uuid:1>\";reg-id=0001"])
    assert resp.status == 200
    (binding,) = env.store.lookup(AOR)
    assert binding.reg_id == 1
