"""Experiments of the CPU-and-nesting part (seed: "Deterministic container resource management
in derivative clouds", IC2E 2018): each boots one lab VM, runs real containers in it and
leaves CSV + PNG.

* ``ct-cpu-ratio`` — "nesting aware CPU provisioning": three CPU-bound containers configured
  1:1:4 in a 4-vCPU VM, one vCPU removed every ``step_s`` seconds (120 s in the seed), CPU
  utilisation of each container over time, nesting-agnostic (allocation made once, like a
  container manager under stock vCPU unplug) vs nesting-aware (the agent re-applies
  pinning + quotas + weights after every change).
* ``ct-mem-ratio`` — "memory usage ratio (default) vs (with control)": containers that keep
  files in their page cache, the balloon inflated step by step; each container's share of the
  containers' memory, with the stock balloon and with the agent's proportional reclamation
  (shares, and a no-reclaim container).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from symbiont.cpu import policy
from symbiont_research.experiments.framework import ExperimentError, RunContext, experiment

MiB = 1 << 20


def burner(threads: int) -> list[str]:
    """A CPU-bound command: ``threads`` busy shell loops (no extra packages in the guest)."""
    return ["sh", "-c", f"i=0; while [ $i -lt {threads} ]; do (while :; do :; done) & i=$((i+1)); done; wait"]


def filler(name: str, mib: int) -> list[str]:
    """Write a file of ``mib`` MiB and keep reading it: its page cache is charged to the container."""
    return ["sh", "-c", f"dd if=/dev/zero of=/var/tmp/{name}.dat bs=1M count={mib} status=none; "
                        f"while :; do cat /var/tmp/{name}.dat > /dev/null; sleep 0.5; done"]


def _ratios(text: str) -> list[float]:
    try:
        vals = [float(x) for x in str(text).split(":") if x.strip()]
    except ValueError:
        raise ExperimentError(f"ratios {text!r}: expected e.g. 1:1:4") from None
    if not vals or any(v <= 0 for v in vals):
        raise ExperimentError(f"ratios {text!r}: every ratio must be positive")
    return vals


@contextlib.contextmanager
def _lab(ctx: RunContext, memory_mib: int = 512):
    from symbiont_research.lab.session import LabSession

    ctx.stage("lab: image, one VM, symbiontd")
    with LabSession(count=1, period_s=1.0, memory_mib=memory_mib, max_vcpus=4,
                    step=ctx.note, daemon_overrides={"control": {"agent_timeout_s": 15.0}}) as lab:
        vm = lab.names[0]
        lab.wait_for(lambda: lab.client().get(f"/v1/vms/{vm}")["cooperative"], 120, "agent cooperative")
        ctx.note(f"{vm} booted in {lab.boot_seconds[vm]:.0f} s")
        yield lab, vm


def _api(lab: Any, vm: str) -> Callable[..., Any]:
    def call(method: str, path: str, body: Any = None) -> Any:
        with lab.client() as c:
            return c.call(method, f"/v1/cpu/vms/{vm}{path}", json=body)

    return call


# -- CPU ratios under vCPU scale-down ---------------------------------------------------------
@experiment(
    "ct-cpu-ratio",
    "Seed 'nesting aware CPU provisioning': 1:1:4 containers, one vCPU removed per step, agnostic vs aware",
    params={"ratios": "1:1:4", "vcpus": 4, "min_vcpus": 1, "step_s": 20.0, "sample_s": 2.0,
            "threads": 4, "modes": "agnostic,aware", "strategy": "pin-share", "libvirt_unplug": False},
    param_help={"step_s": "seconds between vCPU removals (seed: 120)", "threads": "busy loops per container",
                "modes": "which runs, in order", "strategy": "pin-share or quota (nesting-aware)",
                "libvirt_unplug": "also ask libvirt to unplug (times out under TCG)"},
    needs=("root", "libvirt", "vm"),
)
def cpu_ratio(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    ratios = _ratios(p["ratios"])
    names = [f"c{i + 1}" for i in range(len(ratios))]
    want = dict(zip(names, ratios, strict=True))
    expected = policy.expected_shares(want)
    modes = [m.strip() for m in str(p["modes"]).split(",") if m.strip()]
    if not modes or any(m not in ("agnostic", "aware") for m in modes):
        raise ExperimentError("modes: a comma-separated list of agnostic and aware")
    levels = policy.schedule(int(p["vcpus"]), int(p["min_vcpus"]))
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"ratios": p["ratios"], "levels": levels}
    with _lab(ctx) as (lab, vm):
        api = _api(lab, vm)
        for mode in modes:
            ctx.stage(f"{mode}: {len(levels)} levels x {p['step_s']:.0f} s", total=len(levels))
            api("PUT", "/vcpus", {"count": levels[0]})
            api("PUT", "/mode", {"nesting_aware": mode == "aware", "cpu_strategy": p["strategy"]})
            for n in names:
                api("POST", "/containers", {"name": n, "command": burner(int(p["threads"])),
                                            "limits": {"cpu_ratio": want[n]}})
            t0 = time.monotonic()
            prev = {c["name"]: c["usage"]["cpu_usage_usec"] for c in api("GET", "/containers")["containers"]}
            prev_t = time.monotonic()
            for li, level in enumerate(levels):
                if li:
                    step = api("PUT", "/vcpus", {"count": level, "libvirt_unplug": bool(p["libvirt_unplug"])})
                    ctx.note(f"{mode}: -> {level} vCPUs, ratios in force after "
                             f"{step['timings'].get('ratios_in_force_s', 0):.3f} s ({step['libvirt']})")
                end = time.monotonic() + float(p["step_s"])
                while time.monotonic() < end:
                    time.sleep(float(p["sample_s"]))
                    now = time.monotonic()
                    cur = {c["name"]: c["usage"]["cpu_usage_usec"] for c in api("GET", "/containers")["containers"]}
                    dt = now - prev_t
                    used = {n: (cur[n] - prev[n]) / 1e6 / dt for n in names}
                    share = policy.cpu_shares(used)
                    for n in names:
                        rows.append({"mode": mode, "t_s": round(now - t0, 2), "vcpus": level, "container": n,
                                     "ratio": want[n], "cpus_used": round(used[n], 4),
                                     "share": round(share[n], 4), "expected_share": round(expected[n], 4)})
                    prev, prev_t = cur, now
                ctx.advance()
            for n in names:
                api("DELETE", f"/containers/{n}")
        api("PUT", "/mode", {"nesting_aware": True})
    ctx.write_csv("cpu_utilisation.csv", rows)
    # Summary: per mode and level, the mean |share - expected| of the steady part of each level.
    table: list[dict[str, Any]] = []
    for mode in modes:
        for level in levels:
            sel = [r for r in rows if r["mode"] == mode and r["vcpus"] == level]
            if not sel:
                continue
            ts = sorted({r["t_s"] for r in sel})
            steady = [r for r in sel if r["t_s"] > ts[0]] or sel  # the first sample spans the change
            err = max(abs(sum(r["share"] for r in steady if r["container"] == n)
                          / max(1, sum(1 for r in steady if r["container"] == n)) - expected[n]) for n in names)
            shares = {n: round(sum(r["share"] for r in steady if r["container"] == n)
                               / max(1, sum(1 for r in steady if r["container"] == n)), 3) for n in names}
            table.append({"mode": mode, "vcpus": level, "ratio_error": round(err, 4), **shares})
            summary[f"{mode}_{level}vcpu_ratio_error"] = round(err, 4)
    ctx.write_csv("ratio_error.csv", table)
    _plot_cpu(ctx, rows, modes, names, levels, want)
    return summary


def _plot_cpu(ctx: RunContext, rows: list[dict[str, Any]], modes: list[str], names: list[str],
              levels: list[int], want: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 7), sharex="col", sharey="row",
                             squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, mode in enumerate(modes):
        sel = [r for r in rows if r["mode"] == mode]
        for i, n in enumerate(names):
            pts = [r for r in sel if r["container"] == n]
            c = colors[i % len(colors)]
            axes[0][col].plot([r["t_s"] for r in pts], [r["cpus_used"] for r in pts], color=c,
                              label=f"{n} (ratio {want[n]:g})")
            axes[1][col].plot([r["t_s"] for r in pts], [r["share"] for r in pts], color=c)
            if pts:
                axes[1][col].axhline(pts[0]["expected_share"], color=c, lw=0.8, ls=":")
        for level in levels[1:]:
            first = next((r["t_s"] for r in sel if r["vcpus"] == level), None)
            if first is not None:
                for row in (0, 1):
                    axes[row][col].axvline(first, color="grey", lw=0.6, ls="--")
                axes[0][col].annotate(f"{level} vCPU", (first, 1.0), xycoords=("data", "axes fraction"),
                                      fontsize=7, va="top")
        axes[0][col].set_title(f"nesting-{'aware' if mode == 'aware' else 'agnostic'}")
        axes[1][col].set_xlabel("time (s)")
        for row in (0, 1):
            axes[row][col].grid(alpha=0.3)
    axes[0][0].set_ylabel("CPU utilisation (CPUs, guest time)")
    axes[1][0].set_ylabel("share of the containers' CPU time\n(dotted: configured ratio)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"containers at {':'.join(f'{want[n]:g}' for n in names)}, one vCPU removed per step")
    ctx.savefig(fig, "cpu_utilisation.png")


# -- memory usage ratio under balloon inflation ---------------------------------------------------
@experiment(
    "ct-mem-ratio",
    "Seed 'memory usage ratio (default) vs (with control)': balloon inflation, stock vs proportional reclaim",
    params={"shares": "1:3", "file_mib": 90, "no_reclaim_mib": 60, "memory_mib": 512, "targets": "448,384,352,320",
            "settle_s": 6.0, "modes": "stock,aware"},
    param_help={"shares": "memory shares of the reclaimable containers",
                "file_mib": "page cache each reclaimable container keeps hot",
                "no_reclaim_mib": "page cache of the no-reclaim container (0: none)",
                "targets": "balloon targets, MiB, in order", "settle_s": "wait after each balloon step"},
    needs=("root", "libvirt", "vm"),
)
def mem_ratio(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    shares = _ratios(p["shares"])
    names = [f"m{i + 1}" for i in range(len(shares))]
    targets = [int(x) for x in str(p["targets"]).split(",") if x.strip()]
    modes = [m.strip() for m in str(p["modes"]).split(",") if m.strip()]
    if any(m not in ("stock", "aware") for m in modes):
        raise ExperimentError("modes: a comma-separated list of stock and aware")
    if not targets or any(not 128 <= t <= int(p["memory_mib"]) for t in targets):
        raise ExperimentError(f"targets: MiB within 128..{p['memory_mib']}")
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"shares": p["shares"], "targets": targets}
    with _lab(ctx, int(p["memory_mib"])) as (lab, vm):
        api = _api(lab, vm)
        for run, mode in enumerate(modes):
            ctx.stage(f"{mode}: balloon {p['memory_mib']} -> {targets[-1]} MiB", total=len(targets) + 1)
            api("PUT", "/mode", {"nesting_aware": mode == "aware"})
            specs = [(n, filler(f"{n}-{run}", int(p["file_mib"])), {"mem_shares": s})
                     for n, s in zip(names, shares, strict=True)]
            if int(p["no_reclaim_mib"]) > 0:
                specs.append(("keep", filler(f"keep-{run}", int(p["no_reclaim_mib"])), {"no_reclaim": True}))
            for n, cmd, lim in specs:
                api("POST", "/containers", {"name": n, "command": cmd, "limits": lim})
            every = [n for n, _, _ in specs]

            def usage() -> dict[str, int]:
                return {c["name"]: c["usage"]["memory_current"] for c in api("GET", "/containers")["containers"]}

            lab.wait_for(lambda: all(usage()[n] >= 0.9 * int(p["file_mib"]) * MiB for n in names), 120,
                         "containers' page cache filled")
            time.sleep(float(p["settle_s"]))

            def record(target: int, freed: int | None, every: list[str] = every, mode: str = mode) -> None:
                u = usage()
                frac = policy.usage_ratio(u)
                for n in every:
                    rows.append({"mode": mode, "balloon_mib": target, "container": n,
                                 "shares": "no-reclaim" if n == "keep" else shares[names.index(n)],
                                 "usage_mib": round(u[n] / MiB, 2), "usage_ratio": round(frac[n], 4),
                                 "ratio_among_reclaimable": (round(u[n] / max(1, sum(u[m] for m in names)), 4)
                                                             if n in names else None),
                                 "agent_freed_mib": None if freed is None else round(freed / MiB, 2)})

            record(int(p["memory_mib"]), None)
            ctx.advance()
            for target in targets:
                with lab.client() as c:
                    r = c.put(f"/v1/cpu/vms/{vm}/memory", {"target_mib": target, "nesting_aware": mode == "aware"})
                time.sleep(float(p["settle_s"]))
                record(target, (r.get("reclaim") or {}).get("freed"))
                ctx.advance()
            with lab.client() as c:
                c.put(f"/v1/cpu/vms/{vm}/memory", {"target_mib": int(p["memory_mib"])})
            for n in every:
                api("DELETE", f"/containers/{n}")
            _cleanup(lab, api, f"rm -f /var/tmp/*-{run}.dat")
            # Per step: the reclaimable containers' usage ratio (compare with the shares) and
            # what the no-reclaim container kept.
            base = {r["container"]: r["usage_mib"] for r in rows
                    if r["mode"] == mode and r["balloon_mib"] == int(p["memory_mib"])}
            for target in targets:
                at = {r["container"]: r["usage_mib"] for r in rows if r["mode"] == mode and r["balloon_mib"] == target}
                tot = sum(at[n] for n in names) or 1.0
                summary[f"{mode}_{target}mib_ratio"] = ":".join(f"{at[n] / tot:.2f}" for n in names)
                if "keep" in at:
                    summary[f"{mode}_{target}mib_keep_delta_mib"] = round(at["keep"] - base["keep"], 2)
        api("PUT", "/mode", {"nesting_aware": True})
    ctx.write_csv("memory_usage.csv", rows)
    _plot_mem(ctx, rows, modes, int(p["memory_mib"]), targets)
    return summary


def _cleanup(lab: Any, api: Callable[..., Any], script: str) -> None:
    """Run ``script`` in a throw-away container, then drop the guest's clean page cache, so the
    next run starts from the same free memory (the files' cache would outlive their containers)."""
    api("POST", "/containers", {"name": "cleanup", "command": ["sh", "-c", f"{script}; sync; "
                                                                           "echo 3 > /proc/sys/vm/drop_caches"]})
    lab.wait_for(lambda: api("GET", "/containers/cleanup")["state"] == "exited", 60, "clean-up container")
    api("DELETE", "/containers/cleanup")


def _plot_mem(ctx: RunContext, rows: list[dict[str, Any]], modes: list[str], start: int,
              targets: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [start, *targets]
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 7), sharex=True, squeeze=False)
    for col, mode in enumerate(modes):
        sel = [r for r in rows if r["mode"] == mode]
        conts = list(dict.fromkeys(r["container"] for r in sel))
        bottom = [0.0] * len(xs)
        for n in conts:
            vals = [next((r["usage_ratio"] for r in sel if r["container"] == n and r["balloon_mib"] == x), 0.0)
                    for x in xs]
            label = next(f"{n} ({r['shares']})" for r in sel if r["container"] == n)
            axes[0][col].bar([str(x) for x in xs], vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
            mib = [next((r["usage_mib"] for r in sel if r["container"] == n and r["balloon_mib"] == x), 0.0)
                   for x in xs]
            axes[1][col].plot([str(x) for x in xs], mib, marker="o", label=n)
        title = "default (stock balloon)" if mode == "stock" else "with control (proportional reclaim)"
        axes[0][col].set_title(f"memory usage ratio, {title}")
        axes[1][col].set_xlabel("balloon target (MiB the guest keeps)")
        axes[1][col].grid(alpha=0.3)
    axes[0][0].set_ylabel("share of containers' memory")
    axes[1][0].set_ylabel("memory.current (MiB)")
    axes[0][-1].legend(fontsize=8)
    ctx.savefig(fig, "memory_usage_ratio.png")
