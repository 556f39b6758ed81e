"""Placement inputs from a running daemon: host capacity, VM allocations, usage series.

Why: plans should start from what the host really has and what its VMs really use, not only
from hand-written files. This module maps the daemon's live data (the host's capacity, each
registered VM's allocation, and the samples the control loop stored in sqlite) onto the
placement model, in the units docs/placement.md uses: ``cpu`` in cores, ``mem`` in GiB.

Two views of usage, as in Sandpiper (seeds/003):

* **black-box** — only what the hypervisor sees: the QEMU process's CPU (psutil, 100% = one
  core) and the guest memory QEMU holds (the balloon driver's ``rss``, else QEMU's RSS).
  A sample without the QEMU CPU figure (no PID known) is skipped, never guessed.
* **gray-box** — what the guest agent reports: CPU from successive ``/proc/stat`` totals
  (busy share × online CPUs) and memory in use (``MemTotal − MemAvailable``).

Idle-VM detection (seeds/004) uses the guest's CPU as a fraction of its vCPUs and its memory in
use as the working-set estimate (an upper bound: it includes the page cache the guest would
give up under pressure).

The mapping functions are pure (lists of stored samples in, numbers out) and unit-tested; the
placement part (:meth:`symbiont.placement.part.PlacementPart.inventory`) feeds them from its
context.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Any

GIB = float(1 << 30)
DIMS = ("cpu", "mem")
_IDLE_TICKS = ("idle", "iowait")


def black_box(samples: Sequence[tuple[float, Mapping[str, Any]]]) -> list[list[float]]:
    """``[[cpu cores, mem GiB], ...]`` oldest first, from the daemon's ``libvirt`` samples."""
    out: list[list[float]] = []
    for _ts, d in samples:
        if d.get("state") != "running":
            continue
        cpu = d.get("qemu_cpu_percent")
        if not isinstance(cpu, (int, float)) or isinstance(cpu, bool) or cpu < 0:
            continue
        ms = d.get("memstats_kib") or {}
        if isinstance(ms.get("rss"), (int, float)) and ms["rss"] > 0:
            mem = ms["rss"] * 1024 / GIB
        elif isinstance(d.get("qemu_rss"), (int, float)) and d["qemu_rss"] > 0:
            mem = d["qemu_rss"] / GIB
        else:
            continue
        out.append([float(cpu) / 100.0, float(mem)])
    return out


def gray_box(samples: Sequence[tuple[float, Mapping[str, Any]]]) -> tuple[list[list[float]], list[float]]:
    """``([[cpu cores, mem GiB], ...], [busy fraction of the online CPUs, ...])`` oldest first, from
    the daemon's (sanitised) ``agent`` samples. CPU needs two samples; a guest counter that went
    backwards (reboot) starts a new pair."""
    series: list[list[float]] = []
    frac: list[float] = []
    prev: Mapping[str, Any] | None = None
    for _ts, d in samples:
        mi = d.get("meminfo") or {}
        ct = d.get("cpu_times") or {}
        online = (d.get("cpus") or {}).get("count_online") or 0
        cur = ct if ct else None
        if prev is not None and cur is not None and "MemTotal" in mi and "MemAvailable" in mi:
            tot = sum(float(v) for v in cur.values()) - sum(float(v) for v in prev.values())
            idle = sum(float(cur.get(k, 0)) - float(prev.get(k, 0)) for k in _IDLE_TICKS)
            if tot > 0 and 0 <= idle <= tot:
                f = (tot - idle) / tot
                frac.append(f)
                used = max(0.0, float(mi["MemTotal"]) - float(mi["MemAvailable"]))
                series.append([f * max(int(online), 1), used / GIB])
        prev = cur
    return series, frac


def host_id(cfg: Any) -> str:
    """This daemon's host id: ``placement.host_id``, else the entry of ``placement.hosts`` whose
    libvirt URI is the daemon's, else the machine's hostname."""
    pl = getattr(cfg, "placement", None)
    if pl is not None and pl.host_id:
        return str(pl.host_id)
    for h in getattr(pl, "hosts", None) or []:
        if isinstance(h, Mapping) and h.get("libvirt_uri") == cfg.libvirt_uri and h.get("id"):
            return str(h["id"])
    return socket.gethostname()


def build_inventory(
    hid: str,
    capacity: Mapping[str, float],
    overcommit: Mapping[str, float],
    vms: Sequence[Mapping[str, Any]],
    n: int,
) -> dict[str, Any]:
    """The inventory document (what ``GET /v1/placement/inventory`` returns) from per-VM facts.

    Each VM mapping has ``name``, ``vcpus``, ``memory_mib`` (its allocation), ``libvirt`` and
    ``agent`` (stored samples, oldest first), and optionally ``full_mem_mib`` (its size before an
    idle plan shrank it: recorded in its registration when it was parked here, else the saved
    original balloon value), ``home`` (the host it was parked from) and ``min_mib`` (the
    registration's memory floor). ``n``: how many samples per series to keep.
    """
    host_vms: list[dict[str, Any]] = []
    bb: dict[str, list[list[float]]] = {}
    gb: dict[str, list[list[float]]] = {}
    activity: dict[str, dict[str, Any]] = {}
    for v in vms:
        name = str(v["name"])
        vcpus = int(v.get("vcpus") or 0)
        mem_mib = float(v.get("memory_mib") or 0)
        if vcpus <= 0 or mem_mib <= 0:
            continue  # not running (or libvirt does not know it): it takes no room on this host
        host_vms.append({"id": name, "demand": {"cpu": float(vcpus), "mem": mem_mib / 1024.0}})
        b = black_box(v.get("libvirt") or [])
        g, frac = gray_box(v.get("agent") or [])
        if b:
            bb[name] = b[-n:]
        if g:
            gb[name] = g[-n:]
        full, floor, home = v.get("full_mem_mib"), v.get("min_mib"), v.get("home")
        reserve, gfloor = v.get("reserve_mib"), v.get("floor_mib")
        activity[name] = {
            "mem_mib": mem_mib,
            "cpu": [min(1.0, max(0.0, f)) for f in frac[-n:]],
            "wss_mib": round(g[-1][1] * 1024.0, 1) if g else None,
            # Full size to restore on wake-up: the balloon's original value that the daemon saved
            # (sqlite knobs) before it first moved the balloon; None when it never did.
            "full_mem_mib": float(full) if isinstance(full, (int, float)) and full > 0 else None,
            "min_mib": float(floor) if isinstance(floor, (int, float)) and floor > 0 else None,
            "home": str(home) if isinstance(home, str) and home else None,
            # The guest's floor (symbiont.memory.floor): no idle shrink goes below it.
            "reserve_mib": float(reserve) if _num(reserve) and reserve >= 0 else None,
            "floor_mib": float(gfloor) if _num(gfloor) and gfloor > 0 else None,
        }
    return {
        "host": {"id": hid, "capacity": dict(capacity), "overcommit": dict(overcommit), "vms": host_vms},
        "dims": list(DIMS),
        "usage": {"black-box": bb, "gray-box": gb},
        "activity": activity,
    }


def _num(x: Any) -> bool:
    import math

    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plan_live(
    inventories: Sequence[Mapping[str, Any]],
    requests: Sequence[Any] = (),
    heuristic: str = "best-fit",
    mode: str = "batch",
    now: float | None = None,
    hotspots: Mapping[str, Any] | None = None,
    idle: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Plan on live inventories (one per daemon): place ``requests``, and optionally find hotspots
    (Sandpiper, fed with the stored samples) and idle VMs (seeds/004) and plan their moves.

    ``hotspots``: ``{mode: black-box|gray-box, thresholds: {res: fraction}, k, n, heuristic}``.
    ``idle``: ``{idle_host, cpu_threshold, window, wss_max_mib, margin, min_mem_mib, wake_cpu}``:
    VMs on the idle host whose newest CPU sample reaches ``wake_cpu`` move back home if it has room,
    else to the regular host with the tightest room (best fit on memory), and grow to their full
    size (recorded when they were parked, else the balloon original their daemon saved); idle VMs elsewhere shrink to their working set and move to the idle host.
    The result's ``moves`` (and the idle ``actions``, in order) are what ``symbiont place execute``
    carries out.
    """
    from dataclasses import replace

    import numpy as np

    from symbiont.placement.idle import IdleConfig, VMActivity, consolidation_plan, wake_plan
    from symbiont.placement.inventory import parse_inventory
    from symbiont.placement.overload import GuestStats, HotspotConfig, detect_hotspots, plan_migrations
    from symbiont.placement.planner import plan
    from symbiont.placement.state import ClusterState

    if not inventories:
        raise ValueError("no live inventories given")
    inv = parse_inventory({"hosts": [dict(i["host"]) for i in inventories]}, "live inventory")
    p = plan(inv.hosts, list(requests), heuristic, mode, inv.existing, inv.quotas, now)
    out: dict[str, Any] = {"plan": p.to_dict(), "moves": [], "hosts": [h.id for h in inv.hosts]}
    moved: set[str] = set()
    if hotspots is not None:
        hs = dict(hotspots)
        hmode = str(hs.pop("mode", "gray-box"))
        hheur = str(hs.pop("heuristic", "worst-fit"))
        cfg = HotspotConfig(**hs)
        state = ClusterState(inv.hosts, inv.quotas)
        for r, host in inv.existing:
            state.add(r, host)
        bb: dict[str, np.ndarray] = {}
        guest: dict[str, GuestStats] = {}
        unobserved: list[str] = []
        for i in inventories:
            for vm in (v["id"] for v in i["host"].get("vms", [])):
                b = i.get("usage", {}).get("black-box", {}).get(vm)
                g = i.get("usage", {}).get("gray-box", {}).get(vm)
                if b:
                    bb[vm] = np.array(b, dtype=float)
                elif g and hmode == "gray-box":
                    bb[vm] = np.array(g, dtype=float)  # no hypervisor CPU figure: the guest's own
                else:
                    unobserved.append(vm)
                    continue
                if g:
                    guest[vm] = GuestStats(mem=[row[1] for row in g])
        found = detect_hotspots(state, bb, cfg, hmode, guest)
        mp = plan_migrations(state, bb, found, cfg, hheur, hmode, guest)
        out["hotspots"] = {**mp.to_dict(), "mode": hmode, "unobserved": unobserved}
        for m in mp.moves:
            out["moves"].append(m.to_dict())
            moved.add(m.vm)
    if idle is not None:
        ic = dict(idle)
        idle_host = str(ic.pop("idle_host", ""))
        if idle_host not in out["hosts"]:
            raise ValueError(
                f"idle.idle_host {idle_host!r} is not one of the hosts ({', '.join(out['hosts'])})"
            )
        if ic.get("wake_cpu") is None:
            ic["wake_cpu"] = max(IdleConfig.wake_cpu, float(ic.get("cpu_threshold", 0.0)))
        icfg = IdleConfig(**ic)
        free: dict[str, float] = {}
        sleepers: list[VMActivity] = []  # on the idle host: candidates for waking
        acts: list[VMActivity] = []
        for i in inventories:
            h = i["host"]
            oc = float(h.get("overcommit", {}).get("mem", 1.0))
            free[h["id"]] = h["capacity"].get("mem", 0.0) * oc * 1024 - sum(
                v["demand"].get("mem", 0.0) * 1024 for v in h.get("vms", [])
            )
            for v in h.get("vms", []):
                a = i.get("activity", {}).get(v["id"])
                if a is None or v["id"] in moved:
                    continue
                full, floor = a.get("full_mem_mib"), a.get("min_mib")
                reserve, gfloor = a.get("reserve_mib"), a.get("floor_mib")
                vma = VMActivity(
                    v["id"], h["id"], float(a["mem_mib"]), list(a["cpu"]), float(a.get("wss_mib") or 0.0),
                    home_mem_mib=float(full) if full is not None else None,
                    min_mib=float(floor) if floor is not None else None,
                    home=a.get("home"),
                    reserve_mib=float(reserve) if reserve is not None else None,
                    floor_mib=float(gfloor) if gfloor is not None else None,
                )  # fmt: skip
                if h["id"] == idle_host:
                    sleepers.append(vma)
                if a.get("wss_mib") is not None:
                    acts.append(vma)
        regular = {h: max(f, 0.0) for h, f in free.items() if h != idle_host}
        sleepers = [replace(v, home=v.home if v.home in regular else None) for v in sleepers]
        wake = wake_plan(sleepers, idle_host, regular, icfg)
        woken = {a.vm for a in wake}
        # VMs leaving the idle host make room there for the ones consolidated now.
        idle_free = free[idle_host] + sum(v.mem_mib for v in sleepers if _leaves(v.id, wake))
        actions = wake + consolidation_plan([v for v in acts if v.id not in woken], idle_host,
                                            max(idle_free, 0.0), icfg)  # fmt: skip
        out["idle"] = {
            "idle_host": idle_host,
            "free_mib": round(free[idle_host], 1),
            "regular_free_mib": {h: round(f, 1) for h, f in regular.items()},
            "actions": [a.to_dict() for a in actions],
        }
        for a in actions:
            if a.kind == "move":
                out["moves"].append({"vm": a.vm, "from": a.src, "to": a.dst, "reason": a.reason})
    return out


def _leaves(vm: str, actions: Sequence[Any]) -> bool:
    return any(a.kind == "move" and a.vm == vm for a in actions)
