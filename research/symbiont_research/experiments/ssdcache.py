"""Elastic SSD and two-level cache experiments (SymFlex, DoubleDecker): CSV + PNG each.

* ``ssdcache-elastic`` — "Elastic SSD in action / Resizing in action": one real VM, its guest
  cache in front of a throttled slow disk, the host inflating and deflating the elastic SSD
  as the guest's load (working set) changes; the guest workload's throughput follows.
* ``ssdcache-allocation`` — share-based allocation, then allocation with proportionate
  throughput, across three real lab VMs: each has its elastic SSD (the daemon's NBD server on
  the shared pool, QEMU's NBD client) and its guest agent's cache in front of an
  iotune-throttled slow disk; the daemon's control loop runs the policies and resizes the
  caches with the guests (they pick the blocks they give back).
* ``doubledecker-partitioning`` — deterministic cache partitioning: containers C1:C2 at 60:40
  in the memory tier, C3 joins at 50:30:20, then C3 moves to the SSD tier and C1:C2 go back to
  60:40; occupancy over time.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from symbiont.ssdcache.layout import BLOCK_SIZE
from symbiont_research.experiments.framework import ExperimentError, RunContext, experiment


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _need_root() -> None:
    if os.geteuid() != 0:
        raise ExperimentError("this experiment needs root (loop devices)")


def _write_slow_disk(path: Path, lines: int) -> None:
    """A stand-in HDD: line i holds byte i % 251 + 1 (the guest workload verifies it)."""
    with open(path, "wb") as fh:
        for line in range(lines):
            fh.write(bytes([line % 251 + 1]) * BLOCK_SIZE)


# -- ssdcache-elastic ------------------------------------------------------------------------
@experiment(
    "ssdcache-elastic",
    "SymFlex 'elastic SSD in action': a real guest's cache throughput follows its elastic SSD size as the host "
    "inflates and deflates it while the guest's working set changes",
    params={"phases": ["8:2", "8:8", "16:8", "16:16", "16:4"], "phase_s": 25.0, "sample_s": 2.0,
            "slow_mib_s": 8, "memory_mib": 512},  # fmt: skip
    param_help={
        "phases": "WORKING_SET_MIB:CACHE_MIB per phase (the load, and the size the host gives)",
        "phase_s": "seconds per phase",
        "sample_s": "sampling period",
        "slow_mib_s": "bandwidth of the slow (HDD-like) disk, libvirt iotune",
        "memory_mib": "guest memory",
    },
    needs=("root", "libvirt", "vm"),
)
def run_elastic(ctx: RunContext) -> dict[str, Any]:
    from symbiont_research.lab.session import LabSession

    _need_root()
    p = ctx.params
    phases = []
    for item in p["phases"]:
        try:
            ws, cache = (int(x) for x in str(item).split(":"))
        except ValueError:
            raise ExperimentError(f"phase {item!r}: expected WORKING_SET_MIB:CACHE_MIB") from None
        if not (1 <= ws <= 64 and 0 <= cache <= 64):
            raise ExperimentError(f"phase {item!r}: sizes must be within 1..64 MiB")
        phases.append((ws, cache))
    max_ws = max(ws for ws, _ in phases)
    rows: list[dict[str, Any]] = []
    ctx.stage("booting one lab VM (golden image, libvirt)")
    with LabSession(count=1, period_s=1.0, memory_mib=int(p["memory_mib"]),
                    max_vcpus=2, step=ctx.note) as lab:
        name = lab.names[0]
        assert lab.work_dir is not None
        with lab.client() as c:
            c.post("/v1/ssdcache/pool", {"file": "pool.img", "size_mib": 80})
            c.post("/v1/ssdcache/caches", {"vm": name, "size_mib": 64, "current_mib": phases[0][1], "persist": False})
            c.post(f"/v1/ssdcache/caches/{name}/attach", {"target_dev": "vdb"})
        _attach_slow_disk(lab, name, max_ws, int(p["slow_mib_s"]) << 20)

        def view() -> dict[str, Any]:
            with lab.client() as c:
                return c.get(f"/v1/ssdcache/caches/{name}")

        def ready() -> bool:
            v = view()
            st = v["guest"]["status"] or {}
            return v["guest"]["acked_epoch"] == v["epoch"] and bool(st.get("device")) and bool(st.get("slow_device"))

        lab.wait_for(ready, 120, "the guest agent configured with both disks")
        t0 = time.monotonic()
        ctx.stage("phases", total=len(phases))
        for i, (ws, cache) in enumerate(phases):
            with lab.client() as c:
                r = c.put(f"/v1/ssdcache/caches/{name}/size", {"current_mib": cache})
                c.post(f"/v1/ssdcache/caches/{name}/guest-workload",
                       {"action": "start", "working_set_mib": ws, "seconds": 3600, "verify": True, "seed": i + 1})
            ctx.note(f"phase {i}: working set {ws} MiB, cache {r['before_mib']} -> {r['current_mib']} MiB "
                     f"(chosen by {r['chosen_by']}, {r['total_ms']:.0f} ms)")
            end = time.monotonic() + float(p["phase_s"])
            while time.monotonic() < end:
                time.sleep(float(p["sample_s"]))
                v = view()
                st = v["guest"]["status"] or {}
                rows.append({"t_s": round(time.monotonic() - t0, 2), "phase": i, "working_set_mib": ws,
                             "cache_mib": v["current_mib"], "ops_per_s": round(st.get("ops_per_s", 0.0), 2),
                             "hit_rate": round(st.get("hit_rate", 0.0), 4),
                             "mismatches": st.get("workload_mismatches", 0), "eio": st.get("eio", 0)})
            ctx.advance()
        with lab.client() as c:
            c.post(f"/v1/ssdcache/caches/{name}/guest-workload", {"action": "stop"})
            c.delete(f"/v1/ssdcache/caches/{name}")
            c.call("DELETE", "/v1/ssdcache/pool", params={"remove_file": "true"})
    ctx.write_csv("elastic.csv", rows)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    t = [r["t_s"] for r in rows]
    ax.plot(t, [r["ops_per_s"] for r in rows], color="tab:blue", label="guest workload (ops/s)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("throughput (4 KiB reads/s)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.step(t, [r["cache_mib"] for r in rows], where="pre", color="tab:red", label="elastic SSD (MiB)")
    ax2.step(t, [r["working_set_mib"] for r in rows], where="pre", color="tab:gray", ls="--", label="working set (MiB)")
    ax2.set_ylabel("MiB")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3)
    ax.set_title("Elastic SSD in action: throughput follows the cache size")
    ctx.savefig(fig, "elastic.png")
    by_phase: dict[int, list[float]] = {}
    for r in rows:
        by_phase.setdefault(r["phase"], []).append(r["ops_per_s"])
    return {"phases": [{"working_set_mib": ws, "cache_mib": c,
                        "mean_ops_per_s": round(sum(by_phase.get(i, [0])[1:]) / max(1, len(by_phase.get(i, [0])) - 1), 1)}
                       for i, (ws, c) in enumerate(phases)],
            "mismatches": max((r["mismatches"] for r in rows), default=0)}


# -- ssdcache-allocation ---------------------------------------------------------------------
def _attach_slow_disk(lab: Any, name: str, lines: int, bytes_per_s: int, iops: int = 400) -> None:
    """Give ``name`` an HDD stand-in (serial ``symbiont-slow``) throttled by libvirt iotune."""
    from symbiont.config import load_config
    from symbiont.host.system import SystemHost
    from symbiont_research.lab.vms import lab_vm

    slow = lab_vm(load_config(None, {"lab": {"vm_prefix": lab.prefix}}), name).dir / "slow.img"
    _write_slow_disk(slow, lines)
    xml = (
        "<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>"
        f"<source file='{slow}'/><target dev='vdc' bus='virtio'/><serial>symbiont-slow</serial>"
        f"<iotune><read_bytes_sec>{bytes_per_s}</read_bytes_sec><read_iops_sec>{iops}</read_iops_sec></iotune>"
        "</disk>"
    )
    host = SystemHost(lab.host.uri)
    try:
        host.attach_disk(name, xml, persist=False)  # the running guest only: the lab VM stays as defined
    finally:
        host.close()


@experiment(
    "ssdcache-allocation",
    "SymFlex share-based cache allocation, then allocation with proportionate throughput, across three real "
    "lab VMs with different working sets, each with its elastic SSD and in-guest cache in front of a slow disk",
    params={"working_sets": [8, 20, 36], "weights": [3, 2, 1], "capacity_mib": 36, "share_s": 40.0,
            "proportional_s": 100.0, "period_s": 3.0, "sample_s": 3.0, "slow_mib_s": 8, "gain": 0.5,
            "memory_mib": 320},  # fmt: skip
    param_help={
        "working_sets": "MiB of slow disk each VM's workload reads at random (one VM per entry)",
        "weights": "share-based phase: weight of each VM",
        "capacity_mib": "elastic SSD the policies hand out in total",
        "share_s": "seconds of the share-based phase",
        "proportional_s": "seconds of the throughput-proportional phase (target 1:1:1)",
        "period_s": "the daemon's control period (the policy runs once per period)",
        "sample_s": "sampling period of the CSV",
        "slow_mib_s": "slow disk bandwidth per VM (libvirt iotune)",
        "gain": "throughput-proportional controller gain",
        "memory_mib": "memory of each guest",
    },
    needs=("root", "libvirt", "vm"),
)
def run_allocation(ctx: RunContext) -> dict[str, Any]:
    from symbiont_research.lab.session import LabSession

    _need_root()
    p = ctx.params
    ws = [int(x) for x in p["working_sets"]]
    weights = [int(x) for x in p["weights"]]
    if len(ws) != len(weights) or not 1 <= len(ws) <= 4:
        raise ExperimentError("working_sets and weights need the same length, 1 to 4 VMs")
    if not all(1 <= w <= 64 for w in ws) or not all(w >= 1 for w in weights):
        raise ExperimentError("working sets must be within 1..64 MiB and weights at least 1")
    capacity = int(p["capacity_mib"])
    if not 1 <= capacity <= 256:
        raise ExperimentError("capacity_mib must be within 1..256")
    rows: list[dict[str, Any]] = []
    ctx.stage(f"booting {len(ws)} lab VMs (golden image, libvirt)")
    with LabSession(count=len(ws), period_s=float(p["period_s"]),
                    memory_mib=int(p["memory_mib"]), max_vcpus=1, step=ctx.note,
                    daemon_overrides={"control": {"agent_timeout_s": 5.0}}) as lab:
        assert lab.work_dir is not None
        names = lab.names
        with lab.client() as c:
            c.post("/v1/ssdcache/pool", {"file": "pool.img", "size_mib": capacity + 8})
            for name, w, wt in zip(names, ws, weights, strict=True):
                c.post("/v1/ssdcache/caches", {"vm": name, "size_mib": w, "current_mib": 0, "persist": False,
                                               "weight": wt})
                c.post(f"/v1/ssdcache/caches/{name}/attach", {"target_dev": "vdb"})
                _attach_slow_disk(lab, name, w, int(p["slow_mib_s"]) << 20)

        def views() -> dict[str, dict[str, Any]]:
            with lab.client() as c:
                return {v["vm"]: v for v in c.get("/v1/ssdcache/caches")}

        def ready() -> bool:
            for v in views().values():
                st = v["guest"]["status"] or {}
                if v["guest"]["acked_epoch"] != v["epoch"] or not st.get("device") or not st.get("slow_device"):
                    return False
            return True

        lab.wait_for(ready, 180, "every guest agent configured with both disks")
        with lab.client() as c:
            for i, (name, w) in enumerate(zip(names, ws, strict=True)):
                c.post(f"/v1/ssdcache/caches/{name}/guest-workload",
                       {"action": "start", "working_set_mib": w, "seconds": 3600, "verify": True, "seed": i + 7})
        t0 = time.monotonic()
        phases = (("shares", float(p["share_s"])), ("throughput", float(p["proportional_s"])))
        ctx.stage("share-based, then proportionate throughput", total=sum(s for _, s in phases))
        for mode, secs in phases:
            with lab.client() as c:
                c.put("/v1/ssdcache/policy", {"mode": mode, "capacity_mib": capacity, "gain": float(p["gain"]),
                                              "target_ratio": {n: 1.0 for n in names}, "max_step_mib": 8,
                                              "every_periods": 1})
            ctx.note(f"{time.monotonic() - t0:5.1f} s: policy {mode}")
            end = time.monotonic() + secs
            while time.monotonic() < end:
                time.sleep(float(p["sample_s"]))
                vs = views()
                for i, n in enumerate(names):
                    st = vs[n]["guest"]["status"] or {}
                    rows.append({"t_s": round(time.monotonic() - t0, 2), "mode": mode, "vm": n,
                                 "working_set_mib": ws[i], "weight": weights[i], "cache_mib": vs[n]["current_mib"],
                                 "ops_per_s": round(st.get("ops_per_s", 0.0), 2),
                                 "hit_rate": round(st.get("hit_rate", 0.0), 4),
                                 "mismatches": st.get("workload_mismatches", 0), "eio": st.get("eio", 0)})
                ctx.note("  ".join(f"{r['vm'][-1]}: {r['cache_mib']} MiB {r['ops_per_s']:.0f} op/s"
                                   for r in rows[-len(names):]))
                ctx.advance(float(p["sample_s"]))
        with lab.client() as c:
            c.put("/v1/ssdcache/policy", {"mode": "manual"})
            decisions = [d for d in c.get("/v1/decisions", limit=1000) if d.get("action") == "policy-apply"]
            for n in names:
                c.post(f"/v1/ssdcache/caches/{n}/guest-workload", {"action": "stop"})
                c.delete(f"/v1/ssdcache/caches/{n}")
            c.call("DELETE", "/v1/ssdcache/pool", params={"remove_file": "true"})
    ctx.write_csv("allocation.csv", rows)
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    switch = min((r["t_s"] for r in rows if r["mode"] == "throughput"), default=None)
    for n in names:
        rs = [r for r in rows if r["vm"] == n]
        if not rs:
            continue
        label = f"{n} (ws {rs[0]['working_set_mib']} MiB, w {rs[0]['weight']})"
        a1.step([r["t_s"] for r in rs], [r["cache_mib"] for r in rs], where="post", label=label)
        a2.plot([r["t_s"] for r in rs], [max(r["ops_per_s"], 0.1) for r in rs], label=n)
    for a in (a1, a2):
        if switch is not None:
            a.axvline(switch, color="gray", ls=":")
    a1.set_ylabel("elastic SSD (MiB)")
    a1.set_title(f"{len(names)} real VMs: share-based (weights) | then proportionate throughput (target 1:1:1)")
    a2.set_ylabel("guest throughput (ops/s, log)")
    a2.set_yscale("log")
    a2.set_xlabel("time (s)")
    a1.legend(loc="upper center", bbox_to_anchor=(0.5, -1.45), ncol=3)
    ctx.savefig(fig, "allocation.png")

    def tail(mode: str) -> dict[str, Any]:
        rs = [r for r in rows if r["mode"] == mode]
        last = rs[-len(names) * 3 :] if rs else []
        return {n: {"cache_mib": [r["cache_mib"] for r in last if r["vm"] == n][-1:],
                    "ops_per_s": round(sum(r["ops_per_s"] for r in last if r["vm"] == n)
                                       / max(1, sum(1 for r in last if r["vm"] == n)), 1)} for n in names}

    return {"vms": names, "boot_s": {k: round(v, 1) for k, v in lab.boot_seconds.items()},
            "shares_end": tail("shares"), "proportional_end": tail("throughput"),
            "policy_decisions": len(decisions),
            "mismatches": max((r["mismatches"] for r in rows), default=0)}


# -- doubledecker-partitioning ---------------------------------------------------------------
@experiment(
    "doubledecker-partitioning",
    "DoubleDecker deterministic cache partitioning: C1:C2 60:40, C3 joins at 50:30:20, then C3 moves to the "
    "SSD tier and C1:C2 go back to 60:40; occupancy of the memory and SSD tiers over time",
    params={"phase_s": 10.0, "mem_mib": 16, "ssd_mib": 8, "puts_per_s": 2000, "sample_s": 0.5},
    param_help={
        "phase_s": "seconds per phase",
        "mem_mib": "memory tier",
        "ssd_mib": "SSD tier (blocks of the real pool on a loop device)",
        "puts_per_s": "clean pages each container evicts into the hypervisor cache per second",
        "sample_s": "occupancy sampling period",
    },
    needs=("root",),
)
def run_doubledecker(ctx: RunContext) -> dict[str, Any]:
    from symbiont.ssdcache.pool import Pool
    from symbiont.ssdcache.twolevel import PAGE, SsdTier, TwoLevelCache

    _need_root()
    p = ctx.params
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="symbiont-ddexp-") as tmpd:
        pool = Pool.create_file(Path(tmpd) / "pool.img", int(p["ssd_mib"]) + 1)
        try:
            tier = SsdTier(pool, list(range(int(p["ssd_mib"]))))
            tl = TwoLevelCache(mem_pages=(int(p["mem_mib"]) << 20) // PAGE, ssd=tier)
            tl.configure_vm("vm1", {"mem": 100, "ssd": 100}, {"C1": ["mem", 60], "C2": ["mem", 40]})
            phases = [
                ("C1:C2 = 60:40 (Mem)", lambda: None),
                ("C3 joins: 50:30:20 (Mem)", lambda: [tl.configure_container("vm1", c, ["mem", w])
                                                      for c, w in (("C1", 50), ("C2", 30), ("C3", 20))]),
                ("C3 -> SSD, C1:C2 = 60:40", lambda: [tl.configure_container("vm1", c, tw)
                                                      for c, tw in (("C3", ["ssd", 100]), ("C1", ["mem", 60]),
                                                                    ("C2", ["mem", 40]))]),
            ]
            page = bytes(PAGE)
            counters: dict[str, int] = {}
            t0 = time.monotonic()
            ctx.stage("three phases", total=len(phases))
            for i, (label, change) in enumerate(phases):
                change()
                ctx.note(f"{time.monotonic() - t0:5.1f} s: {label}")
                end = time.monotonic() + float(p["phase_s"])
                next_sample = time.monotonic()
                while time.monotonic() < end:
                    tick = time.monotonic()
                    n = max(1, int(float(p["puts_per_s"]) * 0.05))
                    for cont in list(tl.containers["vm1"]):
                        for _ in range(n):
                            k = counters.get(cont, 0)
                            counters[cont] = k + 1
                            tl.put("vm1", cont, k, page)
                    if time.monotonic() >= next_sample:
                        next_sample += float(p["sample_s"])
                        for name, occ in tl.occupancy().items():
                            rows.append({"t_s": round(time.monotonic() - t0, 2), "phase": i, "container": name,
                                         "mem_quota": occ["quota"]["mem"], "mem_used": occ["used"]["mem"],
                                         "ssd_quota": occ["quota"]["ssd"], "ssd_used": occ["used"]["ssd"]})
                    time.sleep(max(0.0, 0.05 - (time.monotonic() - tick)))
                ctx.advance()
        finally:
            pool.close(detach=True)
    ctx.write_csv("occupancy.csv", rows)
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    mem_total = (int(p["mem_mib"]) << 20) // PAGE
    for name in sorted({r["container"] for r in rows}):
        rs = [r for r in rows if r["container"] == name]
        a1.plot([r["t_s"] for r in rs], [100 * r["mem_used"] / mem_total for r in rs], label=name.split("/")[1])
        a2.plot([r["t_s"] for r in rs], [r["ssd_used"] * PAGE / (1 << 20) for r in rs], label=name.split("/")[1])
    for k in range(1, 3):
        for a in (a1, a2):
            a.axvline(k * float(p["phase_s"]), color="gray", ls=":")
    a1.set_ylabel("memory tier occupancy (%)")
    a2.set_ylabel("SSD tier (MiB)")
    a2.set_xlabel("time (s)")
    a1.legend(ncol=3)
    a1.set_title("DoubleDecker: deterministic partitioning, reconfigured at run time")
    ctx.savefig(fig, "occupancy.png")
    end = {}
    for name in sorted({r["container"] for r in rows}):
        last = [r for r in rows if r["container"] == name][-1]
        end[name] = {"mem_pct": round(100 * last["mem_used"] / mem_total, 1), "ssd_used": last["ssd_used"]}
    return {"end": end}


# -- doubledecker-guest ----------------------------------------------------------------------
def _producer_cmd(pages: int, local: int, rate: float, seed: int) -> list[str]:
    """A container's workload: the guest agent's DoubleDecker producer (puts on eviction, gets on miss)."""
    return ["/usr/bin/env", "PYTHONPATH=/opt/symbiont-agent", "/usr/bin/python3", "-m", "symbiont_agent.ops_ssdcache",
            "dd-producer", "--pages", str(pages), "--local", str(local), "--rate", str(rate), "--seed", str(seed)]


@experiment(
    "doubledecker-guest",
    "DoubleDecker deterministic partitioning at the container level inside a real VM: containers in the guest "
    "put evicted pages into, and get them from, the VM's share (memory tier in guest RAM, SSD tier on its "
    "elastic SSD); C1:C2 60:40, C3 joins at 50:30:20, then C3 moves to the SSD tier and C1:C2 go back to 60:40",
    params={"phase_s": 40.0, "sample_s": 2.0, "mem_mib": 8, "ssd_mib": 8, "pages": 8192, "local_pages": 256,
            "rate": 60.0, "memory_mib": 448},  # fmt: skip
    param_help={
        "phase_s": "seconds per phase",
        "sample_s": "occupancy sampling period",
        "mem_mib": "the VM's share of the memory tier (the whole hypervisor memory tier; one VM)",
        "ssd_mib": "the VM's share of the SSD tier (kept in blocks of its elastic SSD)",
        "pages": "pages of each container's (simulated) file",
        "local_pages": "each container's own page cache (pages); evictions from it are puts",
        "rate": "page-cache misses per second per container",
        "memory_mib": "guest memory",
    },
    needs=("root", "libvirt", "vm"),
)
def run_doubledecker_guest(ctx: RunContext) -> dict[str, Any]:
    from symbiont.client import ApiError
    from symbiont_research.lab.session import LabSession

    _need_root()
    p = ctx.params
    mem_mib, ssd_mib = int(p["mem_mib"]), int(p["ssd_mib"])
    if not (1 <= mem_mib <= 64 and 1 <= ssd_mib <= 64):
        raise ExperimentError("mem_mib and ssd_mib must be within 1..64")
    rows: list[dict[str, Any]] = []
    ctx.stage("booting one lab VM (golden image, libvirt)")
    with LabSession(count=1, period_s=2.0, memory_mib=int(p["memory_mib"]),
                    max_vcpus=1, step=ctx.note) as lab:
        assert lab.work_dir is not None
        vm = lab.names[0]
        with lab.client() as c:
            c.post("/v1/ssdcache/pool", {"file": "pool.img", "size_mib": 2 * ssd_mib + 8})
            c.post("/v1/ssdcache/caches", {"vm": vm, "size_mib": ssd_mib, "current_mib": ssd_mib, "persist": False})
            c.post(f"/v1/ssdcache/caches/{vm}/attach", {"target_dev": "vdb"})

        def ready() -> bool:
            with lab.client() as c:
                v = c.get(f"/v1/ssdcache/caches/{vm}")
            return v["guest"]["acked_epoch"] == v["epoch"] and bool((v["guest"]["status"] or {}).get("device"))

        lab.wait_for(ready, 120, "the guest agent configured with its elastic SSD")
        with lab.client() as c:
            c.put("/v1/ssdcache/twolevel", {"mem_mib": mem_mib, "ssd_mib": ssd_mib})
            c.put(f"/v1/ssdcache/twolevel/vms/{vm}", {"mem": 100, "ssd": 100})

        def tw(changes: list[tuple[str, str, int]], start: list[str]) -> None:
            with lab.client() as c:
                for cont, tier, w in changes:
                    c.put(f"/v1/ssdcache/twolevel/vms/{vm}/containers/{cont}", {"type": tier, "weight": w})
                for cont in start:
                    c.post(f"/v1/cpu/vms/{vm}/containers",
                           {"name": cont, "command": _producer_cmd(int(p["pages"]), int(p["local_pages"]),
                                                                   float(p["rate"]), int(cont[1:]))})

        phases = [
            ("C1:C2 = 60:40 (Mem)", [("C1", "mem", 60), ("C2", "mem", 40)], ["C1", "C2"]),
            ("C3 joins: 50:30:20 (Mem)", [("C3", "mem", 20), ("C1", "mem", 50), ("C2", "mem", 30)], ["C3"]),
            ("C3 -> SSD, C1:C2 = 60:40", [("C3", "ssd", 100), ("C1", "mem", 60), ("C2", "mem", 40)], []),
        ]
        t0 = time.monotonic()
        ctx.stage("three phases", total=len(phases))
        last: dict[str, Any] = {}
        starts: list[float] = []
        for i, (label, changes, start) in enumerate(phases):
            starts.append(round(time.monotonic() - t0, 2))
            tw(changes, start)
            ctx.note(f"{time.monotonic() - t0:5.1f} s: {label}")
            end = time.monotonic() + float(p["phase_s"])
            while time.monotonic() < end:
                time.sleep(float(p["sample_s"]))
                try:
                    with lab.client() as c:
                        last = c.get(f"/v1/ssdcache/twolevel/vms/{vm}/guest")
                except ApiError as exc:  # a busy guest under TCG: this sample is lost, not the run
                    ctx.note(f"  no sample: {exc}")
                    continue
                for name, occ in sorted(last["containers"].items()):
                    rows.append({"t_s": round(time.monotonic() - t0, 2), "phase": i, "container": name,
                                 "mem_quota": occ["quota"]["mem"], "mem_used": occ["used"]["mem"],
                                 "ssd_quota": occ["quota"]["ssd"], "ssd_used": occ["used"]["ssd"],
                                 "puts": occ["puts"], "gets": occ["gets"], "hits": occ["hits"],
                                 "demoted": occ["demoted"]})
            ctx.advance()
        with lab.client() as c:
            logs = {ct: c.get(f"/v1/cpu/vms/{vm}/containers/{ct}/logs") for ct in ("C1", "C2", "C3")}
            for ct in ("C1", "C2", "C3"):
                c.call("DELETE", f"/v1/cpu/vms/{vm}/containers/{ct}")
            c.put("/v1/ssdcache/twolevel", {"mem_mib": 0, "ssd_mib": 0})
            c.delete(f"/v1/ssdcache/caches/{vm}")
            c.call("DELETE", "/v1/ssdcache/pool", params={"remove_file": "true"})
    ctx.write_csv("occupancy.csv", rows)
    mismatches = 0
    for out in logs.values():
        text = str(out.get("tail", "")) if isinstance(out, dict) else ""
        for line in text.splitlines():
            if "mismatches" in line:
                mismatches = max(mismatches, int(line.rsplit("mismatches", 1)[1].split()[0]))
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    mem_total = max(1, last.get("share", {}).get("mem", 0))
    for name in sorted({r["container"] for r in rows}):
        rs = [r for r in rows if r["container"] == name]
        a1.plot([r["t_s"] for r in rs], [100 * r["mem_used"] / mem_total for r in rs], label=name)
        a2.plot([r["t_s"] for r in rs], [r["ssd_used"] * 4096 / (1 << 20) for r in rs], label=name)
    for t_change in starts[1:]:
        for a in (a1, a2):
            a.axvline(t_change, color="gray", ls=":")
    a1.set_ylabel("VM's memory-tier share (%)")
    a2.set_ylabel("SSD tier (MiB, on the elastic SSD)")
    a2.set_xlabel("time (s)")
    a1.legend(ncol=3)
    a1.set_title("DoubleDecker inside a VM: containers' occupancy of the VM's cache share")
    ctx.savefig(fig, "occupancy.png")
    end = {}
    for name in sorted({r["container"] for r in rows}):
        r = [x for x in rows if x["container"] == name][-1]
        end[name] = {"mem_pct": round(100 * r["mem_used"] / mem_total, 1), "ssd_mib": round(r["ssd_used"] / 256, 2),
                     "hits": r["hits"], "puts": r["puts"]}
    return {"end": end, "phase_starts_s": starts, "share_pages": last.get("share"), "ssd_capacity_pages": last.get("ssd_capacity"),
            "mismatches": mismatches, "boot_s": {k: round(v, 1) for k, v in lab.boot_seconds.items()}}
