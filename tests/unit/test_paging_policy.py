"""Host paging policy (pure): how much to page out, the guest's runs validated, which pages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from symbiont.paging.policy import pageout_target_mib, sanitize_runs, select


def test_target_is_resident_minus_working_set_and_margin() -> None:
    assert pageout_target_mib(300, 40, 64) == 196
    assert pageout_target_mib(100, 40, 64) == 0  # never negative
    assert pageout_target_mib(300, 40, 64, floor_mib=200) == 100
    assert pageout_target_mib(300, None, 64) == 0  # no sample: the host does not guess


def test_guest_runs_are_validated_clipped_and_merged() -> None:
    assert sanitize_runs([[10, 5], [0, 3], [12, 10], [95, 10]], 100) == [(0, 3), (10, 12), (95, 5)]
    assert sanitize_runs([[200, 5]], 100) == []  # outside guest RAM: dropped
    for bad in ("x", [[1]], [[1, 2, 3]], [[-1, 2]], [[1, 0]], [[1.5, 2]], [[True, 2]], [["1", 2]]):
        with pytest.raises(ValueError):
            sanitize_runs(bad, 100)
    with pytest.raises(ValueError, match="at most 3"):
        sanitize_runs([[i, 1] for i in range(0, 8, 2)], 100, max_runs=3)


def test_select_takes_guest_free_then_cold_then_blind_from_the_top() -> None:
    present = np.zeros(100, bool)
    present[0:60] = True  # pages 60..99 are not resident: paging them out frees nothing
    classes = [("guest-free", [(50, 20)]), ("guest-cold", [(0, 5)])]
    s = select(present, 12, classes)
    assert s.pages_by_source == {"guest-free": 10, "guest-cold": 2} and s.ranges == [(0, 2), (50, 10)]
    s = select(present, 30, classes)
    assert s.pages_by_source == {"guest-free": 10, "guest-cold": 5, "host-blind": 15}
    assert s.ranges == [(0, 5), (35, 25)]  # blind: the resident pages from the top down (35..49)
    s = select(present, 30, classes, blind=False)
    assert s.pages == 15
    assert select(present, 0, classes).ranges == []


@given(st.lists(st.booleans(), min_size=1, max_size=300), st.integers(0, 400),
       st.lists(st.tuples(st.integers(0, 299), st.integers(1, 50)), max_size=10))
def test_select_only_resident_pages_exactly_as_many_as_asked(bits, want, runs) -> None:
    present = np.array(bits, bool)
    classes = [("guest-free", sanitize_runs([list(r) for r in runs], present.size))]
    s = select(present, want, classes)
    chosen = np.zeros_like(present)
    for a, n in s.ranges:
        assert not chosen[a:a + n].any()  # no overlap
        chosen[a:a + n] = True
    assert not (chosen & ~present).any()
    assert chosen.sum() == s.pages == min(want, int(present.sum()))
