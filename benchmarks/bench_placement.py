"""Placement benchmark: decision speed at scale and packing quality against a lower bound.

    .venv/bin/python benchmarks/bench_placement.py            # full run (about a minute on 2 cores)
    .venv/bin/python benchmarks/bench_placement.py --quick    # smaller, for a smoke test

1. Scale: 10,000 VMs (Azure-like size mix, cpu/mem/net) onto 1,000 standard hosts (48 cores,
   512 GiB, 25 Gbit/s), every heuristic, online and batch. Time is the whole ``plan()`` call
   (validation, sorting, decisions); target < 1 s per heuristic. Quality vs the volume bound
   (the instance is far too large for the LP).
2. Quality on the standard traces: for each size mix (azure, uniform, anticorrelated) and seeds
   0-2, 500 VMs onto hosts of 32 cores / 128 GiB, lower bound by LP relaxation (or MILP/volume
   where that is tighter or cheaper). Reports mean hosts used / lower bound per heuristic and mode,
   alone and followed by the improvement search (symbiont.placement.improve, 1 s limit).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from symbiont.placement import heuristics
from symbiont.placement.bound import lower_bound, quality, volume_bound
from symbiont.placement.model import Host, Request
from symbiont.placement.planner import plan
from symbiont.placement.traces import MIXES, sizes, standard_hosts

DIMS = ("cpu", "mem", "net")


def requests_from(dem: np.ndarray, dims: tuple[str, ...]) -> list[Request]:
    return [Request(f"v{i}", dict(zip(dims, row.tolist(), strict=True))) for i, row in enumerate(dem)]


def scale(n_vms: int, n_hosts: int, seed: int) -> list[dict[str, object]]:
    dem = sizes(n_vms, np.random.default_rng(seed), "azure", DIMS)
    reqs = requests_from(dem, DIMS)
    hosts = standard_hosts(n_hosts, DIMS)
    eff = np.array([[h.capacity[d] for d in DIMS] for h in hosts])
    vol = volume_bound(dem, eff)
    out = []
    for name in heuristics.HEURISTICS:
        for mode in ("online", "batch"):
            t0 = time.perf_counter()
            p = plan(hosts, reqs, name, mode)
            total = time.perf_counter() - t0
            out.append(
                {
                    "heuristic": name,
                    "mode": mode,
                    "total_s": total,
                    "decide_s": p.seconds,
                    "decisions_per_s": len(reqs) / p.seconds,
                    "placed": len(p.placements),
                    "hosts_used": p.hosts_used,
                    "bound": vol,
                    "ratio": quality(p.hosts_used, vol),
                }
            )
    return out


def standard_quality(
    n_vms: int, seeds: list[int], time_limit: float
) -> tuple[list[dict[str, object]], list[str]]:
    cap = {"cpu": 32.0, "mem": 128.0}
    rows: list[dict[str, object]] = []
    bounds: list[str] = []
    for mix in MIXES:
        for seed in seeds:
            dem = sizes(n_vms, np.random.default_rng(seed), mix, ("cpu", "mem"))
            reqs = requests_from(dem, ("cpu", "mem"))
            hosts = [Host(f"h{i:03d}", cap) for i in range(n_vms)]
            eff = np.tile([cap["cpu"], cap["mem"]], (n_vms, 1))
            lb = lower_bound(dem, eff, time_limit=time_limit, lp_max_vars=60_000)
            bounds.append(
                f"{mix} seed {seed}: bound {lb.value} ({lb.method}{', optimal' if lb.optimal else ''})"
            )
            for name in heuristics.HEURISTICS:
                for mode in ("online", "batch"):
                    for improve in (False, True):
                        t0 = time.perf_counter()
                        p = plan(hosts, reqs, name, mode, improve=improve)
                        assert len(p.placements) == n_vms, "every VM fits a 32/128 host"
                        rows.append(
                            {
                                "mix": mix,
                                "seed": seed,
                                "heuristic": name,
                                "mode": mode + ("+impr" if improve else ""),
                                "hosts_used": p.hosts_used,
                                "bound": lb.value,
                                "ratio": quality(p.hosts_used, lb),
                                "seconds": time.perf_counter() - t0,
                            }
                        )
    return rows, bounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 VMs onto 100 hosts; 150-VM quality instances")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    n_vms, n_hosts = (1_000, 100) if args.quick else (10_000, 1_000)
    q_vms, seeds = (150, [0]) if args.quick else (500, [0, 1, 2])
    print(
        f"placement benchmark on {platform.processor() or platform.machine()}, python {platform.python_version()}, "
        f"numpy {np.__version__}"
    )

    print(f"\n1. scale: {n_vms:,} VMs (azure mix; cpu, mem, net) onto {n_hosts:,} standard hosts")
    rows = scale(n_vms, n_hosts, args.seed)
    print(
        f"{'heuristic':<14} {'mode':<7} {'total s':>8} {'decide s':>9} {'decisions/s':>12} {'placed':>7} "
        f"{'hosts':>6} {'bound':>6} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['heuristic']:<14} {r['mode']:<7} {r['total_s']:>8.3f} {r['decide_s']:>9.3f} "
            f"{r['decisions_per_s']:>12,.0f} {r['placed']:>7} {r['hosts_used']:>6} {r['bound']:>6} {r['ratio']:>6.3f}"
        )
    worst = max(rows, key=lambda r: r["total_s"])
    print(
        f"slowest: {worst['heuristic']} {worst['mode']} {worst['total_s']:.3f} s "
        f"({'meets' if worst['total_s'] < 1.0 else 'MISSES'} the < 1 s target)"
    )

    print(
        f"\n2. quality on the standard traces: {q_vms} VMs onto 32-core/128-GiB hosts, mixes "
        f"{', '.join(MIXES)}, seeds {seeds}"
    )
    qrows, bounds = standard_quality(q_vms, seeds, time_limit=10.0)
    for b in bounds:
        print("  " + b)
    for modes, title in (
        (("online", "batch"), "heuristic alone"),
        (("online+impr", "batch+impr"), "+ improvement search"),
    ):
        print(f"  {title}:")
        _quality_table(qrows, modes)
    for mix in MIXES:
        best = min(
            ((r["heuristic"], r["mode"]) for r in qrows if r["mix"] == mix),
            key=lambda hm: np.mean(
                [r["ratio"] for r in qrows if r["mix"] == mix and (r["heuristic"], r["mode"]) == hm]
            ),
        )
        v = np.mean([r["ratio"] for r in qrows if r["mix"] == mix and (r["heuristic"], r["mode"]) == best])
        t = max(r["seconds"] for r in qrows if r["mix"] == mix and (r["heuristic"], r["mode"]) == best)
        print(
            f"best on {mix}: {best[0]} ({best[1]}), hosts used / bound = {v:.3f} "
            f"({'within' if v <= 1.05 else 'NOT within'} 5%), plan() at most {t:.3f} s"
        )


def _quality_table(qrows: list[dict[str, object]], modes: tuple[str, str]) -> None:
    print(
        f"{'heuristic':<14} "
        + " ".join(f"{m[:10] + ' ' + mode[:3]:>15}" for m in MIXES for mode in modes)
        + f" {'mean':>7}"
    )
    for name in heuristics.HEURISTICS:
        cells = []
        vals = []
        for mix in MIXES:
            for mode in modes:
                v = float(
                    np.mean(
                        [
                            r["ratio"]
                            for r in qrows
                            if r["heuristic"] == name and r["mix"] == mix and r["mode"] == mode
                        ]
                    )
                )
                cells.append(f"{v:>15.3f}")
                vals.append(v)
        print(f"{name:<14} " + " ".join(cells) + f" {float(np.mean(vals)):>7.3f}")


if __name__ == "__main__":
    main()
