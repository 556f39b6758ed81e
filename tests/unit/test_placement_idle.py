"""Idle-VM consolidation (seeds/004): idleness, shrinking to the working set, parking, waking."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from symbiont.memory.floor import guest_floor
from symbiont.placement.idle import (
    IdleConfig,
    VMActivity,
    consolidation_plan,
    idle_run,
    is_idle,
    target_mem,
    wake_plan,
)

CFG = IdleConfig(cpu_threshold=0.05, window=4, wss_max_mib=64, margin=0.25, min_mem_mib=64, wake_cpu=0.2)
QUIET = [0.01, 0.02, 0.01, 0.0]


def act(
    i: str, cpu: list[float], wss: float = 3.2, mem: float = 2048, host: str = "n1", **kw: object
) -> VMActivity:
    return VMActivity(i, host, mem, cpu, wss, **kw)  # type: ignore[arg-type]


def test_idle_run_counts_newest_quiet_samples() -> None:
    assert idle_run([0.5, 0.01, 0.02], 0.05) == 2
    assert idle_run([0.01, 0.01], 0.05) == 2
    assert idle_run([0.01, 0.5], 0.05) == 0


def test_idleness_rule() -> None:
    assert is_idle(act("a", QUIET), CFG) == (True, "CPU below 0.05 for 4 samples, working set 3.2 MiB")
    assert is_idle(act("b", [0.01, 0.3, 0.01, 0.01]), CFG)[0] is False  # busy inside the window
    assert is_idle(act("c", QUIET[:3]), CFG) == (False, "only 3 of 4 CPU samples")
    # seeds/004: scp in at 348 KB/s has a 31.6 MB working set, find / 24.9 MB; both small enough,
    # but a 100 MiB working set is not idle.
    assert is_idle(act("d", QUIET, wss=100), CFG) == (False, "working set 100 MiB above 64 MiB")
    assert is_idle(act("e", QUIET, events=2), CFG) == (False, "2 pending activity events")


def test_target_mem() -> None:
    # The balloon target counts the guest kernel's reserve (48 MiB when unmeasured) on top of the
    # working set, and never goes below the guest floor (reserve + used + margin, 128 absolute).
    # 2048 MiB guests: margin = 2 × min_free_kbytes (5724 KiB) + 32 = 43.2 MiB.
    assert target_mem(act("a", QUIET, wss=31.6), CFG) == 128  # absolute floor, not 40 or 64
    assert target_mem(act("a", QUIET, wss=60), CFG) == 152  # 48 + 60 + 43.2, not 75
    assert target_mem(act("a", QUIET, wss=60, mem=50), CFG) == 50  # never grows a VM
    # The VM's own floor (its registration's memory.min_mib) wins over a smaller working set.
    assert target_mem(act("a", QUIET, wss=60, min_mib=200), CFG) == 200
    assert target_mem(act("a", QUIET, wss=200, min_mib=128), CFG) == 298  # 48 + 200 × 1.25
    # Its daemon's floor (measured reserve, used) wins too.
    assert target_mem(act("a", QUIET, wss=60, floor_mib=170), CFG) == 170


def test_idle_shrink_of_the_item_12_guest_stays_above_its_floor() -> None:
    """Issue 16 item 12: a 512 MiB guest with 60 MiB used (MemTotal − MemAvailable) and a 43 MiB
    kernel reserve was shrunk to 60 × 1.25 = 75 MiB and panicked. Its target now leaves the
    reserve, the used memory and the watermark margin: at least 43 + 60 + 37 MiB."""
    vm = act("lab", QUIET, wss=60, mem=512, reserve_mib=43)
    t = target_mem(vm, CFG)
    assert t >= 43 + 60 + 37 and t > 75
    assert t == max(128, math.ceil(43 + 60 * 1.25), guest_floor(512, 43, 60).floor_mib)
    plan = consolidation_plan([vm], "idle", 4096, CFG)
    assert [(a.kind, a.mem_to) for a in plan] == [("shrink", t), ("move", t)]


@settings(max_examples=300, deadline=None)
@given(st.floats(1, 1 << 16), st.floats(0, 1 << 16), st.one_of(st.none(), st.floats(0, 4096)),
       st.one_of(st.none(), st.floats(1, 1 << 16)), st.floats(0, 2))
def test_idle_target_never_below_the_guest_floor(mem, wss, reserve, home, margin) -> None:
    vm = VMActivity("v", "n1", mem, QUIET, wss, reserve_mib=reserve, home_mem_mib=home)
    cfg = IdleConfig(cpu_threshold=0.05, window=4, margin=margin, min_mem_mib=64)
    boot = home if home is not None else mem
    t = target_mem(vm, cfg)
    assert t == mem or t >= guest_floor(boot, reserve, wss).floor_mib  # never below, unless not shrunk


def test_consolidation_shrinks_and_parks_longest_idle_first() -> None:
    vms = [
        act("short", [0.5] * 2 + [0.01] * 4, wss=10),  # idle for 4 samples, target 128 (absolute floor)
        act("long", [0.01] * 8, wss=60),  # idle for 8 samples, target 152
        act("busy", [0.5] * 6),
        act("parked", [0.0] * 6, wss=2, mem=128, host="idle"),  # already parked and shrunk
    ]
    actions = consolidation_plan(vms, "idle", idle_host_free_mib=200, cfg=CFG)
    got = [(a.kind, a.vm, a.dst, a.mem_to) for a in actions]
    assert got == [
        ("shrink", "long", None, 152),
        ("move", "long", "idle", 152),  # 200 - 152 = 48 MiB left
        ("shrink", "short", None, 128),
        ("stay", "short", None, None),  # needs 128, only 48 left
    ]
    assert actions[3].reason == "idle host idle full: needs 128 MiB, 48 free"


def test_no_tiny_shrinks_for_a_vm_that_stays_put() -> None:
    # The lab journal: a parked VM (on the idle host) whose working set drifted was shrunk by
    # 1 MiB (130 -> 129) round after round. Here each target is 128 (its guest floor), 2 MiB off.
    cfg = IdleConfig(cpu_threshold=0.05, window=4, wss_max_mib=128, min_mem_mib=64, wake_cpu=0.2)
    kw: dict = {"wss": 60.0, "mem": 130, "reserve_mib": 20.0, "home_mem_mib": 256}
    vms = [act("parked", QUIET, host="idle", home="n1", **kw), act("stuck", QUIET, host="n1", **kw),
           act("mover", QUIET, host="n2", **kw)]  # fmt: skip
    got = [(a.kind, a.vm, a.mem_to) for a in consolidation_plan(vms, "idle", 130, cfg)]
    # "mover" fits the idle host (130 MiB free): its shrink, however small, is what parks it;
    # "stuck" no longer fits (2 MiB left) and stays; neither it nor "parked" gets a 2 MiB shrink.
    assert [g for g in got if g[0] != "stay"] == [("shrink", "mover", 128), ("move", "mover", 128)]
    assert ("stay", "stuck", None) in got
    # A real shrink (≥ min_shrink_mib, default 8) of a VM that stays is still planned.
    big = consolidation_plan([act("parked", QUIET, host="idle", **{**kw, "mem": 136})], "idle", 0, cfg)
    assert [(a.kind, a.mem_from, a.mem_to) for a in big] == [("shrink", 136, 128)]
    # min_shrink_mib 0 is the old rule: every step, however small.
    old = consolidation_plan(vms[:1], "idle", 0, IdleConfig(**{**cfg.__dict__, "min_shrink_mib": 0}))
    assert [(a.kind, a.mem_to) for a in old] == [("shrink", 128)]
    with pytest.raises(ValueError, match="min_shrink_mib"):
        IdleConfig(min_shrink_mib=-1)


def test_wake_plan_goes_home_or_to_best_fit() -> None:
    vms = [
        act("a", [0.0, 0.9], mem=64, host="idle", home="n1", home_mem_mib=2048),  # CPU woke it
        act("b", [0.0, 0.0], mem=64, host="idle", home="n1", home_mem_mib=4096, events=3),  # a packet
        act("c", [0.0, 0.01], mem=64, host="idle", home="n1", home_mem_mib=1024),  # still asleep
    ]
    actions = wake_plan(vms, "idle", {"n1": 3000, "n2": 8000, "n3": 4500}, CFG)
    got = [(x.kind, x.vm, x.dst, x.mem_to) for x in actions]
    # a: home n1 has 3000 >= 2048 -> n1.  b: n1 now has 952 < 4096; best fit among n2 (8000) and
    # n3 (4500) is n3 (leftover 404).
    assert got == [
        ("move", "a", "n1", None),
        ("grow", "a", None, 2048),
        ("move", "b", "n3", None),
        ("grow", "b", None, 4096),
    ]
    assert actions[2].reason == "awake (3 activity events); back to n3"


def test_wake_without_room_grows_in_place() -> None:
    actions = wake_plan([act("a", [0.9], mem=64, host="idle", home_mem_mib=2048)], "idle", {"n1": 100}, CFG)
    assert [(x.kind, x.mem_to) for x in actions] == [("grow", 2048)]


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="CPU samples must be fractions"):
        act("a", [1.5])
    with pytest.raises(ValueError, match="listed twice"):
        consolidation_plan([act("a", QUIET), act("a", QUIET)], "idle", 100, CFG)
    with pytest.raises(ValueError, match="wake_cpu"):
        IdleConfig(cpu_threshold=0.3, wake_cpu=0.1)
    with pytest.raises(ValueError, match="unknown home host 'zz'"):
        wake_plan([act("a", [0.9], host="idle", home="zz")], "idle", {"n1": 100}, CFG)
