"""The ESX memory policy: ρ by hand, and properties over random hosts (hypothesis)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from symbiont.memory.policy import (
    ActiveEstimate,
    HostMemory,
    VmMemory,
    decide,
    floor_mib,
    guest_floor_mib,
    idle_tax_k,
    rho,
    shares_per_page,
    under_pressure,
)


def vm(name="a", shares=1000, alloc=512, f=1.0, lo=128, hi=1024, tau=0.75, used=100, pressure=False, u=1.0,
       coop=True) -> VmMemory:
    return VmMemory(name, shares, alloc, f, lo, hi, tau, used, pressure, u, coop)


def test_rho_by_hand() -> None:
    # τ = 0.75 → k = 4. S=1000, P=500, f=0.5: ρ = 1000 / (500·(0.5 + 4·0.5)) = 1000/1250 = 0.8
    assert idle_tax_k(0.75) == pytest.approx(4.0)
    assert shares_per_page(1000, 500, 0.5, 0.75) == pytest.approx(0.8)
    # τ = 0: plain shares per page, independent of f: 1000/500 = 2
    assert shares_per_page(1000, 500, 0.1, 0.0) == pytest.approx(2.0)
    # fully active: the tax does not apply
    assert shares_per_page(1000, 500, 1.0, 0.9) == pytest.approx(2.0)
    assert shares_per_page(1, 0, 0.5, 0.5) == math.inf
    with pytest.raises(ValueError):
        idle_tax_k(1.0)


def test_idle_vm_pays_the_tax() -> None:
    host = HostMemory(budget_mib=900, free_target_mib=100)
    # 1024 allocated of 900: must reclaim 224. Equal shares; 'idle' has f=0.1, 'busy' f=0.9.
    out = {d.name: d for d in decide([vm("idle", f=0.1), vm("busy", f=0.9)], host)}
    assert out["idle"].target_mib < 512 and out["busy"].target_mib == 512
    assert out["idle"].target_mib == 512 - 224
    assert "lowest ρ" in out["idle"].reason


def test_without_tax_equal_shares_split_evenly() -> None:
    host = HostMemory(budget_mib=900, free_target_mib=100)
    out = {d.name: d.target_mib for d in decide([vm("a", f=0.1, tau=0.0), vm("b", f=0.9, tau=0.0)], host)}
    assert abs(out["a"] - out["b"]) <= 16 and out["a"] + out["b"] == 800


def test_hungry_vm_takes_from_idle_one() -> None:
    host = HostMemory(budget_mib=1024, free_target_mib=0, max_step_mib=256, pressure_grant_mib=128)
    hungry = vm("hungry", f=1.0, used=480, pressure=True)
    idle = vm("idle", f=0.05, used=60)
    out = {d.name: d for d in decide([hungry, idle], host)}
    assert out["hungry"].target_mib >= 512 + 128
    assert out["idle"].target_mib == 1024 - out["hungry"].target_mib
    assert "under pressure" in out["idle"].reason


def test_pressure_does_not_steal_from_a_higher_rho_vm() -> None:
    host = HostMemory(budget_mib=1024, free_target_mib=0)
    hungry = vm("hungry", shares=100, f=0.1, pressure=True)  # low ρ
    rich = vm("rich", shares=10000, f=1.0)
    out = {d.name: d for d in decide([hungry, rich], host)}
    assert out["rich"].target_mib == 512 and out["hungry"].target_mib == 512


def test_sharing_aware_reclaim_sizes_the_balloon_by_unshared_fraction() -> None:
    # 'shared' occupies 512·0.5 = 256 MiB of host memory, 'plain' 512: 768 in all, 100 over budget.
    host = HostMemory(budget_mib=256 + 512 - 100, free_target_mib=0, max_step_mib=512)
    shared = vm("shared", f=0.1, u=0.5, used=50)  # occupies 256 of host memory
    plain = vm("plain", f=1.0, used=50)
    out = {d.name: d for d in decide([shared, plain], host)}
    # 100 MiB of host memory from a VM whose pages are half shared needs a 200 MiB balloon
    assert out["shared"].target_mib == 512 - 200 and out["plain"].target_mib == 512


def test_uncooperative_vm_is_left_alone() -> None:
    host = HostMemory(budget_mib=600, free_target_mib=0)
    out = {d.name: d for d in decide([vm("x", f=0.0, coop=False), vm("y", f=1.0)], host)}
    assert out["x"].target_mib == 512 and "uncooperative" in out["x"].reason
    assert out["y"].target_mib < 512


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="tax rate"):
        vm(tau=1.0)
    with pytest.raises(ValueError, match="shares"):
        vm(shares=0)
    with pytest.raises(ValueError, match="min_mib"):
        vm(lo=600, hi=500)
    with pytest.raises(ValueError, match="duplicate"):
        decide([vm("a"), vm("a")], HostMemory(1000, 0))


def test_active_estimate_follows_esx_fast_and_slow_averages() -> None:
    e = ActiveEstimate()
    assert e.value == 1.0  # unknown: no tax
    e.update(0.8)
    for _ in range(3):
        e.update(0.1)
    # the slow average still remembers the activity: the idle tax comes in gradually
    assert e.value > 0.5
    e.update(0.9)
    assert e.value == 0.9  # a VM that becomes active is seen at once


def test_pressure_signal() -> None:
    assert under_pressure({"MemTotal": 1000, "MemAvailable": 50}, 0.0)
    assert under_pressure({"MemTotal": 1000, "MemAvailable": 500}, 25.0)
    assert not under_pressure({"MemTotal": 1000, "MemAvailable": 500}, 1.0)


vm_strategy = st.builds(
    lambda i, shares, alloc, f, lo, span, tau, used, pressure, u, coop, reserve, boot: VmMemory(
        f"vm{i}", shares, alloc, f, lo, lo + span, tau, used, pressure, u, coop, reserve,
        None if boot is None else max(alloc, lo + span) + boot,
    ),
    st.integers(0, 10**6),
    st.integers(1, 10000),
    st.integers(64, 4096),
    st.floats(0, 1),
    st.integers(64, 1024),
    st.integers(0, 4096),
    st.sampled_from([0.0, 0.5, 0.75, 0.9]),
    st.integers(0, 2048),
    st.booleans(),
    st.sampled_from([0.25, 0.5, 1.0]),
    st.booleans(),
    st.one_of(st.none(), st.floats(0, 200)),  # the guest kernel's reserve (None: not sampled yet)
    st.one_of(st.none(), st.integers(0, 1024)),  # boot memory above max_mib by this much
)


@settings(max_examples=200, deadline=None)
@given(st.lists(vm_strategy, min_size=1, max_size=8, unique_by=lambda v: v.name),
       st.integers(256, 20000), st.integers(0, 2048), st.integers(16, 512))
def test_properties(vms, budget, free_target, step) -> None:
    host = HostMemory(budget, free_target, max_step_mib=step)
    out = {d.name: d for d in decide(vms, host)}
    occ_before = sum(v.allocated_mib * v.unshared_fraction for v in vms)
    occ_after = sum(out[v.name].target_mib * v.unshared_fraction for v in vms)
    for v in vms:
        t = out[v.name].target_mib
        if not v.cooperative:
            assert t == v.allocated_mib
            continue
        assert v.min_mib <= t <= v.max_mib
        # never more than one step up; never below what the guest uses + margin (unless the
        # VM was already there, or its minimum is higher), never more than one step down
        if v.min_mib <= v.allocated_mib <= v.max_mib:
            assert t <= v.allocated_mib + step + 1
            if t < v.allocated_mib:
                assert t >= v.allocated_mib - step - 1
                assert t >= min(v.allocated_mib, v.used_mib + host.safety_margin_mib) - 1
                # never below the guest's floor (kernel reserve + used + margin; issue 16 item 12)
                assert t >= min(v.allocated_mib, guest_floor_mib(v, host))
                if v.pressure:  # shrunk only when no other VM had anything left to give
                    others = [o for o in vms if o.cooperative and not o.pressure and o is not v]
                    for o in others:
                        floor = min(floor_mib(o, host), o.max_mib)
                        assert out[o.name].target_mib <= max(floor, o.min_mib) + 1
    # the host is never pushed further past its budget than it already was
    if all(v.min_mib <= v.allocated_mib <= v.max_mib for v in vms):
        assert occ_after <= max(occ_before, budget - free_target) + len(vms) * 1.0


@settings(max_examples=100, deadline=None)
@given(st.lists(vm_strategy, min_size=1, max_size=6, unique_by=lambda v: v.name), st.integers(256, 8000))
def test_deterministic(vms, budget) -> None:
    host = HostMemory(budget, 64)
    assert decide(vms, host) == decide(list(reversed(vms)), host)[::-1]


# -- issue 15 item 6: the policy does what its docs say ------------------------------------------


def test_6a_a_step_capped_lowest_rho_vm_is_not_topped_up_from_a_higher_rho_one() -> None:
    """From 512/512 with τ = 0.75 the lowest-ρ VM alone should give 180 MiB; max_step_mib lets
    it give 128 this period. The rest waits for the next period — it is not taken from the VM
    with the higher ρ (ESX takes only from the lowest ρ)."""
    host = HostMemory(budget_mib=1024 - 180, free_target_mib=0, max_step_mib=128)
    idle, busy = vm("idle", f=0.0, used=20), vm("busy", f=0.5, used=20)  # ρ 0.49 < 0.78
    out = {d.name: d for d in decide([idle, busy], host)}
    assert out["idle"].target_mib == 512 - 128 and out["busy"].target_mib == 512
    assert "52 MiB more in later periods" in out["idle"].reason
    # Next period: the rest, from the same VM.
    out = {d.name: d for d in decide([vm("idle", alloc=384, f=0.0, used=20), busy], host)}
    assert out["idle"].target_mib == 512 - 180 and out["busy"].target_mib == 512


def test_6a_a_grant_waits_for_what_the_capped_victim_frees() -> None:
    """The lowest-ρ VM gave 16 MiB for the free target and has 48 MiB of its 64 MiB step left; a
    VM under pressure then gets those 48 MiB this period, not 16 more from the VM with a higher ρ."""
    host = HostMemory(budget_mib=1536 - 16, free_target_mib=0, max_step_mib=64, pressure_grant_mib=64)
    hungry = vm("hungry", f=1.0, used=480, pressure=True)
    low, mid = vm("low", f=0.0, used=20), vm("mid", f=0.3, used=20)  # ρ 0.49, 0.68
    out = {d.name: d for d in decide([hungry, low, mid], host)}
    assert out["low"].target_mib == 512 - 64 and out["mid"].target_mib == 512
    assert out["hungry"].target_mib == 512 + 48


def test_6b_victims_are_ranked_by_memory_actually_reclaimable() -> None:
    """Two VMs with equal ρ, one 90 % KSM-shared: ballooning it frees a tenth of each MiB, so the
    100 MiB the host needs come from the unshared one (not 91 MiB from each)."""
    host = HostMemory(budget_mib=512 * 0.1 + 512 - 100, free_target_mib=0, max_step_mib=512)
    out = {d.name: d for d in decide([vm("shared", f=0.2, u=0.1), vm("plain", f=0.2)], host)}
    assert out["shared"].target_mib == 512 and out["plain"].target_mib == 412
    # When the unshared VM has reached its floor, the shared one is next (and pays 1/u).
    host = HostMemory(budget_mib=512 * 0.1 + 512 - 400, free_target_mib=0, max_step_mib=512)
    out = {d.name: d for d in decide([vm("shared", f=0.2, u=0.1), vm("plain", f=0.2)], host)}
    assert out["plain"].target_mib == guest_floor_mib(vm("plain", f=0.2), host) and out["shared"].target_mib < 512


def test_6c_a_stale_ksm_counter_does_not_make_a_vm_look_all_shared(tmp_path) -> None:
    """After KSM was switched off, ksm_merging_pages said 130.6 MiB merged of 112.2 MiB resident
    and u was clamped to 0.05, so reclaim did nothing. Such a reading is unknown sharing: u = 1."""
    import asyncio

    from symbiont.host.fake import FakeDomain, FakeHost
    from symbiont.memory.config import MemoryConfig
    from symbiont.memory.part import MemoryPart
    from tests.fakes import Env

    mib = 1 << 20
    dom = FakeDomain("v", qemu_pid=1234, qemu_rss=int(112.2 * mib), merging_pages=int(130.6 * mib) // 4096)
    host = FakeHost(dom, ksm_running=True)
    env = Env(tmp_path, host=host)
    part = env.add(MemoryPart, MemoryConfig())  # no dedup part here: u from KSM's counter
    assert asyncio.run(part.unshared("v", 1234)) == 1.0
    dom.merging_pages = int(56.1 * mib) // 4096  # a consistent reading: half of it merged
    assert asyncio.run(part.unshared("v", 1234)) == pytest.approx(0.5, abs=0.01)
    host._ksm_running = False  # counter no longer maintained
    assert asyncio.run(part.unshared("v", 1234)) == 1.0
    env.close()


def test_6d_f_is_the_working_set_over_the_allocation_not_over_memtotal(tmp_path) -> None:
    """The same 40 MiB working set: P·f (the active MiB ρ charges at the active rate) must not grow
    as the balloon inflates. With f = referenced / MemTotal it was 40·512/469 = 43.7 MiB at full
    size and 40·128/85 = 60.2 MiB at a 128 MiB target (MemTotal shrinks with the balloon)."""
    import asyncio

    from symbiont.host.fake import FakeDomain
    from symbiont.memory.config import MemoryConfig
    from symbiont.memory.part import MemoryPart
    from tests.fakes import Env, FakeAgents

    mib = 1 << 20

    def active_mib(target: int, memtotal: float) -> float:
        agents = FakeAgents({"memory.wss-sample": {"active_fraction": 40 / memtotal, "referenced_bytes": 40 * mib,
                                                   "resident_bytes": 80 * mib, "interval_s": 2.0}})
        env = Env(tmp_path / f"{target}", FakeDomain("v", memory_kib=512 << 10), agents=agents)
        env.register("v", {"memory": {}}, snapshot={
            "libvirt": {"state": "running", "max_memory_mib": 512, "memory_mib": target,
                        "memstats_kib": {"actual": target * 1024}},
            "agent": {"meminfo": {"MemTotal": int(memtotal * mib), "MemAvailable": int(memtotal * mib / 2)}}})
        env.store.save_knob("v", "balloon_mib", 512, target)
        part = env.add(MemoryPart, MemoryConfig(enabled=True))
        for _ in range(3):
            asyncio.run(part.sample_working_sets(["v"]))
        v = asyncio.run(part.view_of("v"))
        env.close()
        return v.allocated_mib * v.active_fraction

    assert active_mib(512, 469) == pytest.approx(40, abs=0.01)
    assert active_mib(128, 85) == pytest.approx(40, abs=0.01)


def test_6e_memory_moves_on_demand_only_as_in_esx() -> None:
    """Decision (docs/memory.md): like ESX, memory moves to a VM only while it demands it (here:
    is under pressure), at most pressure_grant_mib per period, from the lowest ρ; ρ values are
    not equalised for their own sake. A calm VM with a high ρ receives nothing; a VM that stays
    under pressure keeps receiving, period after period, until its ρ falls to the donor's."""
    host = HostMemory(budget_mib=1024, free_target_mib=0, max_step_mib=128, pressure_grant_mib=64)
    # Calm, very different ρ: nothing moves.
    out = {d.name: d.target_mib for d in decide([vm("rich", shares=4000, f=1.0), vm("poor", f=0.0)], host)}
    assert out == {"rich": 512, "poor": 512}
    # Under pressure for as long as it is short of memory (it needs 700 MiB).
    sizes = {"hungry": 512.0, "idle": 512.0}
    grants = []
    for _ in range(12):
        hungry = vm("hungry", alloc=sizes["hungry"], f=1.0, used=480, pressure=sizes["hungry"] < 700)
        idle = vm("idle", alloc=sizes["idle"], f=0.1, used=60)
        out = {d.name: d.target_mib for d in decide([hungry, idle], host)}
        grants.append(out["hungry"] - sizes["hungry"])
        sizes = out
    assert max(grants) <= 64 and grants[0] == 64  # one grant per period, capped
    assert sizes["hungry"] >= 700 or rho(vm("hungry", alloc=sizes["hungry"], f=1.0)) <= \
        rho(vm("idle", alloc=sizes["idle"], f=0.1)) * 1.05
    assert sizes["hungry"] + sizes["idle"] <= 1024 + 1
    assert grants[-1] == 0  # once it has what it needs, nothing more moves
