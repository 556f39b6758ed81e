"""Allocation constraints (seeds/003), infeasibility reasons, and malformed input."""

from __future__ import annotations

import math

import pytest

from symbiont.placement.model import Host, Request
from symbiont.placement.planner import plan


def hosts(n: int, cpu: float = 8, mem: float = 32) -> list[Host]:
    return [Host(f"h{i}", {"cpu": cpu, "mem": mem}) for i in range(n)]


def vm(i: str, cpu: float = 1, mem: float = 1, **kw: object) -> Request:
    return Request(i, {"cpu": cpu, "mem": mem}, **kw)  # type: ignore[arg-type]


# -- anti-affinity ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["batch", "online"])
def test_anti_affinity_spreads_and_rejects_when_hosts_run_out(mode: str) -> None:
    # 3 replicas, 2 hosts: two land on different hosts, the third has nowhere to go.
    reqs = [vm(f"db{i}", anti_affinity="db") for i in range(3)]
    p = plan(hosts(2), reqs, "best-fit", mode)
    assert sorted(p.placements.values()) == ["h0", "h1"]
    assert len(p.rejected) == 1
    assert (
        p.rejected[0].reason
        == "anti-affinity group 'db' already on h0, h1 — no host satisfies all constraints"
    )


def test_anti_affinity_counts_existing_vms() -> None:
    p = plan(
        hosts(2),
        [vm("db2", anti_affinity="db")],
        "first-fit",
        existing=[(vm("db1", anti_affinity="db"), "h0")],
    )
    assert p.placements == {"db2": "h1"}


# -- affinity -----------------------------------------------------------------------------------
def test_affinity_group_lands_together_in_batch_mode() -> None:
    # Best fit online would put web1 on the tighter h0 (4 cpu free) and strand web2; batch places
    # the group (3 x 2 cpu = 6) as one unit on h1, the only host with 6 free.
    existing = [(vm("f", cpu=4), "h0")]
    reqs = [vm(f"web{i}", cpu=2, affinity="shop") for i in range(3)]
    p = plan(hosts(2), reqs, "best-fit", "batch", existing=existing)
    assert p.placements == {"web0": "h1", "web1": "h1", "web2": "h1"}
    online = plan(hosts(2), reqs, "best-fit", "online", existing=existing)
    assert online.placements["web0"] == "h0"  # the tightest host, chosen without knowing the group
    assert set(online.placements.values()) == {"h0"}  # members always follow the first one
    assert "affinity group 'shop' runs on host h0" in online.rejected[0].reason


def test_affinity_group_rejected_together_with_one_reason() -> None:
    reqs = [vm(f"big{i}", cpu=5, affinity="g") for i in range(2)]  # 10 cpu together > 8 per host
    p = plan(hosts(3), reqs, "first-fit", "batch")
    assert p.placements == {}
    assert {d.reason for d in p.decisions} == {
        "affinity group 'g' (2 VMs together): cpu: needs 10, largest free 8 after overcommit 1"
    }


# -- co-location exclusion -----------------------------------------------------------------------
def test_co_location_exclusion_is_symmetric() -> None:
    # h0 runs a batch VM. A latency VM that excludes batch must avoid h0 ...
    existing = [(vm("b1", app="batch"), "h0")]
    p = plan(hosts(2), [vm("lat", app="latency", exclude_apps={"batch"})], "first-fit", existing=existing)
    assert p.placements == {"lat": "h1"}
    assert "co-location: lat excludes app 'batch' (on h0)" in p.decisions[0].reason
    # ... and a new batch VM must avoid the host of a VM that excludes batch.
    existing = [(vm("lat", app="latency", exclude_apps={"batch"}), "h0")]
    p = plan(hosts(2), [vm("b2", app="batch")], "first-fit", existing=existing)
    assert p.placements == {"b2": "h1"}
    p = plan(hosts(1), [vm("b2", app="batch")], "first-fit", existing=existing)
    assert p.rejected[0].reason.startswith("co-location: VMs on h0 exclude app 'batch'")


# -- quotas -------------------------------------------------------------------------------------
def test_quota_limits_a_user_across_hosts() -> None:
    reqs = [vm(f"a{i}", cpu=3, user="alice") for i in range(3)] + [vm("b0", cpu=3, user="bob")]
    p = plan(hosts(4), reqs, "first-fit", "online", quotas={"alice": {"cpu": 6}})
    assert set(p.placements) == {"a0", "a1", "b0"}  # bob has no quota, alice stops at 6 cpu
    assert p.rejected[0].reason == "quota: user 'alice' would use cpu 9 of quota 6"


def test_quota_counts_existing_vms() -> None:
    p = plan(
        hosts(2),
        [vm("a1", mem=20, user="alice")],
        quotas={"alice": {"mem": 30}},
        existing=[(vm("a0", mem=20, user="alice"), "h0")],
    )
    assert p.rejected[0].reason == "quota: user 'alice' would use mem 40 of quota 30"


# -- deadlines ----------------------------------------------------------------------------------
def test_deadlines_against_now() -> None:
    reqs = [
        vm("late", start=0, deadline=5),
        vm("over", start=0, end=10),
        vm("ok", start=0, deadline=50, end=100),
    ]
    p = plan(hosts(1), reqs, "first-fit", "online", now=20)
    assert p.placements == {"ok": "h0"}
    reasons = {d.request_id: d.reason for d in p.rejected}
    assert reasons["late"] == "deadline: late had to start by 5, now is 20"
    assert reasons["over"] == "deadline: over ends at 10, now is 20"
    # without a current time, deadlines are not checked
    assert len(plan(hosts(1), reqs, "first-fit", "online").placements) == 3


# -- resource reasons ---------------------------------------------------------------------------
def test_reason_names_the_blocking_resource_with_numbers() -> None:
    p = plan(hosts(2, cpu=8, mem=4), [vm("big", cpu=1, mem=8)], "best-fit")
    assert p.rejected[0].reason == "mem: needs 8, largest free 4 after overcommit 1"


def test_reason_reports_every_short_resource() -> None:
    p = plan(hosts(1, cpu=2, mem=4), [vm("big", cpu=3, mem=8)], "best-fit")
    assert p.rejected[0].reason == (
        "cpu: needs 3, largest free 2 after overcommit 1; mem: needs 8, largest free 4 after overcommit 1"
    )


def test_reason_for_fragmentation() -> None:
    # h0 has (4 cpu, 1 mem) free, h1 (1 cpu, 4 mem): each resource alone fits somewhere, never both.
    existing = [(vm("f0", cpu=4, mem=31), "h0"), (vm("f1", cpu=7, mem=28), "h1")]
    p = plan(hosts(2), [vm("r", cpu=2, mem=2)], "best-fit", existing=existing)
    assert p.rejected[0].reason == (
        "fragmented: no single host has all of it free at once (cpu fits on 1, mem fits on 1 hosts)"
    )


def test_reason_scoped_to_hosts_the_constraints_allow() -> None:
    # h1 has room but anti-affinity excludes it; h0 is allowed but full.
    existing = [(vm("db1", anti_affinity="db"), "h1"), (vm("f", cpu=8), "h0")]
    p = plan(hosts(2), [vm("db2", anti_affinity="db")], "best-fit", existing=existing)
    assert p.rejected[0].reason == (
        "cpu: needs 1, largest free 0 after overcommit 1 "
        "(on the 1 hosts allowed by: anti-affinity group 'db' already on h1)"
    )


def test_resource_a_host_lacks_is_infeasible_not_an_error() -> None:
    hs = [Host("cpu-only", {"cpu": 8, "gpu": 0}), Host("gpu-box", {"cpu": 8, "gpu": 1})]
    p = plan(hs, [Request("g1", {"gpu": 1}), Request("g2", {"gpu": 1})], "first-fit", "online")
    assert p.placements == {"g1": "gpu-box"}
    assert p.rejected[0].reason == "gpu: needs 1, largest free 0 after overcommit 1"


# -- malformed input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"requests": [vm("a", cpu=-1)]}, "request a: demand cpu: -1 is negative"),
        (
            {"requests": [Request("a", [1, 2, 3])]},
            "request a: demand: has 3 values but the cluster has 2 resources",
        ),
        ({"requests": [Request("a", {"cpus": 1})]}, "request a: demand: unknown resource 'cpus'"),
        ({"requests": [Request("a", {"cpu": math.nan})]}, "request a: demand cpu: nan is not finite"),
        ({"requests": [Request("a", {"cpu": "2"})]}, "request a: demand cpu: expected a number, got '2'"),
        ({"requests": [vm("a"), vm("a")]}, "request 'a' is listed twice"),
        ({"requests": [vm("")]}, "request id must be a non-empty string"),
        ({"heuristic": "best"}, "unknown heuristic 'best'"),
        ({"mode": "offline"}, "unknown mode 'offline'"),
        ({"existing": [(vm("x"), "h9")]}, "unknown host 'h9'"),
        ({"existing": [(vm("a"), "h0")], "requests": [vm("a")]}, "request 'a' is listed twice"),
        ({"hosts": []}, "no hosts given"),
        ({"hosts": [Host("h0", {"cpu": 1}), Host("h0", {"cpu": 2})]}, "host 'h0' is listed twice"),
        ({"hosts": [Host("h0", {"cpu": -4})]}, "host h0: capacity cpu: -4 is negative"),
        ({"hosts": [Host("h0", {"cpu": 4}, {"cpu": 0})]}, "host h0: overcommit cpu: 0 is not positive"),
        ({"hosts": [Host("h0", {"cpu": 4}, {"mem": 2})]}, "host h0: overcommit: unknown resource 'mem'"),
        ({"quotas": {"u": {"cpu": -1}}}, "quota of user 'u' cpu: -1 is negative"),
        ({"requests": [vm("a", start=10, end=5)]}, "request a: end 5 is not after start 10"),
        ({"requests": [vm("a", start=10, deadline=5)]}, "request a: deadline 5 is before start 10"),
        (
            {
                "requests": [
                    vm("a", affinity="g", anti_affinity="x"),
                    vm("b", affinity="g", anti_affinity="x"),
                ]
            },
            "share affinity group 'g' and anti-affinity group 'x'",
        ),
        (
            {"requests": [vm("a", affinity="g", app="web"), vm("b", affinity="g", exclude_apps={"web"})]},
            "request 'b' excludes app 'web' of 'a', but both are in affinity group 'g'",
        ),
    ],
)
def test_malformed_input_raises_a_clear_value_error(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"hosts": hosts(1), "requests": [vm("ok")]}
    args.update(kwargs)
    with pytest.raises(ValueError) as exc:
        plan(**args)  # type: ignore[arg-type]
    assert message in str(exc.value)


def test_plan_is_pure() -> None:
    hs = hosts(2)
    reqs = [vm(f"v{i}", cpu=3) for i in range(4)]
    a = plan(hs, reqs, "cosine")
    b = plan(hs, reqs, "cosine")
    assert a.decisions == b.decisions and a.utilisation_after == b.utilisation_after
    assert a.to_dict()["placed"] == 4 and a.to_dict()["rejected"] == 0
