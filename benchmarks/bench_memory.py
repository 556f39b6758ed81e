"""Memory policy: evaluation time for N VMs, and reaction time from guest pressure to balloon.

1. Policy time: :func:`symbiont.memory.policy.decide` on N random VMs (10 % under pressure,
   KSM-shared fractions 0.5–1, the host 10 % over budget), median of --repeat runs.
   Baseline in the same run: computing every VM's ρ and sorting the VMs by it in plain
   Python — the least any "take from the lowest ρ" step must do.
2. --reaction (root; boots 2 real VMs): a guest starts a memory hog; the number of control
   periods from the first stored stats sample showing pressure to the daemon's first grant.

    .venv/bin/python benchmarks/bench_memory.py --vms 10 100 1000
    .venv/bin/python benchmarks/bench_memory.py --reaction --runs 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import _common

from symbiont.memory.policy import HostMemory, VmMemory, decide, shares_per_page


def random_vms(n: int, rng: random.Random) -> list[VmMemory]:
    return [
        VmMemory(f"vm{i}", rng.randint(500, 2000), rng.choice([1024, 2048, 4096]), rng.random(), 256, 8192, 0.75,
                 rng.randint(100, 800), rng.random() < 0.1, rng.choice([1.0, 0.8, 0.5]))
        for i in range(n)
    ]


def policy_time(sizes: list[int], repeat: int) -> None:
    rng = random.Random(1)
    print(f"{'VMs':>6} {'decide p50':>12} {'p90':>10} {'baseline p50':>14} {'ratio':>7}")
    for n in sizes:
        vms = random_vms(n, rng)
        occ = sum(v.allocated_mib * v.unshared_fraction for v in vms)
        host = HostMemory(budget_mib=occ * 0.9, free_target_mib=0, max_step_mib=256)
        t_dec, t_base = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            decide(vms, host)
            t_dec.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sorted(vms, key=lambda v: shares_per_page(v.shares, v.allocated_mib, v.active_fraction, v.tax_rate))
            t_base.append(time.perf_counter() - t0)
        d, b = statistics.median(t_dec), statistics.median(t_base)
        print(f"{n:>6} {1000 * d:>10.2f}ms {1000 * _common.pct(t_dec, 0.9):>8.2f}ms {1000 * b:>12.3f}ms {d / b:>6.1f}x")


def reaction_once(period: float) -> tuple[float, float]:
    """Boot 2 VMs, start a hog in one; return (seconds to first pressure sample, periods to grant)."""
    from symbiont_research.experiments.memory import HOG
    from symbiont_research.lab.session import LabSession
    from tests.vm.test_memory import _first_pressure_sample, run_in_background

    with LabSession(count=2, prefix="symbiont-benchmem-", period_s=period, memory_mib=512,
                    daemon_overrides={"memory": {"enabled": True, "budget_mib": 800}}) as lab:
        hungry = lab.names[0]
        with lab.client() as c:
            lab.wait_for(lambda: c.get("/v1/memory")["periods"] >= 3, 60, "policy running")
            c.put("/v1/memory/policy", {"budget_mib": int(c.get("/v1/memory")["host"]["occupied_mib"])})
            time.sleep(2 * period)
            t_start = time.time()
            run_in_background(lab, hungry, HOG, "hog")
            first = lab.wait_for(lambda: _first_pressure_sample(lab, hungry, t_start), 180, "pressure")

            def grant() -> float | None:
                for d in c.get("/v1/decisions", vm=hungry, limit=1000):
                    if (d["part"] == "memory" and d["action"] == "policy" and d["ts"] >= first
                            and d["outcome"]["target_mib"] > d["outcome"]["before_mib"]):
                        return d["ts"]
                return None

            g = lab.wait_for(grant, 60, "grant")
    return first - t_start, (g - first) / period


def reaction(runs: int, period: float) -> None:
    results = []
    for run in range(runs):
        to_pressure, periods = reaction_once(period)
        results.append(periods)
        print(f"run {run}: pressure first stored {to_pressure:.1f}s after the hog started; "
              f"first grant {periods:.2f} control periods later (period {period}s)", flush=True)
    print(f"reaction: median {statistics.median(results):.2f} periods over {runs} runs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--reaction", action="store_true")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--period", type=float, default=2.0)
    args = ap.parse_args()
    if args.reaction:
        reaction(args.runs, args.period)
    else:
        policy_time(args.vms, args.repeat)


if __name__ == "__main__":
    main()
