"""The dial plan: every spelling of a number becomes one E.164 string, anything else None."""

from __future__ import annotations

import pytest

from libon_tsilo.dialplan import DialPlan, number_of
from libon_tsilo.sip.uri import URI

FRANCE = DialPlan(country_code="33", national_prefix="0", international_prefixes=("00",))
US = DialPlan(country_code="1", national_prefix="1", international_prefixes=("011",))


@pytest.mark.parametrize(
    "text",
    ["+33 1 23 45 67 89", "+33-1-23-45-67-89", "+33(1)23.45.67.89", "0033123456789", "01 23 45 67 89"],
)
def test_french_spellings_give_one_e164(text: str) -> None:
    assert FRANCE.to_e164(text) == "+33123456789"


@pytest.mark.parametrize(
    "text", ["alice", "", "+", "12*3", "#31#", "+0123456", "+3312345678901234", "0033", "1a2b3c"]
)
def test_what_is_not_a_number(text: str) -> None:
    assert FRANCE.to_e164(text) is None


def test_longest_international_prefix_wins_over_the_national_prefix() -> None:
    plan = DialPlan(country_code="1", national_prefix="0", international_prefixes=("0", "011"))
    assert plan.to_e164("01144207946000") == "+44207946000"
    assert US.to_e164("1 212 555 0100") == "+12125550100"
    assert US.to_e164("011 44 20 7946 0000") == "+442079460000"


def test_national_numbers_need_a_country_code_and_the_national_prefix() -> None:
    assert DialPlan().to_e164("0123456789") is None
    assert DialPlan().to_e164("+33123456789") == "+33123456789"
    assert FRANCE.to_e164("123456789") is None  # no trunk prefix: a short code, not a national number
    assert DialPlan(country_code="33", national_prefix="").to_e164("123456789") == "+33123456789"


@pytest.mark.parametrize(
    ("uri", "number"),
    [
        ("tel:+33-1-23-45-67-89", "+33-1-23-45-67-89"),
        ("sip:+33123456789@example.com", "+33123456789"),
        ("sip:0123456789@example.com;user=phone", "0123456789"),
        ("sip:+33123456789;isub=12@example.com;user=phone", "+33123456789"),
        ("sip:alice@example.com", None),
        ("sip:example.com", None),
        ("sip:123abc@example.com", None),
    ],
)
def test_number_of_a_request_uri(uri: str, number: str | None) -> None:
    assert number_of(URI.parse(uri)) == number
