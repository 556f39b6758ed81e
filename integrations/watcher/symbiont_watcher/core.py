"""Watcher-independent core: a cluster snapshot in, symbiont's decisions out.

Why apart from the strategy classes: the decisions are symbiont's own library code
(:mod:`symbiont.placement`): host elimination after the packing heuristics
(:func:`symbiont.placement.improve.eliminate_hosts`), Sandpiper hotspot detection and migration
planning (:mod:`symbiont.placement.overload`) and the idle rule (:mod:`symbiont.placement.idle`).
This module only maps a snapshot (nodes, instances, usage series) onto them, so the same mapping
serves Watcher's cluster model and symbiont's live host daemons.

Units: ``cpu`` in vCPUs/cores, ``mem`` in MB (Watcher's unit) throughout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Node:
    id: str
    hostname: str
    capacity: Mapping[str, float]  # effective: (physical - reserved) × ratio
    enabled: bool = True


@dataclass(frozen=True)
class Vm:
    id: str
    name: str
    node: str
    demand: Mapping[str, float]
    movable: bool = True


@dataclass
class Snapshot:
    nodes: list[Node]
    vms: list[Vm]
    usage: dict[str, list[list[float]]] = field(default_factory=dict)  # vm id -> [[cpu, mem], ...] oldest first
    activity: dict[str, dict[str, Any]] = field(default_factory=dict)  # vm id -> live.build_inventory activity

    def state(self) -> Any:
        """A :class:`symbiont.placement.state.ClusterState` of the enabled nodes and their VMs."""
        from symbiont.placement.model import Host, Request
        from symbiont.placement.state import ClusterState

        hosts = [Host(n.id, dict(n.capacity)) for n in self.nodes if n.enabled]
        st = ClusterState(hosts, dims=("cpu", "mem"))
        ids = {h.id for h in hosts}
        for v in self.vms:
            if v.node in ids:
                st.add(Request(v.id, dict(v.demand)), v.node)
        return st


def consolidate(snap: Snapshot, time_limit: float = 1.0) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(moves (vm, from, to), nodes left empty) that free the most hosts: symbiont's improvement
    search (empty the least-filled hosts, refill the others by swaps) on the current placement."""
    from symbiont.placement.improve import eliminate_hosts

    enabled = [n for n in snap.nodes if n.enabled]
    if len(enabled) < 2:
        return [], []
    st = snap.state()
    movable = {v.id for v in snap.vms if v.movable}
    before = {n.id for n in enabled if any(v.node == n.id for v in snap.vms)}
    new, moves = eliminate_hosts(st, movable, time_limit=time_limit)
    after = {new.host_ids[p.host] for p in new.vms.values()}
    return [(m.vm, m.src, m.dst) for m in moves], sorted(before - after)


def hotspots(
    snap: Snapshot,
    thresholds: Mapping[str, float],
    k: int = 3,
    n: int = 5,
    heuristic: str = "worst-fit",
) -> tuple[list[tuple[str, str, str, str]], list[dict[str, Any]], list[str]]:
    """Sandpiper on the usage series: (moves (vm, from, to, reason), hotspots, unresolved)."""
    import numpy as np

    from symbiont.placement.overload import HotspotConfig, detect_hotspots, plan_migrations

    st = snap.state()
    usage = {v: np.array(s, dtype=float) for v, s in snap.usage.items() if v in st.vms and s}
    missing = [v for v in st.vms if v not in usage]
    for v in missing:  # unobserved: its allocation is all we know (conservative)
        d = snap_vm(snap, v).demand
        usage[v] = np.array([[d.get("cpu", 0.0), d.get("mem", 0.0)]] * n, dtype=float)
    cfg = HotspotConfig(thresholds=dict(thresholds), k=k, n=n)
    found = detect_hotspots(st, usage, cfg, "black-box")
    plan = plan_migrations(st, usage, found, cfg, heuristic, "black-box")
    return ([(m.vm, m.src, m.dst, m.reason) for m in plan.moves], [h.to_dict() for h in plan.hotspots],
            list(plan.unresolved))  # fmt: skip


def idle_vms(snap: Snapshot, cfg: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """(vm, why) for the VMs symbiont's idle rule (seeds/004) calls idle: CPU below the threshold
    for the whole window and a small working set. Needs live activity (symbiont daemons)."""
    from symbiont.placement.idle import IdleConfig, VMActivity, is_idle

    icfg = IdleConfig(**dict(cfg or {}))
    out = []
    for v in snap.vms:
        a = snap.activity.get(v.id)
        if not a or a.get("wss_mib") is None:
            continue
        act = VMActivity(v.id, v.node, float(a["mem_mib"]), list(a["cpu"]), float(a["wss_mib"]))
        ok, why = is_idle(act, icfg)
        if ok:
            out.append((v.id, why))
    return out


def snap_vm(snap: Snapshot, vid: str) -> Vm:
    for v in snap.vms:
        if v.id == vid:
            return v
    raise KeyError(vid)


def fetch_inventories(daemons: Sequence[str], timeout: float = 10.0) -> list[dict[str, Any]]:
    """Live inventories (``GET /v1/placement/inventory``) of symbiont host daemons (socket or URL)."""
    import httpx

    out = []
    for d in daemons:
        if d.startswith(("http://", "https://")):
            r = httpx.get(d.rstrip("/") + "/v1/placement/inventory", timeout=timeout)
        else:
            with httpx.Client(transport=httpx.HTTPTransport(uds=d), base_url="http://symbiontd", timeout=timeout) as c:
                r = c.get("/v1/placement/inventory")
        r.raise_for_status()
        out.append(r.json())
    return out


def snapshot_from_inventories(invs: Sequence[Mapping[str, Any]], mode: str = "black-box") -> Snapshot:
    """A snapshot of live symbiont hosts (GiB -> MB)."""
    nodes, vms = [], []
    usage: dict[str, list[list[float]]] = {}
    activity: dict[str, dict[str, Any]] = {}
    for inv in invs:
        h = inv["host"]
        oc = h.get("overcommit") or {}
        cap = {"cpu": float(h["capacity"]["cpu"]) * float(oc.get("cpu", 1.0)),
               "mem": float(h["capacity"]["mem"]) * 1024.0 * float(oc.get("mem", 1.0))}  # fmt: skip
        nodes.append(Node(str(h["id"]), str(h["id"]), cap))
        for v in h.get("vms", []):
            vms.append(Vm(v["id"], v["id"], str(h["id"]), {"cpu": float(v["demand"]["cpu"]),
                                                           "mem": float(v["demand"]["mem"]) * 1024.0}))  # fmt: skip
            u = inv.get("usage") or {}
            # the hypervisor's view where the daemon has it, else the guest agent's
            s = u.get(mode, {}).get(v["id"]) or u.get("gray-box", {}).get(v["id"])
            if s:
                usage[v["id"]] = [[float(r[0]), float(r[1]) * 1024.0] for r in s]
            if v["id"] in (inv.get("activity") or {}):
                activity[v["id"]] = dict(inv["activity"][v["id"]])
    return Snapshot(nodes, vms, usage, activity)
