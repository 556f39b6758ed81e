"""Trace-driven simulation of a cluster under a placement policy (and optional Sandpiper).

Why: the heuristics' static packing quality says little about what a cluster sees over time —
departures fragment hosts, overcommitted hosts overload when their VMs get busy, and migrations
have to fix that. The simulator replays a :class:`~symbiont.placement.traces.Trace` and measures
exactly those effects, deterministically for a given trace and configuration.

Model (time-stepped, one step = ``interval`` minutes, times in minutes):

1. At each step ``t``, the events with time <= t are applied: departures, then arrivals, then usage
   samples. An arrival is placed online by the heuristic (allocations against capacity x
   overcommit). If nothing fits and the request has a ``deadline`` not yet passed, it waits and is
   retried at every step; otherwise, or once the deadline passes, it is rejected with the reason.
2. Each running VM's usage is its latest usage sample (its full allocation until it has one).
3. A host is *overloaded* at a step when the summed usage of its VMs exceeds ``overload_level`` x
   its physical capacity in some resource. ``overload_minutes`` = sum over steps of
   (overloaded hosts x ``interval``): host-minutes of contention.
4. With ``detection`` set to ``black-box`` or ``gray-box``, Sandpiper runs after the measurement:
   hotspots by k-of-n, then migrations planned by :mod:`~symbiont.placement.overload` and
   applied at once (their effect shows from the next step). The hypervisor-visible memory is the
   high-water mark of the VM's memory usage since it was placed (the hypervisor does not see what
   a guest frees); gray-box mode adds the guest's own memory reports.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from symbiont.placement.model import Host, Request, Vector, fmt
from symbiont.placement.overload import GuestStats, HotspotConfig, Move, detect_hotspots, plan_migrations
from symbiont.placement.planner import Decision, Placer
from symbiont.placement.state import ClusterState
from symbiont.placement.traces import Trace

DETECTION = ("off", "black-box", "gray-box")


@dataclass(frozen=True)
class SimConfig:
    heuristic: str = "best-fit"
    interval: float = 5.0
    detection: str = "off"
    hotspot: HotspotConfig = field(default_factory=HotspotConfig)
    migration_heuristic: str = "worst-fit"
    overload_level: float = 1.0
    prefer_open: bool = True

    def __post_init__(self) -> None:
        if self.detection not in DETECTION:
            raise ValueError(f"unknown detection {self.detection!r}; known: {', '.join(DETECTION)}")
        if self.interval <= 0 or self.overload_level <= 0:
            raise ValueError("interval and overload_level must be positive")


@dataclass
class SimResult:
    """What happened, per step and in total."""

    times: np.ndarray
    hosts_used: np.ndarray
    overloaded: np.ndarray
    max_util: np.ndarray
    placed: int
    rejected: list[Decision]
    overload_minutes: float
    migrations: list[tuple[float, Move]]
    decisions: int
    decision_seconds: float
    arrivals: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "arrivals": self.arrivals,
            "placed": self.placed,
            "rejected": len(self.rejected),
            "rejection_rate": len(self.rejected) / self.arrivals if self.arrivals else 0.0,
            "hosts_used_mean": float(self.hosts_used.mean()) if self.hosts_used.size else 0.0,
            "hosts_used_max": int(self.hosts_used.max()) if self.hosts_used.size else 0,
            "overload_minutes": self.overload_minutes,
            "migrations": len(self.migrations),
            "us_per_decision": 1e6 * self.decision_seconds / self.decisions if self.decisions else 0.0,
        }

    def rows(self) -> list[dict[str, Any]]:
        """One row per step, for CSV."""
        return [
            {
                "time": float(t),
                "hosts_used": int(u),
                "overloaded_hosts": int(o),
                "max_util": round(float(m), 4),
            }
            for t, u, o, m in zip(self.times, self.hosts_used, self.overloaded, self.max_util, strict=True)
        ]


def simulate(
    trace: Trace,
    hosts: Sequence[Host],
    config: SimConfig | None = None,
    quotas: Mapping[str, Vector] | None = None,
) -> SimResult:
    """Replay ``trace`` on ``hosts`` under ``config``; see the module docstring for the model."""
    cfg = config or SimConfig()
    state = ClusterState(hosts, quotas)
    missing = [d for d in trace.dims if d not in state.dims]
    if missing:
        raise ValueError(f"trace uses resources the hosts lack: {', '.join(missing)}")
    col = [state.dims.index(d) for d in trace.dims]
    placer = Placer(state, cfg.heuristic, cfg.prefer_open)
    n_hist = cfg.hotspot.n
    D = len(state.dims)

    def widen(v: np.ndarray) -> np.ndarray:
        out = np.zeros(D)
        out[col] = v
        return out

    usage: dict[str, np.ndarray] = {}
    hwm: dict[str, np.ndarray] = {}
    hv_hist: dict[str, deque[np.ndarray]] = {}
    guest_mem: dict[str, deque[float]] = {}
    mem_j = state.dims.index("mem") if "mem" in state.dims else None
    pending: dict[str, Request] = {}
    arrived_usage: dict[str, np.ndarray] = {}
    rejected: list[Decision] = []
    migrations: list[tuple[float, Move]] = []
    decisions = 0
    dec_s = 0.0
    arrivals = 0
    placed = 0

    trace_demand = {e.vm: e.values for e in trace.events if e.kind == "arrive" and e.values is not None}

    def try_place(req: Request, now: float) -> Decision:
        nonlocal decisions, dec_s, placed
        t0 = time.perf_counter()
        d = placer.place_unit([req], now, [widen(trace_demand[req.id])])[0]
        dec_s += time.perf_counter() - t0
        decisions += 1
        if d.placed:
            placed += 1
            if req.id in arrived_usage:
                usage[req.id] = arrived_usage.pop(req.id)
        return d

    events = trace.events
    horizon = trace.horizon
    steps = int(np.ceil(horizon / cfg.interval)) + 1 if events else 0
    times = np.arange(1, steps + 1) * cfg.interval
    used_s = np.zeros(steps, dtype=int)
    over_s = np.zeros(steps, dtype=int)
    maxu_s = np.zeros(steps)
    i = 0
    for k, t in enumerate(times):
        while i < len(events) and events[i].time <= t + 1e-9:
            e = events[i]
            i += 1
            if e.kind == "depart":
                if e.vm in state.vms:
                    state.remove(e.vm)
                elif e.vm in pending:
                    pending.pop(e.vm)
                    rejected.append(Decision(e.vm, None, f"departed at {fmt(e.time)} before room was found"))
                for d in (usage, hwm, hv_hist, guest_mem, arrived_usage):
                    d.pop(e.vm, None)
            elif e.kind == "arrive":
                arrivals += 1
                req = e.request
                assert req is not None
                dec = try_place(req, e.time)
                if not dec.placed:
                    if req.deadline is not None and e.time < req.deadline:
                        pending[req.id] = req
                    else:
                        rejected.append(dec)
            else:  # usage
                assert e.values is not None
                if e.vm in state.vms:
                    usage[e.vm] = widen(e.values)
                elif e.vm in pending:
                    arrived_usage[e.vm] = widen(e.values)
        for vm, req in list(pending.items()):
            dec = try_place(req, t)
            if dec.placed:
                del pending[vm]
            elif req.deadline is not None and t > req.deadline:
                del pending[vm]
                rejected.append(dec)
        # measure with true usage
        load = np.zeros_like(state.capacity)
        for vm, p in state.vms.items():
            u = usage.get(vm)
            if u is None:
                u = p.demand
            load[p.host] += u
            if cfg.detection != "off":
                seen = u.copy()
                if mem_j is not None:
                    h = np.maximum(hwm.get(vm, u), u)
                    hwm[vm] = h
                    seen[mem_j] = h[mem_j]
                    guest_mem.setdefault(vm, deque(maxlen=n_hist)).append(float(u[mem_j]))
                hv_hist.setdefault(vm, deque(maxlen=n_hist)).append(seen)
        util = np.divide(load, state.capacity, out=np.where(load > 0, np.inf, 0.0), where=state.capacity > 0)
        over = np.any(util > cfg.overload_level + 1e-9, axis=1)
        used_s[k] = state.hosts_used()
        over_s[k] = int(over.sum())
        maxu_s[k] = float(util.max()) if util.size else 0.0
        if cfg.detection != "off" and state.vms:
            hist = {vm: np.array(hv_hist[vm]) for vm in state.vms if vm in hv_hist}
            guest = None
            if cfg.detection == "gray-box":
                guest = {vm: GuestStats(mem=list(guest_mem[vm])) for vm in hist if vm in guest_mem}
            hs = detect_hotspots(state, hist, cfg.hotspot, cfg.detection, guest)
            if hs:
                mp = plan_migrations(
                    state,
                    hist,
                    hs,
                    cfg.hotspot,
                    cfg.migration_heuristic,
                    cfg.detection,
                    guest,
                    cfg.prefer_open,
                )
                for m in mp.moves:
                    state.move(m.vm, m.dst)
                    migrations.append((float(t), m))
    for vm in list(pending):
        rejected.append(Decision(vm, None, "trace ended before room was found"))
    return SimResult(
        times=times,
        hosts_used=used_s,
        overloaded=over_s,
        max_util=maxu_s,
        placed=placed,
        rejected=rejected,
        overload_minutes=float(over_s.sum() * cfg.interval),
        migrations=migrations,
        decisions=decisions,
        decision_seconds=dec_s,
        arrivals=arrivals,
    )
