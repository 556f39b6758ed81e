"""The demo: symbiotic overcommit on one host, against the same VMs left to libvirt alone.

It is the first experiment and the README's first command. A handful of lab VMs (default 4 ×
512 MiB, 1 vCPU each) share a memory budget smaller than their configured memory (default
1280 MiB for 2048 configured); some run a page-touching workload that wants all the memory it
can get (``memory.HOG``), the others stay idle. Two phases on the same VMs:

* **stock**: ``symbiontd`` with every part off (it only collects stats): what libvirt does alone;
* **symbiont**: the daemon restarted with ``profile: overcommit`` (sharing, then ballooning
  under the budget, then host paging), ``paging.idle_park`` and a short ``paging.idle_after_s``:
  the idle VMs' balloons shrink (the guest chooses what goes), then they are paged out and
  paused (parked), while the busy ones keep their memory.

At the end each idle VM is pinged through ``POST /v1/vms/{name}/ping`` — which wakes a parked
VM and swaps its recorded working set in first — to show that it still answers. The report
prints each VM's host memory (its QEMU process's PSS plus its share of the zram tier's
compressed size, so shared and swapped pages are counted once) in both phases, and where the
memory is (``GET /v1/paging``). Everything is torn down at the end.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from symbiont.host.procmem import smaps_rollup_kib
from symbiont_research.experiments.framework import RunContext, experiment

MIB = 1 << 20


def host_mib(rollup: dict[str, int], zram_ratio: float | None) -> float:
    """A VM's host memory: PSS (shared pages split among their sharers) plus what its swapped
    pages take in zram (its proportional swap, divided by the tier's compression ratio)."""
    swap_kib = rollup.get("SwapPss", rollup.get("Swap", 0))
    in_zram = swap_kib / zram_ratio if zram_ratio and zram_ratio > 0 else 0.0
    return round((rollup.get("Pss", 0) + in_zram) / 1024, 1)


def roles(names: list[str], busy: int) -> dict[str, str]:
    """The first ``busy`` VMs run the workload, the rest stay idle."""
    if not 1 <= busy < len(names):
        raise ValueError(f"busy must be between 1 and vms - 1 (got busy={busy} for {len(names)} VMs)")
    return {n: ("busy" if i < busy else "idle") for i, n in enumerate(names)}


def check_params(p: dict[str, Any]) -> None:
    """Bad parameters fail before anything boots."""
    if p["vms"] < 2:
        raise ValueError("vms must be at least 2 (some busy, some idle)")
    roles([f"vm{i}" for i in range(p["vms"])], p["busy"])
    configured = p["vms"] * p["memory_mib"]
    if not 0 < p["budget_mib"] < configured:
        raise ValueError(f"budget_mib must be above 0 and below the configured memory ({configured} MiB) "
                         "to overcommit")
    if p["budget_mib"] < p["vms"] * p["min_mib"]:
        raise ValueError(f"budget_mib {p['budget_mib']} is below the VMs' floors ({p['vms']} × {p['min_mib']} MiB)")


def last_known(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Each VM's last non-empty ``key`` in the timeline."""
    out: dict[str, Any] = {}
    for r in rows:
        if r.get(key) is not None:
            out[r["vm"]] = r[key]
    return out


def report_rows(phases: dict[str, dict[str, float]], role: dict[str, str], extra: dict[str, dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """One row per VM: host memory in each phase and the symbiont phase's state."""
    rows = []
    for vm in role:
        stock, sym = phases["stock"].get(vm), phases["symbiont"].get(vm)
        rows.append({"vm": vm, "role": role[vm], "stock_host_mib": stock, "symbiont_host_mib": sym,
                     "saved_mib": None if stock is None or sym is None else round(stock - sym, 1),
                     **extra.get(vm, {})})
    return rows


def format_report(rows: list[dict[str, Any]], budget_mib: int) -> list[str]:
    lines = [f"{'VM':<28} {'role':<5} {'stock MiB':>10} {'symbiont MiB':>13} {'balloon':>8} {'parked':>7} "
             f"{'ping ms':>8}"]
    for r in rows:
        def num(v: Any, fmt: str = ".0f") -> str:
            return "-" if v is None else format(v, fmt)

        lines.append(f"{r['vm']:<28} {r['role']:<5} {num(r['stock_host_mib']):>10} {num(r['symbiont_host_mib']):>13} "
                     f"{num(r.get('balloon_mib')):>8} {('yes' if r.get('parked') else 'no'):>7} "
                     f"{num(r.get('ping_ms'), '.1f'):>8}")
    tot = {k: round(sum(r[k] or 0 for r in rows), 1) for k in ("stock_host_mib", "symbiont_host_mib")}
    lines.append(f"{'total (budget ' + str(budget_mib) + ' MiB)':<34} {tot['stock_host_mib']:>10.0f} "
                 f"{tot['symbiont_host_mib']:>13.0f}")
    return lines


@experiment(
    "demo",
    "Symbiotic overcommit: 4 VMs over a memory budget, 2 busy and 2 idle; stock vs profile overcommit "
    "(idle VMs shrunk, paged out and parked, still answering a ping); host memory per VM",
    params={"vms": 4, "busy": 2, "memory_mib": 512, "budget_mib": 1280, "min_mib": 128, "stock_s": 30.0,
            "symbiont_s": 150.0, "idle_after_s": 15.0, "idle_cpu_pct": 3.0, "period_s": 2.0},
    param_help={
        "vms": "lab VMs to boot (512 MiB, 1 vCPU each by default)",
        "busy": "how many of them run the page-touching workload (the rest stay idle)",
        "memory_mib": "configured memory of each VM (the balloon's ceiling)",
        "budget_mib": "host memory budget for the VMs in the symbiont phase (below vms × memory_mib)",
        "min_mib": "each VM's balloon floor",
        "stock_s": "seconds of the stock phase (daemon parts off)",
        "symbiont_s": "at most this long in the symbiont phase (ends once every idle VM is parked)",
        "idle_after_s": "paging.idle_after_s: how long a VM must look idle to be parked",
        "idle_cpu_pct": "paging.idle_cpu_pct: below this vCPU %, a period counts as idle",
        "period_s": "daemon control period",
    },
    needs=("root", "libvirt", "vm"),
)
def run(ctx: RunContext) -> dict[str, Any]:
    import yaml

    from symbiont.client import ApiError
    from symbiont.config import load_config
    from symbiont_research.experiments.memory import HOG, run_guest_script
    from symbiont_research.lab.session import DaemonProcess, LabSession

    p = ctx.params
    check_params(p)
    rows: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"budget_mib": p["budget_mib"], "configured_mib": p["vms"] * p["memory_mib"]}
    phase_mem: dict[str, dict[str, float]] = {"stock": {}, "symbiont": {}}
    extra: dict[str, dict[str, Any]] = {}
    ctx.stage(f"booting {p['vms']} VMs and symbiontd (parts off)", total=None)
    with LabSession(count=p["vms"], memory_mib=p["memory_mib"], max_vcpus=1, period_s=p["period_s"],
                    step=ctx.note) as lab:
        assert lab.host is not None and lab.daemon is not None
        summary["boot_to_agent_s"] = {k: round(v, 1) for k, v in lab.boot_seconds.items()}
        role = roles(lab.names, p["busy"])
        busy = [v for v in lab.names if role[v] == "busy"]
        idle = [v for v in lab.names if role[v] == "idle"]
        t0 = time.monotonic()

        def zram_ratio(c: Any) -> float | None:
            try:
                return (c.get("/v1/paging").get("tier") or {}).get("ratio")
            except ApiError:
                return None  # stock: no paging part, no tier

        def sample(c: Any, phase: str) -> dict[str, float]:
            ratio = zram_ratio(c) if phase != "stock" else None
            vms = {v["name"]: v for v in c.get("/v1/vms")}
            parked = set()
            if phase != "stock":
                try:
                    parked = {v["name"] for v in c.get("/v1/paging")["vms"] if v.get("parked")}
                except ApiError:
                    pass
            out = {}
            t_s = round(time.monotonic() - t0, 1)
            for name in lab.names:
                pid = lab.host.qemu_pid(name)  # type: ignore[union-attr]
                try:
                    roll = smaps_rollup_kib(Path(f"/proc/{pid}/smaps_rollup").read_text())
                except (OSError, TypeError):
                    continue
                mib = host_mib(roll, ratio)
                out[name] = mib
                v = vms.get(name, {})
                rows.append({"t_s": t_s, "phase": phase, "vm": name, "role": role[name],
                             "host_mib": mib, "rss_mib": round(roll.get("Rss", 0) / 1024, 1),
                             "swap_mib": round(roll.get("Swap", 0) / 1024, 1),
                             "balloon_actual_mib": v.get("balloon_actual_mib"),
                             "guest_mem_available_mib": (v.get("guest") or {}).get("mem_available_mib"),
                             "qemu_cpu_percent": v.get("qemu_cpu_percent"), "parked": int(name in parked)})
            return out

        def ping(c: Any, vm: str) -> tuple[float, bool, bool]:
            """Round trip of POST /v1/vms/{vm}/ping in ms (a wake included), answered, woken."""
            t = time.perf_counter()
            try:
                r = c.post(f"/v1/vms/{vm}/ping", None)
                return (time.perf_counter() - t) * 1000, True, bool(r.get("woke"))
            except ApiError as exc:
                ctx.note(f"{vm}: ping failed: {exc}")
                return (time.perf_counter() - t) * 1000, False, False

        # -- phase 1: stock ----------------------------------------------------------------
        ctx.stage(f"stock: {', '.join(busy)} busy (page-touching), {', '.join(idle)} idle; daemon parts off",
                  total=p["stock_s"])
        for vm in busy:
            run_guest_script(lab, vm, HOG, "hog")
        events.append({"t_s": round(time.monotonic() - t0, 1), "vm": ",".join(busy), "event": "workload starts"})
        with lab.client() as c:
            end = time.monotonic() + p["stock_s"]
            while time.monotonic() < end:
                phase_mem["stock"] = sample(c, "stock")
                time.sleep(p["period_s"])
                ctx.advance(p["period_s"])
            for vm in lab.names:
                ms, ok, _ = ping(c, vm)
                extra.setdefault(vm, {})["stock_ping_ms"] = round(ms, 1) if ok else None
        ctx.note("stock: host memory per VM " + ", ".join(f"{v} {m:.0f} MiB" for v, m in phase_mem["stock"].items()))

        # -- phase 2: the same VMs under profile overcommit ----------------------------------
        ctx.stage("symbiont: restarting symbiontd with profile overcommit and idle parking", total=None)
        lab.daemon.stop()
        cfg_path = lab.daemon.config_path
        data = yaml.safe_load(cfg_path.read_text())
        data.update({
            "profile": "overcommit",
            "memory": {"enabled": True, "budget_mib": p["budget_mib"]},
            "paging": {"enabled": True, "zram_size_mib": max(256, p["vms"] * p["memory_mib"]),
                       "idle_park": True, "idle_after_s": p["idle_after_s"], "idle_cpu_pct": p["idle_cpu_pct"]},
        })
        cfg_path.write_text(yaml.safe_dump(data))
        lab.daemon = DaemonProcess(cfg_path, load_config(cfg_path), lab.daemon.log_path)
        lab.daemon.start()
        events.append({"t_s": round(time.monotonic() - t0, 1), "vm": "all", "event": "profile overcommit"})
        ctx.stage(f"symbiont: budget {p['budget_mib']} MiB for {summary['configured_mib']} MiB configured; "
                  f"waiting for the idle VMs to be parked", total=p["symbiont_s"])
        with lab.client() as c:
            end = time.monotonic() + p["symbiont_s"]
            parked_at: dict[str, float] = {}
            while time.monotonic() < end:
                phase_mem["symbiont"] = sample(c, "symbiont")
                for r in rows[-len(lab.names):]:
                    if r["parked"] and r["vm"] not in parked_at:
                        parked_at[r["vm"]] = r["t_s"]
                        events.append({"t_s": r["t_s"], "vm": r["vm"], "event": "parked"})
                        ctx.note(f"{r['vm']}: parked at t={r['t_s']:.0f} s (host memory {r['host_mib']:.0f} MiB)")
                if all(v in parked_at for v in idle):
                    break
                time.sleep(p["period_s"])
                ctx.advance(p["period_s"])
            summary["parked"] = sorted(parked_at)
            balloons = last_known(rows, "balloon_actual_mib")  # a paused (parked) VM reports none
            for vm in lab.names:
                extra.setdefault(vm, {}).update(balloon_mib=balloons.get(vm), parked=vm in parked_at)
            where = {v["name"]: v for v in c.get("/v1/paging")["vms"]}
            ctx.stage("pinging every VM (a parked one is woken, its working set swapped in first)", total=None)
            for vm in lab.names:
                ms, ok, woke = ping(c, vm)
                extra[vm].update(ping_ms=round(ms, 1), answered=ok, woken=woke)
                events.append({"t_s": round(time.monotonic() - t0, 1), "vm": vm,
                               "event": f"ping {ms:.0f} ms{' (woken)' if woke else ''}"})
                ctx.note(f"{vm} ({role[vm]}): ping {'answered' if ok else 'FAILED'} in {ms:.0f} ms"
                         f"{', woken from parked' if woke else ''}")
            phase_mem["symbiont_after_ping"] = sample(c, "after ping")
            status = c.get("/v1/status")
        for vm, w in where.items():
            if vm in extra:
                extra[vm].update(guest_ram_resident_mib=(w.get("guest_ram") or {}).get("resident_mib"),
                                 code_cache_resident_mib=(w.get("code_cache") or {}).get("resident_mib"),
                                 qemu_other_resident_mib=(w.get("qemu_other") or {}).get("resident_mib"),
                                 swapped_mib=w.get("swap_mib"))
        summary["daemon_loop_cpu_ms_per_iteration"] = round(
            1000 * status["loop_cpu_s"] / max(1, status["loop_iterations"]), 2)
        ctx.stage("tearing down (daemon restores knobs, VMs removed)", total=None)
    report = report_rows(phase_mem, role, extra)
    ctx.write_csv("timeline.csv", rows)
    ctx.write_csv("events.csv", events)
    ctx.write_csv("report.csv", report)
    _plot(ctx, rows, events, p["budget_mib"])
    for line in format_report(report, p["budget_mib"]):
        ctx.note(line)
    tot = {ph: round(sum(phase_mem[ph].values()), 1) for ph in ("stock", "symbiont")}
    summary.update({
        "stock_host_mib": tot["stock"], "symbiont_host_mib": tot["symbiont"],
        "idle_parked": all(extra[v].get("parked") for v in idle),
        "all_answered": all(extra[v].get("answered") for v in lab.names),
        "per_vm": report,
    })
    ctx.note(f"report: VMs' host memory stock {tot['stock']:.0f} MiB -> symbiont {tot['symbiont']:.0f} MiB "
             f"(budget {p['budget_mib']} MiB); idle VMs parked: {summary['idle_parked']}; "
             f"every VM answered its ping: {summary['all_answered']}")
    return summary


def _plot(ctx: RunContext, rows: list[dict[str, Any]], events: list[dict[str, Any]], budget_mib: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vms = sorted({r["vm"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    for vm in vms:
        rs = [r for r in rows if r["vm"] == vm]
        style = "-" if rs and rs[0]["role"] == "busy" else "--"
        t = [r["t_s"] for r in rs]
        label = f"VM {vm.rsplit('-', 1)[-1]} ({rs[0]['role']})"  # lab names end in -N
        ax1.plot(t, [r["host_mib"] for r in rs], style, label=label)
        ax2.plot(t, [r["balloon_actual_mib"] for r in rs], style, label=label)
    ts = sorted({r["t_s"] for r in rows})
    total = [sum(r["host_mib"] for r in rows if r["t_s"] == t) for t in ts]
    ax1.plot(ts, total, "k-", lw=1.5, label="all VMs")
    ax1.axhline(budget_mib, color="red", lw=0.8, ls=":", label=f"budget {budget_mib} MiB")
    for e in events:
        for ax in (ax1, ax2):
            ax.axvline(e["t_s"], color="grey", lw=0.6)
        who = ",".join(f"VM {v.rsplit('-', 1)[-1]}" if "-" in v else v for v in e["vm"].split(","))
        ax1.annotate(f"{who}: {e['event']}", (e["t_s"], ax1.get_ylim()[1]), fontsize=6, rotation=90,
                     va="top", ha="right")
    ax1.set_ylabel("host MiB (PSS + zram share)")
    ax1.set_title("Stock, then symbiont (profile overcommit): memory goes to the busy VMs, idle ones parked")
    ax1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax2.set_ylabel("balloon actual MiB")
    ax2.set_xlabel("seconds since the VMs came up")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ctx.savefig(fig, "demo.png")
