"""Host paging policy (pure): how much to page out, the guest's runs validated, which pages, and
which VMs pay the budget's shortfall after ballooning (never one being given memory)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from symbiont.paging.policy import (
    VmFootprint,
    pageout_target_mib,
    protected,
    sanitize_runs,
    select,
    shortfall_plan,
)


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


# -- the shortfall after ballooning (profile overcommit) ---------------------------------------
def _vm(name: str, resident: float, wss: float | None, **kw: object) -> VmFootprint:
    return VmFootprint(name=name, running=kw.pop("running", True), resident_mib=resident,  # type: ignore[arg-type]
                       allocated_mib=kw.pop("allocated", resident), wss_mib=wss,  # type: ignore[arg-type]
                       floor_mib=kw.pop("floor", 64), **kw)  # type: ignore[arg-type]


def test_a_vm_under_pressure_or_given_memory_is_never_paged_even_with_the_most_cold_memory() -> None:
    """The finding of issue 15 (tests/vm/test_memory under the profile): the hungry guest, growing
    page by page, looks the coldest (its working-set sample lags its allocation) and was the one
    paged out each period, so its guest never saw pressure and its balloon never grew."""
    hungry = _vm("hungry", 480, 40, pressure=True, rho=1.2)
    idle = _vm("idle", 400, 20, rho=0.3)
    plan = shortfall_plan(700, [hungry, idle], margin_mib=64)
    assert plan.shortfall_mib == 180 and plan.pageouts == [("idle", 180)]
    lines = {ln.name: ln for ln in plan.vms}
    assert lines["hungry"].take_mib == 0 and "under memory pressure" in lines["hungry"].reason
    assert lines["hungry"].inputs["cold_mib"] == 376 and lines["hungry"].inputs["pressure"] is True
    # more than the idle one has cold: the rest is left for the balloon, not taken from the hungry one
    plan = shortfall_plan(500, [hungry, idle], margin_mib=64)
    assert plan.pageouts == [("idle", 316)] and plan.left_mib == pytest.approx(64)
    growing = _vm("hungry", 480, 40, growing=True, rho=1.2)
    plan = shortfall_plan(500, [growing, idle], margin_mib=64)
    assert plan.pageouts == [("idle", 316)]
    assert "balloon target rises" in {ln.name: ln.reason for ln in plan.vms}["hungry"]
    # before its guest reports pressure: allocating (its used memory rising) is enough to be spared
    allocating = _vm("hungry", 480, 40, used_rise_mib=48, rho=0.2)  # even ranked first
    plan = shortfall_plan(500, [allocating, idle], margin_mib=64)
    assert plan.pageouts == [("idle", 316)]
    assert "allocating (used memory +48 MiB" in {ln.name: ln.reason for ln in plan.vms}["hungry"]
    assert shortfall_plan(500, [_vm("hungry", 480, 40, used_rise_mib=8, rho=0.2), idle],
                          margin_mib=64).pageouts[0] == ("hungry", 376)  # a small rise is noise


def test_the_lowest_rho_per_host_mib_pays_first_as_the_memory_policy_ranks_victims() -> None:
    busy = _vm("busy", 512, 100, rho=2.0)  # 348 MiB cold, the most, but active: high ρ
    idle = _vm("idle", 300, 20, rho=0.5)  # 216 MiB cold
    plan = shortfall_plan(600, [busy, idle], margin_mib=64)  # 212 MiB over
    assert plan.pageouts == [("idle", 212)]
    plan = shortfall_plan(500, [busy, idle], margin_mib=64)  # 312 over: idle's 216 first, then busy
    assert plan.pageouts == [("idle", 216), ("busy", 96)]
    # ρ/u, not ρ: a VM whose memory is mostly shared frees little per page and pays after
    shared = _vm("shared", 300, 20, rho=0.5, unshared_fraction=0.2)  # ρ/u = 2.5 > busy's 2.0
    plan = shortfall_plan(500, [busy, shared], margin_mib=64)
    assert plan.pageouts[0][0] == "busy"


def test_kSM_shared_memory_is_counted_once_as_the_memory_part_counts_its_budget() -> None:
    """Memory's occupancy is Σ target × u; paging must measure the same budget the same way, or a
    budget the balloon meets looks short to paging (shared pages counted once per sharer)."""
    a = _vm("a", 400, 20, rho=1.0, unshared_fraction=0.75)
    b = _vm("b", 400, 20, rho=1.0, unshared_fraction=0.75)
    plan = shortfall_plan(600, [a, b], margin_mib=64)  # 400·0.75 × 2 = 600: the budget is met
    assert plan.shortfall_mib == 0 and plan.pageouts == []
    plan = shortfall_plan(540, [a, b], margin_mib=64)  # 60 host MiB over: 80 guest MiB at u = 0.75
    assert plan.shortfall_mib == pytest.approx(60) and plan.pageouts == [("a", 80)]


_VMS = st.lists(st.builds(
    VmFootprint, name=st.text("abcdef", min_size=1, max_size=4), running=st.booleans(),
    resident_mib=st.floats(0, 2048), allocated_mib=st.floats(0, 2048),
    wss_mib=st.none() | st.floats(0, 2048), floor_mib=st.floats(0, 128), pressure=st.booleans(),
    growing=st.booleans(), rho=st.none() | st.floats(1e-6, 100), unshared_fraction=st.floats(0, 1),
    used_rise_mib=st.floats(-512, 512)),
    max_size=8, unique_by=lambda v: v.name)


@given(_VMS, st.floats(0, 8192), st.floats(0, 256))
def test_shortfall_plan_properties(vms, budget, margin) -> None:
    plan = shortfall_plan(budget, vms, margin)
    took = dict(plan.pageouts)
    assert len(took) == len(plan.pageouts)
    by = {v.name: v for v in vms}
    if plan.refused is not None or plan.shortfall_mib <= 0:
        assert plan.pageouts == []
        return
    assert {ln.name for ln in plan.vms} == set(by)  # every VM has its line, inputs and reason
    for ln in plan.vms:
        assert ln.reason and ln.inputs["pressure"] == by[ln.name].pressure and ln.take_mib == took.get(ln.name, 0)
    for name, mib in plan.pageouts:
        v = by[name]
        assert protected(v) is None  # (a) never a VM under pressure, growing, parked or unsampled
        assert 4 <= mib <= pageout_target_mib(v.footprint_mib, v.wss_mib, margin, v.floor_mib) + 1e-9
    freed = sum(mib * min(1.0, by[n].unshared_fraction) for n, mib in plan.pageouts)
    assert freed <= plan.shortfall_mib + 1e-6  # never more than what is over the budget
    assert plan.left_mib == pytest.approx(plan.shortfall_mib - freed, abs=1e-6)
    # (b) lowest ρ/u first: a VM that paid means every eligible VM ranked below it gave all it had
    for name in took:
        for v in vms:
            if v.name != name and protected(v) is None and v.rank < by[name].rank and v.unshared_fraction > 0:
                cold = pageout_target_mib(v.footprint_mib, v.wss_mib, margin, v.floor_mib)
                assert cold < 4 or took.get(v.name, 0) == math.floor(cold), (v, by[name], plan)
