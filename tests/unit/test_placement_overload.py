"""Sandpiper-style hotspot detection and migration planning, on hand-worked scenarios.

Scenario: three hosts with capacity (cpu, mem, net) = (10, 10, 10), thresholds 0.75 (limit 7.5),
k = 3 of n = 5 samples. Constant usage series, so estimates equal the usage.

    h0: a uses (5, 1, 0), b uses (3, 4, 0)  -> cpu 8/10 = 0.8 > 0.75 in 5 of 5 samples: hotspot
    h1: c uses (2, 2, 0)
    h2: d uses (6, 1, 0)

Volumes (utilisation as a fraction of the host): a = 1/((1-.5)(1-.1)(1-0)) = 2.222, size 1 ->
VSR 2.222; b = 1/((1-.3)(1-.4)) = 2.381, size 4 -> VSR 0.595. So a moves first. Headroom below
7.5: h1 (5.5, 5.5, 7.5) takes a (5, 1, 0); h2 (1.5, 6.5, 7.5) does not. After the move h0 is at
(3, 4, 0): resolved with one move, a -> h1.
"""

from __future__ import annotations

import numpy as np
import pytest

from symbiont.placement.model import Host, Request
from symbiont.placement.overload import (
    GuestStats,
    HotspotConfig,
    detect_hotspots,
    k_of_n,
    plan_migrations,
    volume,
)
from symbiont.placement.state import ClusterState

CFG = HotspotConfig(thresholds={"cpu": 0.75, "mem": 0.75, "net": 0.75}, k=3, n=5)


def series(u: tuple[float, float, float], n: int = 5) -> np.ndarray:
    return np.tile(np.array(u, dtype=float), (n, 1))


def scenario(a_anti: str | None = None, c_anti: str | None = None, c_aff: str | None = None):
    st = ClusterState([Host(f"h{i}", {"cpu": 10, "mem": 10, "net": 10}) for i in range(3)])
    st.add(Request("a", {"cpu": 5, "mem": 2, "net": 1}, anti_affinity=a_anti), "h0")
    st.add(Request("b", {"cpu": 3, "mem": 5, "net": 1}), "h0")
    st.add(Request("c", {"cpu": 2, "mem": 2, "net": 1}, anti_affinity=c_anti), "h1")
    st.add(Request("d", {"cpu": 6, "mem": 1, "net": 1}), "h2")
    usage = {"a": series((5, 1, 0)), "b": series((3, 4, 0)), "c": series((2, 2, 0)), "d": series((6, 1, 0))}
    return st, usage


def test_volume_formula() -> None:
    assert volume({"cpu": 0.5, "mem": 0.5, "net": 0.0}) == pytest.approx(4.0)  # 1/(.5*.5*1)
    assert volume({"cpu": 1.0, "mem": 0.0, "net": 0.0}) == pytest.approx(100.0)  # capped at 0.99
    assert volume(np.array([[0.5, 0.9, 0.0]]), ("cpu", "mem", "net"))[0] == pytest.approx(20.0)


def test_k_of_n() -> None:
    assert k_of_n([0.9, 0.5, 0.9, 0.9, 0.2], 0.8, 3, 5) == 3
    assert k_of_n([0.9, 0.9, 0.9, 0.1, 0.1, 0.1], 0.8, 3, 3) == 0  # only the last n count


def test_detects_the_sustained_hotspot() -> None:
    st, usage = scenario()
    hs = detect_hotspots(st, usage, CFG)
    assert [h.host for h in hs] == ["h0"]
    assert hs[0].reasons == ("cpu above 0.75 in 5 of last 5 samples (latest 0.8)",)
    assert hs[0].volume == pytest.approx(1 / (0.2 * 0.5 * 1.0))  # util (.8, .5, 0) -> 10


def test_short_spike_is_not_a_hotspot() -> None:
    st, usage = scenario()
    # b is busy in only 2 of the last 5 samples: h0 cpu .8 twice, .5 otherwise (k = 3)
    usage["b"] = np.array([[0, 4, 0], [0, 4, 0], [3, 4, 0], [0, 4, 0], [3, 4, 0]], dtype=float)
    assert detect_hotspots(st, usage, CFG) == []


def test_plan_moves_highest_vsr_vm_to_host_with_headroom() -> None:
    st, usage = scenario()
    before = {vm: p.host for vm, p in st.vms.items()}
    mp = plan_migrations(st, usage, detect_hotspots(st, usage, CFG), CFG)
    assert [(m.vm, m.src, m.dst) for m in mp.moves] == [("a", "h0", "h1")]
    # worst-fit score on h1: ((5.5 - 5) + (5.5 - 1) + (7.5 - 0)) / 7.5 = 1.667
    assert mp.moves[0].reason == (
        "h0 hot (cpu above 0.75 in 5 of last 5 samples (latest 0.8)); a has the highest VSR left (2.22); "
        "worst-fit chose h1 (score 1.67)"
    )
    assert mp.unresolved == []
    assert {vm: p.host for vm, p in st.vms.items()} == before  # pure: caller's state untouched


def test_destination_respects_anti_affinity() -> None:
    # a and c share anti-affinity group x, so a may not join c on h1 (and h2 lacks headroom):
    # the planner moves b (3, 4, 0) to h1 instead, which also brings h0 to (5, 1, 0) <= 7.5.
    st, usage = scenario(a_anti="x", c_anti="x")
    mp = plan_migrations(st, usage, detect_hotspots(st, usage, CFG), CFG)
    assert [(m.vm, m.dst) for m in mp.moves] == [("b", "h1")]


def test_unresolved_hotspot_is_reported() -> None:
    st, usage = scenario()
    usage["c"] = series((6, 6, 0))  # h1 has no headroom for either VM now
    mp = plan_migrations(st, usage, detect_hotspots(st, usage, CFG), CFG)
    assert mp.moves == []
    assert mp.unresolved == [
        "h0: still above threshold (cpu 8 > 7.5); could not move a (no host has headroom for it), "
        "b (no host has headroom for it)"
    ]


def test_affinity_members_are_not_moved_alone() -> None:
    st = ClusterState([Host(f"h{i}", {"cpu": 10, "mem": 10, "net": 10}) for i in range(2)])
    st.add(Request("a", {"cpu": 5, "mem": 1}, affinity="g"), "h0")
    st.add(Request("b", {"cpu": 4, "mem": 1}, affinity="g"), "h0")
    usage = {"a": series((5, 1, 0)), "b": series((4, 1, 0))}
    mp = plan_migrations(st, usage, detect_hotspots(st, usage, CFG), CFG)
    assert mp.moves == []
    assert "affinity group 'g'" in mp.unresolved[0]


def test_gray_box_uses_guest_memory() -> None:
    # The hypervisor sees 9 of 10 GiB touched (black box: mem 0.9 > 0.75 -> hotspot); the guest
    # reports 3 GiB in use (gray box: 0.3, no hotspot).
    st = ClusterState([Host("h0", {"cpu": 10, "mem": 10, "net": 10})])
    st.add(Request("e", {"cpu": 2, "mem": 10}), "h0")
    usage = {"e": series((1, 9, 0))}
    guest = {"e": GuestStats(mem=[3, 3, 3, 3, 3])}
    black = detect_hotspots(st, usage, CFG, "black-box", guest)
    assert [h.reasons for h in black] == [("mem above 0.75 in 5 of last 5 samples (latest 0.9)",)]
    assert detect_hotspots(st, usage, CFG, "gray-box", guest) == []


def test_gray_box_sla_violation_makes_a_hotspot() -> None:
    st = ClusterState([Host("h0", {"cpu": 10, "mem": 10, "net": 10})])
    st.add(Request("e", {"cpu": 2, "mem": 2}), "h0")
    usage = {"e": series((1, 1, 0))}
    cfg = HotspotConfig(thresholds=CFG.thresholds, k=3, n=5, sla_ms=200)
    guest = {"e": GuestStats(response_ms=[250, 250, 250, 50, 250])}
    hs = detect_hotspots(st, usage, cfg, "gray-box", guest)
    assert [h.reasons for h in hs] == [("e response time above 200 ms in 4 of last 5 samples",)]
    assert detect_hotspots(st, usage, cfg, "black-box", guest) == []  # black box cannot see it


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda st: detect_hotspots(st, {"a": np.ones((5, 2))}, CFG),
            "usage of a: 2 columns but 3 resources",
        ),
        (
            lambda st: detect_hotspots(st, {"zz": np.ones((5, 3))}, CFG),
            "usage given for 'zz', which is not placed",
        ),
        (lambda st: detect_hotspots(st, {"a": -np.ones((5, 3))}, CFG), "finite and non-negative"),
        (
            lambda st: detect_hotspots(st, {}, HotspotConfig(thresholds={"gpu": 0.5})),
            "threshold for unknown resource 'gpu'",
        ),
        (lambda st: detect_hotspots(st, {}, CFG, "grey"), "unknown detection mode 'grey'"),
        (lambda st: HotspotConfig(k=4, n=3), "1 <= k <= n"),
    ],
)
def test_bad_input(call, message: str) -> None:
    st, _ = scenario()
    with pytest.raises(ValueError, match=message):
        call(st)
