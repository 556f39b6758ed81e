"""Placement on standard bin-packing instances: plain FFD vs every heuristic, with and without the
improvement search, as a ratio to the optimum (or the best lower bound), per class; and scaling.

    .venv/bin/python benchmarks/bench_placement_instances.py              # ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_placement_instances.py --quick      # 1 instance per class
    .venv/bin/python benchmarks/bench_placement_instances.py --scale-only

Instances: ``symbiont.placement.traces.standard_instances`` (Scholl bin1/bin2/bin3-style,
Falkenauer u/t, 2-D uniform/anticorrelated/triplets), generated with fixed seeds from the
published recipes; triplets have their optimum by construction. ``ref`` is the optimum where known,
else the best lower bound (volume, Martello-Toth L2, conflict clique, and the MILP under
``--milp`` seconds), so a ratio is an upper estimate of the distance from optimal. ``best`` is the
best plan any method found in this run.

Scaling: 10,000 VMs x 1,000 hosts (the Azure-like mix of bench_placement.py, cpu/mem/net) up to
100,000 x 10,000: the plan without and with the improvement search (its time limit is the knob).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
from _common import ROOT

from symbiont.placement import heuristics
from symbiont.placement.bound import lower_bound, quick_bound
from symbiont.placement.model import Host, Request
from symbiont.placement.planner import plan
from symbiont.placement.traces import instance_hosts, load_bpplib, sizes, standard_hosts, standard_instances

DIMS = ("cpu", "mem", "net")


def run_instances(
    insts: list, improve_time: float, milp_s: float, names: list[str]
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for inst in insts:
        hosts, reqs = instance_hosts(inst)
        eff = np.tile(inst.capacity, (len(hosts), 1))
        qb = quick_bound(inst.sizes, eff).value
        lb = lower_bound(inst.sizes, eff, time_limit=milp_s).value if milp_s > 0 else qb
        ref = inst.optimum if inst.optimum is not None else lb
        res: dict[str, int] = {}
        secs: dict[str, float] = {}
        for name in names:
            for imp in (False, True):
                key = f"{name}{'+improve' if imp else ''}"
                t = time.perf_counter()
                p = plan(hosts, reqs, name, "batch", improve=imp, improve_time=improve_time)
                secs[key] = time.perf_counter() - t
                assert not p.rejected, (inst.name, key)
                res[key] = p.hosts_used
        best = min(res.values())
        rows.append(
            {"name": inst.name, "family": inst.family, "n": len(reqs), "ref": ref, "known_optimum": inst.optimum,
             "quick_bound": qb, "bound": lb, "best": best, "hosts": res, "seconds": secs}
        )  # fmt: skip
        print(f"  {inst.name:34s} ref {ref:4d} ffd {res['ffd-sum']:4d} best {best:4d}", flush=True)
    return rows


def report_instances(rows: list[dict[str, object]]) -> None:
    methods = list(rows[0]["hosts"])  # type: ignore[arg-type]
    fams = list(dict.fromkeys(str(r["family"]) for r in rows))
    print("\nmean hosts / ref per class (ref = optimum where known, else the best lower bound)")
    print(f"{'method':26s}" + "".join(f"{f[:12]:>13s}" for f in fams) + f"{'all':>8s}")
    for m in ["ffd-sum"] + [x for x in methods if x != "ffd-sum"]:
        line = f"{m:26s}"
        allr = []
        for f in fams:
            rs = [r["hosts"][m] / r["ref"] for r in rows if r["family"] == f]  # type: ignore[index,operator]
            allr += rs
            line += f"{statistics.fmean(rs):13.4f}"
        print(line + f"{statistics.fmean(allr):8.4f}")
    line = f"{'best of all':26s}"
    for f in fams:
        line += f"{statistics.fmean([r['best'] / r['ref'] for r in rows if r['family'] == f]):13.4f}"  # type: ignore[operator]
    print(line)
    print("\nproven optimal (best == ref) per class: " + ", ".join(
        f"{f} {sum(1 for r in rows if r['family'] == f and r['best'] == r['ref'])}/"
        f"{sum(1 for r in rows if r['family'] == f)}" for f in fams))  # fmt: skip
    print("mean seconds per plan, batch: " + ", ".join(
        f"{m} {statistics.fmean(r['seconds'][m] for r in rows):.3f}" for m in ("ffd-sum", "ffd-sum+improve")))  # type: ignore[index]  # fmt: skip


def scaling(points: list[tuple[int, int]], improve_time: float) -> None:
    print(f"\nscaling (azure mix, {','.join(DIMS)}; standard hosts), improve time limit {improve_time:g} s")
    print(
        f"{'VMs x hosts':>18s} {'heuristic':>10s} {'plan s':>8s} {'+improve s':>11s} {'hosts':>7s} {'improved':>9s} {'bound':>6s}"
    )
    for n_vms, n_hosts in points:
        dem = sizes(n_vms, np.random.default_rng(0), "azure", DIMS)
        reqs = [Request(f"v{i}", dict(zip(DIMS, row.tolist(), strict=True))) for i, row in enumerate(dem)]
        hosts = standard_hosts(n_hosts, DIMS)
        eff = np.array([[h.capacity[d] for d in DIMS] for h in hosts])
        qb = quick_bound(dem, eff).value
        for name in ("ffd-sum", "best-fit"):
            t = time.perf_counter()
            p = plan(hosts, reqs, name, "batch")
            t_plain = time.perf_counter() - t
            t = time.perf_counter()
            q = plan(hosts, reqs, name, "batch", improve=True, improve_time=improve_time)
            t_imp = time.perf_counter() - t
            print(f"{n_vms:>8,d} x {n_hosts:<7,d} {name:>10s} {t_plain:8.2f} {t_imp:11.2f} {p.hosts_used:7d} "
                  f"{q.hosts_used:9d} {qb:6d}", flush=True)  # fmt: skip


def scaling_search(points: list[int], improve_time: float) -> None:
    """Where the search has work to do: 1-D, w ~ U[20, 100] on hosts of 150 (Falkenauer's u recipe)."""
    print(f"\nsearch scaling, 1-D u-class (w ~ U[20,100], C = 150), improve time limit {improve_time:g} s")
    print(
        f"{'VMs x hosts':>18s} {'ffd s':>7s} {'+improve s':>11s} {'ffd hosts':>10s} {'improved':>9s} {'L2 bound':>9s}"
    )
    for n in points:
        w = np.random.default_rng(1).integers(20, 101, n).astype(float)
        n_hosts = n // 2
        hosts = [Host(f"h{i}", {"cpu": 150.0}) for i in range(n_hosts)]
        reqs = [Request(f"v{i}", {"cpu": float(x)}) for i, x in enumerate(w)]
        lb = quick_bound(w[:, None], np.full((1, 1), 150.0)).value
        t = time.perf_counter()
        p = plan(hosts, reqs, "ffd-sum", "batch")
        t_plain = time.perf_counter() - t
        t = time.perf_counter()
        q = plan(hosts, reqs, "ffd-sum", "batch", improve=True, improve_time=improve_time)
        t_imp = time.perf_counter() - t
        print(f"{n:>8,d} x {n_hosts:<7,d} {t_plain:7.2f} {t_imp:11.2f} {p.hosts_used:10d} {q.hosts_used:9d} {lb:9d}",
              flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--improve-time", type=float, default=1.0, help="seconds per improvement search")
    ap.add_argument("--milp", type=float, default=0.0, help="seconds of MILP for the bound (0: cheap bounds)")
    ap.add_argument("--scale-only", action="store_true")
    ap.add_argument("--bpplib", default=str(ROOT / "benchmarks" / "instances" / "bpplib"),
                    help="folder of BPPLIB instances with optima.tsv ('' to skip)")  # fmt: skip
    ap.add_argument("--no-generated", action="store_true", help="skip the generated (2-D and 1-D) instances")
    ap.add_argument("--heuristics", default="all", help="comma-separated names, or all")
    ap.add_argument("--no-scale", action="store_true")
    args = ap.parse_args()
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    names = list(heuristics.HEURISTICS) if args.heuristics == "all" else args.heuristics.split(",")
    if "ffd-sum" not in names:
        names.insert(0, "ffd-sum")
    if not args.scale_only:
        if args.bpplib:
            insts = load_bpplib(args.bpplib)
            if args.quick:
                insts = insts[::10]
            print(f"\nBPPLIB instances from {args.bpplib} ({len(insts)}; ref = published optimum)")
            report_instances(run_instances(insts, args.improve_time, args.milp, names))
        if not args.no_generated:
            gen = standard_instances(per_class=1 if args.quick else args.per_class)
            print(f"\ngenerated instances ({len(gen)})")
            report_instances(run_instances(gen, args.improve_time, args.milp, names))
    if not args.no_scale:
        pts = (
            [(10_000, 1_000), (30_000, 3_000)]
            if args.quick
            else [(10_000, 1_000), (30_000, 3_000), (100_000, 10_000)]
        )
        scaling(pts, args.improve_time)
        scaling_search([10_000, 30_000] if args.quick else [10_000, 30_000, 100_000], args.improve_time)


if __name__ == "__main__":
    main()
