"""CPU-and-nesting benchmark: vCPU scale-step latency to ratios in force, container start time.

    .venv/bin/python benchmarks/bench_cpu.py            # one lab VM, about 4 minutes under TCG
    .venv/bin/python benchmarks/bench_cpu.py --quick    # policy only (no VM), seconds

1. Policy speed (pure functions, no VM): ``cpu_plan`` and ``reclaim_plan`` for 3..64 containers.
2. Container start (needs root + libvirt; boots one VM): ``POST /v1/cpu/vms/VM/containers`` for a
   command that prints a marker, timed to the API's answer (process spawned in its cgroup and
   namespaces) and to the marker appearing in the container's log (the command runs).
3. vCPU scale step: three ratio-managed (1:1:4) CPU-bound containers, the VM scaled
   4 -> 3 -> 2 -> 1 -> 2 -> 3 -> 4 ``--rounds`` times through ``PUT /v1/cpu/vms/VM/vcpus``;
   per step, the API call's wall time and ``ratios_in_force_s`` (from the call to the agent
   reporting the new plan applied), split by direction.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

from symbiont.cpu import policy

BURN = ["sh", "-c", "i=0; while [ $i -lt 4 ]; do (while :; do :; done) & i=$((i+1)); done; wait"]


def stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "mean": round(statistics.fmean(xs), 4), "median": round(statistics.median(xs), 4),
            "p90": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 4), "max": round(xs[-1], 4)}


def bench_policy() -> list[dict[str, Any]]:
    out = []
    for n in (3, 16, 64):
        ratios = {f"c{i}": 1 + i % 5 for i in range(n)}
        views = [policy.MemView(f"c{i}", (50 + 7 * i) << 20, 1 + i % 4, i % 7 == 0) for i in range(n)]
        reps = 200
        t0 = time.perf_counter()
        for k in range(reps):
            policy.cpu_plan(list(range(1 + k % 64)), ratios)
        cpu_us = (time.perf_counter() - t0) / reps * 1e6
        t0 = time.perf_counter()
        for k in range(reps):
            policy.reclaim_plan(views, (k + 1) << 22)
        mem_us = (time.perf_counter() - t0) / reps * 1e6
        out.append({"containers": n, "cpu_plan_us": round(cpu_us, 1), "reclaim_plan_us": round(mem_us, 1)})
    return out


def bench_vm(rounds: int, starts: int) -> dict[str, Any]:
    from symbiont_research.lab.session import LabSession

    with LabSession(count=1, prefix="symbiont-ct-bench-", period_s=2.0, memory_mib=512, max_vcpus=4,
                    daemon_overrides={"control": {"agent_timeout_s": 15.0}}) as lab:
        vm = lab.names[0]
        lab.wait_for(lambda: lab.client().get(f"/v1/vms/{vm}")["cooperative"], 120, "agent cooperative")

        def api(method: str, path: str, body: Any = None) -> Any:
            with lab.client() as c:
                return c.call(method, f"/v1/cpu/vms/{vm}{path}", json=body)

        # Container start time.
        answer, running = [], []
        for i in range(starts):
            name = f"s{i}"
            t0 = time.perf_counter()
            api("POST", "/containers", {"name": name, "command": ["sh", "-c", "echo ready; exec sleep 1000"]})
            answer.append(time.perf_counter() - t0)
            while "ready" not in api("GET", f"/containers/{name}/logs")["tail"]:
                time.sleep(0.01)
            running.append(time.perf_counter() - t0)
            api("DELETE", f"/containers/{name}")
        # Scale steps with 1:1:4 containers.
        api("PUT", "/vcpus", {"count": 4})
        for name, r in (("c1", 1), ("c2", 1), ("c3", 4)):
            api("POST", "/containers", {"name": name, "command": BURN, "limits": {"cpu_ratio": r}})
        steps: dict[str, list[dict[str, float]]] = {"down": [], "up": []}
        for _ in range(rounds):
            for count in (3, 2, 1, 2, 3, 4):
                t0 = time.perf_counter()
                r = api("PUT", "/vcpus", {"count": count})
                wall = time.perf_counter() - t0
                steps[r["step"]["direction"]].append({"wall": wall, **r["timings"]})
        for name in ("c1", "c2", "c3"):
            api("DELETE", f"/containers/{name}")
        return {
            "boot_s": round(lab.boot_seconds[vm], 1),
            "container_start_api_s": stats(answer),
            "container_start_to_running_s": stats(running),
            **{f"scale_{d}_api_wall_s": stats([s["wall"] for s in v]) for d, v in steps.items() if v},
            **{f"scale_{d}_ratios_in_force_s": stats([s["ratios_in_force_s"] for s in v])
               for d, v in steps.items() if v},
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="policy only, no VM")
    ap.add_argument("--rounds", type=int, default=3, help="4->1->4 scale rounds")
    ap.add_argument("--starts", type=int, default=10, help="container starts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(), "policy": bench_policy()}
    if not args.quick:
        result["vm"] = bench_vm(args.rounds, args.starts)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("policy (pure functions, microseconds per call):")
    for row in result["policy"]:
        print(f"  {row['containers']:>3} containers: cpu_plan {row['cpu_plan_us']:8.1f}  "
              f"reclaim_plan {row['reclaim_plan_us']:8.1f}")
    for k, v in result.get("vm", {}).items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
