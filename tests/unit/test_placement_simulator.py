"""The trace simulator on small hand-traced timelines (interval 5 minutes: steps at t = 5, 10, ...)."""

from __future__ import annotations

import numpy as np
import pytest

from symbiont.placement.model import Host, Request
from symbiont.placement.overload import HotspotConfig
from symbiont.placement.simulator import SimConfig, simulate
from symbiont.placement.traces import Event, generate, make_trace, standard_hosts


def arrive(t: float, vm: str, *vals: float, deadline: float | None = None, dims=("cpu",)) -> Event:
    return Event(
        t,
        "arrive",
        vm,
        np.array(vals, dtype=float),
        Request(vm, dict(zip(dims, vals, strict=True)), start=t, deadline=deadline),
    )


def usage(t: float, vm: str, *vals: float) -> Event:
    return Event(t, "usage", vm, np.array(vals, dtype=float))


def depart(t: float, vm: str) -> Event:
    return Event(t, "depart", vm)


def cpu_hosts(n: int, cpu: float = 4, oc: float = 1.0) -> list[Host]:
    return [Host(f"h{i}", {"cpu": cpu}, {"cpu": oc}) for i in range(n)]


def test_rejection_and_hosts_over_time() -> None:
    # Two 4-core hosts. a (3) and b (3) take one host each; c (3) finds 1 core free: rejected.
    # a leaves at 10, b at 20. Horizon 30 -> steps 5..35.
    tr = make_trace(
        ("cpu",),
        [
            arrive(0, "a", 3),
            arrive(1, "b", 3),
            arrive(2, "c", 3),
            depart(10, "a"),
            depart(20, "b"),
            depart(30, "c"),
        ],
    )
    res = simulate(tr, cpu_hosts(2), SimConfig(heuristic="first-fit"))
    assert res.hosts_used.tolist() == [2, 1, 1, 0, 0, 0, 0]
    assert [(d.request_id, d.reason) for d in res.rejected] == [
        ("c", "cpu: needs 3, largest free 1 after overcommit 1")
    ]
    s = res.summary()
    assert (s["arrivals"], s["placed"], s["rejected"]) == (3, 2, 1)
    assert s["rejection_rate"] == pytest.approx(1 / 3)


def test_request_waits_until_its_deadline() -> None:
    # c may start as late as 12: at step 10, a has left (departures first) and c gets its host.
    events = [arrive(0, "a", 3), arrive(1, "b", 3), depart(10, "a"), depart(20, "b"), depart(30, "c")]
    res = simulate(make_trace(("cpu",), events + [arrive(2, "c", 3, deadline=12)]), cpu_hosts(2))
    assert (res.placed, res.rejected) == (3, [])
    # with deadline 8, the step at 10 is too late
    res = simulate(make_trace(("cpu",), events + [arrive(2, "c", 3, deadline=8)]), cpu_hosts(2))
    assert [d.reason for d in res.rejected] == ["deadline: c had to start by 8, now is 10"]


def test_overload_minutes_from_usage() -> None:
    # One 4-core host at 2:1 holds two 4-core VMs. They use 3 + 3 = 6 > 4 until t = 7, then 1 + 1.
    # Step 5: overloaded (util 1.5); steps 10, 15, 20, 25: not. -> 5 host-minutes.
    tr = make_trace(
        ("cpu",),
        [
            arrive(0, "a", 4),
            arrive(0, "b", 4),
            usage(0, "a", 3),
            usage(0, "b", 3),
            usage(7, "a", 1),
            usage(7, "b", 1),
            depart(20, "a"),
            depart(20, "b"),
        ],
    )
    res = simulate(tr, cpu_hosts(1, oc=2.0))
    assert res.overloaded.tolist() == [1, 0, 0, 0, 0]
    assert res.overload_minutes == 5.0
    assert res.max_util[0] == pytest.approx(1.5)
    # Without usage samples a VM counts as using its whole allocation: 8 > 4 at steps 5, 10, 15.
    tr = make_trace(("cpu",), [arrive(0, "a", 4), arrive(0, "b", 4), depart(20, "a"), depart(20, "b")])
    assert simulate(tr, cpu_hosts(1, oc=2.0)).overload_minutes == 15.0


def hot_trace():
    # Two hosts (cpu 10 at 2:1, mem 10). a and b (cpu 8, mem 2) both fit h0 by allocation (16 <= 20)
    # and best fit packs them there. They use 6 + 5 = 11 cpu > 10: overloaded. Sandpiper (k=2 of
    # n=3, threshold 0.75) sees the hotspot at step 10 (second sample), moves a (VSR
    # 1/(.4*.9) = 2.78 beats b's 1/(.5*.9) = 2.22) to the empty h1; from step 15 on nothing is hot.
    dims = ("cpu", "mem")
    tr = make_trace(
        dims,
        [
            arrive(0, "a", 8, 2, dims=dims),
            arrive(0, "b", 8, 2, dims=dims),
            usage(0, "a", 6, 1),
            usage(0, "b", 5, 1),
            depart(60, "a"),
            depart(60, "b"),
        ],
    )
    hosts = [Host(f"h{i}", {"cpu": 10, "mem": 10}, {"cpu": 2.0}) for i in range(2)]
    return tr, hosts


def test_sandpiper_resolves_the_hotspot() -> None:
    tr, hosts = hot_trace()
    hc = HotspotConfig(thresholds={"cpu": 0.75, "mem": 0.75}, k=2, n=3)
    off = simulate(tr, hosts, SimConfig(detection="off", hotspot=hc))
    assert off.overload_minutes == 55.0  # steps 5..55
    on = simulate(tr, hosts, SimConfig(detection="black-box", hotspot=hc))
    assert on.overload_minutes == 10.0  # steps 5 and 10, then fixed
    assert [(t, m.vm, m.src, m.dst) for t, m in on.migrations] == [(10.0, "a", "h0", "h1")]
    assert on.hosts_used.tolist()[:3] == [1, 1, 2]  # measured before the step-10 migration


def test_simulation_is_deterministic() -> None:
    tr = generate(120, seed=9, burst_fraction=0.4)
    hosts = standard_hosts(6, overcommit={"cpu": 4.0, "net": 4.0})
    cfg = SimConfig(detection="gray-box", hotspot=HotspotConfig(thresholds={"cpu": 0.7}, k=2, n=3))
    a, b = simulate(tr, hosts, cfg), simulate(tr, hosts, cfg)
    assert a.migrations == b.migrations and a.rows() == b.rows()
    assert a.summary()["migrations"] > 0  # this setting does produce hotspots


def test_bad_config() -> None:
    tr = make_trace(("gpu",), [arrive(0, "a", 1, dims=("gpu",))])
    with pytest.raises(ValueError, match="trace uses resources the hosts lack: gpu"):
        simulate(tr, cpu_hosts(1))
    with pytest.raises(ValueError, match="unknown detection"):
        SimConfig(detection="grey-box")
