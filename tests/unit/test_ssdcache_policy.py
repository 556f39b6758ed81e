"""Cache-size policies: share-based (weighted max-min) and throughput-proportional."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from symbiont.ssdcache.policy import Demand, PolicyError, moves, share_allocation, throughput_proportional


def test_shares_split_in_proportion_to_weight() -> None:
    d = [Demand("a", 1, 0, 100), Demand("b", 2, 0, 100), Demand("c", 1, 0, 100)]
    assert share_allocation(100, d) == {"a": 25, "b": 50, "c": 25}


def test_a_capped_vm_gives_its_surplus_to_the_others() -> None:
    d = [Demand("a", 1, 0, 10), Demand("b", 1, 0, 100), Demand("c", 2, 0, 100)]
    assert share_allocation(100, d) == {"a": 10, "b": 30, "c": 60}


def test_minimums_first_and_refused_when_they_do_not_fit() -> None:
    d = [Demand("a", 1, 40, 100), Demand("b", 9, 0, 100)]
    assert share_allocation(50, d) == {"a": 41, "b": 9}  # 40 + 1/10 of the rest, 9/10 of the rest
    with pytest.raises(PolicyError, match="exceed the capacity"):
        share_allocation(30, d)
    with pytest.raises(PolicyError):
        Demand("x", 0, 0, 1)
    with pytest.raises(PolicyError):
        Demand("x", 1, 5, 4)


demand_lists = st.lists(
    st.tuples(st.integers(1, 1000), st.integers(0, 50), st.integers(0, 200)), min_size=1, max_size=6
).map(lambda xs: [Demand(f"vm{i}", w, min(lo, hi), max(lo, hi)) for i, (w, lo, hi) in enumerate(xs)])


@given(demand_lists, st.integers(0, 800))
def test_share_allocation_properties(demands: list[Demand], capacity: int) -> None:
    if sum(d.min_blocks for d in demands) > capacity:
        with pytest.raises(PolicyError):
            share_allocation(capacity, demands)
        return
    out = share_allocation(capacity, demands)
    assert sum(out.values()) == min(capacity, sum(d.max_blocks for d in demands))
    for d in demands:
        assert d.min_blocks <= out[d.vm] <= d.max_blocks
    # Fairness: a VM below its cap gets at least its weighted share of what it competes for,
    # give or take the rounding of one block.
    for d in demands:
        for e in demands:
            if out[d.vm] < d.max_blocks and out[e.vm] > e.min_blocks:
                assert (out[d.vm] + 1) / d.weight >= (out[e.vm] - 1 - e.min_blocks) / e.weight - 1e-9 or \
                    out[d.vm] >= d.min_blocks


def _throughput(size: int, ws: int, miss_cost: float = 20.0) -> float:
    """A cache model: hit ratio grows with size up to the working set."""
    hit = min(1.0, size / ws)
    return 1000.0 / (hit * 1.0 + (1 - hit) * miss_cost)


def test_throughput_proportional_converges_to_equal_throughput() -> None:
    ws = {"a": 20, "b": 60, "c": 100}
    demands = [Demand(v, 1, 0, 200) for v in ws]
    sizes = {"a": 60, "b": 60, "c": 60}
    state = None
    for _ in range(60):
        tp = {v: _throughput(sizes[v], ws[v]) for v in ws}
        sizes, why = throughput_proportional(180, sizes, tp, {v: 1 for v in ws}, demands, gain=0.3, max_step=10,
                                             state=state)
        state = why["state"]
        assert sum(sizes.values()) <= 180
    tp = {v: _throughput(sizes[v], ws[v]) for v in ws}
    shares = [t / sum(tp.values()) for t in tp.values()]
    assert max(shares) - min(shares) < 0.05, (sizes, tp)
    # The VM with the biggest appetite ends with the most cache.
    assert sizes["c"] > sizes["b"] > sizes["a"]


def test_throughput_proportional_follows_an_unequal_target_ratio() -> None:
    ws = {"a": 50, "b": 50}
    demands = [Demand(v, 1, 4, 100) for v in ws]
    sizes = {"a": 50, "b": 50}
    state = None
    for _ in range(80):
        tp = {v: _throughput(sizes[v], ws[v]) for v in ws}
        sizes, why = throughput_proportional(100, sizes, tp, {"a": 2, "b": 1}, demands, gain=0.3, max_step=8,
                                             state=state)
        state = why["state"]
    tp = {v: _throughput(sizes[v], ws[v]) for v in ws}
    assert math.isclose(tp["a"] / tp["b"], 2.0, rel_tol=0.15), (sizes, tp)


def test_no_throughput_means_no_move_and_explains_why() -> None:
    d = [Demand("a", 1, 0, 10), Demand("b", 1, 0, 10)]
    new, why = throughput_proportional(20, {"a": 3, "b": 7}, {"a": 0, "b": 0}, {"a": 1, "b": 1}, d)
    assert new == {"a": 3, "b": 7} and "no throughput" in why["reason"]
    with pytest.raises(PolicyError):
        throughput_proportional(20, {"a": 3}, {"a": 1}, {"a": 1}, d)
    with pytest.raises(PolicyError):
        throughput_proportional(20, {"a": 3, "b": 7}, {"a": 1, "b": 1}, {"a": 1, "b": 1}, d, gain=0)


@given(st.dictionaries(st.sampled_from("abcde"), st.integers(0, 64), min_size=1),
       st.dictionaries(st.sampled_from("abcde"), st.floats(0, 1e4), min_size=5),
       st.integers(0, 400), st.floats(0.05, 1))
def test_throughput_step_keeps_bounds_and_capacity(cur: dict, tp: dict, capacity: int, gain: float) -> None:
    demands = [Demand(v, 1, 0, 64) for v in cur]
    new, _ = throughput_proportional(max(capacity, 0), cur, tp, {v: 1 for v in "abcde"}, demands, gain=gain,
                                     max_step=16)
    assert set(new) == set(cur)
    assert all(0 <= n <= 64 for n in new.values())
    assert sum(new.values()) <= max(capacity, sum(min(c, 64) for c in cur.values())) or sum(new.values()) <= capacity


def test_moves_deflate_before_inflate() -> None:
    shrink, grow = moves({"a": 10, "b": 5, "c": 3}, {"a": 4, "b": 9, "c": 3})
    assert shrink == [("a", 4)] and grow == [("b", 9)]
