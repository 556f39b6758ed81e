"""Property tests: whatever the input, no host exceeds capacity x overcommit, no constraint is
violated, plans are deterministic, and the lower bound never exceeds the hosts a plan uses."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symbiont.placement import heuristics
from symbiont.placement.bound import lower_bound, milp_bound, volume_bound
from symbiont.placement.heuristics import HostView
from symbiont.placement.model import TOL, Host, Request
from symbiont.placement.planner import plan
from symbiont.placement.state import ClusterState

DIMS = ("cpu", "mem", "net")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def instances(draw: st.DrawFn) -> tuple[list[Host], list[Request], dict[str, dict[str, float]]]:
    nd = draw(st.integers(1, 3))
    dims = DIMS[:nd]
    nh = draw(st.integers(1, 5))
    hs = [
        Host(
            f"h{i}",
            {d: float(draw(st.integers(0, 16))) for d in dims},
            {d: draw(st.sampled_from([0.5, 1.0, 1.5, 2.0])) for d in dims if draw(st.booleans())},
        )
        for i in range(nh)
    ]
    n = draw(st.integers(0, 18))
    reqs = []
    for i in range(n):
        grouped = draw(st.integers(0, 4)) == 0
        reqs.append(
            Request(
                f"v{i}",
                {d: float(draw(st.integers(0, 10))) for d in dims},
                user=draw(st.sampled_from(["", "alice", "bob"])),
                app=draw(st.sampled_from(["", "web", "db", "batch"])),
                # affinity members get no anti-affinity/exclusions, so groups are never contradictory
                affinity=draw(st.sampled_from(["g1", "g2"])) if grouped else None,
                anti_affinity=None if grouped else draw(st.sampled_from([None, None, "a1", "a2"])),
                exclude_apps=frozenset()
                if grouped
                else frozenset(draw(st.sets(st.sampled_from(["web", "db", "batch"]), max_size=1))),
            )
        )
    quotas = {"alice": {dims[0]: float(draw(st.integers(0, 30)))}} if draw(st.booleans()) else {}
    return hs, reqs, quotas


def _check_plan(
    hs: list[Host], reqs: list[Request], quotas: dict[str, dict[str, float]], p: object, mode: str
) -> None:
    by_id = {r.id: r for r in reqs}
    placements: dict[str, str] = p.placements  # type: ignore[attr-defined]
    assert len(p.decisions) == len(reqs)  # type: ignore[attr-defined]
    assert {d.request_id for d in p.decisions} == set(by_id)  # type: ignore[attr-defined]
    dims = p.dims  # type: ignore[attr-defined]
    load: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(dims)))
    per_user: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(len(dims)))
    for vm, h in placements.items():
        v = np.array([by_id[vm].demand.get(d, 0.0) for d in dims])  # type: ignore[union-attr]
        load[h] += v
        per_user[by_id[vm].user] += v
    # capacity after overcommit
    for host in hs:
        cap = np.array([host.capacity.get(d, 0.0) * host.overcommit.get(d, 1.0) for d in dims])
        assert np.all(load[host.id] <= cap + 1e-6), (host.id, load[host.id], cap)
    # anti-affinity: one member per host
    seen: set[tuple[str, str]] = set()
    for vm, h in placements.items():
        g = by_id[vm].anti_affinity
        if g is not None:
            assert (g, h) not in seen
            seen.add((g, h))
    # affinity: all placed members on one host; batch places a group all-or-nothing
    groups: dict[str, list[str]] = defaultdict(list)
    for r in reqs:
        if r.affinity:
            groups[r.affinity].append(r.id)
    for members in groups.values():
        where = {placements[m] for m in members if m in placements}
        assert len(where) <= 1
        if mode == "batch":
            assert sum(m in placements for m in members) in (0, len(members))
    # co-location: no host has a VM next to another VM whose app it excludes (pairs of distinct VMs;
    # a VM that excludes its own app only keeps other VMs of that app away)
    on_host: dict[str, list[str]] = defaultdict(list)
    for vm, h in placements.items():
        on_host[h].append(vm)
    for h, vms in on_host.items():
        for a in vms:
            for b in vms:
                if a != b:
                    assert by_id[b].app not in by_id[a].exclude_apps, (h, a, b)
    # quotas
    for user, q in quotas.items():
        for d, limit in q.items():
            assert per_user[user][dims.index(d)] <= limit + 1e-6
    # every rejection explains itself
    for d in p.rejected:  # type: ignore[attr-defined]
        assert d.reason and d.host is None


@SETTINGS
@given(instances(), st.sampled_from(list(heuristics.HEURISTICS)), st.sampled_from(["batch", "online"]))
def test_plans_respect_capacity_and_constraints(inst: tuple, heuristic: str, mode: str) -> None:
    hs, reqs, quotas = inst
    p = plan(hs, reqs, heuristic, mode, quotas=quotas)
    _check_plan(hs, reqs, quotas, p, mode)
    again = plan(hs, reqs, heuristic, mode, quotas=quotas)
    assert again.decisions == p.decisions  # deterministic


@SETTINGS
@given(instances(), st.sampled_from(list(heuristics.HEURISTICS)))
def test_lower_bound_never_exceeds_hosts_used(inst: tuple, heuristic: str) -> None:
    hs, reqs, _ = inst
    p = plan(hs, reqs, heuristic, "batch")
    st_ = ClusterState(hs)
    placed = [st_.demand_of(r) for r in reqs if r.id in p.placements]
    dem = np.array(placed).reshape(len(placed), len(st_.dims))
    lb = lower_bound(dem, st_.effective, time_limit=2.0)
    assert lb.value <= p.hosts_used
    assert volume_bound(dem, st_.effective) <= lb.value
    if lb.optimal and p.hosts_used == lb.value:
        assert lb.value == p.hosts_used


@SETTINGS
@given(st.lists(st.integers(1, 10), min_size=1, max_size=9), st.integers(10, 14))
def test_bounds_are_ordered_volume_lp_milp_heuristic(sizes: list[int], cap: int) -> None:
    dem = np.array(sizes, dtype=float).reshape(-1, 1)
    eff = np.full((len(sizes), 1), float(cap))
    vol = volume_bound(dem, eff)
    lp = milp_bound(dem, eff, relax=True).value
    exact = milp_bound(dem, eff, time_limit=5.0)
    hosts = [Host(f"h{i}", {"mem": float(cap)}) for i in range(len(sizes))]
    ffd = plan(
        hosts, [Request(f"v{i}", {"mem": float(s)}) for i, s in enumerate(sizes)], "ffd-sum"
    ).hosts_used
    assert vol <= lp <= exact.value <= ffd
    if exact.optimal:
        # brute force over assignments for tiny instances confirms the MILP optimum
        assert exact.value == _brute_force(sizes, cap)


def _brute_force(sizes: list[int], cap: int) -> int:
    best = len(sizes)

    def go(i: int, bins: list[int]) -> None:
        nonlocal best
        if len(bins) >= best:
            return
        if i == len(sizes):
            best = len(bins)
            return
        for b in range(len(bins)):
            if bins[b] + sizes[i] <= cap:
                bins[b] += sizes[i]
                go(i + 1, bins)
                bins[b] -= sizes[i]
        go(i + 1, bins + [sizes[i]])

    go(0, [])
    return best


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5), st.integers(0, 5), st.booleans()), max_size=40)
)
def test_incremental_state_equals_recomputed(ops: list[tuple[int, int, int, bool]]) -> None:
    s = ClusterState([Host(f"h{i}", {"cpu": 8, "mem": 16}, {"cpu": 1.5}) for i in range(3)])
    live: list[str] = []
    for k, (h, c, m, remove) in enumerate(ops):
        if remove and live:
            s.remove(live.pop(0))
        else:
            s.add(Request(f"v{k}", {"cpu": c, "mem": m}), h)
            live.append(f"v{k}")
    fresh = HostView(s.effective - s.used, s.effective)
    np.testing.assert_allclose(s.avail, fresh.avail, atol=1e-9)
    np.testing.assert_allclose(s.an_sum, fresh.an_sum, atol=1e-9)
    np.testing.assert_allclose(s.an_sq, fresh.an_sq, atol=1e-9)
    assert s.hosts_used() == len({s.vms[v].host for v in live})
    assert np.all(s.used >= -TOL)
