"""``cluster-hotspots``: Sandpiper on the multi-host lab, controller off vs on.

Two VMs on h1 of a 3-host lab start burning a vCPU each (over the serial console): h1's
hypervisor-side CPU (black-box, the QEMU processes) goes over the threshold. With the controller
off the overload lasts for the whole phase; with it on (its own process, in the lab namespace,
period 1 s) it moves one VM away. Measured from the daemons' inventories, sampled every second:
overload-seconds per phase, the time from the first overloaded sample to relief (Sandpiper's
anchor: under 20 s per hotspot), and the migrations made (the controller's journal).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from symbiont_research.experiments.framework import ExperimentError, RunContext, experiment

BURN = "setsid sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 & echo burning"
STOP = "pkill -f 'while :' ; echo stopped"


def _util(hosts: list[dict[str, Any]]) -> dict[str, float]:
    """Each host's newest black-box CPU (sum over its VMs) as a fraction of its cores."""
    from symbiont.cluster.controller import fetch_inventory

    out = {}
    for e in hosts:
        try:
            inv = fetch_inventory(e["daemon"], 5.0)
        except ConnectionError:
            continue
        bb = inv["usage"]["black-box"]
        load = sum(s[-1][0] for s in bb.values() if s)
        out[e["id"]] = load / float(inv["host"]["capacity"]["cpu"])
    return out


@experiment(
    "cluster-hotspots",
    "Sandpiper on the multi-host lab: 2 burning VMs on h1 of 3 hosts, controller off vs on",
    params={"hosts": 3, "phase_s": 60.0, "threshold": 0.75, "period": 1.0},
    param_help={"phase_s": "seconds each phase burns", "threshold": "hotspot CPU fraction of a host"},
    needs=("root", "libvirt", "vm"),
)
def run_cluster_hotspots(ctx: RunContext) -> dict[str, Any]:
    from symbiont.cluster.lab import ClusterLab
    from symbiont.host.libvirt_host import LibvirtHost
    from symbiont_research.lab.console import guest_exec

    p = ctx.params
    if int(p["hosts"]) < 2:
        raise ExperimentError("hosts: at least 2")
    work = ctx.path("lab")
    lab = ClusterLab(hosts=int(p["hosts"]), vms_per_host=[2] + [0] * (int(p["hosts"]) - 1), name="symx",
                     subnet="10.217.0.0/24", work_dir=work, step=ctx.note)  # fmt: skip
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    ctx.stage("bringing the lab up")
    state = lab.up()
    hosts = state["hosts"]
    vms = hosts[0]["vms"]
    local = {e["id"]: e["local_libvirt_uri"] for e in hosts}
    th = float(p["threshold"])

    def where(vm: str) -> str:
        for hid, uri in local.items():
            h = LibvirtHost(uri)
            try:
                if h.exists(vm):
                    return hid
            finally:
                h.close()
        raise ExperimentError(f"{vm} is on no host")

    def console(vm: str, cmd: str) -> None:
        h = LibvirtHost(local[where(vm)])
        try:
            guest_exec(h, vm, cmd, timeout=120)
        finally:
            h.close()

    try:
        for phase in ("off", "on"):
            ctx.stage(f"phase: controller {phase}")
            for vm in vms:  # both VMs home on h1, idle
                if where(vm) != "h1":
                    plan = work / "home.json"
                    plan.write_text(json.dumps({"moves": [{"vm": vm, "from": where(vm), "to": "h1"}]}))
                    subprocess.run([sys.executable, "-c", "from symbiont.cli import main; main()", "cluster",
                                    "execute", "--cluster", str(work), str(plan), "--yes"], check=True,
                                   capture_output=True, timeout=300)  # fmt: skip
                console(vm, STOP)
            time.sleep(10)
            proc = None
            if phase == "on":
                proc = subprocess.Popen(
                    [sys.executable, "-c", "from symbiont.cli import main; main()", "cluster", "controller",
                     "--cluster", str(work), "--period", str(p["period"]), "--cooldown", "600",
                     "--cpu-threshold", str(th), "--mem-threshold", "0.95", "--mode", "black-box",
                     "--journal", str(work / f"controller-{phase}.sqlite")],
                    stdout=(work / f"controller-{phase}.log").open("w"), stderr=subprocess.STDOUT,
                )  # fmt: skip
            try:
                t0 = time.monotonic()
                for vm in vms:
                    console(vm, BURN)
                first_over = relief = None
                over_s = 0.0
                last = time.monotonic()
                while time.monotonic() - t0 < float(p["phase_s"]):
                    time.sleep(1.0)
                    now = time.monotonic()
                    u = _util(hosts)
                    over = any(v > th for v in u.values())
                    if over:
                        over_s += now - last
                        first_over = first_over if first_over is not None else now - t0
                    elif first_over is not None and relief is None:
                        relief = now - t0
                    last = now
                    rows.append({"phase": phase, "t": round(now - t0, 1), **{f"util_{h}": round(v, 3) for h, v in u.items()},
                                 "overloaded": over})  # fmt: skip
                    ctx.advance()
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)
                for vm in vms:
                    with contextlib.suppress(Exception):
                        console(vm, STOP)
            migrations = 0
            if phase == "on":
                from symbiont.cluster.journal import Journal

                with Journal(work / f"controller-{phase}.sqlite") as j:
                    migrations = len([d for d in j.decisions(1000, "migrate") if d["outcome"].get("ok")])
            summary[phase] = {
                "overload_seconds": round(over_s, 1),
                "first_overload_s": first_over,
                "relief_s": relief,
                "overload_to_relief_s": round(relief - first_over, 1) if relief and first_over is not None else None,
                "migrations": migrations,
            }
            ctx.note(f"controller {phase}: {summary[phase]}")
    finally:
        ctx.write_csv("utilisation.csv", rows)
        lab.down()
    (Path(ctx.path("summary.json"))).write_text(json.dumps(summary, indent=2))
    return summary


def _vm_rows(hosts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every VM the lab's daemons manage: its host, allocation (MiB), QEMU's memory (black-box,
    MiB), the guest's CPU (fraction of its vCPU) and memory in use (MiB), newest samples."""
    from symbiont.cluster.controller import fetch_inventory

    out: dict[str, dict[str, Any]] = {}
    for e in hosts:
        try:
            inv = fetch_inventory(e["daemon"], 10.0)
        except ConnectionError:
            continue
        bb = inv["usage"]["black-box"]
        for v in inv["host"]["vms"]:
            a = inv.get("activity", {}).get(v["id"]) or {}
            b = bb.get(v["id"]) or []
            out[v["id"]] = {
                "host": e["id"],
                "alloc_mib": round(v["demand"]["mem"] * 1024, 1),
                "qemu_mib": round(b[-1][1] * 1024, 1) if b else None,
                "cpu": a["cpu"][-1] if a.get("cpu") else None,
                "cpu_samples": len(a.get("cpu") or []),
                "wss_mib": a.get("wss_mib"),
                "home": a.get("home"),
            }
    return out


@experiment(
    "cluster-consolidation",
    "Idle VMs on 3 lab hosts parked (shrunk, moved) on one host by the controller, then woken and spread back",
    params={"hosts": 3, "vms_per_host": "2,2,2", "memory_mib": 256, "period": 2.0, "window": 8, "idle_cpu": 0.15, "cpu_overcommit": 4.0,
            "wss_max_mib": 96.0, "cooldown": 10.0, "max_migrations": 2, "wake": 2, "timeout_s": 300.0},  # fmt: skip
    param_help={
        "vms_per_host": "VMs booted on each lab host (comma list; the last host is the idle host)",
        "window": "idle: CPU below idle_cpu in this many newest agent samples",
        "idle_cpu": "idle: guest CPU fraction (an idle TCG guest on a loaded 2-core host shows 3-7 %)",
        "cpu_overcommit": "vCPUs per core the lab hosts' daemons offer (parked VMs keep their vCPUs)",
        "wss_max_mib": "idle: guest memory in use at most this",
        "wake": "parked VMs (from different homes first) that get a CPU burner after consolidation",
        "timeout_s": "per phase: give up waiting for consolidation / spreading after this",
    },
    needs=("root", "libvirt", "vm"),
)
def run_cluster_consolidation(ctx: RunContext) -> dict[str, Any]:
    """seeds/004 on the multi-host lab. Phase 1: the controller (its own process, idle host = the
    last host, hotspot relief out of reach so that only the idle logic acts) shrinks every idle VM
    to its working set and parks the others' VMs on the idle host. Phase 2: ``wake`` parked VMs
    get a CPU burner; the controller moves them back home and grows them to full size. Sampled
    every second from the daemons' inventories; every decision comes from the controller's journal."""
    from symbiont.cluster.journal import Journal
    from symbiont.cluster.lab import ClusterLab, parse_counts
    from symbiont.host.libvirt_host import LibvirtHost
    from symbiont_research.lab.console import guest_exec

    p = ctx.params
    n_hosts = int(p["hosts"])
    if n_hosts < 2:
        raise ExperimentError("hosts: at least 2 (one of them is the idle host)")
    counts = parse_counts(str(p["vms_per_host"]), n_hosts)
    idle_host = f"h{n_hosts}"
    work = ctx.path("lab")
    lab = ClusterLab(hosts=n_hosts, vms_per_host=counts, name="symk", subnet="10.219.0.0/24", work_dir=work,
                     memory_mib=int(p["memory_mib"]), overcommit={"cpu": float(p["cpu_overcommit"])},
                     step=ctx.note)  # fmt: skip
    journal = work / "controller.sqlite"
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"idle_host": idle_host}
    marks: dict[str, float] = {}
    t_start = time.monotonic()
    ctx.stage("bringing the lab up")
    state = lab.up()
    hosts = state["hosts"]
    local = {e["id"]: e["local_libvirt_uri"] for e in hosts}
    home_of = {vm: e["id"] for e in hosts for vm in e["vms"]}
    proc: subprocess.Popen[bytes] | None = None

    def sample(phase: str) -> dict[str, dict[str, Any]]:
        vms = _vm_rows(hosts)
        t = round(time.monotonic() - t_start, 1)
        for vm, r in sorted(vms.items()):
            rows.append({"t": t, "phase": phase, "vm": vm, "home": home_of.get(vm), **r})
        return vms

    def console(vm: str, host: str, cmd: str) -> None:
        h = LibvirtHost(local[host])
        try:
            guest_exec(h, vm, cmd, timeout=120)
        finally:
            h.close()

    def wait(phase: str, done: Any, what: str) -> dict[str, dict[str, Any]]:
        t0 = time.monotonic()
        while True:
            vms = sample(phase)
            ctx.advance()
            if done(vms):
                return vms
            if time.monotonic() - t0 > float(p["timeout_s"]):
                raise ExperimentError(f"{phase}: {what} not reached within {p['timeout_s']} s; last sample {vms}")
            time.sleep(1.0)

    try:
        ctx.stage("waiting for idle samples (agent CPU window)")
        full = {}

        def warmed(vms: dict[str, dict[str, Any]]) -> bool:
            return len(vms) == len(home_of) and all(r["cpu_samples"] >= int(p["window"]) for r in vms.values())

        before = wait("warm-up", warmed, f"{p['window']} CPU samples of every VM")
        full = {vm: r["alloc_mib"] for vm, r in before.items()}
        for vm, r in sorted(before.items()):
            ctx.note(f"{vm} on {r['host']}: {r['alloc_mib']} MiB, in use {r['wss_mib']} MiB, CPU {r['cpu']}")
        ctx.stage("phase 1: controller on, consolidating idle VMs")
        proc = subprocess.Popen(
            [sys.executable, "-c", "from symbiont.cli import main; main()", "cluster", "controller",
             "--cluster", str(work), "--period", str(p["period"]), "--cooldown", str(p["cooldown"]),
             "--max-migrations", str(p["max_migrations"]), "--idle-host", idle_host,
             "--idle-window", str(int(p["window"])), "--idle-wss-max", str(p["wss_max_mib"]),
             "--idle-cpu", str(p["idle_cpu"]),
             # hotspot relief out of reach: this experiment measures the idle logic alone
             "--cpu-threshold", "10", "--mem-threshold", "10", "--journal", str(journal)],
            stdout=(work / "controller.log").open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        marks["controller_on"] = time.monotonic() - t_start
        t1 = time.monotonic()

        def consolidated(vms: dict[str, dict[str, Any]]) -> bool:
            if proc is not None and proc.poll() is not None:
                raise ExperimentError(f"the controller exited ({proc.returncode}); see {work / 'controller.log'}")
            return len(vms) == len(full) and all(
                r["host"] == idle_host and r["alloc_mib"] < full[vm] for vm, r in vms.items()
            )

        parked = wait("consolidate", consolidated, f"every VM on {idle_host} and shrunk")
        marks["consolidated"] = time.monotonic() - t_start
        summary["consolidate_s"] = round(time.monotonic() - t1, 1)
        used = {r["host"] for r in parked.values()}
        summary["hosts_emptied"] = sorted(e["id"] for e in hosts if e["id"] not in used and e["vms"])
        summary["allocated_mib_before"] = round(sum(full.values()), 1)
        summary["allocated_mib_parked"] = round(sum(r["alloc_mib"] for r in parked.values()), 1)
        summary["memory_freed_mib"] = round(summary["allocated_mib_before"] - summary["allocated_mib_parked"], 1)
        qb = [r["qemu_mib"] for r in before.values()]
        qa = [r["qemu_mib"] for r in parked.values()]
        if None not in qb and None not in qa:
            summary["qemu_mib_before"], summary["qemu_mib_parked"] = round(sum(qb), 1), round(sum(qa), 1)
        ctx.note(f"consolidated in {summary['consolidate_s']} s: emptied {summary['hosts_emptied']}, "
                 f"allocations {summary['allocated_mib_before']} -> {summary['allocated_mib_parked']} MiB")  # fmt: skip
        time.sleep(5)  # the parked VMs' new daemons gather a few samples of them asleep
        sample("parked")

        # Wake: one parked VM per home first (the others stay idle and parked).
        by_home: dict[str, list[str]] = {}
        for vm in sorted(full):
            if home_of[vm] != idle_host:
                by_home.setdefault(home_of[vm], []).append(vm)
        order = [vms[i] for i in range(max(map(len, by_home.values()), default=0))
                 for vms in by_home.values() if i < len(vms)]  # fmt: skip
        woken = order[: int(p["wake"])]
        ctx.stage(f"phase 2: waking {', '.join(woken)} (CPU burner)")
        for vm in woken:
            console(vm, idle_host, BURN)
        t2 = time.monotonic()
        marks["woken"] = t2 - t_start

        def spread(vms: dict[str, dict[str, Any]]) -> bool:
            return all(vm in vms and vms[vm]["host"] == home_of[vm] and vms[vm]["alloc_mib"] >= full[vm]
                       for vm in woken)  # fmt: skip

        back = wait("wake", spread, f"{', '.join(woken)} home and at full size")
        marks["spread"] = time.monotonic() - t_start
        summary["woken"] = woken
        summary["spread_back_s"] = round(time.monotonic() - t2, 1)
        summary["after_wake"] = {vm: {"host": r["host"], "alloc_mib": r["alloc_mib"]} for vm, r in sorted(back.items())}
        ctx.note(f"spread back in {summary['spread_back_s']} s: "
                 + ", ".join(f"{vm} on {back[vm]['host']} at {back[vm]['alloc_mib']} MiB" for vm in woken))  # fmt: skip
        time.sleep(3)
        sample("after")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        ctx.write_csv("timeline.csv", rows)
        decisions: list[dict[str, Any]] = []
        if journal.exists():
            with Journal(journal) as j:
                decisions = j.decisions(100_000)
            Path(ctx.path("decisions.json")).write_text(json.dumps(decisions, indent=1, default=str))
        lab.down()
    wall0 = time.time() - (time.monotonic() - t_start)  # journal timestamps are wall clock
    acts = [d for d in decisions if d["kind"] != "round"]
    for d in acts:
        d["t"] = round(d["ts"] - wall0, 1)
    moves = [d for d in acts if d["kind"] == "migrate"]
    summary["migrations_consolidate"] = sum(1 for d in moves if d["t"] < marks["woken"] and d["outcome"].get("ok"))
    summary["migrations_wake"] = sum(1 for d in moves if d["t"] >= marks["woken"] and d["outcome"].get("ok"))
    summary["migration_s"] = [d["outcome"].get("seconds") for d in moves]
    summary["rounds"] = sum(1 for d in decisions if d["kind"] == "round")
    summary["decisions"] = [
        {"t": d["t"], "kind": d["kind"], "vm": d["vm"],
         **{k: d["inputs"].get(k) for k in ("from", "to", "host", "mem_to", "reason", "balloon_mib") if k in d["inputs"]},
         "ok": d["outcome"].get("ok"), "seconds": d["outcome"].get("seconds"),
         **({"error": d["outcome"]["error"]} if d["outcome"].get("error") else {})}
        for d in acts
    ]  # fmt: skip
    for d in summary["decisions"]:
        ctx.note(f"journal t={d['t']} s: {d['kind']} {d['vm'] or ''} {d.get('from', '')}->{d.get('to', '')} "
                 f"{d.get('host', '')} {d.get('mem_to', '')} ok={d['ok']} {d.get('reason', '')}")  # fmt: skip
    _plot_consolidation(ctx, rows, marks, [e["id"] for e in hosts])
    Path(ctx.path("summary.json")).write_text(json.dumps(summary, indent=2))
    return summary


def _plot_consolidation(ctx: RunContext, rows: list[dict[str, Any]], marks: dict[str, float], hosts: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = sorted({r["t"] for r in rows})
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for h in hosts:
        n = [sum(1 for r in rows if r["t"] == t and r["host"] == h) for t in ts]
        mib = [sum(r["alloc_mib"] for r in rows if r["t"] == t and r["host"] == h) for t in ts]
        axes[0].step(ts, n, where="post", label=h)
        axes[1].step(ts, mib, where="post", label=h)
    axes[0].set_ylabel("VMs on the host")
    axes[1].set_ylabel("memory allocated to its VMs (MiB)")
    axes[1].set_xlabel("seconds since the run started (lab bring-up included)")
    for ax in axes:
        for name, t in marks.items():
            ax.axvline(t, color="gray", ls=":", lw=0.9)
            ax.text(t, ax.get_ylim()[1], name, rotation=90, va="top", ha="right", fontsize=7, color="gray")
        ax.legend(loc="center right")
    fig.suptitle("cluster-consolidation: idle VMs parked on the idle host, woken VMs spread back")
    ctx.savefig(fig, "consolidation.png")
