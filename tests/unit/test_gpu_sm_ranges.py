"""SM range assignment of the CuPy backend (pure; runs without a GPU)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from symbiont.gpu.cupy_backend import sm_ranges


def sms(r: tuple[int, int], total: int) -> set[int]:
    lo, hi = r
    if hi > lo:
        return set(range(lo, min(hi, total))) | set(range(0, max(0, hi - total)))
    return set(range(lo, total)) | set(range(0, hi))


def test_hand_worked():
    assert sm_ranges([1.0], 132) == [(0, 132)]
    assert sm_ranges([0.5, 0.5], 132) == [(0, 66), (66, 0)]
    assert sm_ranges([0.25, 0.75], 132) == [(0, 33), (33, 0)]
    # a critical client at 1.0 beside a neighbour on its one-SM floor: no overlap
    assert sm_ranges([1.0, 1 / 132], 132) == [(0, 131), (131, 0)]


@given(st.integers(1, 200), st.lists(st.floats(0.001, 1.0), min_size=1, max_size=12))
def test_ranges_are_disjoint_when_they_can_be(total, shares):
    rs = sm_ranges(shares, total)
    sets = [sms(r, total) for r in rs]
    assert all(len(s) >= 1 for s in sets)  # every context progresses
    assert all(len(s) <= max(1, int(sh * total + 1e-9)) for s, sh in zip(sets, shares, strict=True))
    if len(shares) <= total:
        union = set().union(*sets)
        assert len(union) == sum(len(s) for s in sets)  # pairwise disjoint
        assert union <= set(range(total))
