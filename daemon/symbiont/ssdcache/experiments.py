"""Elastic SSD and two-level cache experiments (SymFlex, DoubleDecker): CSV + PNG each.

* ``ssdcache-elastic`` — "Elastic SSD in action / Resizing in action": one real VM, its guest
  cache in front of a throttled slow disk, the host inflating and deflating the elastic SSD
  as the guest's load (working set) changes; the guest workload's throughput follows.
* ``ssdcache-allocation`` — share-based allocation, then allocation with proportionate
  throughput, across three caches on the real pool, served by the real NBD servers and
  managed by the real manager. The three "VMs" are host processes running the guest agent's
  own cache code over an NBD client (the host lends one VM at a time to this experiment);
  the agent protocol is replaced by direct calls to the same operations.
* ``doubledecker-partitioning`` — deterministic cache partitioning: containers C1:C2 at 60:40
  in the memory tier, C3 joins at 50:30:20, then C3 moves to the SSD tier and C1:C2 go back to
  60:40; occupancy over time.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from symbiont.experiments.framework import ExperimentError, RunContext, experiment
from symbiont.ssdcache.layout import BLOCK_SIZE


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
    import libvirt

    from symbiont.config import load_config
    from symbiont.lab.session import LabSession
    from symbiont.lab.vms import lab_vm

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
    with LabSession(count=1, prefix="symbiont-cache-exp-", period_s=1.0, memory_mib=int(p["memory_mib"]),
                    max_vcpus=2, step=ctx.note) as lab:
        name = lab.names[0]
        assert lab.work_dir is not None
        with lab.client() as c:
            c.post("/v1/ssdcache/pool", {"file": str(lab.work_dir / "pool.img"), "size_mib": 80})
            c.post("/v1/ssdcache/caches", {"vm": name, "size_mib": 64, "current_mib": phases[0][1], "persist": False})
            c.post(f"/v1/ssdcache/caches/{name}/attach", {"target_dev": "vdb"})
        slow = lab_vm(load_config(None, {"lab": {"vm_prefix": lab.prefix}}), name).dir / "slow.img"
        _write_slow_disk(slow, max_ws)
        bps = int(p["slow_mib_s"]) << 20
        xml = (f"<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>"
               f"<source file='{slow}'/><target dev='vdc' bus='virtio'/><serial>symbiont-slow</serial>"
               f"<iotune><read_bytes_sec>{bps}</read_bytes_sec><read_iops_sec>400</read_iops_sec></iotune></disk>")
        lab.host.domain(name).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)

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
class _HostGuest:
    """The guest agent's cache and workload, run on the host over an NBD client."""

    def __init__(self, name: str, sock: str, slow: Path, slow_bps: float, state: Path) -> None:
        from symbiont.ssdcache.nbdclient import NbdClient
        from symbiont_agent import ops_ssdcache as g

        outer = self
        self.client = NbdClient(sock, name)
        self.slow_fd = os.open(slow, os.O_RDONLY)
        self.slow_bps = slow_bps
        self._slow_lock = threading.Lock()

        class Cache(g.GuestCache):
            def _open(self) -> None:
                self.fd, self.slow_fd, self.device, self.slow = 0, 0, f"nbd:{name}", str(slow)

            def ssd_read(self, buf: Any, offset: int) -> int:
                data = outer.client.read(offset, len(buf))
                buf[: len(data)] = data
                return len(data)

            def ssd_write(self, buf: Any, offset: int) -> int:
                outer.client.write(offset, bytes(buf))
                return len(buf)

            def slow_read(self, buf: Any, offset: int) -> int:
                with outer._slow_lock:  # an HDD: one request at a time, at its bandwidth
                    t = time.monotonic()
                    n = os.preadv(outer.slow_fd, [buf], offset)
                    time.sleep(max(0.0, n / outer.slow_bps - (time.monotonic() - t)))
                return n

        self.cache = Cache(state_file=str(state))
        self.cache._open()
        self.workload = g.Workload(self.cache)
        self.ops = {"ssdcache-config": self.cache.configure, "ssdcache-grant": self.cache.grant,
                    "ssdcache-revoke": self.cache.revoke, "ssdcache-release": self.cache.release,
                    "ssdcache-status": self._status}
        self.caps = list(self.ops)
        self.ready = True
        self.hello = {"caps": self.caps}

    def _status(self, _args: dict[str, Any]) -> dict[str, Any]:
        st = self.cache.status()
        st["ops_per_s"] = self.workload.rate()
        st["workload"] = self.workload.running
        return st

    async def request(self, op: str, args: dict[str, Any] | None = None, payload: bytes = b"",
                      timeout: float | None = None) -> tuple[Any, bytes]:
        return await asyncio.to_thread(self.ops[op], args or {}), b""

    def close(self) -> None:
        self.workload.stop()
        self.client.close()
        os.close(self.slow_fd)


@experiment(
    "ssdcache-allocation",
    "SymFlex share-based cache allocation, then allocation with proportionate throughput, across three caches "
    "with different working sets (real pool, NBD servers and manager; guest cache code run on the host)",
    params={"working_sets": [8, 20, 36], "weights": [3, 2, 1], "capacity_mib": 36, "share_s": 30.0,
            "proportional_s": 90.0, "period_s": 3.0, "slow_mib_s": 16, "gain": 0.5},  # fmt: skip
    param_help={
        "working_sets": "MiB of slow disk each VM's workload reads at random",
        "weights": "share-based phase: weight of each VM",
        "capacity_mib": "elastic SSD the policies hand out in total",
        "share_s": "seconds of the share-based phase",
        "proportional_s": "seconds of the throughput-proportional phase (target 1:1:1)",
        "period_s": "policy period",
        "slow_mib_s": "slow disk bandwidth per VM",
        "gain": "throughput-proportional controller gain",
    },
    needs=("root",),
)
def run_allocation(ctx: RunContext) -> dict[str, Any]:
    _need_root()
    p = ctx.params
    ws = [int(x) for x in p["working_sets"]]
    weights = [int(x) for x in p["weights"]]
    if len(ws) != len(weights) or not ws:
        raise ExperimentError("working_sets and weights need the same (non-zero) length")
    return asyncio.run(_allocation(ctx, ws, weights))


async def _allocation(ctx: RunContext, ws: list[int], weights: list[int]) -> dict[str, Any]:
    from symbiont.ssdcache.manager import CacheManager
    from symbiont.state import StateStore

    p = ctx.params
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="symbiont-ssdexp-") as tmpd:
        tmp = Path(tmpd)
        store = StateStore(tmp / "state.sqlite3")
        guests: dict[str, _HostGuest] = {}
        mgr = CacheManager(store, tmp / "run", agent=lambda vm: guests.get(vm))
        await mgr.start()
        try:
            await mgr.create_pool(str(tmp / "pool.img"), None, int(p["capacity_mib"]) + 8)
            names = [f"vm{i + 1}" for i in range(len(ws))]
            for name, w, wt in zip(names, ws, weights, strict=True):
                await mgr.register(name, size_mib=w, current_mib=0, persist=False, weight=wt)
                slow = tmp / f"{name}.slow"
                _write_slow_disk(slow, w)
                guests[name] = _HostGuest(name, str(mgr.socket_path(name)), slow, int(p["slow_mib_s"]) << 20,
                                          tmp / f"{name}.json")
                await mgr.sync_guest(name)
                guests[name].workload.start({"working_set_mib": w, "seconds": 3600, "verify": True, "seed": 7})
            t0 = time.monotonic()
            for mode, secs in (("shares", float(p["share_s"])), ("throughput", float(p["proportional_s"]))):
                mgr.set_policy(mode=mode, capacity_mib=int(p["capacity_mib"]), gain=float(p["gain"]),
                               target_ratio={n: 1.0 for n in names}, max_step_mib=8)
                ctx.stage(f"{mode} allocation for {secs:.0f} s")
                end = time.monotonic() + secs
                while time.monotonic() < end:
                    await asyncio.sleep(float(p["period_s"]))
                    await mgr.on_period()
                    await asyncio.sleep(0.3)  # let the guest ticks land
                    for n in names:
                        st = mgr.guests[n].last_status or {}
                        rows.append({"t_s": round(time.monotonic() - t0, 2), "mode": mode, "vm": n,
                                     "working_set_mib": ws[names.index(n)], "weight": weights[names.index(n)],
                                     "cache_mib": len(mgr.exports[n].backed()),
                                     "ops_per_s": round(st.get("ops_per_s", 0.0), 2),
                                     "hit_rate": round(st.get("hit_rate", 0.0), 4)})
                    ctx.note("  ".join(f"{r['vm']}: {r['cache_mib']} MiB {r['ops_per_s']:.0f} op/s"
                                       for r in rows[-len(names):]))
            mism = sum(g.workload.mismatches for g in guests.values())
        finally:
            for g in guests.values():
                g.close()
            for name in list(mgr.exports):
                await mgr.unregister(name)
            if mgr.bmap.pool() is not None:
                await mgr.delete_pool(remove_file=True)
            await mgr.stop()
            store.close()
    ctx.write_csv("allocation.csv", rows)
    plt = _plt()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    names = sorted({r["vm"] for r in rows})
    switch = min((r["t_s"] for r in rows if r["mode"] == "throughput"), default=None)
    for n in names:
        rs = [r for r in rows if r["vm"] == n]
        lab = f"{n} (ws {rs[0]['working_set_mib']} MiB, w {rs[0]['weight']})"
        a1.step([r["t_s"] for r in rs], [r["cache_mib"] for r in rs], where="post", label=lab)
        a2.plot([r["t_s"] for r in rs], [r["ops_per_s"] for r in rs], label=n)
    for a in (a1, a2):
        if switch is not None:
            a.axvline(switch, color="gray", ls=":")
    a1.set_ylabel("elastic SSD (MiB)")
    a1.set_title("share-based (weights) | then proportionate throughput (target 1:1:1)")
    a2.set_ylabel("throughput (ops/s, log)")
    a2.set_yscale("log")
    a2.set_xlabel("time (s)")
    a1.legend(loc="upper center", bbox_to_anchor=(0.5, -1.45), ncol=3)
    ctx.savefig(fig, "allocation.png")

    def tail(mode: str) -> dict[str, Any]:
        rs = [r for r in rows if r["mode"] == mode]
        last = rs[-len(names) * 3:] if rs else []
        return {n: {"cache_mib": [r["cache_mib"] for r in last if r["vm"] == n][-1:],
                    "ops_per_s": round(sum(r["ops_per_s"] for r in last if r["vm"] == n)
                                       / max(1, sum(1 for r in last if r["vm"] == n)), 1)} for n in names}

    return {"shares_end": tail("shares"), "proportional_end": tail("throughput"), "mismatches": mism}


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
