from __future__ import annotations

import pytest

from libon_tsilo.b2bua.forking import best_final, caller_status, is_global_failure


@pytest.mark.parametrize(
    "statuses, expected",
    [
        ([], None),
        ([180, 183], None),
        ([486], 486),
        ([404, 486, 500], 486),  # lowest class wins, 486 preferred in it
        ([500, 503], 500),
        ([302, 404], 302),
        ([486, 603, 404], 603),  # any 6xx beats everything
        ([410, 408], 408),  # no preferred code: the lowest
    ],
)
def test_best_final(statuses: list[int], expected: int | None) -> None:
    assert best_final(statuses) == expected


@pytest.mark.parametrize(
    "chosen, shown",
    [(None, 480), (408, 480), (401, 480), (407, 480), (422, 480), (503, 500), (486, 486), (603, 603)],
)
def test_caller_status(chosen: int | None, shown: int) -> None:
    assert caller_status(chosen) == shown


def test_global_failure() -> None:
    assert is_global_failure(600) and is_global_failure(603)
    assert not is_global_failure(486) and not is_global_failure(200)
