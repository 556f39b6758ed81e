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
