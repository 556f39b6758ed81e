"""Host elimination after a heuristic: a hand-worked example, constraints, VMs that must stay, and
properties (never more hosts, never over capacity, no constraint broken, deterministic)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from symbiont.placement import heuristics
from symbiont.placement.improve import eliminate_hosts
from symbiont.placement.model import Host, Request
from symbiont.placement.planner import plan
from symbiont.placement.state import ClusterState
from tests.unit.test_placement_properties import SETTINGS, _check_plan, instances

HOSTS = [Host(f"h{i}", {"cpu": 10.0}) for i in range(4)]


def reqs(*sizes: float, **kw: object) -> list[Request]:
    return [Request(f"v{i}", {"cpu": s}, **kw.get(f"v{i}", {})) for i, s in enumerate(sizes)]  # type: ignore[arg-type]


def test_hand_worked_example() -> None:
    # First fit, online: 5 -> h0, 6 -> h1, 4 -> h0 (9), 5 -> h2 (h0 has 1, h1 has 4 free): 3 hosts.
    # Elimination: h2 (load 5) cannot be emptied (no host has 5 free), h0 (load 9) can: its 5 goes
    # to h2 (tightest: exactly 5 free), its 4 to h1 (exactly 4 free). 2 hosts, the optimum.
    p = plan(HOSTS, reqs(5, 6, 4, 5), "first-fit", "online")
    assert p.hosts_used == 3
    q = plan(HOSTS, reqs(5, 6, 4, 5), "first-fit", "online", improve=True)
    assert q.hosts_used == 2
    assert q.placements == {"v0": "h2", "v1": "h1", "v2": "h1", "v3": "h2"}
    assert "host elimination moved it from h0" in q.decisions[0].reason


def test_constraints_hold_the_vms_in_place() -> None:
    anti = {"v0": {"anti_affinity": "a"}, "v3": {"anti_affinity": "a"}}
    q = plan(HOSTS, reqs(5, 6, 4, 5, **anti), "first-fit", "online", improve=True)
    assert q.hosts_used == 3  # the only way to 2 hosts puts v0 and v3 together
    excl = {"v0": {"app": "db"}, "v3": {"exclude_apps": frozenset({"db"})}}
    assert plan(HOSTS, reqs(5, 6, 4, 5, **excl), "first-fit", "online", improve=True).hosts_used == 3


def test_running_vms_never_move() -> None:
    st = ClusterState(HOSTS)
    for r, h in zip(reqs(5, 6, 4, 5), ["h0", "h1", "h0", "h2"], strict=True):
        st.add(r, h)
    _, moves = eliminate_hosts(st, movable={"v3"})
    assert moves == []  # emptying h0 would move v0 and v2, which are not movable
    new, moves = eliminate_hosts(st)
    assert new.hosts_used() == 2 and st.hosts_used() == 3  # the input state is not modified
    assert {m.vm for m in moves} == {"v0", "v2"}
    # Through plan(): the running VMs e0 (h0) and e1 (h1) stay; only the new ones could move.
    existing = [(Request("e0", {"cpu": 5}), "h0"), (Request("e1", {"cpu": 6}), "h1")]
    new = [Request("n0", {"cpu": 4}), Request("n1", {"cpu": 5})]
    q = plan(HOSTS, new, "first-fit", "online", existing, improve=True)
    assert q.placements == {"n0": "h0", "n1": "h2"} and q.hosts_used == 3
    assert q.utilisation_after["h0"]["cpu"] == 0.9  # e0 (5) + n0 (4): e0 was not moved to h2


@SETTINGS
@given(instances(), st.sampled_from(list(heuristics.HEURISTICS)), st.sampled_from(["batch", "online"]))
def test_elimination_never_uses_more_hosts_nor_breaks_a_constraint(
    inst: tuple, heuristic: str, mode: str
) -> None:
    hs, rs, quotas = inst
    p = plan(hs, rs, heuristic, mode, quotas=quotas)
    q = plan(hs, rs, heuristic, mode, quotas=quotas, improve=True)
    assert q.hosts_used <= p.hosts_used
    assert set(q.placements) == set(p.placements)  # nothing placed or rejected differently
    _check_plan(hs, rs, quotas, q, mode)
    assert plan(hs, rs, heuristic, mode, quotas=quotas, improve=True).decisions == q.decisions
