"""The CPU-and-nesting policy: ratio keeping (pin+share, quota), share-based reclamation, scale steps."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from symbiont.cpu import policy
from symbiont.cpu.policy import MemView, cpu_plan, plan_scale, reclaim_plan

RATIOS = {"c1": 1, "c2": 1, "c3": 4}


def test_seed_example_1_1_4_on_4_cpus_pins_the_big_one_and_shares_the_rest() -> None:
    plan = cpu_plan([0, 1, 2, 3], RATIOS)
    assert plan["c3"].dedicated == (2, 3) and plan["c3"].cpuset == (0, 1, 2, 3)
    assert plan["c1"].cpuset == plan["c2"].cpuset == (0, 1) and plan["c1"].dedicated == ()
    assert [plan[n].quota_us for n in ("c1", "c2", "c3")] == [66667, 66667, 266667]
    assert plan["c3"].weight == 4 * plan["c1"].weight == 1000


@pytest.mark.parametrize("n,expected", [(3, (50000, 50000, 200000)), (2, (33333, 33333, 133333)),
                                        (1, (16667, 16667, 66667))])
def test_ratios_survive_every_scale_down(n: int, expected: tuple[int, int, int]) -> None:
    plan = cpu_plan(list(range(n)), RATIOS)
    assert tuple(plan[c].quota_us for c in ("c1", "c2", "c3")) == expected
    assert all(set(a.cpuset) <= set(range(n)) for a in plan.values())


def test_agnostic_plans_keep_default_weights() -> None:
    plan = cpu_plan([0, 1, 2, 3], RATIOS, proportional_weights=False)
    assert {a.weight for a in plan.values()} == {100}
    assert plan["c3"].quota_us == 266667 and plan["c3"].dedicated == (2, 3)


def test_three_cpus_give_two_whole_cpus_to_the_big_one() -> None:
    plan = cpu_plan([0, 1, 2], RATIOS)
    assert plan["c3"].cpuset == (1, 2) == plan["c3"].dedicated  # a3 = 2.0: no pool share needed
    assert plan["c1"].cpuset == plan["c2"].cpuset == (0,)


def test_quota_strategy_uses_all_cpus() -> None:
    plan = cpu_plan([0, 1, 5], RATIOS, "quota")
    assert all(a.cpuset == (0, 1, 5) and a.dedicated == () for a in plan.values())
    assert plan["c3"].quota_us == 200000


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        cpu_plan([0], {"a": -1})
    with pytest.raises(ValueError, match="positive"):
        cpu_plan([0], {"a": float("nan")})
    with pytest.raises(ValueError, match="no CPUs"):
        cpu_plan([], {"a": 1})
    with pytest.raises(ValueError, match="strategy"):
        cpu_plan([0], {"a": 1}, "random")
    assert cpu_plan([0, 1], {}) == {}


def test_tiny_ratios_get_the_kernel_minimum_quota() -> None:
    plan = cpu_plan([0], {"big": 1000, "tiny": 1})
    assert plan["tiny"].quota_us == 1000 and plan["tiny"].weight == 1


ratios_st = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=4),
    st.floats(min_value=0.01, max_value=100, allow_nan=False),
    min_size=1, max_size=8,
)
online_st = st.lists(st.integers(0, 63), min_size=1, max_size=16, unique=True)


@settings(max_examples=300, deadline=None)
@given(online=online_st, ratios=ratios_st, strategy=st.sampled_from(policy.CPU_STRATEGIES))
def test_plan_properties(online: list[int], ratios: dict[str, float], strategy: str) -> None:
    plan = cpu_plan(online, ratios, strategy)
    n = len(online)
    assert set(plan) == set(ratios)
    assert math.isclose(sum(a.cpus for a in plan.values()), n, rel_tol=1e-9)
    total = sum(ratios.values())
    for name, a in plan.items():
        assert math.isclose(a.cpus, n * ratios[name] / total, rel_tol=1e-9)
        assert set(a.cpuset) <= set(online) and a.cpuset
        assert a.cpus <= len(a.cpuset) + 1e-9  # it can actually use what it is entitled to
        assert a.quota_us >= 1000 and abs(a.quota_us - max(1000, round(a.cpus * a.period_us))) <= 1
        assert 1 <= a.weight <= 10_000
    ded = [c for a in plan.values() for c in a.dedicated]
    assert len(ded) == len(set(ded))  # dedicated CPUs are not shared between containers
    for a in plan.values():
        for other in plan.values():
            if other is not a:
                assert not set(a.dedicated) & set(other.cpuset)
    if strategy == "pin-share":
        # The pool's capacity is exactly what the fractional parts need.
        pool = set(online) - set(ded)
        frac = sum(a.cpus - len(a.dedicated) for a in plan.values())
        assert math.isclose(frac, len(pool), abs_tol=1e-6)
    # Ratios of quotas follow ratios of the configured shares (where above the kernel minimum).
    big = [(nm, a) for nm, a in plan.items() if a.quota_us > 10_000]
    for (n1, a1), (n2, a2) in zip(big, big[1:], strict=False):
        assert math.isclose(a1.quota_us / a2.quota_us, ratios[n1] / ratios[n2], rel_tol=0.01)
    assert cpu_plan(list(reversed(online)), ratios, strategy) == plan  # deterministic


def test_ratio_error() -> None:
    assert policy.ratio_error({"a": 1, "b": 1, "c": 4}, RATIOS) == 0
    err = policy.ratio_error({"c1": 1, "c2": 1, "c3": 1}, RATIOS)
    assert err == pytest.approx(4 / 6 - 1 / 3)
    assert policy.ratio_error({}, RATIOS) == 0


# -- memory ----------------------------------------------------------------------------------
MiB = 1 << 20


def test_reclaim_takes_from_the_most_per_share_first_and_never_from_no_reclaim() -> None:
    views = [MemView("a", 100 * MiB, 1), MemView("b", 100 * MiB, 3), MemView("keep", 100 * MiB, 1, no_reclaim=True)]
    plan = reclaim_plan(views, 80 * MiB)
    assert plan["keep"] == 0 and sum(plan.values()) == 80 * MiB
    # Water-filling: 200 - 4*lambda = 80 -> lambda = 30: a ends at 30, b at 90 (1:3).
    assert plan["a"] == 70 * MiB and plan["b"] == 10 * MiB
    assert reclaim_plan(views, 40 * MiB) == {"a": 40 * MiB, "b": 0, "keep": 0}  # b is under 3*lambda
    plan = reclaim_plan(views, 140 * MiB)
    after = {v.name: v.usage - plan[v.name] for v in views}
    assert after["b"] == pytest.approx(3 * after["a"], abs=2)  # usage ratio follows shares 1:3
    assert plan["keep"] == 0


def test_reclaim_honours_floors_and_caps_at_what_is_reclaimable() -> None:
    views = [MemView("a", 100 * MiB, 1, floor=60 * MiB), MemView("b", 50 * MiB, 1), MemView("n", 10, 1, True)]
    plan = reclaim_plan(views, 10**12)
    assert plan == {"a": 40 * MiB, "b": 50 * MiB, "n": 0}
    assert reclaim_plan(views, 0) == {"a": 0, "b": 0, "n": 0}
    with pytest.raises(ValueError):
        reclaim_plan([MemView("x", 1, 0)], 1)
    with pytest.raises(ValueError):
        reclaim_plan([MemView("x", -1, 1)], 1)


mem_st = st.lists(
    st.tuples(st.integers(0, 1 << 32), st.floats(0.1, 1000), st.booleans(), st.integers(0, 1 << 31)),
    min_size=1, max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(rows=mem_st, want=st.integers(0, 1 << 34))
def test_reclaim_properties(rows: list[tuple[int, float, bool, int]], want: int) -> None:
    views = [MemView(f"c{i}", u, s, nr, min(fl, u)) for i, (u, s, nr, fl) in enumerate(rows)]
    plan = reclaim_plan(views, want)
    room = sum(v.usage - v.floor for v in views if not v.no_reclaim)
    assert sum(plan.values()) == min(want, room)
    for v in views:
        assert 0 <= plan[v.name] <= v.usage - v.floor
        if v.no_reclaim:
            assert plan[v.name] == 0
    # Water-filling: every container reclaimed from (and still above its floor) ends at the
    # same usage per share, lambda; those not reclaimed from are at or below lambda.
    after = {v.name: v.usage - plan[v.name] for v in views}
    cut = [v for v in views if plan[v.name] > 0 and after[v.name] > v.floor]
    for v in cut:
        level = after[v.name] / v.shares
        for w in views:
            if w.no_reclaim or w is v:
                continue
            tol = 3 / v.shares + 3 / w.shares + 1e-9 * level
            if plan[w.name] == 0 and after[w.name] > w.floor:
                assert after[w.name] / w.shares <= level + tol
            elif after[w.name] > w.floor:
                assert abs(after[w.name] / w.shares - level) <= tol


def test_usage_ratio() -> None:
    assert policy.usage_ratio({"a": 1, "b": 3}) == {"a": 0.25, "b": 0.75}
    assert policy.usage_ratio({"a": 0}) == {"a": 0.0}


# -- scale steps -------------------------------------------------------------------------------
def test_scale_down_goes_guest_first_and_libvirt_only_when_asked() -> None:
    s = plan_scale(guest_online=4, libvirt_live=4, target=2, max_vcpus=4)
    assert s.direction == "down" and s.guest_first and s.libvirt
    s = plan_scale(4, 4, 2, 4, libvirt_unplug=False)
    assert s.guest_first and not s.libvirt


def test_scale_up_hotplugs_only_what_the_vm_lacks() -> None:
    s = plan_scale(guest_online=1, libvirt_live=4, target=3, max_vcpus=4)  # offlined earlier
    assert s.direction == "up" and not s.libvirt
    s = plan_scale(guest_online=1, libvirt_live=1, target=3, max_vcpus=4)
    assert s.libvirt and not s.guest_first
    assert plan_scale(2, 2, 2, 4).direction == "none"
    with pytest.raises(ValueError):
        plan_scale(2, 2, 5, 4)
    with pytest.raises(ValueError):
        plan_scale(2, 2, 0, 4)


def test_schedule_and_weights() -> None:
    assert policy.schedule(4, 1) == [4, 3, 2, 1]
    assert policy.schedule(1, 3) == [1, 2, 3]
    assert policy.qemu_cpu_weight(None) == 100 and policy.qemu_cpu_weight(0) == 1
    assert policy.qemu_cpu_weight(50_000) == 10_000
    assert policy.expected_shares(RATIOS)["c3"] == pytest.approx(4 / 6)
