"""KSM policies (pure): the ksmtuned port, the hint-driven policy, and tenant-boundary checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from symbiont.dedup import tenancy
from symbiont.dedup.policy import (
    HintInputs,
    HintParams,
    KsmSettings,
    KsmtunedInputs,
    KsmtunedParams,
    fixed,
    hint_step,
    ksmtuned_step,
    params_from,
    remaining_now,
    stock,
)

GiB_KIB = 1 << 20


# -- ksmtuned -------------------------------------------------------------------------------------
def test_ksmtuned_boosts_by_300_up_to_1250_under_pressure() -> None:
    total = 16 * GiB_KIB
    npages, seen = 0, []
    for _ in range(6):
        d = ksmtuned_step(KsmtunedInputs(total, free_kib=GiB_KIB, committed_kib=15 * GiB_KIB, npages=npages))
        assert d.settings.run == 1 and "boost" in d.reason
        npages = d.detail["npages"]
        seen.append(d.settings.pages_to_scan)
    assert seen == [300, 600, 900, 1200, 1250, 1250]
    assert d.settings.sleep_millisecs == 10  # 10 ms x 16 GiB / 16 GiB
    assert d.detail["thres_kib"] == total * 20 // 100


def test_ksmtuned_decays_by_50_down_to_64_and_stops_when_memory_is_plentiful() -> None:
    total = 32 * GiB_KIB  # thres = 20 % = 6.4 GiB
    d = ksmtuned_step(KsmtunedInputs(total, free_kib=10 * GiB_KIB, committed_kib=30 * GiB_KIB, npages=150))
    assert (d.settings.run, d.settings.pages_to_scan, d.detail["npages"]) == (1, 100, 100) and "decay" in d.reason
    d = ksmtuned_step(KsmtunedInputs(total, 10 * GiB_KIB, 30 * GiB_KIB, npages=100))
    assert d.settings.pages_to_scan == 64  # clamped to KSM_NPAGES_MIN
    assert d.settings.sleep_millisecs == 5  # 10 ms x 16 GiB / 32 GiB
    d = ksmtuned_step(KsmtunedInputs(total, 20 * GiB_KIB, 4 * GiB_KIB, npages=900))
    assert d.settings.run == 0 and "stop" in d.reason
    assert d.detail["npages"] == 900  # the script's npages is kept while stopped


def test_ksmtuned_threshold_constant_for_small_hosts() -> None:
    total = 4 * GiB_KIB  # 20 % is 0.8 GiB < KSM_THRES_CONST 2 GiB
    d = ksmtuned_step(KsmtunedInputs(total, free_kib=GiB_KIB, committed_kib=GiB_KIB, npages=0))
    assert d.detail["thres_kib"] == 2 * GiB_KIB and d.settings.run == 1 and "boost" in d.reason
    with pytest.raises(ValueError):
        ksmtuned_step(KsmtunedInputs(0, 0, 0, 0))


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(GiB_KIB, 1 << 30), free=st.integers(0, 1 << 30), committed=st.integers(0, 1 << 30),
    npages=st.integers(0, 5000),
)  # fmt: skip
def test_property_ksmtuned_is_bounded_and_consistent(total: int, free: int, committed: int, npages: int) -> None:
    p = KsmtunedParams()
    d = ksmtuned_step(KsmtunedInputs(total, free, committed, npages), p)
    thres = max(total * p.thres_coef // 100, p.thres_const_kib)
    stops = committed + thres < total and free > thres
    assert (d.settings.run == 0) == stops
    assert p.npages_min <= d.settings.pages_to_scan <= p.npages_max
    assert d.settings.sleep_millisecs >= 1
    if not stops:
        step = p.npages_boost if free < thres else p.npages_decay
        assert d.detail["npages"] == min(max(npages + step, p.npages_min), p.npages_max)


# -- hint -------------------------------------------------------------------------------------------
def test_hint_scans_fast_while_much_is_left_and_idles_once_reached() -> None:
    p = HintParams(target_pass_s=2.0, fast_sleep_ms=20)
    fast = hint_step(HintInputs(potential=50_000, remaining=50_000, mergeable=200_000), p)
    # a full pass of 200k pages in 2 s at 20 ms sleeps: 2000 pages per wake-up
    assert fast.settings == KsmSettings(1, 2000, 20) and fast.detail["urgency"] == 1.0
    half = hint_step(HintInputs(50_000, remaining=5_000, mergeable=200_000), p)  # 2.5 % left: urgency 0.5
    assert half.settings.pages_to_scan == round(100 + 0.5 * (2000 - 100))
    done = hint_step(HintInputs(50_000, remaining=500, mergeable=200_000), p)  # < 2 % of the potential
    assert done.settings == KsmSettings(1, p.idle_pages, p.idle_sleep_ms) and "back off" in done.reason
    low = hint_step(HintInputs(potential=10, remaining=10, mergeable=200_000), p)  # hardly any potential
    assert low.settings == KsmSettings(1, p.idle_pages, p.idle_sleep_ms)


def test_hint_without_estimate_uses_stock_and_a_boundary_stops_ksm() -> None:
    assert hint_step(HintInputs(None, None, 1000)).settings == stock().settings
    d = hint_step(HintInputs(10_000, 10_000, 20_000, blocked="vm2 opted out"))
    assert d.settings.run == 0 and "vm2" in d.reason
    # remaining unknown: potential minus what is merged already
    d = hint_step(HintInputs(potential=10_000, remaining=None, mergeable=100_000, merged=9_990))
    assert d.detail["remaining"] == 10 and d.settings.pages_to_scan == HintParams().idle_pages


@settings(max_examples=80, deadline=None)
@given(
    potential=st.integers(0, 10**6), r1=st.integers(0, 10**6), r2=st.integers(0, 10**6),
    mergeable=st.integers(1, 10**7), target=st.floats(0.1, 30), high=st.floats(0.001, 1),
)  # fmt: skip
def test_property_hint_is_bounded_and_monotone(potential: int, r1: int, r2: int, mergeable: int, target: float,
                                               high: float) -> None:  # fmt: skip
    p = HintParams(target_pass_s=target, high_gain=high)
    lo, hi = sorted((r1, r2))
    a = hint_step(HintInputs(potential, lo, mergeable), p).settings
    b = hint_step(HintInputs(potential, hi, mergeable), p).settings
    for s in (a, b):
        assert s.run == 1
        assert p.idle_pages <= s.pages_to_scan <= p.max_pages
        assert s.sleep_millisecs in (p.fast_sleep_ms, p.idle_sleep_ms)
    assert a.pages_per_second <= b.pages_per_second  # more left to merge never scans slower
    if potential == 0:
        assert b.sleep_millisecs == p.idle_sleep_ms


def test_remaining_now_and_params() -> None:
    assert remaining_now(1000, 200, 700) == 500
    assert remaining_now(100, 0, 500) == 0
    assert remaining_now(None, 0, 1) is None
    assert params_from({"target_pass_s": 5, "bogus": 1}, HintParams).target_pass_s == 5
    with pytest.raises(ValueError):
        HintParams(min_pages=10, max_pages=5)
    with pytest.raises(ValueError):
        fixed(0, 20)
    assert fixed(500, 10).settings == KsmSettings(1, 500, 10)
    assert KsmSettings(0, 100, 20).pages_per_second == 0 and KsmSettings(1, 100, 20).pages_per_second == 5000


# -- tenancy ----------------------------------------------------------------------------------------
XML = "<domain type='qemu'><name>v</name><memory unit='MiB'>256</memory><currentMemory unit='MiB'>256</currentMemory>" \
      "<devices/></domain>"  # fmt: skip


def test_nosharepages_is_added_once() -> None:
    assert not tenancy.has_nosharepages(XML)
    x = tenancy.with_nosharepages(XML)
    assert tenancy.has_nosharepages(x)
    assert tenancy.with_nosharepages(x).count("nosharepages") == 1
    assert x.index("memoryBacking") > x.index("currentMemory")


def test_tenant_verdicts() -> None:
    S = tenancy.TenantState
    verdicts, blocked, unmerge = tenancy.check([
        S("a", True, True, True), S("b", False, True, False), S("c", False, False, True),
    ])  # fmt: skip
    assert [v.status for v in verdicts] == ["shared", "enforced", "stopped"] and blocked == "" and not unmerge
    verdicts, blocked, unmerge = tenancy.check([S("a", True, True, True), S("d", False, True, True, merging_pages=0)])
    assert verdicts[1].status == "violated" and "nosharepages" in blocked and not unmerge
    _, blocked, unmerge = tenancy.check([S("d", False, True, True, merging_pages=12)])
    assert unmerge
    v, blocked, _ = tenancy.check([S("e", False, True, None)])
    assert v[0].status == "unknown" and "cannot tell" in blocked


def test_advisor_policy_params_are_checked_and_become_sysfs_knobs() -> None:
    import pytest

    from symbiont.dedup.policy import AdvisorParams, advisor, params_from

    d = advisor(AdvisorParams(target_scan_time=60, max_cpu=20))
    assert d.settings.advisor is not None and d.settings.run == 1
    assert d.settings.advisor.knobs() == {"advisor_target_scan_time": 60, "advisor_max_cpu": 20,
                                          "advisor_max_pages_to_scan": 30000, "advisor_min_pages_to_scan": 500}  # fmt: skip
    assert d.settings.as_dict()["advisor"]["max_cpu"] == 20 and "advisor" not in advisor().settings.__class__().as_dict()
    assert params_from({"target_scan_time": 30.0}, AdvisorParams).knobs()["advisor_target_scan_time"] == 30
    for bad in ({"max_cpu": 0}, {"max_cpu": 101}, {"target_scan_time": 1.5}, {"min_pages_to_scan": 40000},
                {"max_cpu": True}):  # fmt: skip
        with pytest.raises(ValueError):
            params_from(bad, AdvisorParams)
