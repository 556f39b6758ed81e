"""The demo lab: two VMs, the daemon, a balloon change and a vCPU hot-plug the guest sees.

It is the first experiment and the README's first command: build or reuse the golden image,
boot two VMs, start ``symbiontd``, register the VMs, watch live stats, shrink one VM's
balloon and add vCPUs to the other through the API, and record what libvirt and — separately —
the guest agent report, so the plot shows the guest seeing each change. Everything is torn
down at the end.
"""

from __future__ import annotations

import time
from typing import Any

from symbiont_research.experiments.framework import RunContext, experiment


def _sample(client: Any, t0: float) -> list[dict[str, Any]]:
    rows = []
    for v in client.get("/v1/vms"):
        g = v.get("guest", {})
        rows.append(
            {
                "t_s": round(time.monotonic() - t0, 2),
                "vm": v["name"],
                "cooperative": int(v["cooperative"]),
                "balloon_actual_mib": v.get("balloon_actual_mib"),
                "guest_mem_total_mib": g.get("mem_total_mib"),
                "guest_mem_available_mib": g.get("mem_available_mib"),
                "libvirt_vcpus": v.get("vcpus"),
                "guest_online_cpus": g.get("online_cpus"),
                "qemu_cpu_percent": v.get("qemu_cpu_percent"),
            }
        )
    return rows


@experiment(
    "demo",
    "Boot 2 VMs, run the daemon, balloon one VM and hot-plug vCPUs into the other; plot what the guest sees",
    params={"vms": 2, "memory_mib": 512, "balloon_to_mib": 300, "vcpus_to": 3, "observe_s": 12.0, "period_s": 1.0},
    param_help={
        "vms": "lab VMs to boot",
        "memory_mib": "boot memory of each VM (the balloon's ceiling)",
        "balloon_to_mib": "balloon target for the first VM",
        "vcpus_to": "vCPU count for the last VM",
        "observe_s": "seconds to watch after each change",
        "period_s": "daemon control period",
    },
    needs=("root", "libvirt", "vm"),
)
def run(ctx: RunContext) -> dict[str, Any]:
    from symbiont_research.lab.session import LabSession

    p = ctx.params
    if p["vms"] < 1:
        raise ValueError("vms must be at least 1")
    rows: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    ctx.stage("setting up the lab", total=None)
    with LabSession(count=p["vms"], memory_mib=p["memory_mib"], period_s=p["period_s"],
                    step=ctx.note) as lab:
        summary["boot_to_agent_s"] = {k: round(v, 1) for k, v in lab.boot_seconds.items()}
        first, last = lab.names[0], lab.names[-1]
        with lab.client() as c:
            t0 = time.monotonic()
            lab.wait_for(lambda: all(v["guest"]["mem_total_mib"] for v in c.get("/v1/vms")), 60,
                         "first guest stats")

            def observe(seconds: float, label: str) -> None:
                ctx.stage(label, total=seconds)
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    rows.extend(_sample(c, t0))
                    time.sleep(p["period_s"])
                    ctx.advance(p["period_s"])

            observe(p["observe_s"] / 2, "baseline: live stats")
            before = c.get(f"/v1/vms/{first}")
            ctx.note(f"{first}: balloon {before['balloon_actual_mib']} MiB, guest MemTotal "
                     f"{before['guest']['mem_total_mib']} MiB")
            r = c.put(f"/v1/vms/{first}/memory", {"target_mib": p["balloon_to_mib"]})
            events.append({"t_s": round(time.monotonic() - t0, 2), "vm": first, "event": f"balloon -> {p['balloon_to_mib']} MiB"})
            ctx.note(f"{first}: balloon target {r['before_mib']} -> {r['target_mib']} MiB via PUT /v1/vms/{first}/memory")
            observe(p["observe_s"], "after the balloon change")
            after = c.get(f"/v1/vms/{first}")
            ctx.note(f"{first}: guest now sees MemTotal {after['guest']['mem_total_mib']} MiB "
                     f"(libvirt actual {after['balloon_actual_mib']} MiB)")
            r = c.put(f"/v1/vms/{last}/vcpus", {"count": p["vcpus_to"]})
            events.append({"t_s": round(time.monotonic() - t0, 2), "vm": last, "event": f"vcpus -> {p['vcpus_to']}"})
            ctx.note(f"{last}: vCPUs {r['before']} -> {r['vcpus']} via PUT /v1/vms/{last}/vcpus; "
                     f"guest online CPUs {(r.get('guest') or {}).get('online')}")
            observe(p["observe_s"], "after the vCPU hot-plug")
            final = {v["name"]: v for v in c.get("/v1/vms")}
            status = c.get("/v1/status")
        summary.update(
            {
                "balloon_vm": first,
                "guest_mem_total_before_mib": before["guest"]["mem_total_mib"],
                "guest_mem_total_after_mib": final[first]["guest"]["mem_total_mib"],
                "balloon_actual_after_mib": final[first]["balloon_actual_mib"],
                "vcpu_vm": last,
                "guest_online_cpus_after": final[last]["guest"]["online_cpus"],
                "daemon_loop_iterations": status["loop_iterations"],
                "daemon_loop_cpu_ms_per_iteration": round(1000 * status["loop_cpu_s"] / max(1, status["loop_iterations"]), 2),
            }
        )
        ctx.stage("tearing down (daemon restores knobs, VMs removed)", total=None)
    ctx.write_csv("timeline.csv", rows)
    ctx.write_csv("events.csv", events)
    _plot(ctx, rows, events)
    ok_mem = (summary["guest_mem_total_after_mib"] or 0) < (summary["guest_mem_total_before_mib"] or 0)
    ok_cpu = summary["guest_online_cpus_after"] == p["vcpus_to"]
    summary["guest_saw_balloon"] = ok_mem
    summary["guest_saw_vcpus"] = ok_cpu
    ctx.note(f"report: guest saw balloon: {ok_mem}; guest saw vCPUs: {ok_cpu}")
    return summary


def _plot(ctx: RunContext, rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vms = sorted({r["vm"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for vm in vms:
        rs = [r for r in rows if r["vm"] == vm]
        t = [r["t_s"] for r in rs]
        ax1.plot(t, [r["balloon_actual_mib"] for r in rs], "--", label=f"{vm} balloon actual (libvirt)")
        ax1.plot(t, [r["guest_mem_total_mib"] for r in rs], "-", label=f"{vm} MemTotal (guest agent)")
        ax2.step(t, [r["libvirt_vcpus"] for r in rs], "--", where="post", label=f"{vm} vCPUs (libvirt)")
        ax2.step(t, [r["guest_online_cpus"] for r in rs], "-", where="post", label=f"{vm} online CPUs (guest)")
    for e in events:
        for ax in (ax1, ax2):
            ax.axvline(e["t_s"], color="grey", lw=0.8)
        ax1.annotate(f"{e['vm']}: {e['event']}", (e["t_s"], ax1.get_ylim()[1]), fontsize=7, rotation=90,
                     va="top", ha="right")
    ax1.set_ylabel("MiB")
    ax1.set_title("Host decides how much (balloon, vCPUs); the guest sees it")
    ax1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax2.set_ylabel("CPUs")
    ax2.set_xlabel("seconds since the daemon's first stats")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ctx.savefig(fig, "demo.png")
