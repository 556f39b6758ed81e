"""Placement experiments: heuristic comparison, overcommit ratios, Sandpiper hotspot resolution.

All three run on seeded synthetic traces (:func:`symbiont.placement.traces.generate`), so a
rerun with the same parameters gives the same placements (only timings change). Defaults are
small enough to finish in well under a minute on two cores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from symbiont.placement import heuristics
from symbiont.placement.bound import lower_bound, quality
from symbiont.placement.model import Host, Request
from symbiont.placement.overload import HotspotConfig
from symbiont.placement.planner import plan
from symbiont.placement.simulator import SimConfig, simulate
from symbiont.placement.traces import MIXES, generate, sizes, standard_hosts
from symbiont_research.experiments.framework import ExperimentError, RunContext, experiment

# The stored BPPLIB subset (benchmarks/instances/README.md): in the source tree, not the package.
BPPLIB = Path(__file__).resolve().parents[3] / "benchmarks" / "instances" / "bpplib"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heuristic_list(raw: list[str]) -> list[str]:
    names = list(heuristics.HEURISTICS) if raw in (["all"], []) else raw
    for n in names:
        if n not in heuristics.HEURISTICS:
            raise ExperimentError(f"unknown heuristic {n!r}; known: {', '.join(heuristics.HEURISTICS)}")
    return names


@experiment(
    "placement-heuristics",
    "Every packing heuristic on the same seeded VM sets: hosts used vs a lower bound (batch and online), "
    "and rejection rate and time per decision when replaying a trace on a fixed cluster.",
    params={
        "seeds": [1, 2],
        "mixes": ["azure", "anticorrelated"],
        "heuristics": ["all"],
        "n_vms": 300,
        "host_cpu": 32.0,
        "host_mem": 128.0,
        "bound_time_limit": 3.0,
        "trace_vms": 300,
        "trace_capacity": 1.0,
    },
    param_help={
        "seeds": "random seeds; each gives one VM set and one trace per mix",
        "mixes": f"VM size mixes ({', '.join(MIXES)})",
        "heuristics": "heuristic names, or 'all'",
        "n_vms": "VMs per static packing instance",
        "host_cpu": "cores per host (static packing and trace replay)",
        "host_mem": "GiB per host",
        "bound_time_limit": "seconds the MILP lower bound may take per instance",
        "trace_vms": "VMs in each replayed trace (arrivals and departures over a day)",
        "trace_capacity": "replay cluster size, as a multiple of the mean hosts first fit uses when hosts are "
        "unlimited (1.0: peaks cause rejections)",
    },
)
def run_heuristics(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    names = _heuristic_list(list(p["heuristics"]))
    for m in p["mixes"]:
        if m not in MIXES:
            raise ExperimentError(f"unknown mix {m!r}; known: {', '.join(MIXES)}")
    cap = {"cpu": float(p["host_cpu"]), "mem": float(p["host_mem"])}
    rows: list[dict[str, Any]] = []
    sim_rows: list[dict[str, Any]] = []
    jobs = len(p["seeds"]) * len(p["mixes"])
    ctx.stage("static packing vs lower bound", total=jobs)
    for mix in p["mixes"]:
        for seed in p["seeds"]:
            rng = np.random.default_rng(int(seed))
            dem = sizes(int(p["n_vms"]), rng, mix, ("cpu", "mem"))
            reqs = [Request(f"v{i}", {"cpu": float(c), "mem": float(m)}) for i, (c, m) in enumerate(dem)]
            eff = np.array([cap["cpu"], cap["mem"]])
            need = int(np.ceil(max((dem / eff).sum(axis=0)))) if len(dem) else 1
            hosts = [Host(f"h{i:03d}", cap) for i in range(2 * need + 2)]
            bounds: dict[tuple[str, ...], Any] = {}
            for name in names:
                for mode in ("batch", "online"):
                    pl = plan(hosts, reqs, name, mode)
                    placed = sorted(pl.placements)
                    key = tuple(placed)
                    if key not in bounds:
                        idx = [int(v[1:]) for v in placed]
                        bounds[key] = lower_bound(
                            dem[idx], np.tile(eff, (len(hosts), 1)), time_limit=float(p["bound_time_limit"])
                        )
                    lb = bounds[key]
                    rows.append(
                        {
                            "mix": mix,
                            "seed": seed,
                            "heuristic": name,
                            "mode": mode,
                            "vms": len(reqs),
                            "placed": len(placed),
                            "hosts_used": pl.hosts_used,
                            "lower_bound": lb.value,
                            "bound_method": lb.method,
                            "bound_optimal": lb.optimal,
                            "ratio": round(quality(pl.hosts_used, lb), 4),
                            "us_per_decision": round(1e6 * pl.seconds / max(len(reqs), 1), 2),
                        }
                    )
            ctx.advance()
    ctx.stage("trace replay on a fixed cluster", total=jobs * len(names))
    for mix in p["mixes"]:
        for seed in p["seeds"]:
            tr = generate(int(p["trace_vms"]), seed=int(seed), mix=mix, dims=("cpu", "mem"), usage=False)
            roomy = [Host(f"h{i:03d}", cap) for i in range(max(int(p["trace_vms"]), 1))]
            mean_used = simulate(tr, roomy, SimConfig(heuristic="first-fit")).summary()["hosts_used_mean"]
            n_hosts = max(1, round(mean_used * float(p["trace_capacity"])))
            hosts = roomy[:n_hosts]
            for name in names:
                res = simulate(tr, hosts, SimConfig(heuristic=name))
                s = res.summary()
                sim_rows.append(
                    {
                        "mix": mix,
                        "seed": seed,
                        "heuristic": name,
                        "hosts": n_hosts,
                        "arrivals": s["arrivals"],
                        "rejected": s["rejected"],
                        "rejection_rate": round(s["rejection_rate"], 4),
                        "hosts_used_mean": round(s["hosts_used_mean"], 3),
                        "us_per_decision": round(s["us_per_decision"], 2),
                    }
                )
                ctx.advance()
    ctx.write_csv("packing.csv", rows)
    ctx.write_csv("trace_replay.csv", sim_rows)

    summary: dict[str, Any] = {}
    for name in names:
        for mode in ("batch", "online"):
            r = [x["ratio"] for x in rows if x["heuristic"] == name and x["mode"] == mode]
            summary[f"ratio_{mode}_{name}"] = round(float(np.mean(r)), 4)
        rr = [x["rejection_rate"] for x in sim_rows if x["heuristic"] == name]
        summary[f"rejection_{name}"] = round(float(np.mean(rr)), 4)
    best = min(names, key=lambda n: summary[f"ratio_batch_{n}"])
    summary["best_batch"] = best
    ctx.note(f"best batch heuristic: {best} (mean hosts/bound {summary[f'ratio_batch_{best}']})")

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(len(names))
    for k, mode in enumerate(("batch", "online")):
        axes[0].bar(x + (k - 0.5) * 0.4, [summary[f"ratio_{mode}_{n}"] for n in names], 0.4, label=mode)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylim(bottom=min(0.95, axes[0].get_ylim()[0]))
    axes[0].set_ylabel("hosts used / lower bound")
    axes[0].legend()
    axes[1].bar(x, [100 * summary[f"rejection_{n}"] for n in names], color="tab:red")
    axes[1].set_ylabel(f"rejected arrivals (%), cluster x{p['trace_capacity']} mean need")
    us = [np.mean([r["us_per_decision"] for r in sim_rows if r["heuristic"] == n]) for n in names]
    axes[2].bar(x, us, color="tab:gray")
    axes[2].set_ylabel("time per decision (us)")
    for ax in axes:
        ax.set_xticks(x, names, rotation=40, ha="right")
    fig.suptitle(f"placement heuristics, mixes {', '.join(p['mixes'])}, seeds {p['seeds']}")
    ctx.savefig(fig, "heuristics.png")
    return summary


@experiment(
    "placement-overcommit",
    "Effect of the CPU overcommit ratio on hosts used, rejections and overload-minutes when a trace "
    "is replayed (VMs use a fraction of what they are allocated).",
    params={
        "ratios": [1.0, 1.5, 2.0, 3.0, 4.0],
        "mem_ratio": 1.0,
        "n_vms": 300,
        "n_hosts": 4,
        "seed": 1,
        "heuristic": "best-fit",
        "burst_fraction": 0.1,
        "horizon": 1440.0,
    },
    param_help={
        "ratios": "CPU (and network) overcommit ratios to compare",
        "mem_ratio": "memory overcommit ratio (fixed)",
        "n_vms": "VMs in the trace",
        "n_hosts": "standard hosts (48 cores, 512 GiB, 25 Gbit/s)",
        "seed": "trace seed",
        "heuristic": "placement heuristic",
        "burst_fraction": "fraction of VMs with one CPU burst",
        "horizon": "trace length in minutes (arrivals in the first 75%)",
    },
)
def run_overcommit(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    heuristics.get(p["heuristic"])  # fail early on a typo
    tr = generate(
        int(p["n_vms"]),
        seed=int(p["seed"]),
        burst_fraction=float(p["burst_fraction"]),
        horizon=float(p["horizon"]),
    )
    rows: list[dict[str, Any]] = []
    series: dict[float, Any] = {}
    ctx.stage("replaying the trace per overcommit ratio", total=len(p["ratios"]))
    for ratio in p["ratios"]:
        ratio = float(ratio)
        hosts = standard_hosts(
            int(p["n_hosts"]), overcommit={"cpu": ratio, "net": ratio, "mem": float(p["mem_ratio"])}
        )
        res = simulate(tr, hosts, SimConfig(heuristic=p["heuristic"]))
        s = res.summary()
        rows.append(
            {
                "cpu_ratio": ratio,
                "mem_ratio": float(p["mem_ratio"]),
                "arrivals": s["arrivals"],
                "rejected": s["rejected"],
                "rejection_rate": round(s["rejection_rate"], 4),
                "hosts_used_mean": round(s["hosts_used_mean"], 3),
                "overload_minutes": s["overload_minutes"],
            }
        )
        series[ratio] = res
        ctx.advance()
    ctx.write_csv("overcommit.csv", rows)
    ts_rows = [{"cpu_ratio": r, **row} for r, res in series.items() for row in res.rows()]
    ctx.write_csv("overcommit_timeseries.csv", ts_rows)
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    xs = [r["cpu_ratio"] for r in rows]
    axes[0].plot(xs, [r["hosts_used_mean"] for r in rows], "o-")
    axes[0].set_ylabel("mean hosts used")
    axes[1].plot(xs, [100 * r["rejection_rate"] for r in rows], "o-", color="tab:red")
    axes[1].set_ylabel("rejected arrivals (%)")
    axes[2].plot(xs, [r["overload_minutes"] for r in rows], "o-", color="tab:orange")
    axes[2].set_ylabel("overload host-minutes")
    for ax in axes:
        ax.set_xlabel("CPU overcommit ratio")
    fig.suptitle(f"overcommit, {p['n_hosts']} hosts, {p['n_vms']} VMs, {p['heuristic']}")
    ctx.savefig(fig, "overcommit.png")
    for r in rows:
        ctx.note(
            f"ratio {r['cpu_ratio']:g}: rejected {100 * r['rejection_rate']:.1f}%, "
            f"overload {r['overload_minutes']:g} host-min"
        )
    return {"rows": rows}


@experiment(
    "placement-hotspots",
    "Sandpiper hotspot resolution in the simulator: overload-minutes and migrations with no detection, "
    "black-box and gray-box detection on an overcommitted cluster.",
    params={
        "n_vms": 300,
        "n_hosts": 12,
        "seed": 2,
        "cpu_ratio": 3.0,
        "mem_ratio": 2.0,
        "threshold": 0.8,
        "k": 2,
        "n": 3,
        "burst_fraction": 0.3,
        "heuristic": "best-fit",
        "horizon": 1440.0,
    },
    param_help={
        "n_vms": "VMs in the trace",
        "n_hosts": "standard hosts",
        "seed": "trace seed",
        "cpu_ratio": "CPU and network overcommit ratio",
        "mem_ratio": "memory overcommit ratio",
        "threshold": "hotspot threshold (fraction of physical capacity) for cpu, mem and net",
        "k": "a hotspot needs the threshold exceeded in k ...",
        "n": "... of the last n samples",
        "burst_fraction": "fraction of VMs with one CPU burst",
        "heuristic": "placement heuristic for arrivals",
        "horizon": "trace length in minutes (arrivals in the first 75%)",
    },
)
def run_hotspots(ctx: RunContext) -> dict[str, Any]:
    p = ctx.params
    try:
        hc = HotspotConfig(
            thresholds={d: float(p["threshold"]) for d in ("cpu", "mem", "net")}, k=int(p["k"]), n=int(p["n"])
        )
    except ValueError as exc:
        raise ExperimentError(str(exc)) from exc
    tr = generate(
        int(p["n_vms"]),
        seed=int(p["seed"]),
        burst_fraction=float(p["burst_fraction"]),
        horizon=float(p["horizon"]),
    )
    oc = {"cpu": float(p["cpu_ratio"]), "net": float(p["cpu_ratio"]), "mem": float(p["mem_ratio"])}
    hosts = standard_hosts(int(p["n_hosts"]), overcommit=oc)
    rows: list[dict[str, Any]] = []
    ts_rows: list[dict[str, Any]] = []
    moves: list[dict[str, Any]] = []
    results = {}
    ctx.stage("replaying with each detection mode", total=3)
    for det in ("off", "black-box", "gray-box"):
        t0 = time.perf_counter()
        res = simulate(tr, hosts, SimConfig(heuristic=p["heuristic"], detection=det, hotspot=hc))
        s = res.summary()
        rows.append(
            {
                "detection": det,
                "overload_minutes": s["overload_minutes"],
                "migrations": s["migrations"],
                "hosts_used_mean": round(s["hosts_used_mean"], 3),
                "rejected": s["rejected"],
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        ts_rows.extend({"detection": det, **r} for r in res.rows())
        moves.extend({"detection": det, "time": t, **m.to_dict()} for t, m in res.migrations)
        results[det] = res
        ctx.advance()
    ctx.write_csv("hotspots.csv", rows)
    ctx.write_csv("hotspots_timeseries.csv", ts_rows)
    ctx.write_csv(
        "migrations.csv",
        moves or [{"detection": "", "time": "", "vm": "", "from": "", "to": "", "reason": ""}],
    )
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(14, 4), gridspec_kw={"width_ratios": [3, 1]})
    for det, res in results.items():
        axes[0].step(res.times / 60, res.max_util, where="post", label=det, lw=1)
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0].axhline(float(p["threshold"]), color="gray", lw=0.8, ls=":")
    axes[0].set_xlabel("hours")
    axes[0].set_ylabel("max host utilisation (any resource)")
    axes[0].legend()
    x = np.arange(len(rows))
    axes[1].bar(x - 0.2, [r["overload_minutes"] for r in rows], 0.4, label="overload host-min")
    axes[1].bar(x + 0.2, [r["migrations"] for r in rows], 0.4, label="migrations")
    axes[1].set_xticks(x, [r["detection"] for r in rows])
    axes[1].legend()
    fig.suptitle(f"Sandpiper, {p['n_hosts']} hosts, overcommit cpu {p['cpu_ratio']} mem {p['mem_ratio']}")
    ctx.savefig(fig, "hotspots.png")
    for r in rows:
        ctx.note(
            f"{r['detection']}: overload {r['overload_minutes']:g} host-min, {r['migrations']} migrations"
        )
    return {r["detection"]: {k: v for k, v in r.items() if k != "detection"} for r in rows}


@experiment(
    "placement-standard-instances",
    "Every heuristic, with and without the improvement search, on standard bin-packing instances "
    "(Scholl-, Falkenauer- and 2-D-style, generated from the published recipes with fixed seeds): "
    "hosts used / optimum (or best lower bound) per class, against a textbook first-fit decreasing.",
    params={
        "source": "both",
        "per_class": 2,
        "families": ["all"],
        "heuristics": ["all"],
        "improve_time": 0.2,
        "seed": 0,
    },
    param_help={
        "source": "generated (seeded, incl. 2-D), bpplib (the stored Scholl/Falkenauer subset with published "
        "optima, benchmarks/instances/bpplib in a checkout), or both",
        "per_class": "generated instances per class (gen-scholl1..3, gen-falkenauer-u/t, vector-uniform/anticorrelated/triplets)",
        "families": "classes to run, or 'all'",
        "heuristics": "heuristic names, or 'all' (batch mode; ffd-sum alone is the textbook reference)",
        "improve_time": "seconds each improvement search may take",
        "seed": "instance generator seed",
    },
)
def run_standard_instances(ctx: RunContext) -> dict[str, Any]:
    from symbiont.placement.bound import quick_bound
    from symbiont.placement.traces import instance_hosts, load_bpplib, standard_instances

    p = ctx.params
    names = _heuristic_list(list(p["heuristics"]))
    if p["source"] not in ("generated", "bpplib", "both"):
        raise ExperimentError(f"source {p['source']!r}: expected generated, bpplib or both")
    insts = []
    if p["source"] in ("generated", "both"):
        insts += standard_instances(per_class=int(p["per_class"]), seed=int(p["seed"]))
    if p["source"] in ("bpplib", "both"):
        if not BPPLIB.is_dir():
            raise ExperimentError(
                f"{BPPLIB}: the stored instances are only in a source checkout; use source=generated"
            )
        insts += [i for i in load_bpplib(BPPLIB)]
    known = sorted({i.family for i in insts})
    fams = known if list(p["families"]) in (["all"], []) else list(p["families"])
    for f in fams:
        if f not in known:
            raise ExperimentError(f"unknown family {f!r}; known: {', '.join(known)}")
    insts = [i for i in insts if i.family in fams]
    rows: list[dict[str, Any]] = []
    ctx.stage("instances", total=len(insts))
    for inst in insts:
        hosts, reqs = instance_hosts(inst)
        lb = quick_bound(inst.sizes, np.tile(inst.capacity, (len(hosts), 1))).value
        ref = inst.optimum if inst.optimum is not None else lb  # BPPLIB: published optimum
        for name in names:
            for imp in (False, True):
                t0 = time.perf_counter()
                pl = plan(hosts, reqs, name, "batch", improve=imp, improve_time=float(p["improve_time"]))
                rows.append(
                    {
                        "instance": inst.name,
                        "family": inst.family,
                        "items": len(reqs),
                        "heuristic": name,
                        "improve": imp,
                        "hosts_used": pl.hosts_used,
                        "reference": ref,
                        "reference_kind": "optimum" if inst.optimum is not None else "lower bound",
                        "ratio": round(pl.hosts_used / ref, 4),
                        "seconds": round(time.perf_counter() - t0, 4),
                    }
                )
        ctx.advance()
    ctx.write_csv("instances.csv", rows)
    summary: dict[str, Any] = {}
    for f in fams:
        for imp in (False, True):
            for name in names:
                r = [
                    x["ratio"]
                    for x in rows
                    if x["family"] == f and x["heuristic"] == name and x["improve"] == imp
                ]
                summary[f"{f}/{name}{'+improve' if imp else ''}"] = round(float(np.mean(r)), 4)
    best_plain = {f: min(summary[f"{f}/{n}"] for n in names) for f in fams}
    best_imp = {f: min(summary[f"{f}/{n}+improve"] for n in names) for f in fams}
    for f in fams:
        ctx.note(f"{f}: best heuristic alone {best_plain[f]}, with improvement {best_imp[f]}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(fams) + 3), 4.5))
    x = np.arange(len(fams))
    ref_name = "ffd-sum" if "ffd-sum" in names else names[0]
    bars = [
        (f"{ref_name} (textbook)", [summary[f"{f}/{ref_name}"] for f in fams]),
        ("best heuristic alone", [best_plain[f] for f in fams]),
        ("best with improvement", [best_imp[f] for f in fams]),
    ]
    for k, (label, vals) in enumerate(bars):
        ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylim(0.98, max(1.05, max(max(v) for _, v in bars) + 0.02))
    ax.set_ylabel("hosts used / optimum (or lower bound)")
    ax.set_xticks(x, fams, rotation=30, ha="right")
    ax.legend()
    fig.suptitle(f"standard instances, {int(p['per_class'])} per class, improvement {p['improve_time']} s")
    ctx.savefig(fig, "standard_instances.png")
    return summary
