"""Memory experiments on real VMs: the idle-memory tax and ESX's balloon-vs-configured figure.

* ``memory-idle-tax``: two VMs with equal shares share a budget smaller than their boot
  memory. One runs a memory hog (always under pressure), the other is idle. With τ = 0
  (pure proportional share) equal shares mean equal memory whatever the VMs do; with
  τ = 0.75 the idle VM's pages are taxed, its ρ falls below the busy VM's, and memory flows
  to the busy VM until their ρ meet (Waldspurger, OSDI'02, section 5.2).
* ``memory-floor``: the smallest balloon target at which an idle lab guest stays alive with its
  agent answering (issue 16 item 12), which :mod:`symbiont.memory.floor`'s absolute floor is
  taken from; also the guest kernel's reserve below MemTotal and whether MemTotal shrinks with
  the balloon.
* ``memory-balloon-vs-configured``: ESX Figure 2's shape. Throughput of a file-server-like
  workload in a VM *configured* with M MiB, and in a VM configured with the maximum and
  *ballooned down* to M, for several M. The seed's claim: ballooning costs little against
  a VM that simply has that much memory.
"""

from __future__ import annotations

import time
from typing import Any

from symbiont_research.experiments.framework import RunContext, experiment

# The busy VM: keep MemAvailable under 8 % of MemTotal (up to 400 MiB) and touch it all.
HOG = """
import mmap, os, time
def avail():
    d = {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/meminfo')}
    return d['MemAvailable'], d['MemTotal']
bufs = []
while True:
    a, t = avail()
    if a >= 0.08 * t and len(bufs) * 8 < 400:
        b = mmap.mmap(-1, 8 << 20)
        for i in range(0, 8 << 20, 4096):
            b[i:i + 16] = os.urandom(16)  # unique pages: KSM cannot merge them
        bufs.append(b)
        continue
    for b in bufs:
        for i in range(0, 8 << 20, 4096):
            b[i + 16] = (b[i + 16] + 1) & 255
    time.sleep(0.2)
"""

# A file-server-like load (dbench's spirit): N files, random whole-file reads and rewrites of
# 64 KiB blocks, for a fixed time; prints operations per second. Its working set is the files.
FILESERVER = """
import os, random, sys, time
root, nfiles, size_mib, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
os.makedirs(root, exist_ok=True)
block = os.urandom(64 << 10)
per = (size_mib << 20) // nfiles
for i in range(nfiles):
    with open(f'{root}/f{i}', 'wb') as fh:
        for _ in range(per // len(block)):
            fh.write(block)
os.sync()
with open('/proc/sys/vm/drop_caches', 'w') as fh:
    fh.write('3')
rng = random.Random(1)
ops = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    i = rng.randrange(nfiles)
    if rng.random() < 0.8:
        with open(f'{root}/f{i}', 'rb') as fh:
            while fh.read(64 << 10):
                pass
    else:
        with open(f'{root}/f{i}', 'r+b') as fh:
            fh.seek(rng.randrange(per // len(block)) * len(block))
            fh.write(block)
    ops += 1
print('OPS', ops / seconds)
"""


def run_guest_script(lab: Any, vm: str, script: str, name: str, args: str = "", background: bool = True,
                     timeout: float = 600) -> str:
    """Copy a Python script into the guest over the serial console and run it (detached, or
    to completion returning its output)."""
    import base64

    from symbiont_research.lab.console import guest_exec

    b64 = base64.b64encode(script.encode()).decode()
    if background:
        cmd = f"echo {b64} | base64 -d > /root/{name}.py && (nohup python3 /root/{name}.py {args} >/dev/null 2>&1 &)"
    else:
        cmd = f"echo {b64} | base64 -d > /root/{name}.py && python3 /root/{name}.py {args}"
    return guest_exec(lab.host, vm, cmd, timeout=timeout).output


@experiment(
    "memory-idle-tax",
    "Two VMs, equal shares, one busy and one idle: allocation over time with τ=0, then τ=0.75",
    params={"budget_mib": 800, "memory_mib": 512, "phase_s": 60.0, "period_s": 2.0, "tau": 0.75},
    param_help={"budget_mib": "memory both VMs may use together", "phase_s": "seconds per τ phase",
                "tau": "tax rate of the second phase"},
    needs=("root", "libvirt", "vm"),
)
def idle_tax(ctx: RunContext) -> dict[str, Any]:
    from symbiont_research.lab.session import LabSession

    p = ctx.params
    rows: list[dict[str, Any]] = []
    ctx.stage("booting 2 VMs and the daemon (memory policy on, τ = 0)")
    with LabSession(count=2, period_s=p["period_s"], memory_mib=p["memory_mib"],
                    step=ctx.note,
                    daemon_overrides={"memory": {"enabled": True, "budget_mib": p["budget_mib"],
                                                 "tax_rate": 0.0, "max_step_mib": 64}}) as lab:
        busy, idle = lab.names
        with lab.client() as c:
            lab.wait_for(lambda: c.get("/v1/memory")["periods"] >= 3, 120, "policy running")
            run_guest_script(lab, busy, HOG, "hog")
            t0 = time.monotonic()
            summary: dict[str, Any] = {}
            for phase, tau in (("tau=0", 0.0), (f"tau={p['tau']}", p["tau"])):
                c.put("/v1/memory/policy", {"tax_rate": tau})
                ctx.stage(f"phase {phase}: observing", total=p["phase_s"])
                end = time.monotonic() + p["phase_s"]
                while time.monotonic() < end:
                    for v in c.get("/v1/memory")["vms"]:
                        rows.append({"t_s": round(time.monotonic() - t0, 1), "phase": phase, "vm": v["name"],
                                     "role": "busy" if v["name"] == busy else "idle",
                                     "target_mib": v["target_mib"], "actual_mib": v["actual_mib"], "f": v["f"],
                                     "rho": v["rho"], "pressure": int(v["pressure"]), "used_mib": v["used_mib"]})
                    time.sleep(p["period_s"])
                    ctx.advance(p["period_s"])
                last = {r["role"]: r["target_mib"] for r in rows[-2:]}
                summary[f"{phase}: busy_mib"] = last.get("busy")
                summary[f"{phase}: idle_mib"] = last.get("idle")
                ctx.note(f"end of {phase}: busy VM {last.get('busy')} MiB, idle VM {last.get('idle')} MiB")
    ctx.write_csv("allocation.csv", rows)
    _plot_idle_tax(ctx, rows, p)
    return summary


def _plot_idle_tax(ctx: RunContext, rows: list[dict[str, Any]], p: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axf) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for role, color in (("busy", "tab:red"), ("idle", "tab:blue")):
        rs = [r for r in rows if r["role"] == role]
        ax.plot([r["t_s"] for r in rs], [r["target_mib"] for r in rs], color=color, label=f"{role} VM target")
        ax.plot([r["t_s"] for r in rs], [r["actual_mib"] for r in rs], ":", color=color, label=f"{role} VM actual")
        axf.plot([r["t_s"] for r in rs], [r["f"] for r in rs], color=color, label=f"{role} VM f")
    switch = min((r["t_s"] for r in rows if r["phase"] != "tau=0"), default=None)
    if switch is not None:
        for a in (ax, axf):
            a.axvline(switch, color="grey", lw=0.8)
        ax.annotate(f"τ: 0 → {p['tau']}", (switch, ax.get_ylim()[1]), fontsize=8, va="top", ha="left")
    ax.set_ylabel("memory (MiB)")
    ax.set_title(f"Idle-memory tax: equal shares, budget {p['budget_mib']} MiB for two {p['memory_mib']} MiB VMs")
    ax.legend(fontsize=8)
    axf.set_ylabel("active fraction f")
    axf.set_xlabel("seconds")
    axf.set_ylim(0, 1)
    ctx.savefig(fig, "idle_tax.png")


@experiment(
    "memory-balloon-vs-configured",
    "ESX Fig. 2: file-server throughput, VM configured with M MiB vs a larger VM ballooned down to M",
    params={"sizes_mib": [256, 384, 512], "max_mib": 512, "files": 24, "data_mib": 160, "seconds": 20.0},
    param_help={"sizes_mib": "memory sizes M to compare", "max_mib": "boot memory of the ballooned VM",
                "data_mib": "file-server data set (the working set)", "seconds": "measurement time per point"},
    needs=("root", "libvirt", "vm"),
)
def balloon_vs_configured(ctx: RunContext) -> dict[str, Any]:
    from symbiont_research.lab.session import LabSession

    p = ctx.params
    sizes = sorted(p["sizes_mib"])
    if not sizes or max(sizes) > p["max_mib"] or min(sizes) < 192:
        raise ValueError("sizes_mib must lie within 192..max_mib")
    rows: list[dict[str, Any]] = []
    args = f"/root/fs {p['files']} {p['data_mib']} {p['seconds']}"

    def measure(lab: Any, vm: str) -> float:
        out = run_guest_script(lab, vm, FILESERVER, "fileserver", args, background=False, timeout=p["seconds"] + 600)
        for line in out.splitlines():
            if line.startswith("OPS"):
                return float(line.split()[1])
        raise RuntimeError(f"file-server workload printed no result: {out[-300:]}")

    ctx.stage("ballooned VM: boot with max memory", total=None)
    with LabSession(count=1, tag="fig2b", memory_mib=p["max_mib"], step=ctx.note) as lab:
        vm = lab.names[0]
        with lab.client() as c:
            for m in sorted(sizes, reverse=True):
                ctx.stage(f"ballooned to {m} MiB", total=None)
                c.put(f"/v1/vms/{vm}/memory", {"target_mib": m})
                lab.wait_for(lambda m=m: abs((c.get(f"/v1/vms/{vm}")["balloon_actual_mib"] or 0) - m) <= 2, 120,
                             f"balloon at {m} MiB")
                ops = measure(lab, vm)
                rows.append({"memory_mib": m, "kind": "ballooned", "ops_per_s": round(ops, 2)})
                ctx.note(f"ballooned {p['max_mib']}→{m} MiB: {ops:.1f} ops/s")
    for m in sizes:
        ctx.stage(f"configured VM with {m} MiB", total=None)
        with LabSession(count=1, tag="fig2c", memory_mib=m, step=ctx.note, register=False) as lab:
            ops = measure(lab, lab.names[0])
            rows.append({"memory_mib": m, "kind": "configured", "ops_per_s": round(ops, 2)})
            ctx.note(f"configured {m} MiB: {ops:.1f} ops/s")
    ctx.write_csv("throughput.csv", rows)
    _plot_fig2(ctx, rows, p)
    ratio = {}
    for m in sizes:
        b = next(r["ops_per_s"] for r in rows if r["memory_mib"] == m and r["kind"] == "ballooned")
        cfg = next(r["ops_per_s"] for r in rows if r["memory_mib"] == m and r["kind"] == "configured")
        ratio[m] = round(b / cfg, 3) if cfg else None
    return {"ballooned_over_configured": ratio}


@experiment(
    "memory-floor",
    "Smallest balloon target an idle 512 MiB lab guest survives (agent answering), step by step",
    params={"memory_mib": 512, "steps_mib": [384, 256, 200, 160, 140, 128, 120, 116, 112, 108, 104, 100, 96],
            "hold_s": 15.0, "period_s": 1.0},
    param_help={"steps_mib": "balloon targets, largest first; the run stops at the first the guest fails",
                "hold_s": "seconds at each target before the liveness check"},
    needs=("root", "libvirt", "vm"),
)
def guest_floor(ctx: RunContext) -> dict[str, Any]:
    """Sets the balloon through libvirt directly (the daemon's floor would refuse the low
    targets); alive = the daemon's agent stats request answered within the last 5 s, the guest
    MemTotal reported and the domain running. The guest dies at the end: the lab VM is removed."""
    from symbiont_research.lab.session import LabSession

    p = ctx.params
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"smallest_alive_mib": None, "first_dead_mib": None}
    with LabSession(count=1, period_s=p["period_s"], memory_mib=p["memory_mib"], step=ctx.note) as lab:
        vm = lab.names[0]
        with lab.client() as c:
            def row(target: int) -> dict[str, Any]:
                v = c.get(f"/v1/vms/{vm}")
                g = v["guest"]
                fresh = v["stats_at"] is not None and time.time() - v["stats_at"] < 5
                r = {"target_mib": target, "actual_mib": v["balloon_actual_mib"], "memtotal_mib": g["mem_total_mib"],
                     "memavailable_mib": g["mem_available_mib"], "state": v["state"],
                     "alive": int(bool(fresh and g["mem_total_mib"] and v["state"] == "running"))}
                rows.append(r)
                return r

            def at_full() -> dict[str, Any] | None:
                r = row(p["memory_mib"])
                return r if r["alive"] and r["actual_mib"] == p["memory_mib"] else None

            full = lab.wait_for(at_full, 60, "a guest sample at full size")
            out["reserve_mib"] = full["actual_mib"] - full["memtotal_mib"]
            out["used_mib"] = full["memtotal_mib"] - full["memavailable_mib"]
            for t in p["steps_mib"]:
                ctx.stage(f"balloon {t} MiB", total=None)
                lab.host.set_balloon(vm, int(t) * 1024)
                time.sleep(p["hold_s"])
                r = row(int(t))
                ctx.note(f"{t} MiB: MemTotal {r['memtotal_mib']}, MemAvailable {r['memavailable_mib']}, "
                         f"{'alive' if r['alive'] else 'NOT ANSWERING'}")
                if r["memtotal_mib"] and r["actual_mib"] and t == 384:
                    out["memtotal_at_384_mib"] = r["memtotal_mib"]
                if not r["alive"]:
                    out["first_dead_mib"] = t
                    break
                out["smallest_alive_mib"] = t
    ctx.write_csv("floor.csv", rows)
    return out


def _plot_fig2(ctx: RunContext, rows: list[dict[str, Any]], p: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sizes = sorted({r["memory_mib"] for r in rows})
    x = np.arange(len(sizes))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for off, kind, color in ((-0.2, "configured", "black"), (0.2, "ballooned", "grey")):
        vals = [next((r["ops_per_s"] for r in rows if r["memory_mib"] == m and r["kind"] == kind), 0) for m in sizes]
        ax.bar(x + off, vals, width=0.4, color=color,
               label=f"{kind}" + (f" (boot {p['max_mib']} MiB)" if kind == "ballooned" else ""))
    ax.set_xticks(x, [str(m) for m in sizes])
    ax.set_xlabel("VM memory (MiB)")
    ax.set_ylabel("file-server operations / s")
    ax.set_title(f"Balloon performance (ESX Fig. 2 shape): {p['data_mib']} MiB data set, QEMU TCG")
    ax.legend()
    ctx.savefig(fig, "balloon_vs_configured.png")


# Fill most of the guest's free memory with content that is the same in every VM (page i
# holds byte i % 251), then exit: the freed pages stay backed on the host with identical
# contents across VMs, as after a real workload in identical guests.
FILL = """
import mmap
d = {l.split(':')[0]: int(l.split()[1]) for l in open('/proc/meminfo')}
n = (d['MemAvailable'] // 1024 - 48) << 20
b = mmap.mmap(-1, n)
for i in range(0, n, 4096):
    b[i:i + 4096] = bytes([(i // 4096) % 251]) * 4096
print('filled', n >> 20)
"""


def _vm_host_memory(lab: Any, names: list[str]) -> dict[str, float]:
    """Host memory the VMs occupy (MiB): their QEMU processes' resident pages minus the pages
    KSM merged, plus one copy of each shared page (``pages_shared``, host-wide)."""
    import psutil

    from symbiont.host.ksm import PAGE_SIZE, Ksm, process_merging_pages

    rss = merged = 0
    for n in names:
        pid = lab.host.qemu_pid(n)
        rss += psutil.Process(pid).memory_info().rss
        merged += (process_merging_pages(pid) or 0) * PAGE_SIZE
    shared = Ksm().stats().pages_shared * PAGE_SIZE
    return {"rss_mib": rss / 2**20, "merged_mib": merged / 2**20, "shared_copies_mib": shared / 2**20,
            "occupied_mib": (rss - merged + shared) / 2**20}


@experiment(
    "memory-synergy",
    "Synergy's table: balloon size vs host memory actually reclaimed, KSM off vs on, two identical VMs",
    params={"balloons_mib": [64, 128, 192, 256], "memory_mib": 512, "merge_wait_s": 90.0, "settle_s": 6.0},
    param_help={"balloons_mib": "balloon sizes for the first VM", "merge_wait_s": "time KSM gets to merge",
                "settle_s": "wait after each balloon change"},
    needs=("root", "libvirt", "vm"),
)
def synergy(ctx: RunContext) -> dict[str, Any]:
    """KSM is set directly (pages_to_scan/sleep/run) and every value is restored at the end."""
    from symbiont.host.ksm import Ksm
    from symbiont_research.lab.session import LabSession

    p = ctx.params
    ksm = Ksm()
    ksm.require()
    saved = ksm.settings()
    rows: list[dict[str, Any]] = []
    try:
        for mode in ("off", "on"):
            ctx.stage(f"KSM {mode}: booting two identical VMs")
            ksm.write("run", 2)  # unmerge everything from before
            ksm.write("run", 0)
            with LabSession(count=2, tag=f"syn{mode}", memory_mib=p["memory_mib"],
                            step=ctx.note) as lab:
                vm = lab.names[0]
                ctx.stage(f"KSM {mode}: filling the guests' free memory (same content in both VMs)")
                for n in lab.names:
                    ctx.note(f"{n}: " + run_guest_script(lab, n, FILL, "fill", background=False, timeout=600).strip())
                if mode == "on":
                    ksm.write("pages_to_scan", 5000)
                    ksm.write("sleep_millisecs", 10)
                    ksm.write("run", 1)
                    ctx.stage(f"KSM on: merging for {p['merge_wait_s']:.0f} s", total=p["merge_wait_s"])
                    end = time.monotonic() + p["merge_wait_s"]
                    while time.monotonic() < end:
                        time.sleep(1)
                        ctx.advance(1)
                time.sleep(p["settle_s"])
                base = _vm_host_memory(lab, lab.names)
                rows.append({"ksm": mode, "balloon_mib": 0, "reclaimed_mib": 0.0, **base})
                with lab.client() as c:
                    for b in sorted(p["balloons_mib"]):
                        c.put(f"/v1/vms/{vm}/memory", {"target_mib": p["memory_mib"] - b})
                        lab.wait_for(lambda b=b, vm=vm: abs((c.get(f"/v1/vms/{vm}")["balloon_actual_mib"] or 0)
                                                            - (p["memory_mib"] - b)) <= 2, 120, f"balloon {b} MiB")
                        time.sleep(p["settle_s"])
                        now = _vm_host_memory(lab, lab.names)
                        rec = base["occupied_mib"] - now["occupied_mib"]
                        rows.append({"ksm": mode, "balloon_mib": b, "reclaimed_mib": round(rec, 1), **now})
                        ctx.note(f"KSM {mode}: balloon {b} MiB reclaimed {rec:.0f} MiB of host memory "
                                 f"(shared copies {now['shared_copies_mib']:.0f} MiB)")
    finally:
        ksm.write("run", 2)
        for name in ("pages_to_scan", "sleep_millisecs"):
            if name in saved:
                ksm.write(name, saved[name])
        ksm.write("run", saved.get("run", 0))
    ctx.write_csv("synergy.csv", rows)
    _plot_synergy(ctx, rows)
    top = max(p["balloons_mib"])
    return {f"ksm {m}: reclaimed by a {top} MiB balloon": next(r["reclaimed_mib"] for r in rows
                                                              if r["ksm"] == m and r["balloon_mib"] == top)
            for m in ("off", "on")}


def _plot_synergy(ctx: RunContext, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, style in (("off", "o-"), ("on", "s-")):
        rs = [r for r in rows if r["ksm"] == mode]
        ax.plot([r["balloon_mib"] for r in rs], [r["reclaimed_mib"] for r in rs], style, label=f"KSM {mode}")
    m = max(r["balloon_mib"] for r in rows)
    ax.plot([0, m], [0, m], ":", color="grey", label="reclaimed = ballooned")
    ax.set_xlabel("balloon size (MiB)")
    ax.set_ylabel("host memory reclaimed (MiB)")
    ax.set_title("Ballooning vs page sharing (Synergy): two identical VMs,\nfree memory filled with the same pages in both")
    ax.legend()
    ctx.savefig(fig, "synergy.png")
